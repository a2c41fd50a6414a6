"""Implicit FEM steps: backward Euler and quasi-static equilibrium, solved by Newton-CG and
differentiated by the implicit function theorem (:mod:`diffsim.core.implicit`).

The unknowns are the node positions x at the end of the step. A step solves r(x) = 0 with

    r_i = m_i (1/h^2 + c/h) (x_i - x_i^n) - (m_i / h) v_i^n - m_i g - f_ext,i
          - f_elastic,i(x) - f_damping,i(x) - f_contact,i(x)                        (free nodes)
    r_i = k_i (x_i - target_i)                                                       (backing nodes)

for backward Euler (h the step, c the body's mass damping), and without the inertia terms for
quasi-static equilibrium. Every force is the negative gradient of a potential, so the Jacobian is
symmetric:

- elastic: the tet's strain energy (stable Neo-Hookean or fixed corotated);
- damping: stiffness-proportional (Rayleigh) damping of the strain rate (x - x^n) / h, the
  gradient of a quadratic dissipation potential;
- contact: the explicit solver's penalty pressure (a potential of the smoothed penetration);
- friction: **lagged**. The normal force and normal of each (node, collider) pair, and the
  collider's surface velocity, are taken at the start of the step; the friction force
  -mu lambda (u/h) / sqrt(|u/h|^2 + v_f^2) of the tangential slip u = P (x - x^n - h v_s) is
  then the gradient of mu lambda h sqrt(|u/h|^2 + v_f^2), smooth and convex in x. The explicit
  solver's friction law with its viscous core below v_f is thus kept, one step late in the normal
  force: a contact that starts inside a step has no friction until the next.

Backing nodes are not unknowns of the elastic and contact terms (those read their targets, the
backing's pose at the end of the step), so pinning them keeps the Jacobian symmetric.

Newton's linear solves use an analytic Jacobian product (``jacobian_product``): exact for the
inertia, pins, stable Neo-Hookean elasticity and Rayleigh damping, exact for the lagged friction
(positive semi-definite), and Gauss-Newton for the penalty, which drops the term of the indenter's
curvature: along the surface of a convex indenter that term is -k A depth / R, at the default
contact stiffness larger than the pad's own shear stiffness, and it made the exact Jacobian
indefinite so that CG stopped after a few iterations. The elastic part is not projected: where
Neo-Hookean compression makes it indefinite, CG stops at the first direction of negative
curvature and the line search still descends. The residual is exact, so Newton lands on r = 0,
and the adjoint solve of the backward pass uses the exact (taped) Jacobian. Fixed-corotated tets
take the taped Jacobian in Newton too (slower, same solution).
"""

from __future__ import annotations

import numpy as np
import warp as wp

from diffsim.core.implicit import ImplicitSolve, arrays_with_gradients
from diffsim.core.parallel import launch_items
from diffsim.fem.kernels import (
    STABLE_NEO_HOOKEAN,
    cofactor,
    edge_matrix,
    first_piola_stress,
    lame_parameters,
    smooth_penetration,
    strain_energy_density,
)
from diffsim.geometry.colliders import (
    MAX_COLLIDERS,
    ColliderSet,
    collider_query,
    collider_slot,
    collider_surface_velocity,
)
from diffsim.geometry.shapes import ShapeType

INTEGRATORS = ("explicit", "implicit", "quasistatic")
SPHERE_SHAPE = wp.constant(int(ShapeType.SPHERE))


@wp.func
def _position(x: wp.array(dtype=wp.vec3), target: wp.array(dtype=wp.vec3), fixed: wp.array(dtype=int), i: int):
    # backing nodes are no unknowns: their position is the backing's
    if fixed[i] != 0:
        return target[i]
    return x[i]


@wp.kernel
def backing_targets(node_x: wp.array(dtype=wp.vec3), node_body: wp.array(dtype=int), node_fixed: wp.array(dtype=int),
                    node_rest_local: wp.array(dtype=wp.vec3), body_position: wp.array(dtype=wp.vec3),
                    body_rotation: wp.array(dtype=wp.quat), target: wp.array(dtype=wp.vec3)):
    """Where each backing node is at the end of the step (free nodes: their start position)."""
    i = wp.tid()
    if node_fixed[i] != 0:
        b = node_body[i]
        target[i] = wp.quat_rotate(body_rotation[b], node_rest_local[i]) + body_position[b]
    else:
        target[i] = node_x[i]


@wp.kernel
def node_residual(x: wp.array(dtype=wp.vec3), x_start: wp.array(dtype=wp.vec3), v_start: wp.array(dtype=wp.vec3),
                  target: wp.array(dtype=wp.vec3), node_body: wp.array(dtype=int), node_mass: wp.array(dtype=float),
                  node_fixed: wp.array(dtype=int), body_damping: wp.array(dtype=float),
                  external_force: wp.array(dtype=wp.vec3), gravity: wp.array(dtype=wp.vec3),
                  pin_stiffness: wp.array(dtype=float), inertia: float, inv_dt: float, r: wp.array(dtype=wp.vec3)):
    """Inertia, mass damping, gravity, external forces and backing pins; ``inertia`` is 1/h^2 and
    ``inv_dt`` 1/h for backward Euler, both 0 for quasi-static equilibrium."""
    i = wp.tid()
    if node_fixed[i] != 0:
        r[i] = pin_stiffness[i] * (x[i] - target[i])
    else:
        m = node_mass[i]
        rate = inertia + body_damping[node_body[i]] * inv_dt
        r[i] = (m * rate) * (x[i] - x_start[i]) - (m * inv_dt) * v_start[i] - m * gravity[0] - external_force[i]


@wp.func
def _rayleigh_stress(F_rate: wp.mat33, lame: wp.vec2, damping_time: float):
    """Stiffness-proportional damping stress [Pa]: the linear-elastic stress of the strain rate."""
    strain_rate = 0.5 * (F_rate + wp.transpose(F_rate))
    return damping_time * (2.0 * lame[0] * strain_rate + lame[1] * wp.trace(strain_rate) * wp.identity(3, float))


@wp.func
def _add_to_free_nodes(H: wp.mat33, n: wp.vec4i, node_fixed: wp.array(dtype=int), out: wp.array(dtype=wp.vec3)):
    """Add a tet's nodal vectors to its free nodes' rows: H's columns go to nodes 1..3 and minus
    their sum to node 0 (H = V P Dm^-T is minus the elastic forces)."""
    g1 = wp.vec3(H[0, 0], H[1, 0], H[2, 0])
    g2 = wp.vec3(H[0, 1], H[1, 1], H[2, 1])
    g3 = wp.vec3(H[0, 2], H[1, 2], H[2, 2])
    if node_fixed[n[0]] == 0:
        wp.atomic_add(out, n[0], -(g1 + g2 + g3))
    if node_fixed[n[1]] == 0:
        wp.atomic_add(out, n[1], g1)
    if node_fixed[n[2]] == 0:
        wp.atomic_add(out, n[2], g2)
    if node_fixed[n[3]] == 0:
        wp.atomic_add(out, n[3], g3)


@wp.kernel
def tet_residual(x: wp.array(dtype=wp.vec3), x_start: wp.array(dtype=wp.vec3), target: wp.array(dtype=wp.vec3),
                 node_fixed: wp.array(dtype=int), tet_nodes: wp.array(dtype=wp.vec4i),
                 tet_rest_inverse: wp.array(dtype=wp.mat33), tet_rest_volume: wp.array(dtype=float),
                 tet_material: wp.array(dtype=int), tet_young_modulus: wp.array(dtype=float),
                 tet_poisson_ratio: wp.array(dtype=float), tet_damping: wp.array(dtype=float), inv_dt: float,
                 r: wp.array(dtype=wp.vec3)):
    """Minus the elastic and Rayleigh-damping forces of each tet, on its free nodes."""
    t = wp.tid()
    n = tet_nodes[t]
    p0 = _position(x, target, node_fixed, n[0])
    p1 = _position(x, target, node_fixed, n[1])
    p2 = _position(x, target, node_fixed, n[2])
    p3 = _position(x, target, node_fixed, n[3])
    Dm_inv = tet_rest_inverse[t]
    F = edge_matrix(p0, p1, p2, p3) @ Dm_inv
    lame = lame_parameters(tet_young_modulus[t], tet_poisson_ratio[t])
    P = first_piola_stress(tet_material[t], F, lame[0], lame[1])
    F_rate = (edge_matrix(p0 - x_start[n[0]], p1 - x_start[n[1]], p2 - x_start[n[2]], p3 - x_start[n[3]])
              @ Dm_inv) * inv_dt
    P = P + _rayleigh_stress(F_rate, lame, tet_damping[t])
    _add_to_free_nodes(tet_rest_volume[t] * (P @ wp.transpose(Dm_inv)), n, node_fixed, r)


@wp.kernel
def lagged_contacts(x: wp.array(dtype=wp.vec3), node_body: wp.array(dtype=int),
                    node_contact_area: wp.array(dtype=float), body_world: wp.array(dtype=int),
                    body_contact_stiffness: wp.array(dtype=float), colliders: ColliderSet, smoothing: float,
                    normal_force: wp.array2d(dtype=float), normal: wp.array2d(dtype=wp.vec3),
                    surface_velocity: wp.array2d(dtype=wp.vec3)):
    """Normal force [N], normal and collider surface velocity of each (node, collider) pair at the
    start of the step: what the step's friction is lagged on."""
    i = wp.tid()
    area = node_contact_area[i]
    if area > 0.0:
        body = node_body[i]
        world = body_world[body]
        for c in range(wp.static(MAX_COLLIDERS)):
            if c < colliders.count:
                slot = collider_slot(colliders, world, c)
                q = collider_query(colliders, c, slot, x[i])
                if q.distance < smoothing:
                    pressure = body_contact_stiffness[body] * smooth_penetration(-q.distance, smoothing)
                    normal_force[i, c] = pressure * area
                    normal[i, c] = q.normal
                    surface_velocity[i, c] = collider_surface_velocity(colliders, slot, x[i])


@wp.func
def _contact_force(x: wp.array(dtype=wp.vec3), x_start: wp.array(dtype=wp.vec3), i: int, area: float,
                   stiffness: float, world: int, colliders: ColliderSet, smoothing: float, friction_velocity: float,
                   dt: float, lagged_force: wp.array2d(dtype=float), lagged_normal: wp.array2d(dtype=wp.vec3),
                   lagged_velocity: wp.array2d(dtype=wp.vec3)):
    p = x[i]
    total = wp.vec3(0.0)
    for c in range(wp.static(MAX_COLLIDERS)):
        if c < colliders.count:
            slot = collider_slot(colliders, world, c)
            q = collider_query(colliders, c, slot, p)
            if q.distance < smoothing:
                total = total + (stiffness * smooth_penetration(-q.distance, smoothing) * area) * q.normal
            lam = lagged_force[i, c]
            if lam > 0.0:
                n = lagged_normal[i, c]
                step = p - x_start[i] - dt * lagged_velocity[i, c]
                slip = (step - wp.dot(step, n) * n) / dt  # tangential slip velocity [m/s]
                speed = wp.sqrt(wp.dot(slip, slip) + friction_velocity * friction_velocity)
                total = total - (colliders.friction[c] * lam / speed) * slip
    return total


@wp.kernel
def contact_residual(x: wp.array(dtype=wp.vec3), x_start: wp.array(dtype=wp.vec3), node_fixed: wp.array(dtype=int),
                     node_body: wp.array(dtype=int), node_contact_area: wp.array(dtype=float),
                     body_world: wp.array(dtype=int), body_contact_stiffness: wp.array(dtype=float),
                     colliders: ColliderSet, smoothing: float, friction_velocity: float, dt: float,
                     lagged_force: wp.array2d(dtype=float), lagged_normal: wp.array2d(dtype=wp.vec3),
                     lagged_velocity: wp.array2d(dtype=wp.vec3), r: wp.array(dtype=wp.vec3)):
    """Minus the contact force (penalty pressure and lagged friction) on each free contact node."""
    i = wp.tid()
    area = node_contact_area[i]
    if area > 0.0 and node_fixed[i] == 0:
        body = node_body[i]
        f = _contact_force(x, x_start, i, area, body_contact_stiffness[body], body_world[body], colliders, smoothing,
                           friction_velocity, dt, lagged_force, lagged_normal, lagged_velocity)
        r[i] = r[i] - f


@wp.kernel
def contact_forces(x: wp.array(dtype=wp.vec3), x_start: wp.array(dtype=wp.vec3), node_fixed: wp.array(dtype=int),
                   node_body: wp.array(dtype=int), node_contact_area: wp.array(dtype=float),
                   body_world: wp.array(dtype=int), body_contact_stiffness: wp.array(dtype=float),
                   colliders: ColliderSet, smoothing: float, friction_velocity: float, dt: float,
                   lagged_force: wp.array2d(dtype=float), lagged_normal: wp.array2d(dtype=wp.vec3),
                   lagged_velocity: wp.array2d(dtype=wp.vec3), contact_force_out: wp.array(dtype=wp.vec3)):
    """The contact force of each node at the solution (what the sensor reads)."""
    i = wp.tid()
    area = node_contact_area[i]
    f = wp.vec3(0.0)
    if area > 0.0 and node_fixed[i] == 0:
        body = node_body[i]
        f = _contact_force(x, x_start, i, area, body_contact_stiffness[body], body_world[body], colliders, smoothing,
                           friction_velocity, dt, lagged_force, lagged_normal, lagged_velocity)
    contact_force_out[i] = f


# -- Newton's Jacobian products: exact elastic and damping terms, Gauss-Newton contact -------------

@wp.func
def _stable_neo_hookean_differential(F: wp.mat33, dF: wp.mat33, mu: float, lam: float):
    """dP of :func:`first_piola_stress`'s stable Neo-Hookean along dF (exact)."""
    mu_s = mu * (4.0 / 3.0)
    lam_s = lam + mu * (5.0 / 6.0)
    alpha = 1.0 + 0.75 * mu_s / lam_s
    stretch = wp.ddot(F, F)
    C = cofactor(F)
    f0 = wp.vec3(F[0, 0], F[1, 0], F[2, 0])
    f1 = wp.vec3(F[0, 1], F[1, 1], F[2, 1])
    f2 = wp.vec3(F[0, 2], F[1, 2], F[2, 2])
    d0 = wp.vec3(dF[0, 0], dF[1, 0], dF[2, 0])
    d1 = wp.vec3(dF[0, 1], dF[1, 1], dF[2, 1])
    d2 = wp.vec3(dF[0, 2], dF[1, 2], dF[2, 2])
    dC = wp.matrix_from_cols(wp.cross(d1, f2) + wp.cross(f1, d2), wp.cross(d2, f0) + wp.cross(f2, d0),
                             wp.cross(d0, f1) + wp.cross(f0, d1))
    a = mu_s * (1.0 - 1.0 / (stretch + 1.0))
    da = mu_s * 2.0 * wp.ddot(F, dF) / ((stretch + 1.0) * (stretch + 1.0))
    return a * dF + da * F + (lam_s * wp.ddot(C, dF)) * C + (lam_s * (wp.determinant(F) - alpha)) * dC


@wp.kernel
def node_jacobian_product(v: wp.array(dtype=wp.vec3), node_body: wp.array(dtype=int), node_mass: wp.array(dtype=float),
                          node_fixed: wp.array(dtype=int), body_damping: wp.array(dtype=float),
                          pin_stiffness: wp.array(dtype=float), inertia: float, inv_dt: float,
                          out: wp.array(dtype=wp.vec3)):
    i = wp.tid()
    if node_fixed[i] != 0:
        out[i] = pin_stiffness[i] * v[i]
    else:
        out[i] = (node_mass[i] * (inertia + body_damping[node_body[i]] * inv_dt)) * v[i]


@wp.kernel
def tet_jacobian_product(x: wp.array(dtype=wp.vec3), target: wp.array(dtype=wp.vec3), v: wp.array(dtype=wp.vec3),
                         node_fixed: wp.array(dtype=int), tet_nodes: wp.array(dtype=wp.vec4i),
                         tet_rest_inverse: wp.array(dtype=wp.mat33), tet_rest_volume: wp.array(dtype=float),
                         tet_young_modulus: wp.array(dtype=float), tet_poisson_ratio: wp.array(dtype=float),
                         tet_damping: wp.array(dtype=float), inv_dt: float, offset: int, out: wp.array(dtype=wp.vec3)):
    """The stable Neo-Hookean tets' share of J v (backing nodes are no unknowns: their v is 0)."""
    t = wp.tid() + offset
    n = tet_nodes[t]
    zero = wp.vec3(0.0)
    v0 = wp.where(node_fixed[n[0]] != 0, zero, v[n[0]])
    v1 = wp.where(node_fixed[n[1]] != 0, zero, v[n[1]])
    v2 = wp.where(node_fixed[n[2]] != 0, zero, v[n[2]])
    v3 = wp.where(node_fixed[n[3]] != 0, zero, v[n[3]])
    Dm_inv = tet_rest_inverse[t]
    F = edge_matrix(_position(x, target, node_fixed, n[0]), _position(x, target, node_fixed, n[1]),
                    _position(x, target, node_fixed, n[2]), _position(x, target, node_fixed, n[3])) @ Dm_inv
    dF = edge_matrix(v0, v1, v2, v3) @ Dm_inv
    lame = lame_parameters(tet_young_modulus[t], tet_poisson_ratio[t])
    dP = _stable_neo_hookean_differential(F, dF, lame[0], lame[1])
    dP = dP + _rayleigh_stress(dF * inv_dt, lame, tet_damping[t])  # linear in the rate
    _add_to_free_nodes(tet_rest_volume[t] * (dP @ wp.transpose(Dm_inv)), n, node_fixed, out)


@wp.kernel
def contact_jacobian_product(x: wp.array(dtype=wp.vec3), x_start: wp.array(dtype=wp.vec3), v: wp.array(dtype=wp.vec3),
                             node_fixed: wp.array(dtype=int), node_body: wp.array(dtype=int),
                             node_contact_area: wp.array(dtype=float), body_world: wp.array(dtype=int),
                             body_contact_stiffness: wp.array(dtype=float), colliders: ColliderSet, smoothing: float,
                             friction_velocity: float, dt: float, lagged_force: wp.array2d(dtype=float),
                             lagged_normal: wp.array2d(dtype=wp.vec3), lagged_velocity: wp.array2d(dtype=wp.vec3),
                             exact: int, out: wp.array(dtype=wp.vec3)):
    """Gauss-Newton contact share of J v: the penalty's k A s'(depth) n n^T without the term of the
    surface's curvature (which makes the exact Jacobian indefinite along the surface of a convex
    indenter: -k A depth / R, larger than the pad's own shear stiffness at the default k), and the
    lagged friction's exact, positive semi-definite Jacobian. With ``exact`` the curvature term of
    spheres is added (planes have none): the exact product, for the adjoint solve."""
    i = wp.tid()
    area = node_contact_area[i]
    if area > 0.0 and node_fixed[i] == 0:
        body = node_body[i]
        world = body_world[body]
        p = x[i]
        dv = v[i]
        total = wp.vec3(0.0)
        for c in range(wp.static(MAX_COLLIDERS)):
            if c < colliders.count:
                slot = collider_slot(colliders, world, c)
                q = collider_query(colliders, c, slot, p)
                depth = -q.distance
                slope = float(0.0)
                if depth >= smoothing:
                    slope = 1.0
                elif depth > -smoothing:
                    slope = (depth + smoothing) / (2.0 * smoothing)
                total = total + (body_contact_stiffness[body] * area * slope * wp.dot(q.normal, dv)) * q.normal
                if exact != 0 and colliders.shape[c] == SPHERE_SHAPE and depth > -smoothing:
                    # d n / d x = (I - n n^T) / |x - centre| for a sphere
                    centre_distance = q.distance + colliders.size[c][0]
                    curvature = body_contact_stiffness[body] * area * smooth_penetration(depth, smoothing)
                    total = total - (curvature / centre_distance) * (dv - wp.dot(dv, q.normal) * q.normal)
                lam = lagged_force[i, c]
                if lam > 0.0:
                    nrm = lagged_normal[i, c]
                    step = p - x_start[i] - dt * lagged_velocity[i, c]
                    slip = (step - wp.dot(step, nrm) * nrm) / dt
                    speed = wp.sqrt(wp.dot(slip, slip) + friction_velocity * friction_velocity)
                    tangent = (dv - wp.dot(dv, nrm) * nrm) / dt
                    total = total + (colliders.friction[c] * lam / speed) * (
                        tangent - (wp.dot(slip, tangent) / (speed * speed)) * slip)
        out[i] = out[i] + total


# -- the potential whose gradient the residual is (for the line search) ---------------------------

@wp.func
def _penetration_energy(depth: float, width: float):
    """Integral of :func:`smooth_penetration` from -inf to ``depth`` [m^2]."""
    out = float(0.0)
    if depth >= width:
        out = 0.5 * depth * depth + width * width / 6.0
    elif depth > -width:
        out = (depth + width) * (depth + width) * (depth + width) / (12.0 * width)
    return out


@wp.kernel
def node_energy(x: wp.array(dtype=wp.vec3), x_start: wp.array(dtype=wp.vec3), v_start: wp.array(dtype=wp.vec3),
                target: wp.array(dtype=wp.vec3), node_body: wp.array(dtype=int), node_mass: wp.array(dtype=float),
                node_fixed: wp.array(dtype=int), body_damping: wp.array(dtype=float),
                external_force: wp.array(dtype=wp.vec3), gravity: wp.array(dtype=wp.vec3),
                pin_stiffness: wp.array(dtype=float), inertia: float, inv_dt: float,
                energy: wp.array(dtype=wp.float64)):
    i = wp.tid()
    e = float(0.0)
    if node_fixed[i] != 0:
        d = x[i] - target[i]
        e = 0.5 * pin_stiffness[i] * wp.dot(d, d)
    else:
        m = node_mass[i]
        d = x[i] - x_start[i]
        rate = inertia + body_damping[node_body[i]] * inv_dt
        # (the constant parts of -v.x, -g.x and -f.x are dropped: measured from x_start)
        e = 0.5 * m * rate * wp.dot(d, d) - wp.dot((m * inv_dt) * v_start[i] + m * gravity[0] + external_force[i], d)
    wp.atomic_add(energy, 0, wp.float64(e))
    wp.atomic_add(energy, 1, wp.float64(wp.abs(e)))


@wp.kernel
def tet_energy(x: wp.array(dtype=wp.vec3), x_start: wp.array(dtype=wp.vec3), target: wp.array(dtype=wp.vec3),
               node_fixed: wp.array(dtype=int), tet_nodes: wp.array(dtype=wp.vec4i),
               tet_rest_inverse: wp.array(dtype=wp.mat33), tet_rest_volume: wp.array(dtype=float),
               tet_material: wp.array(dtype=int), tet_young_modulus: wp.array(dtype=float),
               tet_poisson_ratio: wp.array(dtype=float), tet_damping: wp.array(dtype=float), inv_dt: float,
               energy: wp.array(dtype=wp.float64)):
    """Strain energy plus the Rayleigh dissipation potential V beta/h (mu |sym G|^2 + lam/2 tr(G)^2)
    of the step's deformation increment G (its gradient is :func:`tet_residual`'s damping)."""
    t = wp.tid()
    n = tet_nodes[t]
    p0 = _position(x, target, node_fixed, n[0])
    p1 = _position(x, target, node_fixed, n[1])
    p2 = _position(x, target, node_fixed, n[2])
    p3 = _position(x, target, node_fixed, n[3])
    Dm_inv = tet_rest_inverse[t]
    F = edge_matrix(p0, p1, p2, p3) @ Dm_inv
    lame = lame_parameters(tet_young_modulus[t], tet_poisson_ratio[t])
    G = edge_matrix(p0 - x_start[n[0]], p1 - x_start[n[1]], p2 - x_start[n[2]], p3 - x_start[n[3]]) @ Dm_inv
    sym = 0.5 * (G + wp.transpose(G))
    trace = wp.trace(G)
    damping = tet_damping[t] * inv_dt * (lame[0] * wp.ddot(sym, sym) + 0.5 * lame[1] * trace * trace)
    e = tet_rest_volume[t] * (strain_energy_density(tet_material[t], F, lame[0], lame[1]) + damping)
    wp.atomic_add(energy, 0, wp.float64(e))
    # the energy density is a difference of terms ~ (mu + lam) |F|^2: its rounding scales with them
    wp.atomic_add(energy, 1, wp.float64(tet_rest_volume[t] * (lame[0] + lame[1]) * (wp.ddot(F, F) + 1.0)))


@wp.kernel
def contact_energy(x: wp.array(dtype=wp.vec3), x_start: wp.array(dtype=wp.vec3), node_fixed: wp.array(dtype=int),
                   node_body: wp.array(dtype=int), node_contact_area: wp.array(dtype=float),
                   body_world: wp.array(dtype=int), body_contact_stiffness: wp.array(dtype=float),
                   colliders: ColliderSet, smoothing: float, friction_velocity: float, dt: float,
                   lagged_force: wp.array2d(dtype=float), lagged_normal: wp.array2d(dtype=wp.vec3),
                   lagged_velocity: wp.array2d(dtype=wp.vec3), energy: wp.array(dtype=wp.float64)):
    """Penalty potential k A S(penetration) and lagged friction potential mu lambda h sqrt(|s|^2 + v_f^2)."""
    i = wp.tid()
    area = node_contact_area[i]
    if area > 0.0 and node_fixed[i] == 0:
        body = node_body[i]
        world = body_world[body]
        p = x[i]
        e = float(0.0)
        for c in range(wp.static(MAX_COLLIDERS)):
            if c < colliders.count:
                slot = collider_slot(colliders, world, c)
                q = collider_query(colliders, c, slot, p)
                e += body_contact_stiffness[body] * area * _penetration_energy(-q.distance, smoothing)
                lam = lagged_force[i, c]
                if lam > 0.0:
                    nrm = lagged_normal[i, c]
                    step = p - x_start[i] - dt * lagged_velocity[i, c]
                    slip = (step - wp.dot(step, nrm) * nrm) / dt
                    e += colliders.friction[c] * lam * dt * wp.sqrt(wp.dot(slip, slip)
                                                                   + friction_velocity * friction_velocity)
        wp.atomic_add(energy, 0, wp.float64(e))
        wp.atomic_add(energy, 1, wp.float64(wp.abs(e)))


@wp.kernel
def finish_step(x: wp.array(dtype=wp.vec3), x_start: wp.array(dtype=wp.vec3), target: wp.array(dtype=wp.vec3),
                node_fixed: wp.array(dtype=int), inv_dt: float, x_out: wp.array(dtype=wp.vec3),
                v_out: wp.array(dtype=wp.vec3)):
    i = wp.tid()
    p = _position(x, target, node_fixed, i)
    x_out[i] = p
    v_out[i] = (p - x_start[i]) * inv_dt


def elastic_diagonal(model) -> np.ndarray:
    """Per node, sum over its tets of V (lambda + 2 mu) |grad N|^2 [N/m]: the linear-elastic
    stiffness diagonal, for Jacobi preconditioning and pin stiffness."""
    Dm_inv = model.tet_rest_inverse.numpy().astype(np.float64)  # (T, 3, 3)
    volume = model.tet_rest_volume.numpy().astype(np.float64)
    E = model.tet_young_modulus.numpy().astype(np.float64)
    nu = model.tet_poisson_ratio.numpy().astype(np.float64)
    mu = E / (2 * (1 + nu))
    lam = E * nu / ((1 + nu) * (1 - 2 * nu))
    grads = Dm_inv  # row j: gradient of shape function j+1
    g = np.concatenate([-grads.sum(axis=1, keepdims=True), grads], axis=1)  # (T, 4, 3)
    weight = (volume * (lam + 2 * mu))[:, None] * np.sum(g * g, axis=2)  # (T, 4)
    diagonal = np.zeros(model.node_count)
    np.add.at(diagonal, model.tet_nodes.numpy().reshape(-1), weight.reshape(-1))
    return diagonal


class ImplicitFEMStep:
    """One backward-Euler or quasi-static step of an :class:`~diffsim.fem.FEMModel` (see the
    module header), used by :class:`~diffsim.fem.FEMSolver` for ``integrator="implicit"`` and
    ``"quasistatic"``."""

    def __init__(self, solver, model, integrator: str):
        self.solver = solver
        self.integrator = integrator
        self._stiffness = elastic_diagonal(model)
        self._all_stable_neo_hookean = bool(np.all(model.tet_material.numpy() == int(STABLE_NEO_HOOKEAN)))
        # spheres and planes have an analytic exact contact Jacobian; other shapes use the tape's
        shapes = model.collider_shape.numpy()
        self._analytic_contact = bool(np.all(np.isin(shapes, [int(ShapeType.SPHERE), int(ShapeType.PLANE)])))
        self.report = None  #: the last step's NewtonReport
        self.steps = 0  #: implicit steps taken, to name the one that fails

    def _pin_and_diagonal(self, model, dt: float) -> tuple[wp.array, np.ndarray]:
        mass = model.node_mass.numpy().astype(np.float64)
        inertia = 0.0 if self.integrator == "quasistatic" else 1.0 / (dt * dt)
        contact = (model.body_contact_stiffness.numpy().astype(np.float64)[model.node_body.numpy()]
                   * model.node_contact_area.numpy().astype(np.float64)) if model.collider_count else 0.0
        diagonal = self._stiffness + mass * inertia + contact
        pin = wp.array(diagonal.astype(np.float32), dtype=float, device=model.device)
        return pin, np.repeat(diagonal, 3)

    def step(self, model, state_in, state_out, control, dt: float, colliders_end: ColliderSet,
             colliders_start: ColliderSet) -> None:
        s = self.solver
        device = model.device
        n = model.node_count
        grad = state_in.node_x.requires_grad
        target = wp.zeros(n, dtype=wp.vec3, device=device, requires_grad=grad)
        wp.launch(backing_targets, n, [state_in.node_x, model.node_body, model.node_fixed, model.node_rest_local,
                                       state_out.body_position, state_out.body_rotation], [target], device=device)
        slots = max(model.collider_count, 1)
        lam = wp.zeros((n, slots), dtype=float, device=device, requires_grad=grad)
        normal = wp.zeros((n, slots), dtype=wp.vec3, device=device, requires_grad=grad)
        velocity = wp.zeros((n, slots), dtype=wp.vec3, device=device, requires_grad=grad)
        if model.collider_count:
            wp.launch(lagged_contacts, n, [state_in.node_x, model.node_body, model.node_contact_area,
                                           model.body_world, model.body_contact_stiffness, colliders_start,
                                           s.contact_smoothing], [lam, normal, velocity], device=device)
        quasistatic = self.integrator == "quasistatic"
        inertia = 0.0 if quasistatic else 1.0 / (dt * dt)
        inv_dt = 1.0 / dt
        pin, diagonal = self._pin_and_diagonal(model, dt)
        diagonal = _as_vec3(wp.array(diagonal.astype(np.float32), dtype=float, device=device), n)

        # every term's inputs after x: the residual, its energy and the outputs read the same arrays
        rate = 0.0 if quasistatic else inv_dt
        node_args = [state_in.node_x, state_in.node_v, target, model.node_body, model.node_mass, model.node_fixed,
                     model.body_damping, control.node_external_force, model.gravity, pin, inertia, rate]
        tet_args = [state_in.node_x, target, model.node_fixed, model.tet_nodes, model.tet_rest_inverse,
                    model.tet_rest_volume, model.tet_material, model.tet_young_modulus, model.tet_poisson_ratio,
                    model.tet_damping, rate]
        contact_args = [state_in.node_x, model.node_fixed, model.node_body, model.node_contact_area,
                        model.body_world, model.body_contact_stiffness, colliders_end, s.contact_smoothing,
                        s.friction_velocity, dt, lam, normal, velocity]

        def residual(x, r):
            wp.launch(node_residual, n, [x, *node_args], [r], device=device)
            wp.launch(tet_residual, model.tet_count, [x, *tet_args], [r], device=device)
            if model.collider_count:
                wp.launch(contact_residual, n, [x, *contact_args], [r], device=device)

        def energy(x) -> tuple[float, float]:
            # (energy [J], its float32 rounding [J]: slot 1 sums the size of the terms)
            total = wp.zeros(2, dtype=wp.float64, device=device)
            wp.launch(node_energy, n, [x, *node_args], [total], device=device)
            wp.launch(tet_energy, model.tet_count, [x, *tet_args], [total], device=device)
            if model.collider_count:
                wp.launch(contact_energy, n, [x, *contact_args], [total], device=device)
            value, size = total.numpy()
            return float(value), 1e-6 * float(size)

        def preconditioner(x, d):
            wp.copy(d, diagonal)

        launch = s._launches.launch  # CG calls this hundreds of times with the same arrays

        def contact_exact(x, v, out):
            # the penalty's curvature term has no closed form for every collider shape: the exact
            # contact share comes from the tape of the contact residual alone
            probe = wp.clone(x, requires_grad=True)
            r = wp.zeros_like(x, requires_grad=True)
            tape = wp.Tape()
            with tape:
                wp.launch(contact_residual, n, [probe, *contact_args], [r], device=device)
            saved = [(a, wp.clone(a.grad)) for a in arrays_with_gradients(tape, exclude=(probe, r))]
            tape.backward(grads={r: v})
            for a, g in saved:
                wp.copy(a.grad, g)
            wp.launch(_add_vec3, n, [probe.grad], [out], device=device)

        def jacobian_product(x, v, out, exact):
            launch("jv_nodes", node_jacobian_product, n,
                   [v, model.node_body, model.node_mass, model.node_fixed, model.body_damping, pin, inertia, rate],
                   [out], device)
            # the products' dominant cost: split over the CPU's cores (chunks add into private copies)
            launch_items(tet_jacobian_product, model.tet_count,
                         [x, target, v, model.node_fixed, model.tet_nodes, model.tet_rest_inverse,
                          model.tet_rest_volume, model.tet_young_modulus, model.tet_poisson_ratio, model.tet_damping,
                          rate], [out], device=device, scattered_outputs=True,
                         cache=s._launches, site="jv_tets")
            if model.collider_count and exact and not self._analytic_contact:
                contact_exact(x, v, out)
            elif model.collider_count:
                launch("jv_contacts", contact_jacobian_product, n,
                       [x, contact_args[0], v, *contact_args[1:], int(exact)], [out], device)
            return True

        # the analytic products cover stable Neo-Hookean tets; fixed-corotated ones take the taped Jacobian
        fast = self._all_stable_neo_hookean
        solve = ImplicitSolve(residual, energy=energy, preconditioner=preconditioner,
                              jacobian_product=jacobian_product if fast else None, tolerance=s.newton_tolerance,
                              max_iterations=s.newton_iterations, cg_tolerance=s.cg_tolerance,
                              cg_max_iterations=s.cg_iterations, adjoint_tolerance=s.adjoint_tolerance,
                              name=f"{self.integrator} FEM step {self.steps} (counted from 0 by this solver)")
        self.steps += 1
        x = wp.zeros(n, dtype=wp.vec3, device=device, requires_grad=grad)
        # initial guess: x + h v, the explicit predictor; for quasi-static frames v is the last
        # frame's displacement over its duration, so this extrapolates the motion
        wp.launch(_predict, n, [state_in.node_x, state_in.node_v, target, model.node_fixed, dt], [x], device=device)
        self.report = solve.solve(x)
        wp.launch(finish_step, n, [x, state_in.node_x, target, model.node_fixed, inv_dt],
                  [state_out.node_x, state_out.node_v], device=device)
        if model.collider_count:
            wp.launch(contact_forces, n, [x, *contact_args], [state_out.node_contact_force], device=device)
        else:
            state_out.node_contact_force.zero_()


@wp.kernel
def _add_vec3(a: wp.array(dtype=wp.vec3), out: wp.array(dtype=wp.vec3)):
    i = wp.tid()
    out[i] = out[i] + a[i]


@wp.kernel
def _predict(x: wp.array(dtype=wp.vec3), v: wp.array(dtype=wp.vec3), target: wp.array(dtype=wp.vec3),
             fixed: wp.array(dtype=int), dt: float, out: wp.array(dtype=wp.vec3)):
    i = wp.tid()
    if fixed[i] != 0:
        out[i] = target[i]
    else:
        out[i] = x[i] + dt * v[i]


def _as_vec3(flat: wp.array, n: int) -> wp.array:
    view = wp.array(ptr=flat.ptr, dtype=wp.vec3, shape=(n,), device=flat.device)
    view._keepalive = flat
    return view
