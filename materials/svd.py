"""Singular value decomposition of 3x3 deformation gradients with gradients that stay finite.

``svd3_guarded`` wraps ``wp.svd3`` with a custom adjoint; ``polar_rotation`` and ``spectral_rebuild``
add exact adjoints for the two isotropic uses the constitutive models need.

Conventions (those of ``wp.svd3``, checked against Warp 1.19): F = U diag(sigma) V^T with U and V
proper rotations (det = +1); sigma is sorted by decreasing magnitude, sigma[0] >= sigma[1] >= 0,
and sigma[2] carries the sign of det(F), so an inverted F has a negative last singular value.

Adjoint. With U^T dU and V^T dV antisymmetric, a loss with adjoints (U_bar, sigma_bar, V_bar) gives
(verified against finite differences)

    F_bar = U (diag(sigma_bar) + G) V^T,
    G_ij  = (A_ij sigma_j + B_ij sigma_i) / (sigma_j^2 - sigma_i^2)              (i != j)
          = (A_ij + B_ij) / (2 d_ij) + (A_ij - B_ij) / (2 s_ij),
    A = U^T U_bar - U_bar^T U,  B = V^T V_bar - V_bar^T V,
    d_ij = sigma_j - sigma_i,   s_ij = sigma_j + sigma_i.

The first form divides by ~0 whenever two singular values meet, even when the loss does not care
how U and V are chosen inside the degenerate subspace. The split form isolates that in 1/d, which is
clamped (SVD_GAP_RELATIVE); 1/s is singular only for singular or inverted F. Limits of any generic
adjoint at (nearly) repeated singular values, which the two specialised adjoints below remove:
- R = U V^T has A + B = 0 analytically, but float32 rounding of A + B times the clamped 1/d still
  leaves errors of ~5-15 % when U != V; ``polar_rotation`` has its own adjoint (exact).
- U g(sigma) V^T needs (g_j - g_i) / (sigma_j - sigma_i), which tends to a finite, nonzero limit,
  while both factors round to ~0; ``spectral_rebuild`` takes that divided difference from the caller.
"""

from __future__ import annotations

import warp as wp

__all__ = [
    "SVD3",
    "svd3_guarded",
    "polar_rotation",
    "spectral_rebuild",
    "SVD_GAP_RELATIVE",
    "SVD_GAP_ABSOLUTE",
]

# Smallest |sigma_j - sigma_i| (and |sigma_i + sigma_j|) the adjoint divides by, relative to the
# largest singular value. wp.svd3 in float32 resolves singular values to a few 1e-7 relative, so
# 1e-6 sits just above its noise: gaps below it are numerically "equal" singular values, and the
# resulting gradient is bounded by ~1e6 |adjoint| instead of overflowing.
SVD_GAP_RELATIVE = wp.constant(1.0e-6)
# Floor for F ~ 0 so the clamp never becomes zero [same unit as F, dimensionless].
SVD_GAP_ABSOLUTE = wp.constant(1.0e-12)


@wp.struct
class SVD3:
    """F = U diag(sigma) V^T; U, V rotations, sigma sorted by magnitude, sign of det(F) on sigma[2]."""

    U: wp.mat33
    sigma: wp.vec3
    V: wp.mat33


@wp.func
def svd3_guarded(F: wp.mat33) -> SVD3:
    """Singular value decomposition F = U diag(sigma) V^T whose adjoint is finite everywhere."""
    U = wp.mat33()
    sigma = wp.vec3()
    V = wp.mat33()
    wp.svd3(F, U, sigma, V)
    result = SVD3()
    result.U = U
    result.sigma = sigma
    result.V = V
    return result


@wp.func
def _clamp_away_from_zero(x: float, eps: float, sign_if_tiny: float) -> float:
    # keep the sign of x; a value too small to carry a reliable sign takes sign_if_tiny
    if wp.abs(x) >= eps:
        return x
    if x > 0.0:
        return eps
    if x < 0.0:
        return -eps
    return sign_if_tiny * eps


@wp.func
def _offdiag_pair(
    a_ij: float, b_ij: float, a_ji: float, b_ji: float, sigma_i: float, sigma_j: float, eps: float
) -> wp.vec2:
    """Entries (G_ij, G_ji) of the off-diagonal adjoint block for the pair i < j."""
    # sigma is sorted decreasingly, so an unresolved gap is treated as sigma_j <= sigma_i; using the
    # same clamped d for (i, j) and its negative for (j, i) keeps G's symmetric part consistent.
    d = _clamp_away_from_zero(sigma_j - sigma_i, eps, -1.0)
    s = _clamp_away_from_zero(sigma_j + sigma_i, eps, 1.0)
    g_ij = 0.5 * (a_ij + b_ij) / d + 0.5 * (a_ij - b_ij) / s
    g_ji = -0.5 * (a_ji + b_ji) / d + 0.5 * (a_ji - b_ji) / s
    return wp.vec2(g_ij, g_ji)


@wp.func_grad(svd3_guarded)
def adj_svd3_guarded(F: wp.mat33, adj_ret: SVD3):
    U = wp.mat33()
    sigma = wp.vec3()
    V = wp.mat33()
    wp.svd3(F, U, sigma, V)

    A = wp.transpose(U) @ adj_ret.U - wp.transpose(adj_ret.U) @ U
    B = wp.transpose(V) @ adj_ret.V - wp.transpose(adj_ret.V) @ V

    sigma_max = wp.max(wp.abs(sigma[0]), wp.max(wp.abs(sigma[1]), wp.abs(sigma[2])))
    eps = SVD_GAP_RELATIVE * sigma_max + SVD_GAP_ABSOLUTE

    g01 = _offdiag_pair(A[0, 1], B[0, 1], A[1, 0], B[1, 0], sigma[0], sigma[1], eps)
    g02 = _offdiag_pair(A[0, 2], B[0, 2], A[2, 0], B[2, 0], sigma[0], sigma[2], eps)
    g12 = _offdiag_pair(A[1, 2], B[1, 2], A[2, 1], B[2, 1], sigma[1], sigma[2], eps)

    G = wp.mat33(
        adj_ret.sigma[0], g01[0], g02[0],
        g01[1], adj_ret.sigma[1], g12[0],
        g02[1], g12[1], adj_ret.sigma[2],
    )  # fmt: skip
    wp.adjoint[F] += U @ G @ wp.transpose(V)


@wp.func
def polar_rotation(F: wp.mat33) -> wp.mat33:
    """Rotation R = U V^T of the polar decomposition F = R S (a reflection-free rotation, det R = +1)."""
    decomposition = svd3_guarded(F)
    return decomposition.U @ wp.transpose(decomposition.V)


@wp.func_grad(polar_rotation)
def adj_polar_rotation(F: wp.mat33, adj_ret: wp.mat33):
    # The svd3_guarded adjoint specialised to R = U V^T: U_bar = R_bar V, V_bar = R_bar^T U give
    # B = -A and sigma_bar = 0, so G_ij = (N_ij - N_ji) / (sigma_i + sigma_j) with N = U^T R_bar V.
    # Going through svd3_guarded instead is exact only up to float32 rounding of A + B, which the
    # clamped 1/d amplifies by up to 1/SVD_GAP_RELATIVE at (nearly) repeated singular values.
    U = wp.mat33()
    sigma = wp.vec3()
    V = wp.mat33()
    wp.svd3(F, U, sigma, V)
    N = wp.transpose(U) @ adj_ret @ V
    sigma_max = wp.max(wp.abs(sigma[0]), wp.max(wp.abs(sigma[1]), wp.abs(sigma[2])))
    eps = SVD_GAP_RELATIVE * sigma_max + SVD_GAP_ABSOLUTE
    g01 = (N[0, 1] - N[1, 0]) / _clamp_away_from_zero(sigma[0] + sigma[1], eps, 1.0)
    g02 = (N[0, 2] - N[2, 0]) / _clamp_away_from_zero(sigma[0] + sigma[2], eps, 1.0)
    g12 = (N[1, 2] - N[2, 1]) / _clamp_away_from_zero(sigma[1] + sigma[2], eps, 1.0)
    G = wp.mat33(0.0, g01, g02, -g01, 0.0, g12, -g02, -g12, 0.0)
    wp.adjoint[F] += U @ G @ wp.transpose(V)


@wp.func
def spectral_rebuild(
    F: wp.mat33, U: wp.mat33, sigma: wp.vec3, V: wp.mat33, values: wp.vec3, divided_differences: wp.vec3
) -> wp.mat33:
    """U diag(values) V^T for values = g(sigma), g a symmetric function, with an exact gradient.

    (U, sigma, V) must be ``svd3_guarded(F)``. ``divided_differences`` holds
    (g_j - g_i) / (sigma_j - sigma_i) for the pairs (0, 1), (0, 2), (1, 2), computed by the caller in
    a form that stays accurate as sigma_i -> sigma_j (there it tends to dg_i/dsigma_i - dg_i/dsigma_j).
    The adjoint sends diag(U^T M_bar V) to ``values`` (so autodiff carries it through g to sigma and
    to any parameters of g) and the off-diagonal part, which needs the divided differences, to F;
    (U, sigma, V) and ``divided_differences`` receive none. The generic svd3_guarded adjoint would
    instead get (g_j - g_i) / (sigma_j - sigma_i) from quantities that both round to ~0 at repeated
    singular values and lose this term.
    """
    return U @ wp.diag(values) @ wp.transpose(V)


@wp.func
def _rebuild_pair(
    n_ij: float, n_ji: float, divided_difference: float, value_sum: float, sigma_sum: float
) -> float:
    return 0.5 * (n_ij + n_ji) * divided_difference + 0.5 * (n_ij - n_ji) * value_sum / sigma_sum


@wp.func_grad(spectral_rebuild)
def adj_spectral_rebuild(
    F: wp.mat33,
    U: wp.mat33,
    sigma: wp.vec3,
    V: wp.mat33,
    values: wp.vec3,
    divided_differences: wp.vec3,
    adj_ret: wp.mat33,
):
    # With N = U^T M_bar V the svd3_guarded adjoint has A + B = (N_ij + N_ji)(g_j - g_i) and
    # A - B = (N_ij - N_ji)(g_i + g_j); dividing by 2 d and 2 s gives the two terms of _rebuild_pair.
    N = wp.transpose(U) @ adj_ret @ V
    sigma_max = wp.max(wp.abs(sigma[0]), wp.max(wp.abs(sigma[1]), wp.abs(sigma[2])))
    eps = SVD_GAP_RELATIVE * sigma_max + SVD_GAP_ABSOLUTE
    s01 = _clamp_away_from_zero(sigma[0] + sigma[1], eps, 1.0)
    s02 = _clamp_away_from_zero(sigma[0] + sigma[2], eps, 1.0)
    s12 = _clamp_away_from_zero(sigma[1] + sigma[2], eps, 1.0)
    dd = divided_differences
    G = wp.mat33(
        0.0,
        _rebuild_pair(N[0, 1], N[1, 0], dd[0], values[0] + values[1], s01),
        _rebuild_pair(N[0, 2], N[2, 0], dd[1], values[0] + values[2], s02),
        _rebuild_pair(N[1, 0], N[0, 1], dd[0], values[0] + values[1], s01),
        0.0,
        _rebuild_pair(N[1, 2], N[2, 1], dd[2], values[1] + values[2], s12),
        _rebuild_pair(N[2, 0], N[0, 2], dd[1], values[0] + values[2], s02),
        _rebuild_pair(N[2, 1], N[1, 2], dd[2], values[1] + values[2], s12),
        0.0,
    )
    wp.adjoint[F] += U @ G @ wp.transpose(V)
    wp.adjoint[values] += wp.vec3(N[0, 0], N[1, 1], N[2, 2])
