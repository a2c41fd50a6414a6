"""The implicit-differentiation mechanism (diffsim.core.implicit) on spring networks at static
equilibrium: gradients against finite differences and against a fully taped, unrolled Newton
solve, composition with an outer tape, and a clear error when Newton does not converge."""

import numpy as np
import pytest
import warp as wp

from diffsim.core.implicit import ImplicitSolve, NotConverged


@wp.func
def _node(x: wp.array(dtype=wp.vec3), anchors: wp.array(dtype=wp.vec3), i: int, free: int):
    if i < free:
        return x[i]
    return anchors[i - free]


@wp.kernel
def spring_gradient(x: wp.array(dtype=wp.vec3), anchors: wp.array(dtype=wp.vec3), springs: wp.array(dtype=wp.vec2i),
                    stiffness: wp.array(dtype=float), rest: wp.array(dtype=float), free: int,
                    out: wp.array(dtype=wp.vec3)):
    """dE/dx of E = sum k/2 (|x_j - x_i| - L)^2 over springs (free nodes only)."""
    s = wp.tid()
    i = springs[s][0]
    j = springs[s][1]
    d = _node(x, anchors, j, free) - _node(x, anchors, i, free)
    length = wp.length(d)
    f = stiffness[s] * (length - rest[s]) * d / length
    if i < free:
        wp.atomic_add(out, i, -f)
    if j < free:
        wp.atomic_add(out, j, f)


@wp.kernel
def weight_gradient(weight: wp.array(dtype=wp.vec3), out: wp.array(dtype=wp.vec3)):
    """d/dx of -w . x: the node's weight pulls it along w."""
    i = wp.tid()
    out[i] = out[i] - weight[i]


@wp.kernel
def spring_energy(x: wp.array(dtype=wp.vec3), anchors: wp.array(dtype=wp.vec3), springs: wp.array(dtype=wp.vec2i),
                  stiffness: wp.array(dtype=float), rest: wp.array(dtype=float), free: int,
                  energy: wp.array(dtype=float)):
    s = wp.tid()
    d = _node(x, anchors, springs[s][1], free) - _node(x, anchors, springs[s][0], free)
    stretch = wp.length(d) - rest[s]
    wp.atomic_add(energy, 0, 0.5 * stiffness[s] * stretch * stretch)


@wp.kernel
def weight_energy(x: wp.array(dtype=wp.vec3), weight: wp.array(dtype=wp.vec3), energy: wp.array(dtype=float)):
    i = wp.tid()
    wp.atomic_add(energy, 0, -wp.dot(weight[i], x[i]))


@wp.kernel
def linear_loss(x: wp.array(dtype=wp.vec3), w: wp.array(dtype=wp.vec3), loss: wp.array(dtype=float)):
    i = wp.tid()
    wp.atomic_add(loss, 0, wp.dot(w[i], x[i]))


class Net:
    """A hanging net: ``free`` nodes joined in a chain between two anchors, plus one spring from
    each node to a third anchor above, all under gravity. Rest lengths are short enough that every
    spring stays stretched, where its energy is convex: one equilibrium, which finite
    differences cannot jump away from."""

    def __init__(self, free: int = 6, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.free = free
        self.anchors = wp.array(np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0.3, 0.4]], np.float32),
                                dtype=wp.vec3)
        a0, a1, top = free, free + 1, free + 2
        chain = [(a0, 0)] + [(i, i + 1) for i in range(free - 1)] + [(free - 1, a1)]
        springs = chain + [(i, top) for i in range(free)]
        self.springs = wp.array(np.array(springs, np.int32), dtype=wp.vec2i)
        n = len(springs)
        self.stiffness = wp.array(rng.uniform(80.0, 120.0, n).astype(np.float32), requires_grad=True)
        self.rest = wp.array(rng.uniform(0.04, 0.07, n).astype(np.float32), requires_grad=True)
        weights = np.tile([0.0, 0.0, -1.0], (free, 1)) * rng.uniform(0.5, 1.5, (free, 1))  # [N]
        self.weight = wp.array(weights.astype(np.float32), dtype=wp.vec3, requires_grad=True)
        t = np.linspace(0, 1, free + 2)[1:-1]
        self.x0 = np.stack([t, np.zeros(free), -0.05 * np.ones(free)], axis=1).astype(np.float32)
        self.loss_weights = wp.array(rng.standard_normal((free, 3)).astype(np.float32), dtype=wp.vec3)

    def residual(self, x, out):
        out.zero_()
        wp.launch(spring_gradient, self.springs.shape[0],
                  [x, self.anchors, self.springs, self.stiffness, self.rest, self.free], [out])
        wp.launch(weight_gradient, self.free, [self.weight], [out])

    def energy(self, x) -> float:
        e = wp.zeros(1, dtype=float)
        wp.launch(spring_energy, self.springs.shape[0],
                  [x, self.anchors, self.springs, self.stiffness, self.rest, self.free], [e])
        wp.launch(weight_energy, self.free, [x, self.weight], [e])
        return float(e.numpy()[0])

    def solver(self, **options) -> ImplicitSolve:
        return ImplicitSolve(self.residual, energy=self.energy,
                             tolerance=options.pop("tolerance", 2e-5), name="spring net equilibrium", **options)

    def loss(self, x) -> wp.array:
        loss = wp.zeros(1, dtype=float, requires_grad=True)
        wp.launch(linear_loss, self.free, [x, self.loss_weights], [loss])
        return loss

    def equilibrium_loss(self) -> float:
        x = wp.array(self.x0, dtype=wp.vec3)
        self.solver().solve(x)
        return float(self.loss(x).numpy()[0])


def implicit_gradients(net: Net):
    for p in (net.stiffness, net.rest, net.weight):
        p.grad.zero_()
    x = wp.array(net.x0, dtype=wp.vec3, requires_grad=True)
    tape = wp.Tape()
    solve = net.solver()
    with tape:
        solve.solve(x)
        loss = net.loss(x)
    tape.backward(loss)
    return {name: p.grad.numpy().astype(np.float64).copy()
            for name, p in (("stiffness", net.stiffness), ("rest", net.rest), ("weight", net.weight))}, solve


def test_equilibrium_balances_forces_and_reports_iterations():
    net = Net()
    x = wp.array(net.x0, dtype=wp.vec3)
    report = net.solver().solve(x)
    r = wp.zeros_like(x)
    net.residual(x, r)
    assert np.abs(r.numpy()).max() <= 2e-5
    assert report.residual <= 2e-5 and 1 <= report.newton_iterations <= 30 and report.cg_iterations >= 1


@pytest.mark.parametrize("param", ["stiffness", "rest", "weight"])
def test_implicit_gradient_matches_finite_differences(param):
    net = Net()
    grads, solve = implicit_gradients(net)
    assert solve.report.adjoint_cg_iterations >= 1
    array = getattr(net, param)
    base = array.numpy().copy()
    rng = np.random.default_rng(1)
    # relative steps: a coherent change of every entry, and a random one
    for direction in (base, base * rng.standard_normal(base.shape)):
        eps = 1e-2
        values = []
        for sign in (1.0, -1.0):
            array.assign((base + sign * eps * direction).astype(np.float32))
            values.append(net.equilibrium_loss())
        array.assign(base)
        fd = (values[0] - values[1]) / (2 * eps)
        tape = float(np.sum(grads[param] * direction))
        assert abs(fd - tape) <= 0.02 * max(abs(fd), abs(tape)), (param, fd, tape)


# -- a fully taped Newton solve of one node on three springs, for comparison -------------------

@wp.kernel
def newton_step_one_node(x: wp.array(dtype=wp.vec3), anchors: wp.array(dtype=wp.vec3), stiffness: wp.array(dtype=float),
                         rest: wp.array(dtype=float), weight: wp.array(dtype=wp.vec3), x_out: wp.array(dtype=wp.vec3)):
    """x_out = x - H^-1 r for one free node on three springs (dense 3x3 Hessian, exact inverse)."""
    p = x[0]
    r = -weight[0]
    H = wp.mat33(0.0)
    for s in range(3):
        d = anchors[s] - p
        length = wp.length(d)
        n = d / length
        k = stiffness[s]
        r = r - k * (length - rest[s]) * n
        H = H + k * ((1.0 - rest[s] / length) * wp.identity(3, dtype=float) + (rest[s] / length) * wp.outer(n, n))
    x_out[0] = p - wp.inverse(H) @ r


def test_implicit_gradient_equals_unrolled_newton_tape():
    anchors = wp.array(np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0.8, 0.3]], np.float32), dtype=wp.vec3)
    stiffness = wp.array(np.array([100.0, 80.0, 120.0], np.float32), requires_grad=True)
    rest = wp.array(np.array([0.5, 0.55, 0.6], np.float32), requires_grad=True)
    weight = wp.array(np.array([[0.1, 0.0, -2.0]], np.float32), dtype=wp.vec3, requires_grad=True)
    w = wp.array(np.array([[0.3, -0.7, 1.1]], np.float32), dtype=wp.vec3)
    start = np.array([[0.5, 0.3, -0.3]], np.float32)

    # unrolled: 12 Newton steps, every one on the tape
    tape = wp.Tape()
    with tape:
        x = wp.array(start, dtype=wp.vec3, requires_grad=True)
        for _ in range(12):
            nxt = wp.zeros(1, dtype=wp.vec3, requires_grad=True)
            wp.launch(newton_step_one_node, 1, [x, anchors, stiffness, rest, weight], [nxt])
            x = nxt
        loss = wp.zeros(1, dtype=float, requires_grad=True)
        wp.launch(linear_loss, 1, [x, w], [loss])
    tape.backward(loss)
    unrolled = [a.grad.numpy().astype(np.float64).copy() for a in (stiffness, rest, weight)]
    x_unrolled = x.numpy().copy()
    tape.zero()
    for a in (stiffness, rest, weight):
        a.grad.zero_()

    # implicit: the same equilibrium through ImplicitSolve (three springs to three anchors)
    springs = wp.array(np.array([[1, 0], [2, 0], [3, 0]], np.int32), dtype=wp.vec2i)  # anchor i+1 -> node 0

    def residual(xs, out):
        out.zero_()
        wp.launch(spring_gradient, 3, [xs, anchors, springs, stiffness, rest, 1], [out])
        wp.launch(weight_gradient, 1, [weight], [out])

    solve = ImplicitSolve(residual, params=[stiffness, rest, weight], tolerance=1e-5, name="one node")
    tape = wp.Tape()
    with tape:
        x = wp.array(start, dtype=wp.vec3, requires_grad=True)
        solve.solve(x)
        loss = wp.zeros(1, dtype=float, requires_grad=True)
        wp.launch(linear_loss, 1, [x, w], [loss])
    tape.backward(loss)
    np.testing.assert_allclose(x.numpy(), x_unrolled, atol=1e-5)
    for implicit, taped in zip([a.grad.numpy() for a in (stiffness, rest, weight)], unrolled, strict=True):
        np.testing.assert_allclose(implicit, taped, rtol=2e-3, atol=1e-5 * np.abs(taped).max())


@wp.kernel
def exp_kernel(log_k: wp.array(dtype=float), k: wp.array(dtype=float)):
    i = wp.tid()
    k[i] = wp.exp(log_k[i])


def test_gradient_flows_through_an_outer_tape_to_upstream_arrays():
    # stiffness = exp(log_stiffness) computed on the same tape: d loss / d log k = k * d loss / d k
    net = Net(free=4)
    direct, _ = implicit_gradients(net)
    log_k = wp.array(np.log(net.stiffness.numpy()), requires_grad=True)
    tape = wp.Tape()
    with tape:
        wp.launch(exp_kernel, log_k.shape[0], [log_k], [net.stiffness])
        x = wp.array(net.x0, dtype=wp.vec3, requires_grad=True)
        net.solver().solve(x)
        loss = net.loss(x)
    net.stiffness.grad.zero_()
    tape.backward(loss)
    np.testing.assert_allclose(log_k.grad.numpy(), direct["stiffness"] * net.stiffness.numpy(), rtol=1e-3,
                               atol=1e-6 * np.abs(direct["stiffness"]).max())


def test_non_convergence_is_a_clear_error():
    net = Net()
    x = wp.array(net.x0, dtype=wp.vec3)
    with pytest.raises(NotConverged, match=r"spring net equilibrium did not converge: residual .* after 1 iterations"):
        net.solver(max_iterations=1, tolerance=1e-9).solve(x)


@pytest.mark.parametrize("backend", ["banded", "cholmod"])
def test_sparse_cholesky_sums_duplicates_drops_structural_zeros_and_renews_when_stale(backend):
    from diffsim.core.cholesky import SparseCholesky
    from diffsim.errors import DiffsimError

    rng = np.random.default_rng(2)
    size = 12
    a = rng.standard_normal((size, size))
    dense = a @ a.T + size * np.eye(size)
    rows, columns = np.nonzero(np.ones((size, size)))
    # every entry given as two halves, plus entries marked structurally zero that must be ignored
    rows2 = np.concatenate([rows, rows, rows[:5]])
    columns2 = np.concatenate([columns, columns, columns[:5]])
    values = np.concatenate([0.5 * dense.ravel(), 0.5 * dense.ravel(), np.full(5, 1e9)])
    structural = np.concatenate([np.ones(2 * rows.size, dtype=bool), np.zeros(5, dtype=bool)])
    factor = SparseCholesky(size, rows2, columns2, structural=structural, device="cpu", refresh_iterations=10,
                            backend=backend)
    assert factor.backend == backend
    factor.values.assign(values)
    factor.factor()
    b = rng.standard_normal(size).astype(np.float32)
    out = wp.zeros(size, dtype=float, device="cpu")
    factor.solve(wp.array(b, dtype=float, device="cpu"), out)
    np.testing.assert_allclose(out.numpy(), np.linalg.solve(dense, b), rtol=1e-4, atol=1e-6)
    # rent or buy: 2 iterations per decade right after factoring, then 6 extra per solve
    factor.note_iterations(2, 1.0)
    assert not factor.stale
    factor.note_iterations(8, 1.0)
    assert not factor.stale
    factor.note_iterations(8, 1.0)
    assert factor.stale
    factor.values.assign(np.concatenate([-values[: 2 * rows.size], values[2 * rows.size:]]))
    with pytest.raises(DiffsimError, match="not positive definite"):
        factor.factor()


@pytest.mark.parametrize("backend", ["banded", "cholmod"])
def test_sparse_cholesky_adds_local_blocks_to_its_solves_exactly(backend, monkeypatch):
    """set_blocks: the solves invert the factored matrix plus positive semi-definite diagonal blocks
    (Woodbury), follow new blocks and new rows, and outlive a factorisation; a set larger than
    MAX_CORRECTION_ROWS is factored in instead and renewed with the factor."""
    from diffsim.core import cholesky
    from diffsim.core.cholesky import SparseCholesky
    from diffsim.errors import DiffsimError

    rng = np.random.default_rng(5)
    size = 15
    a = rng.standard_normal((size, size))
    dense = a @ a.T + size * np.eye(size)
    rows, columns = np.nonzero(np.ones((size, size)))
    factor = SparseCholesky(size, rows, columns, device="cpu", backend=backend)
    factor.values.assign(dense.ravel())
    b = rng.standard_normal(size).astype(np.float32)
    out = wp.zeros(size, dtype=float, device="cpu")
    with pytest.raises(DiffsimError, match="factor"):
        factor.solve(wp.array(b, dtype=float, device="cpu"), out)
    factor.factor()

    def solved():
        factor.solve(wp.array(b, dtype=float, device="cpu"), out)
        return out.numpy()

    def with_blocks(block_rows, blocks):
        expected = dense.copy()
        for r, block in zip(block_rows, blocks, strict=True):
            expected[np.ix_(r, r)] += block
        return np.linalg.solve(expected, b)

    def spd_blocks(m, scale):
        g = rng.standard_normal((m, 3, 2))  # rank 2: semi-definite, as a contact block is
        return scale * g @ g.transpose(0, 2, 1)

    for block_rows, scale in (([[3, 4, 5], [9, 10, 11]], 50.0), ([[3, 4, 5], [9, 10, 11]], 5.0),
                              ([[0, 1, 2], [9, 10, 11], [12, 13, 14]], 500.0)):
        block_rows = np.array(block_rows)
        blocks = spd_blocks(len(block_rows), scale)
        factor.set_blocks(block_rows, blocks)
        np.testing.assert_allclose(solved(), with_blocks(block_rows, blocks), rtol=2e-4, atol=1e-6)
    columns_before = factor.block_solves
    factor.set_blocks(block_rows, 2.0 * blocks)  # the same rows: no new solves
    np.testing.assert_allclose(solved(), with_blocks(block_rows, 2.0 * blocks), rtol=2e-4, atol=1e-6)
    assert factor.block_solves == columns_before
    factor.factor()  # the blocks stay; their columns are solved again with the new factor
    np.testing.assert_allclose(solved(), with_blocks(block_rows, 2.0 * blocks), rtol=2e-4, atol=1e-6)
    assert factor.block_solves == columns_before + block_rows.size
    factor.set_blocks(np.zeros((0, 3), dtype=int), np.zeros((0, 3, 3)))
    np.testing.assert_allclose(solved(), np.linalg.solve(dense, b), rtol=2e-4, atol=1e-6)

    monkeypatch.setattr(cholesky, "MAX_CORRECTION_ROWS", 6)
    many = np.array([[0, 1, 2], [6, 7, 8], [12, 13, 14]])
    first, second = spd_blocks(3, 50.0), spd_blocks(3, 50.0)
    factor.set_blocks(many, first)  # factored in at once
    np.testing.assert_allclose(solved(), with_blocks(many, first), rtol=2e-4, atol=1e-6)
    factor.set_blocks(many, second)  # kept as they were until the factor is renewed
    np.testing.assert_allclose(solved(), with_blocks(many, first), rtol=2e-4, atol=1e-6)
    factor.factor()
    np.testing.assert_allclose(solved(), with_blocks(many, second), rtol=2e-4, atol=1e-6)
    factor.set_blocks(many[:1], first[:1])  # few again: corrected, the factored-in set dropped
    np.testing.assert_allclose(solved(), with_blocks(many[:1], first[:1]), rtol=2e-4, atol=1e-6)


def test_banded_cholesky_of_a_mesh_laplacian_matches_a_direct_solve():
    """The banded factorisation reorders a shuffled grid (reverse Cuthill-McKee) to a band about as
    wide as the grid's cross-section and solves like a dense solve; "auto" takes it on a CPU, and an
    unknown backend is refused."""
    import scipy.sparse

    from diffsim.core.cholesky import CholeskyPattern, SparseCholesky
    from diffsim.errors import InvalidParameter

    nx, ny, nz = 12, 5, 3
    index = np.arange(nx * ny * nz).reshape(nx, ny, nz)
    shuffle = np.random.default_rng(0).permutation(index.size)  # hide the grid's natural order
    pairs = []
    for axis in range(3):
        a = np.moveaxis(index, axis, 0)
        pairs.append(np.stack([a[:-1].ravel(), a[1:].ravel()], axis=1))
    i, j = shuffle[np.concatenate(pairs)].T
    n = index.size
    laplacian = scipy.sparse.coo_matrix((-np.ones(i.size), (i, j)), shape=(n, n))
    laplacian = laplacian + laplacian.T
    matrix = (laplacian + scipy.sparse.diags(1.0 - np.asarray(laplacian.sum(axis=1)).ravel())).tocoo()
    pattern = CholeskyPattern(n, matrix.row, matrix.col, device="cpu")
    assert pattern.backend == "banded"
    assert pattern.bandwidth <= 2 * ny * nz  # about one cross-section of the grid, not n
    factor = SparseCholesky(pattern)
    factor.values.assign(matrix.data)
    factor.factor()
    b = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    out = wp.zeros(n, dtype=float, device="cpu")
    factor.solve(wp.array(b, dtype=float, device="cpu"), out)
    np.testing.assert_allclose(out.numpy(), np.linalg.solve(matrix.toarray(), b), rtol=1e-4, atol=1e-5)
    with pytest.raises(InvalidParameter, match="backend"):
        CholeskyPattern(n, matrix.row, matrix.col, device="cpu", backend="dense")
