"""Tests of diffsim.materials: guarded SVD and its adjoint, the five constitutive models against
float64 references and finite differences, and material validation and presets.

Everything runs through two small Warp kernels evaluated over batches of matrices, so the whole file
compiles once. Finite differences are central, in float64 over float32 per-item losses of size O(1).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import warp as wp

from diffsim.errors import ConfigError, InvalidParameter
from diffsim.materials import (
    PRESETS,
    Material,
    MaterialModel,
    MaterialParams,
    constitutive_update,
    polar_rotation,
    preset,
    strain_energy_density,
    svd3_guarded,
)

FD_STEP = 1.0e-3
GRAD_TOL = 0.02

# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------

SVD_RECONSTRUCT = 0  # <W, U diag(sigma) V^T>
SVD_SIGMA = 1  # a non-symmetric function of sigma alone
SVD_UV = 2  # <W, U V^T> built from svd3_guarded's outputs
SVD_POLAR = 3  # <W, polar_rotation(F)>
SVD_RAW_UV = 4  # <W, U V^T> from Warp's plain wp.svd3 and its built-in adjoint
SVD_FACTORS = 5  # <W, U> + <W^T, V>: depends on the factors themselves
SVD_LOG = 6  # <W, U diag(log sigma) V^T>


@wp.kernel
def svd_loss_kernel(
    mode: wp.array(dtype=int),
    F: wp.array(dtype=wp.mat33),
    W: wp.array(dtype=wp.mat33),
    loss: wp.array(dtype=float),
    reconstruction: wp.array(dtype=wp.mat33),
):
    i = wp.tid()
    decomposition = svd3_guarded(F[i])
    U = decomposition.U
    s = decomposition.sigma
    V = decomposition.V
    reconstruction[i] = U @ wp.diag(s) @ wp.transpose(V)
    w = W[i]
    m = mode[i]
    value = 0.0
    if m == 0:
        value = wp.ddot(w, U @ wp.diag(s) @ wp.transpose(V))
    elif m == 1:
        value = w[0, 0] * s[0] + w[1, 1] * s[1] * s[1] + w[2, 2] * s[2] + w[0, 1] * s[0] * s[2]
    elif m == 2:
        value = wp.ddot(w, U @ wp.transpose(V))
    elif m == 3:
        value = wp.ddot(w, polar_rotation(F[i]))
    elif m == 4:
        U_raw = wp.mat33()
        s_raw = wp.vec3()
        V_raw = wp.mat33()
        wp.svd3(F[i], U_raw, s_raw, V_raw)
        value = wp.ddot(w, U_raw @ wp.transpose(V_raw))
    elif m == 5:
        value = wp.ddot(w, U) + wp.ddot(wp.transpose(w), V)
    elif m == 6:
        log_s = wp.vec3(wp.log(s[0]), wp.log(s[1]), wp.log(s[2]))
        value = wp.ddot(w, U @ wp.diag(log_s) @ wp.transpose(V))
    loss[i] = value


@wp.kernel
def material_kernel(
    model: wp.array(dtype=int),
    F_trial: wp.array(dtype=wp.mat33),
    velocity_gradient: wp.array(dtype=wp.mat33),
    young_modulus: wp.array(dtype=float),
    poisson_ratio: wp.array(dtype=float),
    yield_stress: wp.array(dtype=float),
    friction_angle: wp.array(dtype=float),
    viscosity: wp.array(dtype=float),
    bulk_modulus: wp.array(dtype=float),
    weight_F: wp.array(dtype=wp.mat33),
    weight_stress: wp.array(dtype=wp.mat33),
    offset_F: wp.array(dtype=wp.mat33),
    offset_stress: wp.array(dtype=wp.mat33),
    stress_scale: wp.array(dtype=float),
    F_out: wp.array(dtype=wp.mat33),
    stress_out: wp.array(dtype=wp.mat33),
    energy_out: wp.array(dtype=float),
    loss: wp.array(dtype=float),
):
    i = wp.tid()
    params = MaterialParams()
    params.young_modulus = young_modulus[i]
    params.poisson_ratio = poisson_ratio[i]
    params.yield_stress = yield_stress[i]
    params.friction_angle = friction_angle[i]
    params.viscosity = viscosity[i]
    params.bulk_modulus = bulk_modulus[i]
    response = constitutive_update(model[i], F_trial[i], velocity_gradient[i], params)
    F_out[i] = response.F
    stress_out[i] = response.stress
    energy_out[i] = strain_energy_density(model[i], F_trial[i], params)
    # offsets near the expected outputs make the loss O(FD step) around the base state, so its float32
    # rounding stays far below the differences the finite-difference quotients resolve
    loss[i] = (
        wp.ddot(weight_F[i], response.F - offset_F[i])
        + wp.ddot(weight_stress[i], response.stress - offset_stress[i]) / stress_scale[i]
    )


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

RNG = np.random.default_rng(20240611)


def random_rotation(rng=RNG) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q * np.sign(np.linalg.det(q))


def with_stretches(stretches, rng=RNG) -> np.ndarray:
    """A deformation gradient Qa diag(stretches) Qb^T with random rotations."""
    return random_rotation(rng) @ np.diag(stretches) @ random_rotation(rng).T


def perturbations(F0: np.ndarray, h: float = FD_STEP) -> np.ndarray:
    """18 copies of F0: +h and -h on each entry, ordered (entry, sign)."""
    out = np.repeat(F0[None], 18, axis=0)
    for k in range(9):
        out[2 * k, k // 3, k % 3] += h
        out[2 * k + 1, k // 3, k % 3] -= h
    return out


def central_difference(values: np.ndarray, h: float) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64).reshape(-1, 2)
    return (values[:, 0] - values[:, 1]) / (2.0 * h)


def svd_losses(modes, Fs, Ws):
    """Per-item loss, tape gradient dloss_i/dF_i, and U diag(sigma) V^T for a batch."""
    n = len(Fs)
    F = wp.array(np.asarray(Fs, dtype=np.float32), dtype=wp.mat33, requires_grad=True)
    loss = wp.zeros(n, dtype=float, requires_grad=True)
    reconstruction = wp.zeros(n, dtype=wp.mat33, requires_grad=True)
    tape = wp.Tape()
    with tape:
        wp.launch(
            svd_loss_kernel,
            n,
            [wp.array(np.asarray(modes, dtype=np.int32), dtype=int), F,
             wp.array(np.asarray(Ws, dtype=np.float32), dtype=wp.mat33), loss, reconstruction],
        )  # fmt: skip
    tape.backward(grads={loss: wp.ones(n, dtype=float)})
    return loss.numpy().astype(np.float64), F.grad.numpy().astype(np.float64), reconstruction.numpy()


def svd_gradient_check(mode: int, F0: np.ndarray, W: np.ndarray):
    """(tape gradient, central finite difference) of one SVD loss at F0."""
    Fs = np.concatenate([F0[None], perturbations(F0)])
    losses, grads, _ = svd_losses([mode] * 19, Fs, [W] * 19)
    return grads[0], central_difference(losses[1:], FD_STEP).reshape(3, 3)


def relative_error(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


PARAM_NAMES = (
    "young_modulus",
    "poisson_ratio",
    "yield_stress",
    "friction_angle",
    "viscosity",
    "bulk_modulus",
)


def material_item(material: Material, F, *, L=None, weights_seed=0, for_gradients=False):
    """One kernel input. for_gradients: scale and offset the loss by the float64 reference outputs."""
    rng = np.random.default_rng(weights_seed)
    item = {name: float(getattr(material, name)) for name in PARAM_NAMES}
    item["model"] = int(material.model)
    item["F"] = np.asarray(F, dtype=np.float64)
    item["L"] = np.zeros((3, 3)) if L is None else np.asarray(L, dtype=np.float64)
    item["weight_F"] = rng.normal(size=(3, 3))
    item["weight_stress"] = rng.normal(size=(3, 3))
    modulus = material.bulk_modulus if material.model == MaterialModel.FLUID else material.young_modulus
    item["offset_F"] = np.zeros((3, 3))
    item["offset_stress"] = np.zeros((3, 3))
    item["stress_scale"] = modulus
    if for_gradients:
        item["offset_F"], item["offset_stress"] = reference_stress(material, item["F"], item["L"])
        item["stress_scale"] = max(float(np.linalg.norm(item["offset_stress"])), 1.0e-2 * modulus)
    return item


def run_materials(items):
    """Evaluate a batch on one tape; returns outputs and per-item tape gradients."""
    n = len(items)

    def farr(key):
        return wp.array(
            np.array([it[key] for it in items], dtype=np.float32), dtype=float, requires_grad=True
        )

    def marr(key, grad=False):
        values = np.array([it[key] for it in items], dtype=np.float32)
        return wp.array(values, dtype=wp.mat33, requires_grad=grad)

    params = {name: farr(name) for name in PARAM_NAMES}
    F = marr("F", grad=True)
    outputs = {
        "F": wp.zeros(n, dtype=wp.mat33, requires_grad=True),
        "stress": wp.zeros(n, dtype=wp.mat33, requires_grad=True),
        "energy": wp.zeros(n, dtype=float, requires_grad=True),
        "loss": wp.zeros(n, dtype=float, requires_grad=True),
    }
    tape = wp.Tape()
    with tape:
        wp.launch(
            material_kernel,
            n,
            [wp.array(np.array([it["model"] for it in items], dtype=np.int32), dtype=int), F, marr("L"),
             *(params[name] for name in PARAM_NAMES), marr("weight_F"), marr("weight_stress"),
             marr("offset_F"), marr("offset_stress"),
             wp.array(np.array([it["stress_scale"] for it in items], dtype=np.float32), dtype=float),
             outputs["F"], outputs["stress"], outputs["energy"], outputs["loss"]],
        )  # fmt: skip
    tape.backward(grads={outputs["loss"]: wp.ones(n, dtype=float)})
    result = {key: array.numpy().astype(np.float64) for key, array in outputs.items()}
    result["grad_F"] = F.grad.numpy().astype(np.float64)
    for name in PARAM_NAMES:
        result["grad_" + name] = params[name].grad.numpy().astype(np.float64)
    return result


def evaluate(material: Material, Fs, *, L=None):
    items = [material_item(material, F, L=L) for F in Fs]
    return run_materials(items)


def reference_stress(material: Material, F: np.ndarray, L: np.ndarray | None = None):
    """(F after return mapping, Kirchhoff stress) in float64 numpy, written from the formulas."""
    mu, lam = material.lame_parameters()
    eye = np.eye(3)
    model = material.model
    if model in (MaterialModel.FIXED_COROTATED, MaterialModel.NEO_HOOKEAN):
        J = np.linalg.det(F)
        if model == MaterialModel.FIXED_COROTATED:
            U, s, Vt = np.linalg.svd(F)
            R = U @ Vt
            return F, 2 * mu * (F - R) @ F.T + lam * (J - 1) * J * eye
        return F, mu * (F @ F.T - eye) + lam * np.log(J) * eye
    if model == MaterialModel.FLUID:
        J = np.linalg.det(F)
        p = material.bulk_modulus / 7.0 * (J**-7 - 1.0)
        L = np.zeros((3, 3)) if L is None else L
        viscous = material.viscosity * (L + L.T - 2.0 / 3.0 * np.trace(L) * eye)
        return np.cbrt(J) * eye, J * (viscous - p * eye)
    U, s, Vt = np.linalg.svd(F)  # positive-determinant inputs only here
    eps = np.log(s)
    eps_dev = eps - eps.mean()
    if model == MaterialModel.VON_MISES:
        q = math.sqrt(6.0) * mu * np.linalg.norm(eps_dev)
        if q > material.yield_stress:
            eps = eps.mean() + eps_dev * material.yield_stress / q
        else:
            return F, U @ np.diag(2 * mu * eps + lam * eps.sum()) @ U.T
    else:
        sin_phi = math.sin(material.friction_angle)
        alpha = math.sqrt(2.0 / 3.0) * 2 * sin_phi / (3 - sin_phi)
        if eps.sum() >= 0:
            return U @ Vt, np.zeros((3, 3))
        delta_gamma = np.linalg.norm(eps_dev) + (3 * lam + 2 * mu) / (2 * mu) * eps.sum() * alpha
        if delta_gamma <= 0:
            return F, U @ np.diag(2 * mu * eps + lam * eps.sum()) @ U.T
        eps = eps - delta_gamma * eps_dev / np.linalg.norm(eps_dev)
    return U @ np.diag(np.exp(eps)) @ Vt, U @ np.diag(2 * mu * eps + lam * eps.sum()) @ U.T


def von_mises_stress(tau: np.ndarray) -> float:
    dev = tau - np.trace(tau) / 3.0 * np.eye(3)
    return math.sqrt(1.5) * float(np.linalg.norm(dev))


# test materials: moderate moduli keep the float32 losses O(1) after scaling by E or K
ELASTIC_FCR = Material(MaterialModel.FIXED_COROTATED, young_modulus=2.0e4, poisson_ratio=0.3)
ELASTIC_NH = Material(MaterialModel.NEO_HOOKEAN, young_modulus=2.0e4, poisson_ratio=0.35)
CLAY = Material(MaterialModel.VON_MISES, young_modulus=2.0e4, poisson_ratio=0.3, yield_stress=300.0)
GRAINS = Material(MaterialModel.DRUCKER_PRAGER, young_modulus=2.0e4, poisson_ratio=0.3, friction_angle=0.5)
LIQUID = Material(MaterialModel.FLUID, density=1000.0, viscosity=40.0, bulk_modulus=1.0e4)
ALL_TEST_MATERIALS = [ELASTIC_FCR, ELASTIC_NH, CLAY, GRAINS, LIQUID]

# states: each well inside one regime, at least 1e-2 away from any yield surface or cone
F_GENERIC = with_stretches([1.12, 0.97, 0.9])
F_UNIAXIAL = with_stretches([1.01, 1.0, 1.0])  # two exactly repeated stretches
F_VM_ELASTIC = with_stretches([1.004, 0.999, 0.998])  # von Mises stress ~ 0.3x the CLAY yield stress
F_YIELDING = with_stretches([1.25, 0.92, 0.85])  # von Mises stress ~ 18x the CLAY yield stress
F_CONE_OUTSIDE = with_stretches([1.1, 0.93, 0.88])  # compressed, shear 1.5x what the GRAINS cone allows
F_CONE_INSIDE = with_stretches([0.95, 0.94, 0.93])  # mostly volumetric: shear 0.08x the cone limit
F_EXPANDED = with_stretches([1.1, 1.05, 1.02])  # tr(eps) > 0: cone tip
FLUID_L = np.array([[0.3, 1.5, -0.2], [0.1, -0.4, 0.7], [0.5, 0.2, 0.25]])


# ---------------------------------------------------------------------------------------------
# guarded SVD
# ---------------------------------------------------------------------------------------------


@wp.kernel
def svd_factors_kernel(F: wp.array(dtype=wp.mat33), U: wp.array(dtype=wp.mat33), sigma: wp.array(dtype=wp.vec3),
                       V: wp.array(dtype=wp.mat33)):
    i = wp.tid()
    decomposition = svd3_guarded(F[i])
    U[i] = decomposition.U
    sigma[i] = decomposition.sigma
    V[i] = decomposition.V


def _svd_families(n: int, rng) -> dict:
    """Batches of n deformation gradients per family, from benign to degenerate."""
    def stretched(stretches):
        return np.array([with_stretches(stretches, rng) for _ in range(n)])
    return {
        "generic": rng.normal(size=(n, 3, 3)),
        "near_rotation": np.array([random_rotation(rng) @ (np.eye(3) + 1e-3 * rng.normal(size=(3, 3)))
                                   for _ in range(n)]),
        "rotation": np.array([random_rotation(rng) for _ in range(n)]),
        "stretched_60_to_1": stretched([3.0, 0.3, 0.05]),
        "inverted": stretched([1.2, 0.9, -0.8]),
        "two_repeated": stretched([1.0, 1.0, 0.5]),
        "rank_one": stretched([1.0, 0.0, 0.0]),
        "zero": np.zeros((n, 3, 3)),
    }


@pytest.mark.parametrize("family", list(_svd_families(1, np.random.default_rng(0))))
def test_svd_reconstruction_and_conventions(family):
    # 500 matrices per family: wp.svd3 passed a 40-matrix version of this check while leaving
    # reconstruction errors of 1e-2 on about one generic matrix in a thousand
    Fs = _svd_families(500, np.random.default_rng(7))[family]
    F = wp.array(Fs.astype(np.float32), dtype=wp.mat33)
    U, sigma, V = (wp.zeros(len(Fs), dtype=t) for t in (wp.mat33, wp.vec3, wp.mat33))
    wp.launch(svd_factors_kernel, len(Fs), [F, U, sigma, V])
    U, sigma, V = (a.numpy().astype(np.float64) for a in (U, sigma, V))
    scale = np.maximum(np.abs(Fs).max(axis=(1, 2)), 1e-30)
    reconstruction = np.einsum("nij,nj,nkj->nik", U, sigma, V)
    assert (np.abs(reconstruction - Fs).max(axis=(1, 2)) / scale).max() < 2e-6
    for R in (U, V):  # proper rotations
        assert np.abs(R @ R.transpose(0, 2, 1) - np.eye(3)).max() < 2e-6
        assert np.abs(np.linalg.det(R) - 1.0).max() < 5e-6
    # sorted by magnitude, the sign of det(F) on the last, and numpy's singular values
    # (to rounding: ties are sorted on sigma^2, then sigma_i = u_i . F v_i is formed)
    assert np.all(sigma[:, 0] >= sigma[:, 1] - 1e-6 * scale)
    assert np.all(sigma[:, 1] >= np.abs(sigma[:, 2]) - 1e-6 * scale)
    reference = np.linalg.svd(Fs, compute_uv=False)
    reference[:, 2] *= np.where(np.linalg.det(Fs) < 0, -1.0, 1.0)
    assert (np.abs(sigma - reference).max(axis=1) / scale).max() < 2e-6


@pytest.mark.parametrize("mode", [SVD_RECONSTRUCT, SVD_SIGMA, SVD_UV, SVD_POLAR, SVD_FACTORS, SVD_LOG])
def test_svd_gradient_generic(mode):
    # distinct singular values, one of them with a reflected (negative) last singular value
    for F0 in (F_GENERIC, with_stretches([1.4, 1.0, 0.6]) @ np.diag([1.0, 1.0, -1.0])):
        if mode == SVD_LOG and np.linalg.det(F0) < 0:
            continue
        W = RNG.normal(size=(3, 3))
        grad, fd = svd_gradient_check(mode, F0, W)
        assert relative_error(grad, fd) < GRAD_TOL, (mode, grad, fd)


def polar_rotation_float64(F: np.ndarray) -> np.ndarray:
    U, _, Vt = np.linalg.svd(F)
    if np.linalg.det(U @ Vt) < 0:
        U[:, -1] *= -1.0
    return U @ Vt


def float64_gradient(function, x0: np.ndarray, h: float = 1.0e-6) -> np.ndarray:
    """Central differences of a smooth float64 function of a matrix or vector."""
    grad = np.zeros_like(x0, dtype=np.float64)
    for index in np.ndindex(x0.shape):
        step = np.zeros_like(x0, dtype=np.float64)
        step[index] = h
        grad[index] = (function(x0 + step) - function(x0 - step)) / (2.0 * h)
    return grad


REPEATED = {
    "identity": np.eye(3),
    "two_equal": with_stretches([1.3, 0.8, 0.8]),
    "three_equal": with_stretches([0.7, 0.7, 0.7]),
}


def test_polar_rotation_gradient_at_identity_matches_finite_differences():
    W = RNG.normal(size=(3, 3))
    for mode in (SVD_UV, SVD_POLAR):
        grad, fd = svd_gradient_check(mode, np.eye(3), W)
        assert relative_error(grad, fd) < GRAD_TOL, (mode, grad, fd)


@pytest.mark.parametrize("name", list(REPEATED))
def test_polar_rotation_gradient_exact_at_repeated_singular_values(name):
    # float32 finite differences are themselves noisy here (wp.svd3 resolves a repeated singular
    # value only to ~1e-6), so the reference is a float64 difference of the exact polar rotation
    F0 = REPEATED[name].astype(np.float32).astype(np.float64)
    W = RNG.normal(size=(3, 3)).astype(np.float32).astype(np.float64)
    reference = float64_gradient(lambda F: np.sum(W * polar_rotation_float64(F)), F0)
    _, grads, _ = svd_losses([SVD_POLAR, SVD_UV, SVD_RAW_UV], [F0] * 3, [W] * 3)
    assert relative_error(grads[0], reference) < 1.0e-4
    if name == "identity":
        # through svd3_guarded: A + B cancels exactly when U = V
        assert relative_error(grads[1], reference) < 1.0e-4
    # Warp's own svd3 adjoint divides (A_ij sigma_j + B_ij sigma_i) by a clamped sigma_j^2 - sigma_i^2,
    # which also clamps the finite part of the quotient: the rotation gradient is lost.
    assert relative_error(grads[2], reference) > 5 * GRAD_TOL


def test_polar_rotation_gradient_at_identity_is_the_skew_part():
    W = RNG.normal(size=(3, 3))
    _, grads, _ = svd_losses([SVD_POLAR], [np.eye(3)], [W])
    np.testing.assert_allclose(grads[0], 0.5 * (W - W.T), atol=1.0e-5)


def test_svd_gradients_finite_at_degenerate_inputs():
    nearly_singular = with_stretches([1.0, 0.5, 1.0e-6])
    Fs = [np.eye(3), 0.5 * np.eye(3), nearly_singular, np.zeros((3, 3)), -np.eye(3)]
    modes = [SVD_RECONSTRUCT, SVD_SIGMA, SVD_UV, SVD_POLAR, SVD_FACTORS]
    batch_F = [F for F in Fs for _ in modes]
    batch_modes = [m for _ in Fs for m in modes]
    W = RNG.normal(size=(3, 3))
    losses, grads, _ = svd_losses(batch_modes, batch_F, [W] * len(batch_F))
    assert np.isfinite(losses).all() and np.isfinite(grads).all()


# ---------------------------------------------------------------------------------------------
# constitutive models: physics
# ---------------------------------------------------------------------------------------------


def test_stress_free_at_identity():
    result = run_materials([material_item(m, np.eye(3)) for m in ALL_TEST_MATERIALS])
    # zero up to float32 rounding of the SVD of I (singular values 1 - 6e-8): |tau| ~ 1e-6 E
    moduli = np.array([m.bulk_modulus if m.model == MaterialModel.FLUID else m.young_modulus
                       for m in ALL_TEST_MATERIALS])  # fmt: skip
    assert (np.abs(result["stress"]).max(axis=(1, 2)) < 2.0e-6 * moduli).all()
    np.testing.assert_allclose(result["F"], np.eye(3)[None].repeat(5, 0), atol=1.0e-5)


def test_models_match_float64_reference():
    cases = [
        (ELASTIC_FCR, F_GENERIC, None),
        (ELASTIC_NH, F_GENERIC, None),
        (CLAY, F_VM_ELASTIC, None),
        (CLAY, F_YIELDING, None),
        (GRAINS, F_CONE_INSIDE, None),
        (GRAINS, F_CONE_OUTSIDE, None),
        (GRAINS, F_EXPANDED, None),
        (LIQUID, with_stretches([1.01, 0.99, 0.985]), FLUID_L),
    ]
    result = run_materials([material_item(m, F, L=L) for m, F, L in cases])
    for k, (material, F, L) in enumerate(cases):
        F_ref, tau_ref = reference_stress(material, F, L)
        scale = material.young_modulus if material.model != MaterialModel.FLUID else material.bulk_modulus
        np.testing.assert_allclose(result["F"][k], F_ref, atol=2.0e-5, err_msg=material.model.name)
        np.testing.assert_allclose(
            result["stress"][k] / scale, tau_ref / scale, atol=2.0e-5, err_msg=material.model.name
        )


@pytest.mark.parametrize("material", [ELASTIC_FCR, ELASTIC_NH, CLAY, GRAINS])
def test_hyperelastic_stress_is_energy_derivative(material):
    # tau = (dPsi/dF) F^T; for the plastic models at an elastic state, Psi is the Hencky energy
    F0 = F_VM_ELASTIC if material.model == MaterialModel.VON_MISES else F_GENERIC
    if material.model == MaterialModel.DRUCKER_PRAGER:
        F0 = F_CONE_INSIDE
    result = evaluate(material, np.concatenate([F0[None], perturbations(F0)]))
    dpsi_dF = central_difference(result["energy"][1:], FD_STEP).reshape(3, 3)
    tau_fd = dpsi_dF @ F0.T
    assert relative_error(result["stress"][0], tau_fd) < 5.0e-3


def test_von_mises_returns_to_yield_surface():
    inside = F_VM_ELASTIC
    result = evaluate(CLAY, [F_YIELDING, inside])
    mu, _ = CLAY.lame_parameters()
    # the trial state is far outside: its elastic von Mises stress is several times the yield stress
    eps = np.log(np.linalg.svd(F_YIELDING, compute_uv=False))
    assert math.sqrt(6.0) * mu * np.linalg.norm(eps - eps.mean()) > 5 * CLAY.yield_stress
    assert von_mises_stress(result["stress"][0]) == pytest.approx(CLAY.yield_stress, rel=1.0e-3)
    # plastic flow is isochoric: det F is kept
    assert np.linalg.det(result["F"][0]) == pytest.approx(np.linalg.det(F_YIELDING), rel=1.0e-5)
    assert von_mises_stress(result["stress"][1]) < CLAY.yield_stress
    np.testing.assert_array_equal(result["F"][1], inside.astype(np.float32))


def test_drucker_prager_projection():
    result = evaluate(GRAINS, [F_CONE_OUTSIDE, F_CONE_INSIDE, F_EXPANDED])
    sin_phi = math.sin(GRAINS.friction_angle)
    alpha = math.sqrt(2.0 / 3.0) * 2 * sin_phi / (3 - sin_phi)

    def cone(tau):
        # the Hencky cone ||eps_dev|| <= -(3 lam + 2 mu)/(2 mu) tr(eps) alpha in stress form:
        # ||dev tau|| <= -alpha tr(tau)
        dev = tau - np.trace(tau) / 3.0 * np.eye(3)
        return np.linalg.norm(dev), -alpha * np.trace(tau)

    # elastic trial stress: the same Hencky elasticity without any plastic limit
    unlimited = Material(MaterialModel.VON_MISES, young_modulus=GRAINS.young_modulus,
                         poisson_ratio=GRAINS.poisson_ratio, yield_stress=1.0e12)  # fmt: skip
    shear_trial, bound_trial = cone(reference_stress(unlimited, F_CONE_OUTSIDE)[1])
    assert shear_trial > 1.2 * bound_trial > 0  # the trial state is well outside the cone
    shear, bound = cone(result["stress"][0])
    assert shear == pytest.approx(bound, rel=1.0e-3)
    assert np.trace(result["stress"][0]) < 0
    # the projection keeps the volumetric strain: det F is unchanged
    assert np.linalg.det(result["F"][0]) == pytest.approx(np.linalg.det(F_CONE_OUTSIDE), rel=1.0e-5)
    shear, bound = cone(result["stress"][1])
    assert shear < bound
    np.testing.assert_array_equal(result["F"][1], F_CONE_INSIDE.astype(np.float32))
    # expansion: stress-free, F reduced to its rotation
    np.testing.assert_allclose(result["stress"][2], 0.0, atol=1e-6)
    U, _, Vt = np.linalg.svd(F_EXPANDED)
    np.testing.assert_allclose(result["F"][2], U @ Vt, atol=1e-5)


def test_fluid_pressure_and_viscosity():
    rate = 2.5  # shear rate [1/s]
    shear = np.zeros((3, 3))
    shear[0, 1] = rate
    compressed = np.cbrt(0.99) * np.eye(3)
    items = [material_item(LIQUID, compressed), material_item(LIQUID, np.eye(3), L=shear)]
    result = run_materials(items)
    pressure = -np.trace(result["stress"][0]) / 3.0 / 0.99  # Cauchy pressure = -tr(tau) / (3 J)
    assert pressure == pytest.approx(LIQUID.bulk_modulus * 0.01, rel=0.06)  # linear part of Tait
    assert pressure == pytest.approx(LIQUID.bulk_modulus / 7.0 * (0.99**-7 - 1.0), rel=1.0e-3)
    np.testing.assert_allclose(result["F"][0], compressed, atol=1e-6)
    tau = result["stress"][1]
    assert tau[0, 1] == pytest.approx(LIQUID.viscosity * rate, rel=1.0e-5)
    assert tau[1, 0] == pytest.approx(LIQUID.viscosity * rate, rel=1.0e-5)
    np.testing.assert_allclose(np.diag(tau), 0.0, atol=1e-6)


def test_outputs_finite_at_extreme_states():
    extreme = [np.eye(3), 0.5 * np.eye(3), with_stretches([1.0, 0.5, 1.0e-6]), np.diag([1.0, 1.0, -0.5]),
               with_stretches([3.0, 0.2, 0.2]), np.zeros((3, 3))]  # fmt: skip
    items = [material_item(m, F, L=FLUID_L) for m in ALL_TEST_MATERIALS for F in extreme]
    result = run_materials(items)
    for key, values in result.items():
        assert np.isfinite(values).all(), key


# ---------------------------------------------------------------------------------------------
# constitutive models: gradients
# ---------------------------------------------------------------------------------------------

GRADIENT_CASES = [
    ("fixed_corotated", ELASTIC_FCR, F_GENERIC, None),
    ("fixed_corotated_identity", ELASTIC_FCR, np.eye(3), None),
    ("neo_hookean", ELASTIC_NH, F_GENERIC, None),
    ("von_mises_elastic", CLAY, F_VM_ELASTIC, None),
    ("von_mises_identity", CLAY, np.eye(3), None),
    ("von_mises_uniaxial", CLAY, F_UNIAXIAL, None),
    ("von_mises_yielding", CLAY, F_YIELDING, None),
    ("drucker_prager_inside", GRAINS, F_CONE_INSIDE, None),
    ("drucker_prager_projected", GRAINS, F_CONE_OUTSIDE, None),
    ("drucker_prager_tip", GRAINS, F_EXPANDED, None),
    ("fluid", LIQUID, with_stretches([1.01, 0.99, 0.985]), FLUID_L),
]


def gradient_batch():
    """One launch: each case, its 18 F perturbations and 12 relative parameter perturbations."""
    items = []
    for k, (_, material, F0, L) in enumerate(GRADIENT_CASES):
        base = material_item(material, F0, L=L, weights_seed=k, for_gradients=True)
        items.append(base)
        for F in perturbations(F0):
            items.append({**base, "F": F})
        for name in PARAM_NAMES:
            for sign in (1.0, -1.0):
                items.append({**base, name: base[name] * (1.0 + sign * FD_STEP)})
    return run_materials(items)


@pytest.fixture(scope="module")
def gradient_results():
    return gradient_batch()


# the parameters each case's loss must depend on (so the check is not vacuous)
SENSITIVE = {
    "fixed_corotated": ("young_modulus", "poisson_ratio"),
    "neo_hookean": ("young_modulus", "poisson_ratio"),
    "von_mises_elastic": ("young_modulus", "poisson_ratio"),
    "von_mises_yielding": ("young_modulus", "poisson_ratio", "yield_stress"),
    "drucker_prager_projected": ("young_modulus", "poisson_ratio", "friction_angle"),
    "fluid": ("viscosity", "bulk_modulus"),
}


@pytest.mark.parametrize("case", range(len(GRADIENT_CASES)), ids=[c[0] for c in GRADIENT_CASES])
def test_constitutive_gradients_match_finite_differences(gradient_results, case):
    name = GRADIENT_CASES[case][0]
    stride = 1 + 18 + 2 * len(PARAM_NAMES)
    base = case * stride
    losses = gradient_results["loss"]
    fd_F = central_difference(losses[base + 1 : base + 19], FD_STEP).reshape(3, 3)
    assert relative_error(gradient_results["grad_F"][base], fd_F) < GRAD_TOL, (
        name,
        gradient_results["grad_F"][base],
        fd_F,
    )
    for p, param in enumerate(PARAM_NAMES):
        start = base + 19 + 2 * p
        item_value = material_item(GRADIENT_CASES[case][1], np.eye(3))[param]
        # derivative with respect to log(param): both sides scale alike, FD step is relative
        fd = central_difference(losses[start : start + 2], FD_STEP)[0]
        tape = gradient_results["grad_" + param][base] * item_value
        assert abs(tape - fd) <= GRAD_TOL * abs(fd) + 2.0e-4, (name, param, tape, fd)
        if param in SENSITIVE.get(name, ()):
            assert abs(fd) > 1.0e-2, (name, param, fd)


def reference_loss(item, F=None, **param_changes) -> float:
    """The kernel's loss for one item, evaluated with the float64 reference model."""
    params = {name: item[name] for name in PARAM_NAMES}
    params.update(param_changes)
    material = Material(MaterialModel(item["model"]), **params)
    F_out, tau = reference_stress(material, item["F"] if F is None else F, item["L"])
    loss_F = np.sum(item["weight_F"] * (F_out - item["offset_F"]))
    loss_stress = np.sum(item["weight_stress"] * (tau - item["offset_stress"])) / item["stress_scale"]
    return float(loss_F + loss_stress)


REPEATED_STRETCH_CASES = [
    ("fixed_corotated_two_equal", ELASTIC_FCR, with_stretches([1.1, 0.95, 0.95])),
    ("von_mises_identity", CLAY, np.eye(3)),
    ("von_mises_elastic_two_equal", CLAY, with_stretches([1.01, 1.0, 1.0])),
    ("von_mises_yielding_two_equal", CLAY, with_stretches([1.25, 0.88, 0.88])),
    ("drucker_prager_inside_three_equal", GRAINS, with_stretches([0.95, 0.95, 0.95])),
    ("drucker_prager_projected_two_equal", GRAINS, with_stretches([1.12, 0.9, 0.9])),
]


def test_gradients_exact_at_repeated_stretches():
    # Uniaxial and isotropic states are common (bodies at rest, flat pushers). Their gradients pass
    # through the custom Hencky-stress and spectral-rebuild adjoints; float32 finite differences are
    # too noisy at repeated singular values, so the reference is float64 differencing of numpy models.
    items = [material_item(m, F.astype(np.float32).astype(np.float64), weights_seed=k, for_gradients=True)
             for k, (_, m, F) in enumerate(REPEATED_STRETCH_CASES)]  # fmt: skip
    for item in items:
        for key in ("weight_F", "weight_stress"):
            item[key] = item[key].astype(np.float32).astype(np.float64)
    result = run_materials(items)
    for k, (name, _, _) in enumerate(REPEATED_STRETCH_CASES):
        item = items[k]
        reference = float64_gradient(lambda F, item=item: reference_loss(item, F=F), item["F"])
        assert relative_error(result["grad_F"][k], reference) < 1.0e-3, (name, result["grad_F"][k], reference)
        for param in PARAM_NAMES:
            if item[param] == 0.0:  # an unused parameter left at zero (viscosity of a solid)
                assert result["grad_" + param][k] == 0.0
                continue
            scale = abs(item[param])  # compare derivatives with respect to log(param)
            h = 1.0e-6 * scale
            fd = reference_loss(item, **{param: item[param] + h}) - reference_loss(
                item, **{param: item[param] - h}
            )
            fd *= scale / (2.0 * h)
            tape = result["grad_" + param][k] * scale
            assert abs(tape - fd) <= 1.0e-3 * abs(fd) + 1.0e-4, (name, param, tape, fd)


# ---------------------------------------------------------------------------------------------
# materials and presets
# ---------------------------------------------------------------------------------------------

BAD_VALUES = [
    (MaterialModel.FIXED_COROTATED, "density", 0.0),
    (MaterialModel.FIXED_COROTATED, "density", -5.0),
    (MaterialModel.NEO_HOOKEAN, "young_modulus", 0.0),
    (MaterialModel.FIXED_COROTATED, "poisson_ratio", 0.5),
    (MaterialModel.FIXED_COROTATED, "poisson_ratio", -0.1),
    (MaterialModel.VON_MISES, "yield_stress", 0.0),
    (MaterialModel.DRUCKER_PRAGER, "friction_angle", 0.0),
    (MaterialModel.DRUCKER_PRAGER, "friction_angle", 30.0),  # degrees by mistake
    (MaterialModel.FLUID, "viscosity", -1.0e-3),
    (MaterialModel.FLUID, "bulk_modulus", 0.0),
    (MaterialModel.VON_MISES, "young_modulus", float("nan")),
    (MaterialModel.FLUID, "density", float("inf")),
    (MaterialModel.FIXED_COROTATED, "friction_angle", float("nan")),  # unused but still must be finite
]


@pytest.mark.parametrize(("model", "name", "value"), BAD_VALUES)
def test_invalid_material_raises_naming_the_parameter(model, name, value):
    with pytest.raises(InvalidParameter) as info:
        Material(model, **{name: value})
    assert info.value.name == name
    assert name in str(info.value) and repr(float(value)) in str(info.value)


def test_unknown_model_id_rejected_and_int_ids_accepted():
    with pytest.raises(InvalidParameter, match="model"):
        Material(7)
    assert Material(4, bulk_modulus=2.0e5).model is MaterialModel.FLUID


def test_with_revalidates_and_replaces():
    softer = preset("rubber").with_(young_modulus=5.0e5)
    assert softer.young_modulus == 5.0e5 and softer.model == MaterialModel.FIXED_COROTATED
    with pytest.raises(InvalidParameter, match="poisson_ratio"):
        preset("rubber").with_(poisson_ratio=0.6)


def test_presets_validate_and_have_wave_speeds():
    assert {"rubber", "plasticine", "dough", "sand", "water", "honey"} <= set(PRESETS)
    for name, material in PRESETS.items():
        material.validate()
        assert preset(name.upper()) is material
        assert 0.5 < material.wave_speed() < 200.0, name
    water = preset("water")
    assert water.wave_speed() == pytest.approx(math.sqrt(water.bulk_modulus / water.density))
    sand = preset("sand")
    mu, lam = sand.lame_parameters()
    assert sand.wave_speed() == pytest.approx(math.sqrt((lam + 2 * mu) / sand.density))
    assert sand.friction_angle == pytest.approx(math.radians(30.0))


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ConfigError) as info:
        preset("nope")
    for name in PRESETS:
        assert name in str(info.value)
