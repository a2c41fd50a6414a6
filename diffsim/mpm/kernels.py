"""Warp kernels of one MLS-MPM step: particle-to-grid transfer with stress, grid update with
gravity, colliders and walls, and grid-to-particle transfer (APIC).
"""

from __future__ import annotations

import warp as wp

from diffsim.geometry import ShapeType
from diffsim.geometry.colliders import (
    MAX_COLLIDERS,
    ColliderSet,
    collider_contact_normal,
    collider_local_point,
    collider_local_query,
    collider_slot,
    collider_surface_velocity,
)
from diffsim.geometry.motion import integrate_colliders  # noqa: F401 -- part of the step
from diffsim.materials import MaterialParams, constitutive_update
from diffsim.materials.models import FLUID

wp.set_module_options({"default_grid_stride": False})

#: Fluid mass [kg] below which a node's fluid volume ratio is divided by this floor instead: keeps
#: the grid-averaged J of G2P finite at nodes a particle reaches with (near) zero weight.
FLUID_MASS_FLOOR = wp.constant(1.0e-30)


@wp.func
def stencil_base(x: wp.vec3, origin: wp.vec3, inv_dx: float, grid_res: int):
    """Lower corner of the 3x3x3 stencil of a particle, clamped inside the grid."""
    g = (x - origin) * inv_dx
    return wp.vec3i(
        wp.clamp(int(wp.floor(g[0] - 0.5)), 0, grid_res - 3),
        wp.clamp(int(wp.floor(g[1] - 0.5)), 0, grid_res - 3),
        wp.clamp(int(wp.floor(g[2] - 0.5)), 0, grid_res - 3),
    )


@wp.func
def bspline_weights(fx: float):
    """Quadratic B-spline weights of the three nodes at offsets 0, 1, 2 from the stencil base."""
    return wp.vec3(0.5 * (1.5 - fx) * (1.5 - fx), 0.75 - (fx - 1.0) * (fx - 1.0), 0.5 * (fx - 0.5) * (fx - 0.5))


@wp.func
def bspline_slopes(fx: float):
    """d/dfx of :func:`bspline_weights`."""
    return wp.vec3(fx - 1.5, -2.0 * (fx - 1.0), fx - 0.5)


@wp.struct
class Stencil:
    """A particle's 3x3x3 quadratic B-spline stencil."""

    local: wp.vec3i  #: lower corner in the grid arrays (which cover only the active box)
    fx: wp.vec3  #: particle position relative to the stencil's lower corner [cells]
    wx: wp.vec3  #: weights of the three nodes along x
    wy: wp.vec3
    wz: wp.vec3
    sx: wp.vec3  #: d weight / d fx of the three nodes along x
    sy: wp.vec3
    sz: wp.vec3


@wp.func
def particle_stencil(x: wp.vec3, origin: wp.vec3, inv_dx: float, grid_res: int, grid_offset: wp.vec3i):
    base = stencil_base(x, origin, inv_dx, grid_res)
    st = Stencil()
    st.local = base - grid_offset
    st.fx = (x - origin) * inv_dx - wp.vec3(float(base[0]), float(base[1]), float(base[2]))
    st.wx = bspline_weights(st.fx[0])
    st.wy = bspline_weights(st.fx[1])
    st.wz = bspline_weights(st.fx[2])
    st.sx = bspline_slopes(st.fx[0])
    st.sy = bspline_slopes(st.fx[1])
    st.sz = bspline_slopes(st.fx[2])
    return st


@wp.func
def stencil_weight(st: Stencil, i: int, j: int, k: int):
    return st.wx[i] * st.wy[j] * st.wz[k]


@wp.func
def stencil_weight_gradient(st: Stencil, i: int, j: int, k: int, inv_dx: float):
    """d weight / d x [1/m]."""
    return inv_dx * wp.vec3(
        st.sx[i] * st.wy[j] * st.wz[k], st.wx[i] * st.sy[j] * st.wz[k], st.wx[i] * st.wy[j] * st.sz[k]
    )


@wp.kernel
def particle_stress(
    particle_F: wp.array(dtype=wp.mat33),
    particle_C: wp.array(dtype=wp.mat33),
    particle_material: wp.array(dtype=int),
    particle_mass: wp.array(dtype=float),
    particle_volume: wp.array(dtype=float),
    young_modulus: wp.array(dtype=float),
    poisson_ratio: wp.array(dtype=float),
    yield_stress: wp.array(dtype=float),
    friction_angle: wp.array(dtype=float),
    viscosity: wp.array(dtype=float),
    bulk_modulus: wp.array(dtype=float),
    fiber: wp.array(dtype=wp.vec3),
    actuation_strength: wp.array(dtype=float),
    actuation: wp.array(dtype=float),
    inv_dx: float,
    dt: float,
    offset: int,
    particle_F_new: wp.array(dtype=wp.mat33),
    particle_affine: wp.array(dtype=wp.mat33),
):
    """Constitutive update of each particle: the new F and the MLS-MPM affine momentum matrix.

    The Kirchhoff stress is the material's plus the active (muscle) stress
    a * s * (F d)(F d)^T of activation a [-], strength s [Pa] and reference fibre d (DiffTaichi's
    F A F^T with A = a s d d^T); with a = 0 it adds exact zeros.
    """
    p = wp.tid() + offset
    C = particle_C[p]
    params = MaterialParams()
    params.young_modulus = young_modulus[p]
    params.poisson_ratio = poisson_ratio[p]
    params.yield_stress = yield_stress[p]
    params.friction_angle = friction_angle[p]
    params.viscosity = viscosity[p]
    params.bulk_modulus = bulk_modulus[p]
    F_trial = (wp.identity(3, dtype=float) + dt * C) * particle_F[p]
    response = constitutive_update(particle_material[p], F_trial, C, params)
    particle_F_new[p] = response.F
    stretched_fiber = response.F * fiber[p]
    stress = response.stress + (actuation[p] * actuation_strength[p]) * wp.outer(stretched_fiber, stretched_fiber)
    # MLS-MPM: the stress divergence and the APIC momentum share one affine matrix.
    particle_affine[p] = (-dt * particle_volume[p] * 4.0 * inv_dx * inv_dx) * stress + particle_mass[p] * C


@wp.kernel
def particle_to_grid(
    particle_x: wp.array(dtype=wp.vec3),
    particle_v: wp.array(dtype=wp.vec3),
    particle_affine: wp.array(dtype=wp.mat33),
    particle_F_new: wp.array(dtype=wp.mat33),
    particle_world: wp.array(dtype=int),
    particle_material: wp.array(dtype=int),
    particle_mass: wp.array(dtype=float),
    origin: wp.vec3,
    inv_dx: float,
    grid_res: int,
    grid_offset: wp.vec3i,
    has_fluid: int,
    offset: int,
    grid_mass: wp.array4d(dtype=float),
    grid_momentum: wp.array4d(dtype=wp.vec3),
    grid_fluid_mass: wp.array4d(dtype=float),
    grid_fluid_volume: wp.array4d(dtype=float),
):
    """Scatter mass, APIC momentum and stress impulse (and fluid volume) to the grid."""
    p = wp.tid() + offset
    x = particle_x[p]
    world = particle_world[p]
    mass = particle_mass[p]
    affine = particle_affine[p]
    momentum = mass * particle_v[p]
    is_fluid = has_fluid != 0 and particle_material[p] == FLUID
    fluid_J = float(1.0)
    if is_fluid:
        fluid_J = wp.determinant(particle_F_new[p])
    dx = 1.0 / inv_dx
    st = particle_stencil(x, origin, inv_dx, grid_res, grid_offset)
    local = st.local  # the grid arrays cover the active box only
    fx = st.fx
    for i in range(3):
        for j in range(3):
            for k in range(3):
                weight = stencil_weight(st, i, j, k)
                dpos = (wp.vec3(float(i), float(j), float(k)) - fx) * dx
                wp.atomic_add(grid_mass, world, local[0] + i, local[1] + j, local[2] + k, weight * mass)
                wp.atomic_add(
                    grid_momentum, world, local[0] + i, local[1] + j, local[2] + k, weight * (momentum + affine * dpos)
                )
                if is_fluid:
                    wp.atomic_add(grid_fluid_mass, world, local[0] + i, local[1] + j, local[2] + k, weight * mass)
                    wp.atomic_add(
                        grid_fluid_volume, world, local[0] + i, local[1] + j, local[2] + k, weight * mass * fluid_J
                    )


@wp.func
def contact_weight(distance: float, contact_distance: float):
    """1 inside the surface, smoothstep down to 0 at ``contact_distance`` outside it."""
    if distance <= 0.0:
        return 1.0
    if distance >= contact_distance:
        return 0.0
    t = 1.0 - distance / contact_distance
    return t * t * (3.0 - 2.0 * t)


#: Width of the stick-slip transition of grid friction, in the ratio mu |vn| / |vt| (Coulomb: slip
#: below 1, stick above). Over ratios 1 -+ this, the kept share of the slip, max(1 - ratio, 0),
#: bends smoothly (C1) into 0 instead of at a kink; the kept share differs from Coulomb's by at
#: most a quarter of this (at ratio 1). A kink per node and substep is harmless alone, but in a
#: rubbing contact many nodes cross it one after another as an input changes: the loss is then
#: full of same-signed slope jumps, and the local derivative the tape computes misses the slope
#: over any practical step (by 3-15% on validation's pushed block) and any optimiser's step.
FRICTION_SMOOTHING = wp.constant(0.2)


@wp.func
def friction_scale(ratio: float):
    """The kept share of a node's tangential slip for ratio = mu |vn| / |vt| >= 0: Coulomb's
    max(1 - ratio, 0) with its kink at ratio 1 replaced by a C1 parabola of width
    :data:`FRICTION_SMOOTHING`; 1 without normal impulse and exactly 0 in firm sticking."""
    x = 1.0 - ratio
    w = FRICTION_SMOOTHING
    if x >= w:
        return x
    if x <= -w:
        return 0.0
    return (x + w) * (x + w) / (4.0 * w)


@wp.func
def collider_response(v: wp.vec3, x: wp.vec3, colliders: ColliderSet, c: int, slot: int, contact_distance: float):
    """Node velocity after contact with collider ``c`` posed at ``slot`` (unchanged outside its skin).

    Colliders act one after another; each blends in over its skin, so the result stays
    continuous when a node enters or leaves any of them.
    """
    local = collider_local_point(colliders, slot, x)
    q = collider_local_query(colliders, c, local)
    out = v
    if q.distance < contact_distance:
        # a mesh's nearest-face normal flips across concave edges; the contact normal turns smoothly
        n = collider_contact_normal(colliders, c, slot, local, q, contact_distance)
        v_collider = collider_surface_velocity(colliders, slot, x)
        v_rel = v - v_collider
        vn = wp.dot(v_rel, n)
        if vn < 0.0:
            # Coulomb friction: the tangential slip shrinks by mu * |vn|, never reversing.
            vt = v_rel - vn * n
            vt_norm = wp.sqrt(wp.dot(vt, vt) + 1.0e-20)
            scale = friction_scale(colliders.friction[c] * -vn / vt_norm)
            v_contact = v_collider + scale * vt
            # Full response inside the collider, fading out smoothly across a thin skin outside
            # it: the contact front then moves continuously with the collider's pose, which is
            # what gives the loss a gradient with respect to collider positions.
            out = v + contact_weight(q.distance, contact_distance) * (v_contact - v)
    return out


@wp.func
def node_velocity(momentum: wp.vec3, mass: float):
    """momentum / mass [m/s] of a grid node with positive mass [kg]."""
    return momentum / mass


@wp.func_grad(node_velocity)
def adj_node_velocity(momentum: wp.vec3, mass: float, adj_ret: wp.vec3):
    # Warp's adjoint of vec3 / float forms dot(momentum, adj) / (mass * mass). A node that only the
    # far edge of a particle's stencil reaches (B-spline weight 0.5 (fx - 0.5)^2 ~ 1e-13 per axis)
    # may hold ~1e-24 kg, whose square underflows to 0 in float32: that adjoint is then inf, or
    # 0/0 = NaN, while the velocity is finite. Here each division is by mass once, with the bounded
    # velocity momentum / mass in place of momentum / mass^2.
    wp.adjoint[momentum] += adj_ret / mass
    wp.adjoint[mass] -= wp.dot(adj_ret, momentum / mass) / mass


@wp.func
def _without_component(v: wp.vec3, axis: int):
    """``v`` with component ``axis`` set to zero, as a new vector (differentiable)."""
    if axis == 0:
        return wp.vec3(0.0, v[1], v[2])
    if axis == 1:
        return wp.vec3(v[0], 0.0, v[2])
    return wp.vec3(v[0], v[1], 0.0)


@wp.func
def wall_condition(v: wp.vec3, index: int, axis: int, grid_res: int, boundary: int, boundary_cells: int):
    """Apply the domain-wall condition along one axis to a node velocity.

    The projection builds a new vector instead of assigning ``out[axis] = 0.0``: Warp 1.19's
    adjoint ignores such an in-place component store on a copy of an argument, so the tape saw
    no wall at all for SLIP and SEPARATE (gradients of impacts on walls then missed FD).
    """
    low = index < boundary_cells
    high = index >= grid_res - boundary_cells
    out = v
    if low or high:
        if boundary == 0:
            out = wp.vec3(0.0)
        elif boundary == 1 or (low and v[axis] < 0.0) or (high and v[axis] > 0.0):
            out = _without_component(v, axis)
    return out


@wp.kernel
def grid_update(
    grid_mass: wp.array4d(dtype=float),
    grid_momentum: wp.array4d(dtype=wp.vec3),
    grid_force: wp.array4d(dtype=wp.vec3),
    gravity: wp.array(dtype=wp.vec3),
    colliders: ColliderSet,
    contact_distance: float,
    origin: wp.vec3,
    dx: float,
    dt: float,
    grid_res: int,
    boundary: int,
    boundary_cells: int,
    offset: wp.vec3i,
    grid_v: wp.array4d(dtype=wp.vec3),
):
    world, ii, jj, kk = wp.tid()
    # the grid arrays cover only the box of nodes that particles reach; (i, j, k) is global
    i = ii + offset[0]
    j = jj + offset[1]
    k = kk + offset[2]
    m = grid_mass[world, ii, jj, kk]
    if m <= 0.0:
        grid_v[world, ii, jj, kk] = wp.vec3(0.0)
        return
    # grid_force: forces of other solvers coupled to this one on the node [N] (zero when none)
    v = node_velocity(grid_momentum[world, ii, jj, kk] + dt * grid_force[world, ii, jj, kk], m) + dt * gravity[0]
    x = origin + wp.vec3(float(i), float(j), float(k)) * dx

    for c in range(wp.static(MAX_COLLIDERS)):
        if c < colliders.count:
            v = collider_response(v, x, colliders, c, collider_slot(colliders, world, c), contact_distance)

    v = wall_condition(v, i, 0, grid_res, boundary, boundary_cells)
    v = wall_condition(v, j, 1, grid_res, boundary, boundary_cells)
    v = wall_condition(v, k, 2, grid_res, boundary, boundary_cells)
    grid_v[world, ii, jj, kk] = v


@wp.kernel
def collider_wrench(
    grid_mass: wp.array4d(dtype=float),
    grid_momentum: wp.array4d(dtype=wp.vec3),
    grid_force: wp.array4d(dtype=wp.vec3),
    gravity: wp.array(dtype=wp.vec3),
    colliders: ColliderSet,
    contact_distance: float,
    origin: wp.vec3,
    dx: float,
    dt: float,
    offset: wp.vec3i,
    wrench: wp.array(dtype=wp.vec3),
):
    """Force [N] and torque [N m] about its origin that the material exerts on each (world,
    collider) slot during the step: ``wrench[2 slot]`` and ``wrench[2 slot + 1]``.

    Replays :func:`grid_update`'s collider sequence: collider ``c`` changes node momentum by
    m (v_after - v_before), and the collider receives the opposite impulse. Differentiable (a
    taped two-way coupled step differentiates the wrench; see :mod:`diffsim.coupling.mujoco`).
    """
    world, ii, jj, kk = wp.tid()
    m = grid_mass[world, ii, jj, kk]
    if m <= 0.0:
        return
    v = node_velocity(grid_momentum[world, ii, jj, kk] + dt * grid_force[world, ii, jj, kk], m) + dt * gravity[0]
    x = origin + wp.vec3(float(ii + offset[0]), float(jj + offset[1]), float(kk + offset[2])) * dx
    for c in range(wp.static(MAX_COLLIDERS)):
        if c < colliders.count:
            slot = collider_slot(colliders, world, c)
            after = collider_response(v, x, colliders, c, slot, contact_distance)
            force = (m / dt) * (v - after)
            if wp.dot(force, force) > 0.0:
                wp.atomic_add(wrench, 2 * slot, force)
                wp.atomic_add(wrench, 2 * slot + 1, wp.cross(x - colliders.position[slot], force))
            v = after


@wp.kernel
def grid_to_particle(
    particle_x: wp.array(dtype=wp.vec3),
    particle_world: wp.array(dtype=int),
    particle_material: wp.array(dtype=int),
    particle_F_new: wp.array(dtype=wp.mat33),
    grid_v: wp.array4d(dtype=wp.vec3),
    grid_fluid_mass: wp.array4d(dtype=float),
    grid_fluid_volume: wp.array4d(dtype=float),
    origin: wp.vec3,
    inv_dx: float,
    dt: float,
    grid_res: int,
    grid_offset: wp.vec3i,
    has_fluid: int,
    offset: int,
    particle_x_out: wp.array(dtype=wp.vec3),
    particle_v_out: wp.array(dtype=wp.vec3),
    particle_C_out: wp.array(dtype=wp.mat33),
    particle_F_out: wp.array(dtype=wp.mat33),
):
    p = wp.tid() + offset
    x = particle_x[p]
    world = particle_world[p]
    st = particle_stencil(x, origin, inv_dx, grid_res, grid_offset)
    local = st.local  # the grid arrays cover the active box only
    fx = st.fx
    is_fluid = has_fluid != 0 and particle_material[p] == FLUID
    v = wp.vec3(0.0)
    C = wp.mat33(0.0)
    J = float(0.0)
    for i in range(3):
        for j in range(3):
            for k in range(3):
                weight = stencil_weight(st, i, j, k)
                dpos = wp.vec3(float(i), float(j), float(k)) - fx  # in cells
                g = grid_v[world, local[0] + i, local[1] + j, local[2] + k]
                v += weight * g
                C += (4.0 * inv_dx * weight) * wp.outer(g, dpos)
                if is_fluid:
                    node_mass = grid_fluid_mass[world, local[0] + i, local[1] + j, local[2] + k]
                    node_volume = grid_fluid_volume[world, local[0] + i, local[1] + j, local[2] + k]
                    J += weight * node_volume / wp.max(node_mass, FLUID_MASS_FLOOR)
    particle_v_out[p] = v
    particle_C_out[p] = C
    particle_x_out[p] = x + dt * v
    if is_fluid:
        # A fluid particle's volume ratio is the grid-averaged one: per-particle J drifts apart
        # between neighbours (a checkerboard the pressure cannot see), and averaging removes it.
        particle_F_out[p] = wp.identity(3, dtype=float) * wp.cbrt(J)
    else:
        particle_F_out[p] = particle_F_new[p]


@wp.kernel
def advance_time(world_time: wp.array(dtype=float), dt: float, world_time_out: wp.array(dtype=float)):
    w = wp.tid()
    world_time_out[w] = world_time[w] + dt


@wp.kernel
def stencil_bounds(
    particle_x: wp.array(dtype=wp.vec3),
    origin: wp.vec3,
    inv_dx: float,
    grid_res: int,
    bounds: wp.array(dtype=int),
):
    """Lowest stencil base (bounds[0:3]) and highest (bounds[3:6]) over all particles."""
    p = wp.tid()
    base = stencil_base(particle_x[p], origin, inv_dx, grid_res)
    for a in range(3):
        wp.atomic_min(bounds, a, base[a])
        wp.atomic_max(bounds, 3 + a, base[a])


@wp.kernel
def particles_outside(
    particle_x: wp.array(dtype=wp.vec3),
    lower: wp.vec3,
    upper: wp.vec3,
    first_outside: wp.array(dtype=int),
):
    """Record the smallest index of a particle outside [lower, upper] or with a non-finite position."""
    p = wp.tid()
    x = particle_x[p]
    inside = True
    for a in range(3):
        if not (x[a] >= lower[a] and x[a] <= upper[a]):  # also false for NaN
            inside = False
    if not inside:
        wp.atomic_min(first_outside, 0, p)


_BOX = wp.constant(int(ShapeType.BOX))
_SPHERE = wp.constant(int(ShapeType.SPHERE))
_CAPSULE = wp.constant(int(ShapeType.CAPSULE))
_CYLINDER = wp.constant(int(ShapeType.CYLINDER))


@wp.func
def collider_extent(shape: int, size: wp.vec3):
    """Distance [m] from a collider's origin to the farthest point of its surface (inf for planes
    and meshes, whose bound the caller takes from the domain instead)."""
    if shape == _BOX:  # size: half extents
        return wp.length(size)
    if shape == _SPHERE:
        return size[0]
    if shape == _CAPSULE:  # radius + half-length of the segment
        return size[0] + size[1]
    if shape == _CYLINDER:
        return wp.sqrt(size[0] * size[0] + size[1] * size[1])
    return wp.inf


@wp.kernel(enable_backward=False)
def max_particle_speed(particle_v: wp.array(dtype=wp.vec3), speed: wp.array(dtype=float)):
    """speed[0] = max |v| over particles [m/s]; NaN counts as infinitely fast."""
    p = wp.tid()
    v = wp.length(particle_v[p])
    if not (v <= 3.0e38):  # also true for NaN and inf
        v = 3.0e38
    wp.atomic_max(speed, 0, v)


@wp.kernel(enable_backward=False)
def max_collider_speed(
    colliders: ColliderSet,
    contact_distance: float,
    lower: wp.vec3,
    upper: wp.vec3,
    speed: wp.array(dtype=float),
):
    """speed[1] = a bound on the speed [m/s] of any collider point that can touch the grid: linear
    speed + |angular velocity| x the distance from the collider's origin to its farthest surface
    point (plus the contact skin), or to the farthest domain corner when that is nearer."""
    slot = wp.tid()
    c = slot % colliders.count
    pos = colliders.position[slot]
    far = wp.vec3(wp.max(wp.abs(pos[0] - lower[0]), wp.abs(upper[0] - pos[0])),
                  wp.max(wp.abs(pos[1] - lower[1]), wp.abs(upper[1] - pos[1])),
                  wp.max(wp.abs(pos[2] - lower[2]), wp.abs(upper[2] - pos[2])))
    reach = wp.min(collider_extent(colliders.shape[c], colliders.size[c]) + contact_distance, wp.length(far))
    v = wp.length(colliders.velocity[slot]) + wp.length(colliders.angular_velocity[slot]) * reach
    if not (v <= 3.0e38):
        v = 3.0e38
    wp.atomic_max(speed, 1, v)


# -- hand-written adjoints ----------------------------------------------------------------------
# Warp's generated adjoints of the two transfer kernels cost 7-9x their forward passes on CPU;
# these compute the same gradients (tests compare them with the generated ones) in one sweep.


@wp.kernel(enable_backward=False)
def particle_to_grid_adjoint(
    particle_x: wp.array(dtype=wp.vec3),
    particle_v: wp.array(dtype=wp.vec3),
    particle_affine: wp.array(dtype=wp.mat33),
    particle_F_new: wp.array(dtype=wp.mat33),
    particle_world: wp.array(dtype=int),
    particle_material: wp.array(dtype=int),
    particle_mass: wp.array(dtype=float),
    origin: wp.vec3,
    inv_dx: float,
    grid_res: int,
    grid_offset: wp.vec3i,
    has_fluid: int,
    offset: int,
    adj_grid_mass: wp.array4d(dtype=float),
    adj_grid_momentum: wp.array4d(dtype=wp.vec3),
    adj_grid_fluid_mass: wp.array4d(dtype=float),
    adj_grid_fluid_volume: wp.array4d(dtype=float),
    adj_particle_x: wp.array(dtype=wp.vec3),
    adj_particle_v: wp.array(dtype=wp.vec3),
    adj_particle_affine: wp.array(dtype=wp.mat33),
    adj_particle_F_new: wp.array(dtype=wp.mat33),
    adj_particle_mass: wp.array(dtype=float),
):
    p = wp.tid() + offset
    x = particle_x[p]
    world = particle_world[p]
    mass = particle_mass[p]
    v = particle_v[p]
    affine = particle_affine[p]
    is_fluid = has_fluid != 0 and particle_material[p] == FLUID
    fluid_J = float(1.0)
    if is_fluid:
        fluid_J = wp.determinant(particle_F_new[p])
    dx = 1.0 / inv_dx
    st = particle_stencil(x, origin, inv_dx, grid_res, grid_offset)
    local = st.local  # the grid arrays cover the active box only
    fx = st.fx
    adj_x = wp.vec3(0.0)
    adj_v = wp.vec3(0.0)
    adj_affine = wp.mat33(0.0)
    adj_mass = float(0.0)
    adj_J = float(0.0)
    for i in range(3):
        for j in range(3):
            for k in range(3):
                weight = stencil_weight(st, i, j, k)
                grad_weight = stencil_weight_gradient(st, i, j, k, inv_dx)
                dpos = (wp.vec3(float(i), float(j), float(k)) - fx) * dx
                gm = adj_grid_mass[world, local[0] + i, local[1] + j, local[2] + k]
                gp = adj_grid_momentum[world, local[0] + i, local[1] + j, local[2] + k]
                node_value = gm * mass + wp.dot(gp, mass * v + affine * dpos)
                mass_share = gm + wp.dot(gp, v)
                if is_fluid:
                    gfm = adj_grid_fluid_mass[world, local[0] + i, local[1] + j, local[2] + k]
                    gfv = adj_grid_fluid_volume[world, local[0] + i, local[1] + j, local[2] + k]
                    node_value += gfm * mass + gfv * mass * fluid_J
                    mass_share += gfm + gfv * fluid_J
                    adj_J += weight * mass * gfv
                adj_x += node_value * grad_weight - weight * (wp.transpose(affine) * gp)  # d dpos / dx = -I
                adj_v += (weight * mass) * gp
                adj_mass += weight * mass_share
                adj_affine += weight * wp.outer(gp, dpos)
    adj_particle_x[p] = adj_particle_x[p] + adj_x
    adj_particle_v[p] = adj_particle_v[p] + adj_v
    adj_particle_affine[p] = adj_particle_affine[p] + adj_affine
    adj_particle_mass[p] = adj_particle_mass[p] + adj_mass
    if is_fluid:
        F = particle_F_new[p]
        # d det(F) / dF is the cofactor matrix (det(F) F^-T, but finite for singular F too)
        r0 = wp.vec3(F[0, 0], F[0, 1], F[0, 2])
        r1 = wp.vec3(F[1, 0], F[1, 1], F[1, 2])
        r2 = wp.vec3(F[2, 0], F[2, 1], F[2, 2])
        c0 = wp.cross(r1, r2)
        c1 = wp.cross(r2, r0)
        c2 = wp.cross(r0, r1)
        cofactor = wp.mat33(c0[0], c0[1], c0[2], c1[0], c1[1], c1[2], c2[0], c2[1], c2[2])
        adj_particle_F_new[p] = adj_particle_F_new[p] + adj_J * cofactor


@wp.kernel(enable_backward=False)
def grid_to_particle_adjoint(
    particle_x: wp.array(dtype=wp.vec3),
    particle_world: wp.array(dtype=int),
    particle_material: wp.array(dtype=int),
    particle_F_new: wp.array(dtype=wp.mat33),
    grid_v: wp.array4d(dtype=wp.vec3),
    grid_fluid_mass: wp.array4d(dtype=float),
    grid_fluid_volume: wp.array4d(dtype=float),
    origin: wp.vec3,
    inv_dx: float,
    dt: float,
    grid_res: int,
    grid_offset: wp.vec3i,
    has_fluid: int,
    offset: int,
    adj_particle_x_out: wp.array(dtype=wp.vec3),
    adj_particle_v_out: wp.array(dtype=wp.vec3),
    adj_particle_C_out: wp.array(dtype=wp.mat33),
    adj_particle_F_out: wp.array(dtype=wp.mat33),
    adj_particle_x: wp.array(dtype=wp.vec3),
    adj_particle_F_new: wp.array(dtype=wp.mat33),
    adj_grid_v: wp.array4d(dtype=wp.vec3),
    adj_grid_fluid_mass: wp.array4d(dtype=float),
    adj_grid_fluid_volume: wp.array4d(dtype=float),
):
    p = wp.tid() + offset
    x = particle_x[p]
    world = particle_world[p]
    is_fluid = has_fluid != 0 and particle_material[p] == FLUID
    # outputs' adjoints are consumed, as in Warp's generated adjoints
    adj_x_out = adj_particle_x_out[p]
    adj_C = adj_particle_C_out[p]
    adj_F_out = adj_particle_F_out[p]
    adj_v = adj_particle_v_out[p] + dt * adj_x_out
    adj_particle_x_out[p] = wp.vec3(0.0)
    adj_particle_v_out[p] = wp.vec3(0.0)
    adj_particle_C_out[p] = wp.mat33(0.0)
    adj_particle_F_out[p] = wp.mat33(0.0)
    st = particle_stencil(x, origin, inv_dx, grid_res, grid_offset)
    local = st.local  # the grid arrays cover the active box only
    fx = st.fx
    adj_J = float(0.0)
    if is_fluid:
        # forward: J = sum w fv/fm, F_out = cbrt(J) I
        J = float(0.0)
        for i in range(3):
            for j in range(3):
                for k in range(3):
                    fm = grid_fluid_mass[world, local[0] + i, local[1] + j, local[2] + k]
                    fv = grid_fluid_volume[world, local[0] + i, local[1] + j, local[2] + k]
                    J += stencil_weight(st, i, j, k) * fv / wp.max(fm, FLUID_MASS_FLOOR)
        root = wp.cbrt(wp.max(J, 1.0e-12))
        adj_J = (adj_F_out[0, 0] + adj_F_out[1, 1] + adj_F_out[2, 2]) / (3.0 * root * root)
    else:
        adj_particle_F_new[p] = adj_particle_F_new[p] + adj_F_out
    adj_x = adj_x_out
    scale = 4.0 * inv_dx
    for i in range(3):
        for j in range(3):
            for k in range(3):
                weight = stencil_weight(st, i, j, k)
                grad_weight = stencil_weight_gradient(st, i, j, k, inv_dx)
                dpos = wp.vec3(float(i), float(j), float(k)) - fx  # in cells
                g = grid_v[world, local[0] + i, local[1] + j, local[2] + k]
                C_dpos = adj_C * dpos
                wp.atomic_add(adj_grid_v, world, local[0] + i, local[1] + j, local[2] + k,
                              weight * (adj_v + scale * C_dpos))
                node_value = wp.dot(g, adj_v) + scale * wp.dot(g, C_dpos)
                adj_x += node_value * grad_weight - (weight * scale * inv_dx) * (wp.transpose(adj_C) * g)
                if is_fluid:
                    fm = grid_fluid_mass[world, local[0] + i, local[1] + j, local[2] + k]
                    fv = grid_fluid_volume[world, local[0] + i, local[1] + j, local[2] + k]
                    # forward: J += weight * fv / max(fm, FLUID_MASS_FLOOR). A node at the rim of the
                    # stencil may hold only ~1e-24 kg, whose square underflows to 0 in float32: form
                    # d/dfm = -weight fv / fm^2 from the two bounded ratios weight / fm (<= 1 / the
                    # particle's mass, since this particle put weight * mass there) and fv / fm (~ J).
                    denom = wp.max(fm, FLUID_MASS_FLOOR)
                    share = weight / denom
                    ratio = fv / denom
                    wp.atomic_add(adj_grid_fluid_volume, world, local[0] + i, local[1] + j, local[2] + k,
                                  share * adj_J)
                    if fm > FLUID_MASS_FLOOR:
                        wp.atomic_add(adj_grid_fluid_mass, world, local[0] + i, local[1] + j, local[2] + k,
                                      -(share * adj_J) * ratio)
                    adj_x += (adj_J * ratio) * grad_weight
    adj_particle_x[p] = adj_particle_x[p] + adj_x
