"""Constitutive models of the MPM solver as Warp functions: elasticity, plastic return mappings, fluids.

``constitutive_update`` maps a particle's trial deformation gradient to its plastically corrected
deformation gradient and Kirchhoff stress; every branch is differentiable by Warp's tape.
"""

from __future__ import annotations

import enum

import warp as wp

from .svd import (
    SVD3,
    SVD_GAP_ABSOLUTE,
    SVD_GAP_RELATIVE,
    _clamp_away_from_zero,
    polar_rotation,
    spectral_rebuild,
    svd3_guarded,
)

__all__ = [
    "MaterialModel",
    "MaterialParams",
    "MaterialResponse",
    "lame_parameters",
    "constitutive_update",
    "strain_energy_density",
    "hencky_kirchhoff_stress",
    "HENCKY_MIN_STRETCH",
    "NEO_HOOKEAN_MIN_J",
    "FLUID_MIN_J",
    "FLUID_MAX_J",
    "TAIT_EXPONENT",
]


class MaterialModel(enum.IntEnum):
    """Constitutive model id, stored per particle so one kernel runs mixed scenes."""

    FIXED_COROTATED = 0  #: hyperelastic, Stomakhin et al. 2012 fixed-corotated energy
    NEO_HOOKEAN = 1  #: hyperelastic, compressible Neo-Hookean
    VON_MISES = 2  #: plasticine: St. Venant-Kirchhoff on Hencky strain with von Mises plasticity
    DRUCKER_PRAGER = 3  #: cohesionless sand: Hencky elasticity with a Drucker-Prager cone (Klar et al. 2016)
    FLUID = 4  #: weakly compressible Newtonian fluid (Tait pressure + viscous stress)


# The model ids as kernel constants: kernels compare against names, never bare numbers.
FIXED_COROTATED = wp.constant(int(MaterialModel.FIXED_COROTATED))
NEO_HOOKEAN = wp.constant(int(MaterialModel.NEO_HOOKEAN))
VON_MISES = wp.constant(int(MaterialModel.VON_MISES))
DRUCKER_PRAGER = wp.constant(int(MaterialModel.DRUCKER_PRAGER))
FLUID = wp.constant(int(MaterialModel.FLUID))

# Principal stretches below this are clamped before taking log: an inverted or collapsed particle
# then sees a large but finite Hencky strain (log 1e-4 ~ -9.2) instead of -inf/NaN [-].
HENCKY_MIN_STRETCH = wp.constant(1.0e-4)
# Neo-Hookean uses log(J); clamping J keeps it finite for inverted particles [-].
NEO_HOOKEAN_MIN_J = wp.constant(1.0e-4)
# Volume ratio range of the fluid: J^-7 stays below 1e7 at J = 0.1, finite in float32, and a
# weakly compressible fluid outside [0.1, 10] is already far from its model anyway [-].
FLUID_MIN_J = wp.constant(0.1)
FLUID_MAX_J = wp.constant(10.0)
# Tait exponent of water (Becker and Teschner 2007 use 7); dp/dJ = -K at J = 1 for any exponent.
TAIT_EXPONENT = wp.constant(7.0)


@wp.struct
class MaterialParams:
    """Per-particle material parameters in SI units; fields a model does not use are ignored."""

    young_modulus: float  # Young's modulus [Pa] (solids)
    poisson_ratio: float  # Poisson's ratio [-] (solids)
    yield_stress: float  # von Mises yield stress [Pa] (VON_MISES)
    friction_angle: float  # internal friction angle [rad] (DRUCKER_PRAGER)
    viscosity: float  # dynamic viscosity [Pa s] (FLUID)
    bulk_modulus: float  # bulk modulus [Pa] (FLUID)


@wp.struct
class MaterialResponse:
    """Result of one constitutive update."""

    F: wp.mat33  # deformation gradient after the plastic return mapping [-]
    stress: wp.mat33  # Kirchhoff stress tau = P F^T = J * Cauchy stress [Pa]


@wp.func
def lame_parameters(young_modulus: float, poisson_ratio: float) -> wp.vec2:
    """Lame parameters (mu, lambda) [Pa] from Young's modulus [Pa] and Poisson's ratio [-]."""
    mu = young_modulus / (2.0 * (1.0 + poisson_ratio))
    lam = young_modulus * poisson_ratio / ((1.0 + poisson_ratio) * (1.0 - 2.0 * poisson_ratio))
    return wp.vec2(mu, lam)


# ---------------------------------------------------------------------------------------------
# Hencky (logarithmic strain) elasticity with an adjoint that is exact at repeated stretches
# ---------------------------------------------------------------------------------------------


@wp.func
def _hencky_strain(sigma: wp.vec3) -> wp.vec3:
    return wp.vec3(
        wp.log(wp.max(sigma[0], HENCKY_MIN_STRETCH)),
        wp.log(wp.max(sigma[1], HENCKY_MIN_STRETCH)),
        wp.log(wp.max(sigma[2], HENCKY_MIN_STRETCH)),
    )


@wp.func
def _log_divided_difference(sigma_i: float, sigma_j: float) -> float:
    """(l_j - l_i) / (sigma_j - sigma_i) with l = log(max(sigma, HENCKY_MIN_STRETCH)), stable as they meet."""
    if sigma_i > HENCKY_MIN_STRETCH and sigma_j > HENCKY_MIN_STRETCH:
        x = (sigma_j - sigma_i) / sigma_i
        if wp.abs(x) < 1.0e-3:
            # series of log(1 + x) / x: the direct quotient would divide float32 noise by ~0
            return (1.0 - 0.5 * x + x * x / 3.0) / sigma_i
        return (wp.log(sigma_j) - wp.log(sigma_i)) / (sigma_j - sigma_i)
    gap = sigma_j - sigma_i
    if wp.abs(gap) < 1.0e-12:
        return 0.0
    log_j = wp.log(wp.max(sigma_j, HENCKY_MIN_STRETCH))
    log_i = wp.log(wp.max(sigma_i, HENCKY_MIN_STRETCH))
    return (log_j - log_i) / gap


@wp.func
def hencky_kirchhoff_stress(
    F: wp.mat33, U: wp.mat33, sigma: wp.vec3, V: wp.mat33, mu: float, lam: float
) -> wp.mat33:
    """Kirchhoff stress [Pa] of St. Venant-Kirchhoff elasticity on Hencky strain.

    tau = U diag(2 mu eps + lam tr(eps)) U^T with eps = log(sigma). (U, sigma, V) must be the SVD
    of F (from ``svd3_guarded``); they are passed in only to avoid a second SVD. The custom adjoint
    returns the whole derivative through F and none through (U, sigma, V), and evaluates the
    divided differences (eps_j - eps_i) / (sigma_j - sigma_i) in a cancellation-free form, so the
    gradient is exact at F = I and at repeated stretches (the generic SVD adjoint cannot be).
    """
    eps = _hencky_strain(sigma)
    trace = eps[0] + eps[1] + eps[2]
    principal = wp.vec3(
        2.0 * mu * eps[0] + lam * trace, 2.0 * mu * eps[1] + lam * trace, 2.0 * mu * eps[2] + lam * trace
    )
    return U @ wp.diag(principal) @ wp.transpose(U)


@wp.func_grad(hencky_kirchhoff_stress)
def adj_hencky_kirchhoff_stress(
    F: wp.mat33, U: wp.mat33, sigma: wp.vec3, V: wp.mat33, mu: float, lam: float, adj_ret: wp.mat33
):
    # tau = U diag(t) U^T, t_i = 2 mu eps_i + lam tr(eps). With Q = U^T sym(tau_bar) U, P = U^T dF V:
    #   dL = sum_k (2 mu Q_kk + lam tr Q) eps'_k P_kk
    #      + sum_{i<j} 4 mu Q_ij [(eps_j - eps_i) / (sigma_j - sigma_i)]
    #                  * (sigma_j P_ij + sigma_i P_ji) / (sigma_i + sigma_j),
    # the last factor coming from U^T dU; the bracket is the stable divided difference.
    Q = wp.transpose(U) @ (0.5 * (adj_ret + wp.transpose(adj_ret))) @ U
    eps = _hencky_strain(sigma)
    trace_eps = eps[0] + eps[1] + eps[2]
    trace_q = Q[0, 0] + Q[1, 1] + Q[2, 2]

    sigma_bar = wp.vec3(0.0)
    for k in range(3):
        if sigma[k] > HENCKY_MIN_STRETCH:
            sigma_bar[k] = (2.0 * mu * Q[k, k] + lam * trace_q) / sigma[k]

    sigma_max = wp.max(wp.abs(sigma[0]), wp.max(wp.abs(sigma[1]), wp.abs(sigma[2])))
    eps_gap = SVD_GAP_RELATIVE * sigma_max + SVD_GAP_ABSOLUTE
    c01 = 4.0 * mu * Q[0, 1] * _log_divided_difference(sigma[0], sigma[1])
    c01 = c01 / _clamp_away_from_zero(sigma[0] + sigma[1], eps_gap, 1.0)
    c02 = 4.0 * mu * Q[0, 2] * _log_divided_difference(sigma[0], sigma[2])
    c02 = c02 / _clamp_away_from_zero(sigma[0] + sigma[2], eps_gap, 1.0)
    c12 = 4.0 * mu * Q[1, 2] * _log_divided_difference(sigma[1], sigma[2])
    c12 = c12 / _clamp_away_from_zero(sigma[1] + sigma[2], eps_gap, 1.0)
    G = wp.mat33(
        sigma_bar[0], c01 * sigma[1], c02 * sigma[2],
        c01 * sigma[0], sigma_bar[1], c12 * sigma[2],
        c02 * sigma[0], c12 * sigma[1], sigma_bar[2],
    )  # fmt: skip
    wp.adjoint[F] += U @ G @ wp.transpose(V)
    wp.adjoint[mu] += 2.0 * (Q[0, 0] * eps[0] + Q[1, 1] * eps[1] + Q[2, 2] * eps[2])
    wp.adjoint[lam] += trace_q * trace_eps


@wp.func
def _expm1_quotient(c: float, x: float) -> float:
    """(exp(c x) - 1) / x, tending to c as x -> 0."""
    y = c * x
    if wp.abs(y) < 1.0e-3:
        return c * (1.0 + 0.5 * y + y * y / 6.0)
    return (wp.exp(y) - 1.0) / x


@wp.func
def _projected_stretch_difference(
    sigma_i: float, sigma_j: float, eps_i: float, eps_j: float, stretch_i: float, shrink: float
) -> float:
    """(s_j - s_i) / (sigma_j - sigma_i) for s = exp(mean + shrink (eps - mean)), eps = log(sigma)."""
    # s_j - s_i = s_i expm1(shrink (eps_j - eps_i)), and (eps_j - eps_i) / (sigma_j - sigma_i) is the
    # log divided difference: both factors stay accurate when sigma_j -> sigma_i.
    return stretch_i * _expm1_quotient(shrink, eps_j - eps_i) * _log_divided_difference(sigma_i, sigma_j)


@wp.func
def _projected_response(
    F: wp.mat33,
    decomposition: SVD3,
    eps: wp.vec3,
    mean: float,
    shrink: float,
    mu: float,
    lam: float,
) -> MaterialResponse:
    """F and Hencky stress after a return mapping that scales the deviatoric strain by ``shrink``.

    Both return mappings here keep the volumetric strain and shrink the deviator radially:
    eps_new = mean + shrink (eps - mean). The new F = U exp(eps_new) V^T goes through
    spectral_rebuild so that its gradient stays exact at repeated stretches.
    """
    sigma = decomposition.sigma
    eps_new = wp.vec3(mean) + (eps - wp.vec3(mean)) * shrink
    stretch = wp.vec3(wp.exp(eps_new[0]), wp.exp(eps_new[1]), wp.exp(eps_new[2]))
    divided_differences = wp.vec3(
        _projected_stretch_difference(sigma[0], sigma[1], eps[0], eps[1], stretch[0], shrink),
        _projected_stretch_difference(sigma[0], sigma[2], eps[0], eps[2], stretch[0], shrink),
        _projected_stretch_difference(sigma[1], sigma[2], eps[1], eps[2], stretch[1], shrink),
    )
    U = decomposition.U
    V = decomposition.V
    F_elastic = spectral_rebuild(F, U, sigma, V, stretch, divided_differences)
    response = MaterialResponse()
    response.F = F_elastic
    response.stress = hencky_kirchhoff_stress(F_elastic, U, stretch, V, mu, lam)
    return response


# ---------------------------------------------------------------------------------------------
# The five models
# ---------------------------------------------------------------------------------------------


@wp.func
def _fixed_corotated(F: wp.mat33, mu: float, lam: float) -> MaterialResponse:
    R = polar_rotation(F)
    J = wp.determinant(F)
    response = MaterialResponse()
    response.F = F
    response.stress = 2.0 * mu * (F - R) @ wp.transpose(F) + wp.identity(3, float) * (lam * (J - 1.0) * J)
    return response


@wp.func
def _neo_hookean(F: wp.mat33, mu: float, lam: float) -> MaterialResponse:
    J = wp.max(wp.determinant(F), NEO_HOOKEAN_MIN_J)
    identity = wp.identity(3, float)
    response = MaterialResponse()
    response.F = F
    response.stress = mu * (F @ wp.transpose(F) - identity) + identity * (lam * wp.log(J))
    return response


@wp.func
def _von_mises(F: wp.mat33, mu: float, lam: float, yield_stress: float) -> MaterialResponse:
    decomposition = svd3_guarded(F)
    U = decomposition.U
    V = decomposition.V
    eps = _hencky_strain(decomposition.sigma)
    mean = (eps[0] + eps[1] + eps[2]) / 3.0
    eps_dev = eps - wp.vec3(mean)
    # von Mises stress of the deviatoric Kirchhoff stress 2 mu eps_dev: sqrt(3/2) * ||2 mu eps_dev||
    von_mises_stress = wp.sqrt(6.0) * mu * wp.length(eps_dev)
    if von_mises_stress > yield_stress:
        # radial return: for this model it is the exact closest-point projection onto the yield surface
        return _projected_response(F, decomposition, eps, mean, yield_stress / von_mises_stress, mu, lam)
    response = MaterialResponse()
    response.F = F
    response.stress = hencky_kirchhoff_stress(F, U, decomposition.sigma, V, mu, lam)
    return response


@wp.func
def _drucker_prager(F: wp.mat33, mu: float, lam: float, friction_angle: float) -> MaterialResponse:
    # Sand return mapping of Klar et al. 2016 ("Drucker-Prager elastoplasticity for sand animation",
    # SIGGRAPH), done on the Hencky strain eps = log(sigma) of the trial state, d = 3 dimensions:
    #   alpha = sqrt(2/3) * 2 sin(phi) / (3 - sin(phi))   (cone slope from the friction angle phi)
    #   tr(eps) >= 0: the sand is pulled apart and, being cohesionless, carries no stress: eps = 0
    #   otherwise delta_gamma = ||eps_dev|| + (d lambda + 2 mu) / (2 mu) * tr(eps) * alpha;
    #   delta_gamma <= 0: inside the cone, elastic; else eps -= delta_gamma * eps_dev / ||eps_dev||,
    #   which keeps the volumetric strain and shrinks the shear strain onto the cone surface.
    decomposition = svd3_guarded(F)
    U = decomposition.U
    V = decomposition.V
    eps = _hencky_strain(decomposition.sigma)
    trace = eps[0] + eps[1] + eps[2]
    if trace >= 0.0:
        # the tip: F becomes the pure rotation U V^T, stress-free
        tip = MaterialResponse()
        tip.F = polar_rotation(F)
        tip.stress = wp.mat33(0.0)
        return tip
    eps_dev = eps - wp.vec3(trace / 3.0)
    eps_dev_norm = wp.length(eps_dev)
    sin_phi = wp.sin(friction_angle)
    alpha = wp.sqrt(2.0 / 3.0) * 2.0 * sin_phi / (3.0 - sin_phi)
    delta_gamma = eps_dev_norm + (3.0 * lam + 2.0 * mu) / (2.0 * mu) * trace * alpha
    if delta_gamma > 0.0:
        # delta_gamma > 0 with tr(eps) < 0 implies ||eps_dev|| > delta_gamma > 0: no division by zero,
        # and the deviator shrinks by 1 - delta_gamma / ||eps_dev|| in (0, 1)
        return _projected_response(
            F, decomposition, eps, trace / 3.0, 1.0 - delta_gamma / eps_dev_norm, mu, lam
        )
    response = MaterialResponse()
    response.F = F
    response.stress = hencky_kirchhoff_stress(F, U, decomposition.sigma, V, mu, lam)
    return response


@wp.func
def _tait_pressure(J: float, bulk_modulus: float) -> float:
    """Tait equation of state p = (K / gamma) (J^-gamma - 1) [Pa], J already clamped."""
    return bulk_modulus / TAIT_EXPONENT * (wp.pow(J, -TAIT_EXPONENT) - 1.0)


@wp.func
def _fluid(
    F: wp.mat33, velocity_gradient: wp.mat33, viscosity: float, bulk_modulus: float
) -> MaterialResponse:
    J = wp.clamp(wp.determinant(F), FLUID_MIN_J, FLUID_MAX_J)
    pressure = _tait_pressure(J, bulk_modulus)
    L = velocity_gradient
    identity = wp.identity(3, float)
    rate_trace = L[0, 0] + L[1, 1] + L[2, 2]
    viscous = viscosity * (L + wp.transpose(L) - identity * (2.0 / 3.0 * rate_trace))
    response = MaterialResponse()
    # a fluid forgets shape: keep only the volume so F cannot accumulate shear and tangle
    response.F = identity * wp.cbrt(J)
    response.stress = J * (viscous - identity * pressure)
    return response


@wp.func
def constitutive_update(
    model: int, F_trial: wp.mat33, velocity_gradient: wp.mat33, params: MaterialParams
) -> MaterialResponse:
    """Plastic return mapping and Kirchhoff stress of one particle.

    Args:
        model: a ``MaterialModel`` value.
        F_trial: deformation gradient after the elastic predictor, (I + dt C) F_old [-].
        velocity_gradient: particle velocity gradient L [1/s] (APIC C); only FLUID uses it.
        params: material parameters [SI].

    Returns:
        ``MaterialResponse`` with the corrected deformation gradient and Kirchhoff stress [Pa].
        An unknown model id leaves F unchanged and returns zero stress.
    """
    lame = lame_parameters(params.young_modulus, params.poisson_ratio)
    mu = lame[0]
    lam = lame[1]
    if model == FIXED_COROTATED:
        return _fixed_corotated(F_trial, mu, lam)
    if model == NEO_HOOKEAN:
        return _neo_hookean(F_trial, mu, lam)
    if model == VON_MISES:
        return _von_mises(F_trial, mu, lam, params.yield_stress)
    if model == DRUCKER_PRAGER:
        return _drucker_prager(F_trial, mu, lam, params.friction_angle)
    if model == FLUID:
        return _fluid(F_trial, velocity_gradient, params.viscosity, params.bulk_modulus)
    unknown = MaterialResponse()
    unknown.F = F_trial
    unknown.stress = wp.mat33(0.0)
    return unknown


@wp.func
def strain_energy_density(model: int, F: wp.mat33, params: MaterialParams) -> float:
    """Stored elastic energy per unit reference volume Psi(F) [J/m^3 = Pa], with tau = (dPsi/dF) F^T.

    FIXED_COROTATED: mu ||F - R||^2 + lambda/2 (J - 1)^2; NEO_HOOKEAN: mu/2 (tr(F^T F) - 3) - mu log J
    + lambda/2 log(J)^2; VON_MISES and DRUCKER_PRAGER: the Hencky energy mu ||eps||^2 + lambda/2 tr(eps)^2
    of F taken as purely elastic (no return mapping); FLUID: the Tait volumetric energy
    K/(gamma (gamma-1)) J^(1-gamma) + K J / gamma - K/(gamma-1) (the viscous stress has no potential).
    """
    lame = lame_parameters(params.young_modulus, params.poisson_ratio)
    mu = lame[0]
    lam = lame[1]
    if model == FIXED_COROTATED:
        R = polar_rotation(F)
        D = F - R
        J = wp.determinant(F)
        return mu * wp.ddot(D, D) + 0.5 * lam * (J - 1.0) * (J - 1.0)
    if model == NEO_HOOKEAN:
        log_j = wp.log(wp.max(wp.determinant(F), NEO_HOOKEAN_MIN_J))
        return 0.5 * mu * (wp.ddot(F, F) - 3.0) - mu * log_j + 0.5 * lam * log_j * log_j
    if model == VON_MISES or model == DRUCKER_PRAGER:
        eps = _hencky_strain(svd3_guarded(F).sigma)
        trace = eps[0] + eps[1] + eps[2]
        return mu * wp.dot(eps, eps) + 0.5 * lam * trace * trace
    if model == FLUID:
        K = params.bulk_modulus
        J = wp.clamp(wp.determinant(F), FLUID_MIN_J, FLUID_MAX_J)
        g = TAIT_EXPONENT
        return K / (g * (g - 1.0)) * wp.pow(J, 1.0 - g) + K * J / g - K / (g - 1.0)
    return 0.0
