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
inertia, pins and Rayleigh damping, exact for the lagged friction (positive semi-definite),
Gauss-Newton for the penalty, which drops the term of the indenter's curvature (along the surface
of a convex indenter that term is -k A depth / R, at the default contact stiffness larger than the
pad's own shear stiffness, and it made the Jacobian indefinite), and the **projected** stable
Neo-Hookean Hessian: each tet's Hessian in the frame of its singular values, with negative
eigenvalues clamped to zero (the twist modes under compression; see "projected Hessians" below).
Newton's matrix is thus symmetric positive definite at every iterate, and CG is preconditioned by
a sparse Cholesky factor of that same matrix assembled from its element and node blocks, kept
across steps and refactored when it has gone stale (:mod:`diffsim.core.cholesky`), or by the
linear-elastic diagonal (Jacobi). The contact and friction blocks are left out of the factor and
added to its solves exactly at every linear solve (``local_blocks``, a low-rank Woodbury
correction over the ten or so nodes in contact): they flip as the patch slides, and kept in the
factor they staled it within a frame, while the elastic part stays good for several;
``preconditioner="auto"`` factors on CPUs up to :data:`AUTO_CHOLESKY_UNKNOWNS` unknowns. The
residual is exact, so Newton lands on r = 0 either way (the approximations cost iterations, not
accuracy), and the adjoint solve of the backward pass uses the exact Jacobian (unprojected, with
the curvature term). The approximation alone makes Newton converge linearly (a quasi-static
sliding frame of the benchmark pad took 8-11 iterations, each cutting the residual by 2-3x), so
once a line search has taken the full step Newton switches to the exact product (falling back at
negative curvature): 4-7 iterations. With the Cholesky preconditioner Newton also predicts the
contacts a step would close (:class:`ContactPrediction`): linearised apart from the indenter, a
node a few micrometres off it was driven a third of a millimetre inside by one step, and the
line search then shortened every node's step by 32x. Fixed-corotated tets take the taped Jacobian
and Jacobi preconditioning (slower, same solution).
"""

from __future__ import annotations

import numpy as np
import warp as wp

from diffsim.core.cholesky import CholeskyPattern, SparseCholesky
from diffsim.core.implicit import ActiveSetPrediction, ImplicitSolve, arrays_with_gradients
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
from diffsim.materials.svd import jacobi_svd3

INTEGRATORS = ("explicit", "implicit", "quasistatic")
PRECONDITIONERS = ("auto", "cholesky", "jacobi")
#: "auto" factors up to this many unknowns (3 per node), on CPUs. Measured on a 2-core CPU: on a
#: 1,764-node tactile pad Cholesky-preconditioned quasi-static frames run 2.3x faster than Jacobi
#: ones; on the 10k-node Hertz pad, whose factor costs seconds, 4.6x slower.
AUTO_CHOLESKY_UNKNOWNS = 15_000
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


@wp.func
def _contact_jacobian_block(x: wp.array(dtype=wp.vec3), x_start: wp.array(dtype=wp.vec3), i: int, area: float,
                            stiffness: float, world: int, colliders: ColliderSet, smoothing: float,
                            friction_velocity: float, dt: float, lagged_force: wp.array2d(dtype=float),
                            lagged_normal: wp.array2d(dtype=wp.vec3), lagged_velocity: wp.array2d(dtype=wp.vec3),
                            exact: int, anticipated: wp.array2d(dtype=int)):
    """Node i's 3 x 3 block of the contact Jacobian (see :func:`contact_jacobian_product`)."""
    p = x[i]
    block = wp.mat33(0.0)
    eye = wp.identity(3, float)
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
            if anticipated[i, c] != 0:
                slope = 1.0
            block = block + (stiffness * area * slope) * wp.outer(q.normal, q.normal)
            if exact != 0 and colliders.shape[c] == SPHERE_SHAPE and depth > -smoothing:
                # d n / d x = (I - n n^T) / |x - centre| for a sphere
                centre_distance = q.distance + colliders.size[c][0]
                curvature = stiffness * area * smooth_penetration(depth, smoothing)
                block = block - (curvature / centre_distance) * (eye - wp.outer(q.normal, q.normal))
            lam = lagged_force[i, c]
            if lam > 0.0:
                nrm = lagged_normal[i, c]
                step = p - x_start[i] - dt * lagged_velocity[i, c]
                slip = (step - wp.dot(step, nrm) * nrm) / dt
                speed = wp.sqrt(wp.dot(slip, slip) + friction_velocity * friction_velocity)
                # d slip / d x = (I - n n^T) / dt; slip is tangential, so the block is symmetric
                tangent = eye - wp.outer(nrm, nrm)
                block = block + (colliders.friction[c] * lam / (speed * dt)) * (
                    tangent - wp.outer(slip, slip) / (speed * speed))
    return block


@wp.kernel
def contact_jacobian_product(x: wp.array(dtype=wp.vec3), x_start: wp.array(dtype=wp.vec3), v: wp.array(dtype=wp.vec3),
                             node_fixed: wp.array(dtype=int), node_body: wp.array(dtype=int),
                             node_contact_area: wp.array(dtype=float), body_world: wp.array(dtype=int),
                             body_contact_stiffness: wp.array(dtype=float), colliders: ColliderSet, smoothing: float,
                             friction_velocity: float, dt: float, lagged_force: wp.array2d(dtype=float),
                             lagged_normal: wp.array2d(dtype=wp.vec3), lagged_velocity: wp.array2d(dtype=wp.vec3),
                             exact: int, anticipated: wp.array2d(dtype=int), out: wp.array(dtype=wp.vec3)):
    """Gauss-Newton contact share of J v: the penalty's k A s'(depth) n n^T without the term of the
    surface's curvature (which makes the exact Jacobian indefinite along the surface of a convex
    indenter: -k A depth / R, larger than the pad's own shear stiffness at the default k), and the
    lagged friction's exact, positive semi-definite Jacobian; (node, collider) pairs that
    :func:`anticipate_contacts` flagged count as in contact (Newton's model only: the flags are
    cleared after each solve). With ``exact`` the curvature term of spheres is added (planes have
    none): the exact product."""
    i = wp.tid()
    area = node_contact_area[i]
    if area > 0.0 and node_fixed[i] == 0:
        body = node_body[i]
        block = _contact_jacobian_block(x, x_start, i, area, body_contact_stiffness[body], body_world[body], colliders,
                                        smoothing, friction_velocity, dt, lagged_force, lagged_normal,
                                        lagged_velocity, exact, anticipated)
        out[i] = out[i] + block @ v[i]


@wp.kernel
def contact_jacobian_blocks(nodes: wp.array(dtype=int), x: wp.array(dtype=wp.vec3), x_start: wp.array(dtype=wp.vec3),
                            node_body: wp.array(dtype=int), node_contact_area: wp.array(dtype=float),
                            body_world: wp.array(dtype=int), body_contact_stiffness: wp.array(dtype=float),
                            colliders: ColliderSet, smoothing: float, friction_velocity: float, dt: float,
                            lagged_force: wp.array2d(dtype=float), lagged_normal: wp.array2d(dtype=wp.vec3),
                            lagged_velocity: wp.array2d(dtype=wp.vec3), anticipated: wp.array2d(dtype=int),
                            blocks: wp.array(dtype=wp.mat33)):
    """The Gauss-Newton blocks of :func:`contact_jacobian_product` for the given (free, surface) nodes."""
    k = wp.tid()
    i = nodes[k]
    body = node_body[i]
    blocks[k] = _contact_jacobian_block(x, x_start, i, node_contact_area[i], body_contact_stiffness[body],
                                        body_world[body], colliders, smoothing, friction_velocity, dt, lagged_force,
                                        lagged_normal, lagged_velocity, 0, anticipated)


@wp.kernel
def anticipate_contacts(x: wp.array(dtype=wp.vec3), r: wp.array(dtype=wp.vec3), step: wp.array(dtype=wp.vec3),
                        has_step: int, node_fixed: wp.array(dtype=int), node_body: wp.array(dtype=int),
                        node_contact_area: wp.array(dtype=float), body_world: wp.array(dtype=int),
                        body_contact_stiffness: wp.array(dtype=float), colliders: ColliderSet, smoothing: float,
                        anticipated: wp.array2d(dtype=int), rhs: wp.array(dtype=wp.vec3), changed: wp.array(dtype=int)):
    """Newton's active-set prediction for the penalty contact. A node apart from a collider at x has
    no contact in Newton's linearisation, so a step can drive it far into the indenter (a node of the
    contact patch, a few micrometres off the sphere and pushed up by the pad, moves a third of a
    millimetre into it in one step) and the line search could only shorten the step for every
    node. A pair whose step would take the node deeper inside than it now is apart is flagged:
    Newton's model then takes the contact branch's linearisation, force k A (-d - n.s) n for
    distance d, whose stiffness the products add and whose value at x, -k A d n, the right-hand
    side gets, so the step stops the node near the surface. A flag is
    dropped once the node's force (without contact, since it is apart) no longer pushes it
    towards the collider. Without a step: update the flags and correct ``rhs``; with one: flag
    the pairs the step pushes in (``changed`` counts them) and correct ``rhs`` for those."""
    i = wp.tid()
    area = node_contact_area[i]
    if area > 0.0 and node_fixed[i] == 0:
        body = node_body[i]
        world = body_world[body]
        for c in range(wp.static(MAX_COLLIDERS)):
            if c < colliders.count:
                slot = collider_slot(colliders, world, c)
                q = collider_query(colliders, c, slot, x[i])
                flag = int(0)
                if q.distance >= smoothing and wp.dot(r[i], q.normal) > 0.0:  # apart, pushed towards it
                    flag = anticipated[i, c]
                    if has_step != 0 and flag == 0:
                        if collider_query(colliders, c, slot, x[i] + step[i]).distance < -wp.max(smoothing, q.distance):
                            flag = 1
                            wp.atomic_add(changed, 0, 1)
                    if flag != 0 and (has_step == 0 or anticipated[i, c] == 0):
                        rhs[i] = rhs[i] - (body_contact_stiffness[body] * area * q.distance) * q.normal
                anticipated[i, c] = flag


class ContactPrediction(ActiveSetPrediction):
    """The penalty contacts Newton's model treats as closed before they are (see
    :func:`anticipate_contacts`): flags per (node, collider) that ``contact_jacobian_product``
    reads, kept across one step's Newton iterations."""

    def __init__(self, flags: wp.array, changed: wp.array, args: list):
        self.flags, self.changed, self.args = flags, changed, args
        self.clear()

    def predict(self, x, r, step, rhs) -> bool:
        self.changed.zero_()
        wp.launch(anticipate_contacts, x.shape[0], [x, r, step if step is not None else x, int(step is not None),
                                                    *self.args], [self.flags, rhs, self.changed], device=x.device)
        return step is not None and bool(self.changed.numpy()[0])

    def clear(self) -> None:
        self.flags.zero_()


# -- projected (SPD) stable Neo-Hookean Hessians: Newton's products and the Cholesky preconditioner --
#
# An isotropic energy's Hessian in F splits, in the frame of F = U diag(sigma) V^T, into a 3x3 block
# on the scaling modes U diag(d) V^T and one 1x1 block each on the twist and flip modes of a pair of
# axes (i, j), U (E_ij -+ E_ji) V^T / sqrt(2) (Smith, de Goes and Kim 2019, "Analytic eigensystems
# for isotropic distortion energies"). For the stable Neo-Hookean energy of ``first_piola_stress``,
# mu/2 (I_C - 3) - mu/2 log(I_C + 1) + lambda/2 (J - alpha)^2 (Smith et al. 2018's rest-stable
# parameters mu_s, lambda_s), with a = mu (1 - 1 / (I_C + 1)) and k the third axis:
#
#   twist_k = a + lambda (J - alpha) sigma_k,        flip_k = a - lambda (J - alpha) sigma_k,
#   scaling_ij = a delta_ij + 2 mu sigma_i sigma_j / (I_C + 1)^2 + lambda c_i c_j
#                + lambda (J - alpha) sigma_k (i != j),      c_i = J / sigma_i,
#
# and projecting means clamping each eigenvalue at zero (the 3x3 block by its eigen-decomposition).
# Twist modes are the ones that go negative (at rest a twist is a rotation: eigenvalue 0), under
# compression; the projected Hessian equals the exact one wherever none does.

@wp.kernel
def tet_linearize(x: wp.array(dtype=wp.vec3), target: wp.array(dtype=wp.vec3), node_fixed: wp.array(dtype=int),
                  tet_nodes: wp.array(dtype=wp.vec4i), tet_rest_inverse: wp.array(dtype=wp.mat33),
                  tet_young_modulus: wp.array(dtype=float), tet_poisson_ratio: wp.array(dtype=float), offset: int,
                  frame_u: wp.array(dtype=wp.mat33), frame_v: wp.array(dtype=wp.mat33),
                  scaling: wp.array(dtype=wp.mat33), twist: wp.array(dtype=wp.vec3), flip: wp.array(dtype=wp.vec3)):
    """Each tet's projected Hessian eigensystem at x: the SVD frame, the clamped 3x3 scaling block
    and the clamped twist and flip eigenvalues (per the third axis k)."""
    t = wp.tid() + offset
    n = tet_nodes[t]
    Ds = edge_matrix(_position(x, target, node_fixed, n[0]), _position(x, target, node_fixed, n[1]),
                     _position(x, target, node_fixed, n[2]), _position(x, target, node_fixed, n[3]))
    F = Ds @ tet_rest_inverse[t]
    lame = lame_parameters(tet_young_modulus[t], tet_poisson_ratio[t])
    mu_s = lame[0] * (4.0 / 3.0)
    lam_s = lame[1] + lame[0] * (5.0 / 6.0)
    alpha = 1.0 + 0.75 * mu_s / lam_s
    svd = jacobi_svd3(F)
    s = svd.sigma
    stretch = wp.dot(s, s)
    a = mu_s * (1.0 - 1.0 / (stretch + 1.0))
    b = 2.0 * mu_s / ((stretch + 1.0) * (stretch + 1.0))
    c = wp.vec3(s[1] * s[2], s[0] * s[2], s[0] * s[1])
    g = lam_s * (s[0] * s[1] * s[2] - alpha)
    A = a * wp.identity(3, float) + b * wp.outer(s, s) + lam_s * wp.outer(c, c) + g * wp.mat33(
        0.0, s[2], s[1], s[2], 0.0, s[0], s[1], s[0], 0.0)
    eig = wp.eig3(A)
    Q = eig[0]
    d = eig[1]
    frame_u[t] = svd.U
    frame_v[t] = svd.V
    scaling[t] = Q @ wp.diag(wp.vec3(wp.max(d[0], 0.0), wp.max(d[1], 0.0), wp.max(d[2], 0.0))) @ wp.transpose(Q)
    twist[t] = wp.vec3(wp.max(a + g * s[0], 0.0), wp.max(a + g * s[1], 0.0), wp.max(a + g * s[2], 0.0))
    flip[t] = wp.vec3(wp.max(a - g * s[0], 0.0), wp.max(a - g * s[1], 0.0), wp.max(a - g * s[2], 0.0))


@wp.func
def _projected_differential(dF: wp.mat33, U: wp.mat33, V: wp.mat33, A: wp.mat33, twist: wp.vec3, flip: wp.vec3):
    """dP of stable Neo-Hookean along dF with the projected Hessian (see the section header)."""
    D = wp.transpose(U) @ dF @ V
    d = A @ wp.vec3(D[0, 0], D[1, 1], D[2, 2])
    # pairs (1, 2), (0, 2), (0, 1) with third axes 0, 1, 2: h the twist half, m the flip half
    h0 = 0.5 * (D[1, 2] - D[2, 1])
    m0 = 0.5 * (D[1, 2] + D[2, 1])
    h1 = 0.5 * (D[0, 2] - D[2, 0])
    m1 = 0.5 * (D[0, 2] + D[2, 0])
    h2 = 0.5 * (D[0, 1] - D[1, 0])
    m2 = 0.5 * (D[0, 1] + D[1, 0])
    out = wp.mat33(d[0], twist[2] * h2 + flip[2] * m2, twist[1] * h1 + flip[1] * m1,
                   flip[2] * m2 - twist[2] * h2, d[1], twist[0] * h0 + flip[0] * m0,
                   flip[1] * m1 - twist[1] * h1, flip[0] * m0 - twist[0] * h0, d[2])
    return U @ out @ wp.transpose(V)


@wp.func
def _projected_tet_force(t: int, dF: wp.mat33, tet_rest_inverse: wp.array(dtype=wp.mat33),
                         tet_rest_volume: wp.array(dtype=float), tet_young_modulus: wp.array(dtype=float),
                         tet_poisson_ratio: wp.array(dtype=float), tet_damping: wp.array(dtype=float), inv_dt: float,
                         frame_u: wp.array(dtype=wp.mat33), frame_v: wp.array(dtype=wp.mat33),
                         scaling: wp.array(dtype=wp.mat33), twist: wp.array(dtype=wp.vec3),
                         flip: wp.array(dtype=wp.vec3)):
    """V dP Dm^-T of the projected elastic and the (linear, SPD) damping Hessian along dF."""
    lame = lame_parameters(tet_young_modulus[t], tet_poisson_ratio[t])
    dP = _projected_differential(dF, frame_u[t], frame_v[t], scaling[t], twist[t], flip[t])
    dP = dP + _rayleigh_stress(dF * inv_dt, lame, tet_damping[t])
    return tet_rest_volume[t] * (dP @ wp.transpose(tet_rest_inverse[t]))


@wp.kernel
def tet_projected_product(v: wp.array(dtype=wp.vec3), node_fixed: wp.array(dtype=int),
                          tet_nodes: wp.array(dtype=wp.vec4i), tet_rest_inverse: wp.array(dtype=wp.mat33),
                          tet_rest_volume: wp.array(dtype=float), tet_young_modulus: wp.array(dtype=float),
                          tet_poisson_ratio: wp.array(dtype=float), tet_damping: wp.array(dtype=float), inv_dt: float,
                          frame_u: wp.array(dtype=wp.mat33), frame_v: wp.array(dtype=wp.mat33),
                          scaling: wp.array(dtype=wp.mat33), twist: wp.array(dtype=wp.vec3),
                          flip: wp.array(dtype=wp.vec3), offset: int, out: wp.array(dtype=wp.vec3)):
    """The tets' share of H v with the projected element Hessians of the last ``tet_linearize``."""
    t = wp.tid() + offset
    n = tet_nodes[t]
    zero = wp.vec3(0.0)
    dF = edge_matrix(wp.where(node_fixed[n[0]] != 0, zero, v[n[0]]), wp.where(node_fixed[n[1]] != 0, zero, v[n[1]]),
                     wp.where(node_fixed[n[2]] != 0, zero, v[n[2]]),
                     wp.where(node_fixed[n[3]] != 0, zero, v[n[3]])) @ tet_rest_inverse[t]
    H = _projected_tet_force(t, dF, tet_rest_inverse, tet_rest_volume, tet_young_modulus, tet_poisson_ratio,
                             tet_damping, inv_dt, frame_u, frame_v, scaling, twist, flip)
    _add_to_free_nodes(H, n, node_fixed, out)


@wp.kernel
def tet_hessian_entries(node_fixed: wp.array(dtype=int), tet_nodes: wp.array(dtype=wp.vec4i),
                        tet_rest_inverse: wp.array(dtype=wp.mat33), tet_rest_volume: wp.array(dtype=float),
                        tet_young_modulus: wp.array(dtype=float), tet_poisson_ratio: wp.array(dtype=float),
                        tet_damping: wp.array(dtype=float), inv_dt: float, frame_u: wp.array(dtype=wp.mat33),
                        frame_v: wp.array(dtype=wp.mat33), scaling: wp.array(dtype=wp.mat33),
                        twist: wp.array(dtype=wp.vec3), flip: wp.array(dtype=wp.vec3), offset: int,
                        values: wp.array(dtype=wp.float64)):
    """Each tet's projected 12x12 Hessian, row-major at values[144 t:], rows and columns of backing
    nodes zero (they are pinned, not unknowns of the tets)."""
    t = wp.tid() + offset
    n = tet_nodes[t]
    Dm_inv = tet_rest_inverse[t]
    for column in range(12):
        b = column // 3
        unit = wp.vec3(0.0)
        unit[column % 3] = 1.0
        u0 = wp.where(b == 0, unit, wp.vec3(0.0))
        u1 = wp.where(b == 1, unit, wp.vec3(0.0))
        u2 = wp.where(b == 2, unit, wp.vec3(0.0))
        u3 = wp.where(b == 3, unit, wp.vec3(0.0))
        H = _projected_tet_force(t, edge_matrix(u0, u1, u2, u3) @ Dm_inv, tet_rest_inverse, tet_rest_volume,
                                 tet_young_modulus, tet_poisson_ratio, tet_damping, inv_dt, frame_u, frame_v,
                                 scaling, twist, flip)
        g1 = wp.vec3(H[0, 0], H[1, 0], H[2, 0])
        g2 = wp.vec3(H[0, 1], H[1, 1], H[2, 1])
        g3 = wp.vec3(H[0, 2], H[1, 2], H[2, 2])
        g0 = -(g1 + g2 + g3)
        free_column = node_fixed[n[b]] == 0
        for row in range(12):
            a = row // 3
            g = g0
            if a == 1:
                g = g1
            elif a == 2:
                g = g2
            elif a == 3:
                g = g3
            value = float(0.0)
            if free_column and node_fixed[n[a]] == 0:
                value = g[row % 3]
            values[144 * t + 12 * row + column] = wp.float64(value)


@wp.kernel
def _node_block_column(column: wp.array(dtype=wp.vec3), axis: int, start: int, values: wp.array(dtype=wp.float64)):
    i = wp.tid()
    c = column[i]
    for r in range(3):
        values[start + 9 * i + 3 * r + axis] = wp.float64(c[r])


def hessian_pattern(model) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, columns, structural) of the assembled Hessian's entries: each tet's 12 x 12 block in
    the order of ``tet_hessian_entries``, then each node's 3 x 3 block (inertia, pin, contact and
    friction); ``structural`` is False where a tet entry touches a backing node (always zero)."""
    nodes = model.tet_nodes.numpy().astype(np.int64)
    dof = (3 * nodes[:, :, None] + np.arange(3)).reshape(-1, 12)
    tet_rows = np.repeat(dof, 12, axis=1).ravel()
    tet_columns = np.tile(dof, (1, 12)).ravel()
    free = np.repeat(model.node_fixed.numpy()[nodes] == 0, 3, axis=1)  # (T, 12)
    tet_structural = (free[:, :, None] & free[:, None, :]).ravel()
    node_dof = 3 * np.arange(model.node_count)[:, None] + np.arange(3)  # (N, 3)
    node_rows = np.repeat(node_dof, 3, axis=1).ravel()
    node_columns = np.tile(node_dof, (1, 3)).ravel()
    return (np.concatenate([tet_rows, node_rows]), np.concatenate([tet_columns, node_columns]),
            np.concatenate([tet_structural, np.ones(node_rows.size, dtype=bool)]))


def hessian_analysis(model) -> CholeskyPattern:
    """The symbolic Cholesky analysis of the model's Hessian pattern (about 0.15 s for an 8k-tet
    pad), kept on the model: it depends on the mesh and on which nodes are backing only, so
    every solver of the model shares it."""
    fixed = model.node_fixed.numpy()
    cached = getattr(model, "_hessian_analysis", None)
    if cached is None or not np.array_equal(cached[0], fixed):
        rows, columns, structural = hessian_pattern(model)
        cached = (fixed.copy(), CholeskyPattern(3 * model.node_count, rows, columns, structural=structural,
                                                device=model.device))
        model._hessian_analysis = cached
    return cached[1]


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
        # per tet, the projected Hessian's eigensystem at the current Newton iterate
        t, device = model.tet_count, model.device
        self._frames = [wp.zeros(t, dtype=wp.mat33, device=device) for _ in range(3)] + [
            wp.zeros(t, dtype=wp.vec3, device=device) for _ in range(2)]
        self.cholesky = None  #: the lagged Cholesky preconditioner (kept across steps)
        choice = solver.preconditioner
        if choice == "auto":
            small = 3 * model.node_count <= AUTO_CHOLESKY_UNKNOWNS
            choice = "cholesky" if small and wp.get_device(model.device).is_cpu else "jacobi"
        self.preconditioner = choice if self._all_stable_neo_hookean else "jacobi"  #: the one in use
        if self.preconditioner == "cholesky":
            self.cholesky = SparseCholesky(hessian_analysis(model), refresh_iterations=solver.refresh_iterations)
        # the contacts Newton's linearisation treats as active before they are (anticipate_contacts)
        self._anticipated = wp.zeros((model.node_count, max(model.collider_count, 1)), dtype=int, device=device)
        self._changed = wp.zeros(1, dtype=int, device=device)
        self._block = wp.zeros(model.node_count, dtype=wp.vec3, device=device)
        # the free nodes that can touch a collider, and their contact blocks (contact_jacobian_blocks)
        self._surface_nodes = np.flatnonzero((model.node_contact_area.numpy() > 0) & (model.node_fixed.numpy() == 0))
        self._surface = wp.array(self._surface_nodes.astype(np.int32), dtype=int, device=device)
        self._surface_blocks = wp.zeros(self._surface_nodes.size, dtype=wp.mat33, device=device)
        self._units = [wp.array(np.tile(np.eye(3, dtype=np.float32)[axis], (model.node_count, 1)), dtype=wp.vec3,
                                device=device) for axis in range(3)]  # probes of the node blocks, per axis

    def _pin_and_diagonal(self, model, dt: float) -> tuple[wp.array, np.ndarray]:
        mass = model.node_mass.numpy().astype(np.float64)
        inertia = 0.0 if self.integrator == "quasistatic" else 1.0 / (dt * dt)
        contact = (model.body_contact_stiffness.numpy().astype(np.float64)[model.node_body.numpy()]
                   * model.node_contact_area.numpy().astype(np.float64)) if model.collider_count else 0.0
        diagonal = self._stiffness + mass * inertia + contact
        pin = wp.array(diagonal.astype(np.float32), dtype=float, device=model.device)
        return pin, np.repeat(diagonal, 3)

    def step(self, model, state_in, state_out, control, dt: float, colliders_end: ColliderSet,
             colliders_start: ColliderSet, coupled_force: wp.array | None = None) -> None:
        """One step. ``coupled_force`` [N per node] is a coupled solver's contact force on the
        nodes, computed from the step's start (a staggered split): a constant external force of
        the solve, counted as contact in ``state_out``, its gradient flowing back to the partner."""
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

        external = control.node_external_force
        if coupled_force is not None:
            external = wp.zeros(n, dtype=wp.vec3, device=device, requires_grad=grad or coupled_force.requires_grad)
            wp.launch(_sum_vec3, n, [control.node_external_force, coupled_force], [external], device=device)
        # every term's inputs after x: the residual, its energy and the outputs read the same arrays
        rate = 0.0 if quasistatic else inv_dt
        node_args = [state_in.node_x, state_in.node_v, target, model.node_body, model.node_mass, model.node_fixed,
                     model.body_damping, external, model.gravity, pin, inertia, rate]
        tet_args = [state_in.node_x, target, model.node_fixed, model.tet_nodes, model.tet_rest_inverse,
                    model.tet_rest_volume, model.tet_material, model.tet_young_modulus, model.tet_poisson_ratio,
                    model.tet_damping, rate]
        contact_args = [state_in.node_x, model.node_fixed, model.node_body, model.node_contact_area,
                        model.body_world, model.body_contact_stiffness, colliders_end, s.contact_smoothing,
                        s.friction_velocity, dt, lam, normal, velocity]

        # Newton and its line search call these tens of times per step with the same arrays but x
        launch = s._launches.launch

        def residual(x, r):
            launch("r_nodes", node_residual, n, [x, *node_args], [r], device)
            launch("r_tets", tet_residual, model.tet_count, [x, *tet_args], [r], device)
            if model.collider_count:
                launch("r_contacts", contact_residual, n, [x, *contact_args], [r], device)

        def energy(x) -> tuple[float, float]:
            # (energy [J], its float32 rounding [J]: slot 1 sums the size of the terms)
            total = wp.zeros(2, dtype=wp.float64, device=device)
            launch("e_nodes", node_energy, n, [x, *node_args], [total], device)
            launch("e_tets", tet_energy, model.tet_count, [x, *tet_args], [total], device)
            if model.collider_count:
                launch("e_contacts", contact_energy, n, [x, *contact_args], [total], device)
            value, size = total.numpy()
            return float(value), 1e-6 * float(size)

        def preconditioner(x, d):
            wp.copy(d, diagonal)

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

        tet_material_args = [model.tet_rest_inverse, model.tet_rest_volume, model.tet_young_modulus,
                             model.tet_poisson_ratio, model.tet_damping, rate, *self._frames]

        def linearize(x):
            launch_items(tet_linearize, model.tet_count,
                         [x, target, model.node_fixed, model.tet_nodes, model.tet_rest_inverse,
                          model.tet_young_modulus, model.tet_poisson_ratio], self._frames, device=device,
                         cache=s._launches, site="linearize")

        def node_products(x, v, out, exact):
            # writes out (node_jacobian_product assigns); the contact terms add
            launch("jv_nodes", node_jacobian_product, n,
                   [v, model.node_body, model.node_mass, model.node_fixed, model.body_damping, pin, inertia, rate],
                   [out], device)
            if model.collider_count and exact and not self._analytic_contact:
                contact_exact(x, v, out)
            elif model.collider_count:
                launch("jv_contacts", contact_jacobian_product, n,
                       [x, contact_args[0], v, *contact_args[1:], int(exact), self._anticipated], [out], device)

        def jacobian_product(x, v, out, exact):
            # (the node products write ``out`` first; the tets add to it.) The tets are the products'
            # dominant cost: split over the CPU's cores (chunks add into private copies). Newton
            # takes the projected Hessian, the adjoint the exact one.
            node_products(x, v, out, exact)
            if exact:
                launch_items(tet_jacobian_product, model.tet_count,
                             [x, target, v, model.node_fixed, model.tet_nodes, model.tet_rest_inverse,
                              model.tet_rest_volume, model.tet_young_modulus, model.tet_poisson_ratio,
                              model.tet_damping, rate], [out], device=device, scattered_outputs=True,
                             cache=s._launches, site="jv_tets")
            else:
                launch_items(tet_projected_product, model.tet_count,
                             [v, model.node_fixed, model.tet_nodes, *tet_material_args], [out], device=device,
                             scattered_outputs=True, cache=s._launches, site="jv_projected")
            return True

        def assemble(x, values):
            # the tets' projected blocks, then each node's own 3 x 3 block of inertia and pins, probed
            # a column at a time; the contact blocks are set apart (contact_blocks)
            launch_items(tet_hessian_entries, model.tet_count,
                         [model.node_fixed, model.tet_nodes, *tet_material_args], [values], device=device)
            for axis in range(3):
                launch("jv_nodes", node_jacobian_product, n, [self._units[axis], model.node_body, model.node_mass,
                                                             model.node_fixed, model.body_damping, pin, inertia,
                                                             rate], [self._block], device)
                wp.launch(_node_block_column, n, [self._block, axis, 144 * model.tet_count], [values], device=device)

        def contact_blocks(x):
            # The Gauss-Newton contact and lagged-friction 3 x 3 blocks of the nodes that have any (the
            # ten or so touching a collider, and those Newton predicts will): they change as the
            # patch moves, so the factor leaves them out and its solves add them exactly.
            launch("contact_blocks", contact_jacobian_blocks, self._surface.shape[0],
                   [self._surface, x, contact_args[0], *contact_args[2:], self._anticipated], [self._surface_blocks],
                   device)
            blocks = self._surface_blocks.numpy()
            active = np.flatnonzero(np.abs(blocks).reshape(-1, 9).max(axis=1) > 0.0)
            return 3 * self._surface_nodes[active, None] + np.arange(3), blocks[active]

        prediction = ContactPrediction(self._anticipated, self._changed, [
            model.node_fixed, model.node_body, model.node_contact_area, model.body_world,
            model.body_contact_stiffness, colliders_end, s.contact_smoothing])

        # the analytic products cover stable Neo-Hookean tets; fixed-corotated ones take the taped Jacobian
        fast = self._all_stable_neo_hookean
        factored = self.cholesky is not None
        solve = ImplicitSolve(residual, energy=energy, preconditioner=preconditioner,
                              factorization=self.cholesky, assemble=assemble if factored else None,
                              local_blocks=contact_blocks if factored and model.collider_count else None,
                              linearize=linearize if fast else None,
                              jacobian_product=jacobian_product if fast else None,
                              # Both pay with the Cholesky preconditioner only. Jacobi-preconditioned CG,
                              # stopped early by the forcing terms, leaves steps at the contact's edge
                              # too rough to predict from (the Hertz check's Newton iterations went from
                              # 66 to 86), and Newton's linear rate is not what costs there: the exact
                              # tail took it from 66 to 67 iterations and 30 to 37 s.
                              active_set=prediction if s.predict_contacts and model.collider_count and fast
                              and factored else None, exact_tail=s.exact_tail and factored,
                              tolerance=s.newton_tolerance,
                              step_tolerance=s.newton_step_tolerance,
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
        if coupled_force is not None:
            wp.launch(_add_vec3, n, [coupled_force], [state_out.node_contact_force], device=device)


@wp.kernel
def _sum_vec3(a: wp.array(dtype=wp.vec3), b: wp.array(dtype=wp.vec3), out: wp.array(dtype=wp.vec3)):
    i = wp.tid()
    out[i] = a[i] + b[i]


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
