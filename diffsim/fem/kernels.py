"""Warp kernels of the tetrahedral FEM solver: elastic and damping forces per tet, penalty contact
with friction against the shared colliders per surface node, and the symplectic Euler update.
"""

from __future__ import annotations

import warp as wp

from diffsim.geometry.colliders import (
    MAX_COLLIDERS,
    ColliderSet,
    collider_query,
    collider_slot,
    collider_surface_velocity,
)
from diffsim.materials.svd import polar_rotation

#: ``tet_material`` ids
STABLE_NEO_HOOKEAN = wp.constant(0)
FIXED_COROTATED = wp.constant(1)


@wp.func
def lame_parameters(young_modulus: float, poisson_ratio: float):
    """(mu, lambda) [Pa] of Young's modulus [Pa] and Poisson's ratio."""
    mu = young_modulus / (2.0 * (1.0 + poisson_ratio))
    lam = young_modulus * poisson_ratio / ((1.0 + poisson_ratio) * (1.0 - 2.0 * poisson_ratio))
    return wp.vec2(mu, lam)


@wp.func
def cofactor(F: wp.mat33):
    """dJ/dF of J = det F: its columns are cross products of F's columns."""
    f0 = wp.vec3(F[0, 0], F[1, 0], F[2, 0])
    f1 = wp.vec3(F[0, 1], F[1, 1], F[2, 1])
    f2 = wp.vec3(F[0, 2], F[1, 2], F[2, 2])
    return wp.matrix_from_cols(wp.cross(f1, f2), wp.cross(f2, f0), wp.cross(f0, f1))


@wp.func
def first_piola_stress(material: int, F: wp.mat33, mu: float, lam: float):
    """First Piola-Kirchhoff stress [Pa] of the deformation gradient ``F``.

    Stable Neo-Hookean (Smith, de Goes and Kim 2018) with its Lame parameters rescaled so that
    small strains see exactly (mu, lam); it stays finite and restoring for inverted tets. Fixed
    corotated (Stomakhin et al. 2012) uses the polar rotation of F.
    """
    J = wp.determinant(F)
    P = wp.mat33()
    if material == FIXED_COROTATED:
        P = 2.0 * mu * (F - polar_rotation(F)) + (lam * (J - 1.0)) * cofactor(F)
    else:
        mu_s = mu * (4.0 / 3.0)
        lam_s = lam + mu * (5.0 / 6.0)
        alpha = 1.0 + 0.75 * mu_s / lam_s
        stretch = wp.ddot(F, F)
        P = (mu_s * (1.0 - 1.0 / (stretch + 1.0))) * F + (lam_s * (J - alpha)) * cofactor(F)
    return P


@wp.func
def strain_energy_density(material: int, F: wp.mat33, mu: float, lam: float):
    """Energy per rest volume [J/m^3] whose derivative is :func:`first_piola_stress`."""
    J = wp.determinant(F)
    psi = float(0.0)
    if material == FIXED_COROTATED:
        R = polar_rotation(F)
        psi = mu * wp.ddot(F - R, F - R) + 0.5 * lam * (J - 1.0) * (J - 1.0)
    else:
        mu_s = mu * (4.0 / 3.0)
        lam_s = lam + mu * (5.0 / 6.0)
        alpha = 1.0 + 0.75 * mu_s / lam_s
        stretch = wp.ddot(F, F)
        psi = 0.5 * mu_s * (stretch - 3.0) + 0.5 * lam_s * (J - alpha) * (J - alpha) - 0.5 * mu_s * wp.log(
            (stretch + 1.0) / 4.0) - 0.5 * lam_s * (1.0 - alpha) * (1.0 - alpha)
    return psi


@wp.func
def edge_matrix(x0: wp.vec3, x1: wp.vec3, x2: wp.vec3, x3: wp.vec3):
    return wp.matrix_from_cols(x1 - x0, x2 - x0, x3 - x0)


@wp.kernel
def tet_forces(
    node_x: wp.array(dtype=wp.vec3),
    node_v: wp.array(dtype=wp.vec3),
    tet_nodes: wp.array(dtype=wp.vec4i),
    tet_rest_inverse: wp.array(dtype=wp.mat33),
    tet_rest_volume: wp.array(dtype=float),
    tet_material: wp.array(dtype=int),
    tet_young_modulus: wp.array(dtype=float),
    tet_poisson_ratio: wp.array(dtype=float),
    tet_damping: wp.array(dtype=float),
    node_force: wp.array(dtype=wp.vec3),
):
    t = wp.tid()
    n = tet_nodes[t]
    Dm_inv = tet_rest_inverse[t]
    F = edge_matrix(node_x[n[0]], node_x[n[1]], node_x[n[2]], node_x[n[3]]) @ Dm_inv
    lame = lame_parameters(tet_young_modulus[t], tet_poisson_ratio[t])
    P = first_piola_stress(tet_material[t], F, lame[0], lame[1])
    # stiffness-proportional (Rayleigh) damping: the linear-elastic stress of the strain rate
    F_rate = edge_matrix(node_v[n[0]], node_v[n[1]], node_v[n[2]], node_v[n[3]]) @ Dm_inv
    strain_rate = 0.5 * (F_rate + wp.transpose(F_rate))
    P = P + tet_damping[t] * (2.0 * lame[0] * strain_rate + lame[1] * wp.trace(strain_rate) * wp.identity(3, float))
    H = (-tet_rest_volume[t]) * (P @ wp.transpose(Dm_inv))
    f1 = wp.vec3(H[0, 0], H[1, 0], H[2, 0])
    f2 = wp.vec3(H[0, 1], H[1, 1], H[2, 1])
    f3 = wp.vec3(H[0, 2], H[1, 2], H[2, 2])
    wp.atomic_add(node_force, n[0], -(f1 + f2 + f3))
    wp.atomic_add(node_force, n[1], f1)
    wp.atomic_add(node_force, n[2], f2)
    wp.atomic_add(node_force, n[3], f3)


@wp.func
def smooth_penetration(depth: float, width: float):
    """max(depth, 0) [m] with the corner rounded over [-width, width], so contact forces and
    their gradients do not jump when a node touches down."""
    out = float(0.0)
    if depth >= width:
        out = depth
    elif depth > -width:
        out = (depth + width) * (depth + width) / (4.0 * width)
    return out


@wp.func
def contact_force(
    x: wp.vec3,
    v: wp.vec3,
    area: float,
    stiffness: float,
    friction: float,
    query_distance: float,
    normal: wp.vec3,
    surface_velocity: wp.vec3,
    smoothing: float,
    friction_velocity: float,
):
    """Penalty force [N] on a surface node of lumped ``area`` [m^2] at signed distance
    ``query_distance`` [m] from a surface with outward ``normal``: pressure ``stiffness`` [Pa/m]
    times the penetration, and friction that is viscous below ``friction_velocity`` [m/s] of slip
    and reaches the Coulomb limit ``friction`` times the normal force above it."""
    pressure = stiffness * smooth_penetration(-query_distance, smoothing)
    normal_force = pressure * area
    relative = v - surface_velocity
    slip = relative - wp.dot(relative, normal) * normal
    speed = wp.sqrt(wp.dot(slip, slip) + friction_velocity * friction_velocity)
    return normal_force * normal - (friction * normal_force / speed) * slip


@wp.kernel
def node_contacts(
    node_x: wp.array(dtype=wp.vec3),
    node_v: wp.array(dtype=wp.vec3),
    node_body: wp.array(dtype=int),
    node_contact_area: wp.array(dtype=float),
    body_world: wp.array(dtype=int),
    body_contact_stiffness: wp.array(dtype=float),
    colliders: ColliderSet,
    smoothing: float,
    friction_velocity: float,
    coupled_force: wp.array(dtype=wp.vec3),
    contact_force_out: wp.array(dtype=wp.vec3),
):
    i = wp.tid()
    area = node_contact_area[i]
    total = coupled_force[i]  # contact forces of other solvers (diffsim.coupling), else zero
    if area > 0.0:
        body = node_body[i]
        world = body_world[body]
        x = node_x[i]
        for c in range(wp.static(MAX_COLLIDERS)):
            if c < colliders.count:
                slot = collider_slot(colliders, world, c)
                q = collider_query(colliders, c, slot, x)
                if q.distance < smoothing:
                    total = total + contact_force(x, node_v[i], area, body_contact_stiffness[body],
                                                  colliders.friction[c], q.distance, q.normal,
                                                  collider_surface_velocity(colliders, slot, x), smoothing,
                                                  friction_velocity)
    contact_force_out[i] = total


@wp.kernel
def integrate_nodes(
    node_x: wp.array(dtype=wp.vec3),
    node_v: wp.array(dtype=wp.vec3),
    node_body: wp.array(dtype=int),
    node_mass: wp.array(dtype=float),
    node_fixed: wp.array(dtype=int),
    node_rest_local: wp.array(dtype=wp.vec3),
    body_damping: wp.array(dtype=float),
    body_position_out: wp.array(dtype=wp.vec3),
    body_rotation_out: wp.array(dtype=wp.quat),
    elastic_force: wp.array(dtype=wp.vec3),
    contact_force: wp.array(dtype=wp.vec3),
    external_force: wp.array(dtype=wp.vec3),
    gravity: wp.array(dtype=wp.vec3),
    dt: float,
    x_out: wp.array(dtype=wp.vec3),
    v_out: wp.array(dtype=wp.vec3),
):
    i = wp.tid()
    body = node_body[i]
    x = node_x[i]
    if node_fixed[i] != 0:
        # bonded to the rigid backing: carried by the body's pose at the end of the step
        target = wp.quat_rotate(body_rotation_out[body], node_rest_local[i]) + body_position_out[body]
        x_out[i] = target
        v_out[i] = (target - x) / dt
    else:
        force = elastic_force[i] + contact_force[i] + external_force[i]
        acceleration = force / node_mass[i] + gravity[0] - body_damping[body] * node_v[i]
        v = node_v[i] + dt * acceleration
        v_out[i] = v
        x_out[i] = x + dt * v


@wp.kernel
def tet_energy(
    node_x: wp.array(dtype=wp.vec3),
    tet_nodes: wp.array(dtype=wp.vec4i),
    tet_rest_inverse: wp.array(dtype=wp.mat33),
    tet_rest_volume: wp.array(dtype=float),
    tet_material: wp.array(dtype=int),
    tet_young_modulus: wp.array(dtype=float),
    tet_poisson_ratio: wp.array(dtype=float),
    tet_body: wp.array(dtype=int),
    energy: wp.array(dtype=float),
):
    t = wp.tid()
    n = tet_nodes[t]
    F = edge_matrix(node_x[n[0]], node_x[n[1]], node_x[n[2]], node_x[n[3]]) @ tet_rest_inverse[t]
    lame = lame_parameters(tet_young_modulus[t], tet_poisson_ratio[t])
    wp.atomic_add(energy, tet_body[t], tet_rest_volume[t] * strain_energy_density(tet_material[t], F, lame[0], lame[1]))
