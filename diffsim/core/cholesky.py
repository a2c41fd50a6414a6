"""A lagged sparse Cholesky factorisation, the preconditioner of :class:`~diffsim.core.implicit.ImplicitSolve`.

Jacobi-preconditioned CG on an elastic body needs a number of iterations that grows with the mesh's
resolution (about 100 per Newton iteration on an 8k-tet tactile pad). The factor of an SPD
approximation of the Jacobian, assembled from element matrices (projected element Hessians, the
Gauss-Newton contact blocks), solves the linear system to the accuracy of that approximation in one
application; as a CG preconditioner it leaves the few iterations that the difference between the
approximation and the current Jacobian needs. A factorisation costs as much as tens of CG
iterations, so it is kept across Newton iterations and steps (the Jacobian of a tactile pad moves
little between frames) and refreshed only once a linear solve needs more than ``refresh_iterations``.

When to refactor is a rent-or-buy choice: a stale factor costs extra CG iterations in every solve
until the next factorisation, which costs a fixed time. The factor is renewed once the iterations
beyond the rate of the first solve after the last factorisation (iterations per decade of
residual reduction) add up to ``refresh_iterations``, which should be about what one factorisation
costs in CG iterations (never more than twice the best choice in hindsight). Counting iterations
rather than seconds keeps a rerun identical.

Two factorisations, chosen per matrix (``backend="auto"``):

- **banded** (CPU devices): the unknowns reordered by reverse Cuthill-McKee, which gives an FEM
  body a band about as wide as its thinnest cross-section, then LAPACK's banded Cholesky
  (``pbtrf``/``pbtrs``, on the BLAS scipy ships with). Tactile pads are thin, so their band is
  narrow: on the 8k-tet benchmark pad (5,292 unknowns, band 341) a factorisation takes 25-45 ms
  and a solve 0.6-1 ms (single precision), against 120-200 ms and 1.2-1.6 ms through CHOLMOD; on
  a 10 x 10 x 10 cube of 3,993 unknowns 14 ms against 121 ms (2-core CPU). Chosen while the band,
  in double precision, needs at most :data:`BANDED_MAX_BYTES`.
- **cholmod**: CHOLMOD's supernodal Cholesky through ``cholespy``, whose solves read Warp arrays
  directly (DLPack) on the CPU and on CUDA devices; the only choice on a GPU, and the choice for
  bodies whose band would be too wide to store.

**Fast-changing local blocks** (:meth:`SparseCholesky.set_blocks`). Some terms of a Jacobian change
from one Newton iteration to the next while the rest barely moves: a tactile pad's contact and
friction blocks, one 3 x 3 block on each of the ten or so nodes touching the indenter, flip as the
patch slides, while its elastic stiffness drifts slowly. Left in the factor they make it stale
within a frame (on the 8k-tet benchmark pad, a factor one to four 30 Hz frames old took 4-35 CG
iterations to 1e-2 against 1-5 for one whose elastic part was as old but whose node blocks were
current). Such blocks are kept out of the factored matrix and added to every solve exactly by the
Woodbury identity: with the factored matrix P, the blocks B on the rows selected by E and
W = P^-1 E,

    (P + E B E^T)^-1 r = y - W B (I + E^T W B)^-1 E^T y,      y = P^-1 r,

which costs a solve with P, a gather and a product with W per application. The columns of W are
computed once per block row and factorisation (three solves for a node's block) and kept, so a
block row entering the set costs its solves once, until the next factorisation.

The sparsity pattern is fixed when the preconditioner is made: entries are given in coordinate
form with duplicates, summed on the host into the compressed pattern before each factorisation
(entries listed as structurally zero are dropped from it, which keeps them out of the factor's
fill and the band).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np
import scipy.linalg
import scipy.sparse
import scipy.sparse.csgraph
import warp as wp

from diffsim.errors import DiffsimError, InvalidParameter

__all__ = ["BACKENDS", "BANDED_MAX_BYTES", "MAX_CORRECTION_ROWS", "CholeskyPattern", "SparseCholesky"]

BACKENDS = ("auto", "banded", "cholmod")
#: ``backend="auto"`` factors banded while the band's storage in double precision (the fallback)
#: stays under this [bytes]
BANDED_MAX_BYTES = 512 * 2**20
#: extra CG iterations after which a stale factor is renewed, per backend, when not given: about
#: what one factorisation costs in preconditioned CG iterations on a 2-core CPU (8k-tet pad)
REFRESH_ITERATIONS = {"banded": 20, "cholmod": 60}
#: :meth:`SparseCholesky.set_blocks` corrects the solves for at most this many rows; a larger set is
#: factored in instead (renewed with the factor). The columns of W cost one solve per row, once per
#: factorisation: on the 8k-tet benchmark pad a factorisation costs about 25 solves, and the sliding
#: sphere's 10-15 contact nodes (30-45 rows) pay for themselves several times over in CG
#: iterations, while a plate on the whole face (200 nodes) would cost 20 factorisations' worth.
MAX_CORRECTION_ROWS = 96


class _Correction(NamedTuple):
    """The Woodbury correction of the blocks set, for the current factor P."""

    rows: np.ndarray  # flat rows of the blocks (E)
    columns: np.ndarray  # W = P^-1 E
    block_matrix: np.ndarray  # B, block diagonal
    capacitance: tuple  # LU of I + E^T W B
    blocks: np.ndarray  # the blocks as set (to tell a repeat)
    gathered: np.ndarray  # E^T W


class CholeskyPattern:
    """The symbolic half of a :class:`SparseCholesky`: the compressed pattern, where each given
    entry adds into it, the backend and (banded) the reordering. It depends on the structure only,
    so a model analyses it once and every solver of that model shares it.

    Args:
        size: rows (= columns) of the matrix.
        rows, columns: the pattern in coordinate form (duplicates allowed: their values add up).
        structural: optional mask of the entries that can be nonzero (the others are left out).
        device: where the solves run.
        backend: "banded", "cholmod" or "auto" (see the module header).
    """

    def __init__(self, size: int, rows: np.ndarray, columns: np.ndarray, *, structural: np.ndarray | None = None,
                 device=None, backend: str = "auto"):
        if backend not in BACKENDS:
            raise InvalidParameter("backend", backend, ", ".join(f"'{b}'" for b in BACKENDS))
        self.size = int(size)
        self.device = wp.get_device(device)
        if backend == "banded" and not self.device.is_cpu:
            raise InvalidParameter("backend", backend, "'cholmod' or 'auto' on a CUDA device (banded factors on CPUs)")
        rows = np.asarray(rows, dtype=np.int64)
        columns = np.asarray(columns, dtype=np.int64)
        self.entries = rows.shape[0]  #: entries given (the length of the values array)
        keep = np.ones(rows.shape, dtype=bool) if structural is None else np.asarray(structural, dtype=bool)
        # compressed sparse rows of the summed matrix (scipy merges the duplicates), and where each
        # kept entry adds into it: its rank among the pattern's keys, row-major (a sort of the
        # ~100 entries per row an 8k-tet mesh lists would cost three times as long)
        kept_rows, kept_columns = rows[keep], columns[keep]
        pattern = scipy.sparse.csr_matrix((np.ones(kept_rows.size, dtype=np.int32), (kept_rows, kept_columns)),
                                          shape=(self.size, self.size))
        pattern.sort_indices()
        keys = np.repeat(np.arange(self.size, dtype=np.int64), np.diff(pattern.indptr)) * self.size + pattern.indices
        self.keys = keys  #: row * size + column of each compressed entry, ascending
        self.slot = np.searchsorted(keys, kept_rows * self.size + kept_columns)
        self.keep = keep
        self.indptr = pattern.indptr.astype(np.int32)
        self.indices = pattern.indices.astype(np.int32)
        if backend != "cholmod" and self.device.is_cpu:
            self._band_layout(pattern)
            if backend == "auto" and 8 * (self.bandwidth + 1) * self.size > BANDED_MAX_BYTES:
                backend = "cholmod"
        self.backend = "banded" if backend != "cholmod" and self.device.is_cpu else "cholmod"  #: the one in use

    def _band_layout(self, pattern: scipy.sparse.csr_matrix) -> None:
        """The reordering and where each compressed entry of the upper triangle lands in LAPACK's
        upper band storage (``band[w + i - j, j] = A[i, j]`` for i <= j, w the bandwidth)."""
        order = scipy.sparse.csgraph.reverse_cuthill_mckee(pattern, symmetric_mode=True).astype(np.int64)
        rank = np.empty_like(order)
        rank[order] = np.arange(self.size)
        i = rank[np.repeat(np.arange(self.size, dtype=np.int64), np.diff(pattern.indptr))]
        j = rank[pattern.indices.astype(np.int64)]
        upper = i <= j
        self.bandwidth = int(np.max(j[upper] - i[upper])) if upper.any() else 0  #: (banded) of the reordered matrix
        self.order = order  # reordered unknown k is unknown order[k]
        self.band_entries = np.flatnonzero(upper)
        self.band_slots = (self.bandwidth + i[upper] - j[upper]) * self.size + j[upper]


class SparseCholesky:
    """The Cholesky factor of a symmetric positive-definite matrix of fixed sparsity pattern.

    Args:
        pattern: a :class:`CholeskyPattern`, or the ``size`` of the matrix followed by ``rows``,
            ``columns`` and the keywords of :class:`CholeskyPattern`, which analyse one here.
        refresh_iterations: extra CG iterations (see the module header) after which the factor is
            renewed (default: :data:`REFRESH_ITERATIONS` of the backend).
    """

    def __init__(self, pattern: CholeskyPattern | int, rows: np.ndarray | None = None,
                 columns: np.ndarray | None = None, *, refresh_iterations: int | None = None, **analysis):
        if not isinstance(pattern, CholeskyPattern):
            pattern = CholeskyPattern(pattern, rows, columns, **analysis)
        self.pattern = pattern  #: the symbolic analysis (shareable between factors of one structure)
        self.size = pattern.size
        self.device = pattern.device
        self.backend = pattern.backend  #: "banded" or "cholmod"
        if self.backend == "cholmod":
            try:
                import cholespy
            except ImportError as error:  # a dependency of the package: only a broken install lands here
                raise DiffsimError("the Cholesky preconditioner needs the 'cholespy' package (pip install cholespy), "
                                   "or choose preconditioner='jacobi'.") from error
            self._cholespy = cholespy
        #: the entries of the next matrix to factor, one per pattern entry (float64, on ``device``)
        self.values = wp.zeros(pattern.entries, dtype=wp.float64, device=self.device)
        self.refresh_iterations = int(REFRESH_ITERATIONS[self.backend] if refresh_iterations is None
                                      else refresh_iterations)
        self._solver = None
        self.stale = True  #: factor again before the next solve
        self.factorizations = 0  #: how often it was factored
        self.factor_seconds = 0.0  #: wall time spent factoring [s]
        self._baseline = None  # CG iterations per decade of the first solve after a factorisation
        self._extra = 0.0  # iterations beyond that rate since
        self._columns: dict[tuple, np.ndarray] = {}  # per block row: its columns of W = P^-1 E (this factor's)
        self._correction: _Correction | None = None  # of the blocks now set, for this factor
        self._blocks = None  # (rows, blocks) last set
        self._folded = False  # the factor holds them (too many to correct for)
        self.block_solves = 0  #: solves spent on columns of W (see set_blocks)

    def factor(self) -> None:
        """Factor the matrix whose entries are now in ``values`` (float64, one per pattern entry)."""
        start = time.perf_counter()
        p = self.pattern
        summed = np.bincount(p.slot, weights=self.values.numpy()[p.keep], minlength=p.indices.size)
        fold = self._blocks is not None and self._large(self._blocks[0])
        if fold:
            rows, blocks = self._blocks
            k = rows.shape[1]
            keys = (np.repeat(rows, k, axis=1) * self.size + np.tile(rows, (1, k))).ravel()
            slots = np.searchsorted(p.keys, keys)
            if np.any(slots >= p.keys.size) or np.any(p.keys[np.minimum(slots, p.keys.size - 1)] != keys):
                raise DiffsimError("set_blocks: a block's entries are not all in the factor's sparsity pattern")
            np.add.at(summed, slots, blocks.ravel())
        self._folded = fold
        if self.backend == "banded":
            # single precision first: the solves read the whole band, and half the bytes is half
            # their time; a matrix too ill-conditioned for it is factored again in double
            for dtype in (np.float32, np.float64):
                band = np.zeros((p.bandwidth + 1) * self.size, dtype=dtype)
                band[p.band_slots] = summed[p.band_entries]
                band = band.reshape(p.bandwidth + 1, self.size)
                pbtrf, self._pbtrs = scipy.linalg.get_lapack_funcs(("pbtrf", "pbtrs"), (band,))
                self._band, info = pbtrf(band, lower=0, overwrite_ab=1)
                if info == 0:
                    break
            if info != 0:
                raise DiffsimError(f"the Cholesky preconditioner's matrix ({self.size} rows) is not positive definite "
                                   f"(LAPACK pbtrf: leading minor {info} of the reordered matrix); "
                                   f"choose preconditioner='jacobi'.")
        else:
            device = self.device
            indptr = wp.array(p.indptr, dtype=wp.int32, device=device)
            indices = wp.array(p.indices, dtype=wp.int32, device=device)
            data = wp.array(summed, dtype=wp.float64, device=device)
            try:
                self._solver = self._cholespy.CholeskySolverF(self.size, indptr, indices, data,
                                                              self._cholespy.MatrixType.CSR)
            except (RuntimeError, ValueError) as error:
                raise DiffsimError(f"the Cholesky preconditioner's matrix ({self.size} rows) is not positive definite "
                                   f"({error}); choose preconditioner='jacobi'.") from error
        self.stale = False
        self.factorizations += 1
        self.factor_seconds += time.perf_counter() - start
        self._baseline = None
        self._extra = 0.0
        self._columns.clear()  # W belongs to the old factor: the next solve rebuilds the correction
        self._correction = None

    def solve(self, b: wp.array, out: wp.array) -> None:
        """out = A^-1 b for flat float32 arrays of ``size`` entries (A: the factored matrix plus
        the blocks of :meth:`set_blocks`)."""
        if self.factorizations == 0:
            raise DiffsimError("solve needs a factor: call factor() first")
        self._update_correction()
        self._solve_factored(b, out)
        if self._correction is not None:
            c = self._correction
            y = out.numpy()  # a view on CPUs; a copy, assigned back, on CUDA devices
            u = scipy.linalg.lu_solve(c.capacitance, y[c.rows].astype(np.float64))
            y -= (c.columns @ (c.block_matrix @ u)).astype(y.dtype)
            if not self.device.is_cpu:
                out.assign(y)

    def _solve_factored(self, b: wp.array, out: wp.array) -> None:
        if self.backend == "banded":  # CPU arrays: numpy() is a view of the same memory
            order = self.pattern.order
            x, _ = self._pbtrs(self._band, b.numpy()[order], lower=0)
            out.numpy()[order] = x
        else:
            self._solver.solve(b, out)

    def _factored_columns(self, rows: np.ndarray) -> np.ndarray:
        """P^-1 E for the unit vectors of ``rows`` (flat indices): (size, len(rows)) float64."""
        self.block_solves += rows.size
        if self.backend == "banded":
            rhs = np.zeros((self.size, rows.size), dtype=self._band.dtype)
            rhs[rows, np.arange(rows.size)] = 1.0
            order = self.pattern.order
            solved, _ = self._pbtrs(self._band, rhs[order], lower=0)
            columns = np.empty((self.size, rows.size))
            columns[order] = solved
            return columns
        unit = wp.zeros(self.size, dtype=float, device=self.device)
        column = wp.zeros(self.size, dtype=float, device=self.device)
        columns = np.empty((self.size, rows.size))
        for k, row in enumerate(rows):
            unit.assign(np.eye(1, self.size, int(row), dtype=np.float32).ravel())
            self._solver.solve(unit, column)
            columns[:, k] = column.numpy()
        return columns

    def set_blocks(self, rows: np.ndarray, blocks: np.ndarray) -> None:
        """Have the solves invert the factored matrix plus symmetric positive semi-definite
        diagonal blocks (see the module header), until the next call. Only recorded here: the next
        solve brings the correction up to date, and a factorisation in between takes the blocks
        into account, so a caller sets them before deciding to refactor and after.

        Beyond :data:`MAX_CORRECTION_ROWS` rows the blocks are factored in instead (their entries
        must be in the pattern), kept until the factor is renewed, and renewed with it.

        Args:
            rows: (m, k) integer array, the rows (= columns) of each k x k block.
            blocks: (m, k, k) the blocks' values; m = 0 removes them.
        """
        blocks = np.asarray(blocks, dtype=np.float64)
        rows = np.asarray(rows, dtype=np.int64).reshape(blocks.shape[0], blocks.shape[-1])
        self._blocks = (rows, blocks.copy())

    def _large(self, rows: np.ndarray) -> bool:
        # (once factored in, a set stays so until it has halved: no refactoring back and forth)
        return rows.size > (MAX_CORRECTION_ROWS // 2 if self._folded else MAX_CORRECTION_ROWS)

    def _update_correction(self) -> None:
        """Bring the factor and the correction up to the blocks last set (before a solve)."""
        if self._blocks is None:
            return
        rows, blocks = self._blocks
        if self._large(rows):
            self._correction = None
            if not self._folded:
                self.factor()  # (factors the blocks in)
            return
        if self._folded:  # the factor holds an earlier, larger set: factor without it
            self.factor()
        if rows.shape[0] == 0:
            self._correction = None
            return
        last = self._correction
        if last is not None and last.rows.size == rows.size and np.array_equal(last.rows, rows.ravel()):
            if np.array_equal(last.blocks, blocks):
                return  # (Newton sets them again after each prediction; often nothing changed)
            flat, columns, gathered = last.rows, last.columns, last.gathered
        else:
            keys = [tuple(r) for r in rows]
            missing = [k for k in dict.fromkeys(keys) if k not in self._columns]
            if missing:
                solved = self._factored_columns(np.concatenate([np.asarray(k) for k in missing]))
                width = rows.shape[1]
                for i, k in enumerate(missing):
                    self._columns[k] = solved[:, width * i: width * (i + 1)]
            columns = np.concatenate([self._columns[k] for k in keys], axis=1)
            flat = rows.ravel()
            gathered = columns[flat]  # E^T W
        b = scipy.linalg.block_diag(*blocks)
        capacitance = scipy.linalg.lu_factor(np.eye(flat.size) + gathered @ b)
        self._correction = _Correction(flat, columns, b, capacitance, blocks, gathered)

    def note_iterations(self, iterations: int, decades: float = 1.0) -> None:
        """Told after each preconditioned linear solve: its CG iterations and the residual
        reduction it asked for (decades, -log10 of the relative tolerance)."""
        decades = max(float(decades), 1.0)
        if self._baseline is None:
            self._baseline = iterations / decades
        self._extra += max(0.0, iterations - self._baseline * decades)
        if self._extra >= self.refresh_iterations:
            self.stale = True
