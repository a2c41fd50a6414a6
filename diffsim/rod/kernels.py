"""Warp kernels of one discrete-elastic-rod step: reference twist and quasi-static material
angles, elastic forces and explicit integration, inextensibility projection with contact, and the
parallel transport of reference frames in time.

Rods of any length share flat arrays: vertex ``v`` of rod ``r`` sits at ``rod_vertex_start[r] +
local index``, and the edge from vertex ``v`` to ``v + 1`` has index ``v - r``. The energy of an
interior vertex (bending and twisting) depends on its two edges ``e0 = x[v] - x[v-1]`` and
``e1 = x[v+1] - x[v]``; forces gather those gradients from the vertex and its two neighbours.
"""

from __future__ import annotations

import warp as wp

from diffsim.geometry.colliders import (
    MAX_COLLIDERS,
    ColliderSet,
    collider_local_point,
    collider_query,
    collider_slot,
    collider_start_point,
)

wp.set_module_options({"default_grid_stride": False})

#: Bits of ``rod_twist_clamp``: the first / last edge's material angle follows the Control.
CLAMP_FIRST = 1
CLAMP_LAST = 2


# -- geometry of one vertex --------------------------------------------------------------------
@wp.func
def parallel_transport(u: wp.vec3, a: wp.vec3, b: wp.vec3):
    """Rotate ``u`` by the smallest rotation that takes unit vector ``a`` to unit vector ``b``."""
    w = wp.cross(a, b)
    c = wp.dot(a, b)
    # Rodrigues' formula with the unnormalised axis: smooth, and exact for any angle below pi
    return u * c + wp.cross(w, u) + w * (wp.dot(w, u) / wp.max(1.0 + c, 1.0e-6))


@wp.func
def curvature_binormal(e0: wp.vec3, e1: wp.vec3):
    """(kappa b) = 2 e0 x e1 / (|e0||e1| + e0.e1): magnitude 2 tan(turning angle / 2) [-]."""
    return 2.0 * wp.cross(e0, e1) / (wp.length(e0) * wp.length(e1) + wp.dot(e0, e1))


@wp.func
def reference_twist(d1_prev: wp.vec3, t_prev: wp.vec3, d1: wp.vec3, t: wp.vec3):
    """Angle [rad] from the previous edge's reference director, transported along the rod, to this
    edge's reference director, measured about this edge's tangent."""
    u = parallel_transport(d1_prev, t_prev, t)
    return wp.atan2(wp.dot(wp.cross(u, d1), t), wp.dot(u, d1))


@wp.func
def rest_binormal(d1: wp.vec3, t: wp.vec3, theta: float, rest_curvature: wp.vec2):
    """World vector that (kappa b) equals at rest, for material curvature (w1, w2) in the frame of
    an edge with reference director ``d1`` and material angle ``theta`` [rad]."""
    d2 = wp.cross(t, d1)
    c = wp.cos(theta)
    s = wp.sin(theta)
    m1 = c * d1 + s * d2
    m2 = c * d2 - s * d1
    return rest_curvature[0] * m2 - rest_curvature[1] * m1


@wp.struct
class EdgePairGradient:
    """Gradient of one interior vertex's energy with respect to its two edge vectors [N]."""

    e0: wp.vec3
    e1: wp.vec3


@wp.func
def vertex_energy_gradient(
    v: int,
    r: int,
    x: wp.array(dtype=wp.vec3),
    edge_d1: wp.array(dtype=wp.vec3),
    edge_theta: wp.array(dtype=float),
    edge_rest_length: wp.array(dtype=float),
    edge_bend_stiffness: wp.array(dtype=float),
    vertex_rest_curvature: wp.array(dtype=wp.vec2),
    torque: float,
    vel: wp.array(dtype=wp.vec3),
    edge_bend_damping: wp.array(dtype=float),
    dt: float,
):
    """d(bending + twisting energy of interior vertex v)/d(e0, e1), twist at torque ``torque`` [N m],
    plus the bending-rate damping force: dissipation gamma / (2 l) |d(kappa b)/dt|^2, with the rate
    taken over the last step (the positions one step back are x - dt v)."""
    ea = v - 1 - r
    eb = v - r
    e0 = x[v] - x[v - 1]
    e1 = x[v + 1] - x[v]
    l0 = wp.length(e0)
    l1 = wp.length(e1)
    t0 = e0 / l0
    t1 = e1 / l1
    denominator = l0 * l1 + wp.dot(e0, e1)
    kb = 2.0 * wp.cross(e0, e1) / denominator
    voronoi = 0.5 * (edge_rest_length[ea] + edge_rest_length[eb])
    alpha = 0.5 * (edge_bend_stiffness[ea] + edge_bend_stiffness[eb])
    # E = alpha / (4 l) sum_j |kb - b_j|^2 over the frames of both edges; the rest binormals b_j
    # turn with their edges, but that changes E only at second order (kb and b_j are normal to t_j)
    rest = vertex_rest_curvature[v]
    b0 = rest_binormal(edge_d1[ea], t0, edge_theta[ea], rest)
    b1 = rest_binormal(edge_d1[eb], t1, edge_theta[eb], rest)
    g = (alpha / (2.0 * voronoi)) * (2.0 * kb - b0 - b1)
    gamma = 0.5 * (edge_bend_damping[ea] + edge_bend_damping[eb])
    if gamma > 0.0:
        kb_before = curvature_binormal(e0 - dt * (vel[v] - vel[v - 1]), e1 - dt * (vel[v + 1] - vel[v]))
        g = g + (gamma / (voronoi * dt)) * (kb - kb_before)
    gk = wp.dot(g, kb)
    out = EdgePairGradient()
    out.e0 = (-2.0 * wp.cross(g, e1) - gk * (l1 * t0 + e1)) / denominator
    out.e1 = (2.0 * wp.cross(g, e0) - gk * (l0 * t1 + e0)) / denominator
    # twist: dE/dx = torque * d(reference twist)/dx, with d(twist)/d(e_j) = (kappa b) / (2 |e_j|)
    out.e0 = out.e0 + (0.5 * torque / l0) * kb
    out.e1 = out.e1 + (0.5 * torque / l1) * kb
    return out


@wp.func
def rod_torque(
    r: int,
    rod_vertex_start: wp.array(dtype=int),
    rod_vertex_count: wp.array(dtype=int),
    rod_twist_clamp: wp.array(dtype=int),
    rod_twist_sum: wp.array(dtype=float),
    rod_twist_compliance: wp.array(dtype=float),
    edge_theta_in: wp.array(dtype=float),
):
    """Twisting moment [N m], uniform along a rod in quasi-static twist; zero unless both ends are
    clamped (a free end lets the rod spin until the moment vanishes)."""
    flags = rod_twist_clamp[r]
    torque = float(0.0)
    if (flags & 3) == 3 and rod_twist_compliance[r] > 0.0:
        first = rod_vertex_start[r] - r
        last = first + rod_vertex_count[r] - 2
        torque = (edge_theta_in[last] - edge_theta_in[first] + rod_twist_sum[r]) / rod_twist_compliance[r]
    return torque


# -- kernels of one step ------------------------------------------------------------------------
@wp.kernel
def twist_sums(
    x: wp.array(dtype=wp.vec3),
    edge_d1: wp.array(dtype=wp.vec3),
    vertex_rod: wp.array(dtype=int),
    rod_vertex_start: wp.array(dtype=int),
    rod_vertex_count: wp.array(dtype=int),
    edge_rest_length: wp.array(dtype=float),
    edge_twist_stiffness: wp.array(dtype=float),
    vertex_rest_twist: wp.array(dtype=float),
    vertex_reference_twist: wp.array(dtype=float),
    rod_twist_sum: wp.array(dtype=float),
    rod_twist_compliance: wp.array(dtype=float),
):
    """Per interior vertex: reference twist, and per rod the sums the twist solve needs."""
    v = wp.tid()
    r = vertex_rod[v]
    local = v - rod_vertex_start[r]
    if local == 0 or local == rod_vertex_count[r] - 1:
        vertex_reference_twist[v] = 0.0
        return
    ea = v - 1 - r
    eb = v - r
    t0 = wp.normalize(x[v] - x[v - 1])
    t1 = wp.normalize(x[v + 1] - x[v])
    twist = reference_twist(edge_d1[ea], t0, edge_d1[eb], t1)
    vertex_reference_twist[v] = twist
    voronoi = 0.5 * (edge_rest_length[ea] + edge_rest_length[eb])
    beta = 0.5 * (edge_twist_stiffness[ea] + edge_twist_stiffness[eb])
    wp.atomic_add(rod_twist_sum, r, twist - vertex_rest_twist[v])
    wp.atomic_add(rod_twist_compliance, r, voronoi / beta)


@wp.kernel
def material_angles(
    vertex_rod: wp.array(dtype=int),
    rod_vertex_start: wp.array(dtype=int),
    rod_vertex_count: wp.array(dtype=int),
    rod_twist_clamp: wp.array(dtype=int),
    rod_twist_sum: wp.array(dtype=float),
    rod_twist_compliance: wp.array(dtype=float),
    edge_rest_length: wp.array(dtype=float),
    edge_twist_stiffness: wp.array(dtype=float),
    vertex_rest_twist: wp.array(dtype=float),
    vertex_reference_twist: wp.array(dtype=float),
    edge_theta_in: wp.array(dtype=float),
    edge_theta: wp.array(dtype=float),
):
    """Quasi-static material angles [rad]: the twist m_i = theta_i - theta_(i-1) + reference twist
    carries the same moment at every vertex, so each interior vertex adds its angle increment to
    the edges on the far side of it from the anchor edge (a prefix sum by atomics; edge_theta
    starts at zero)."""
    v = wp.tid()
    r = vertex_rod[v]
    start = rod_vertex_start[r]
    count = rod_vertex_count[r]
    local = v - start
    first = start - r
    flags = rod_twist_clamp[r]
    from_first = (flags & CLAMP_FIRST) != 0 or (flags & CLAMP_LAST) == 0
    if local == 0:
        anchor = edge_theta_in[first]
        if not from_first:
            anchor = edge_theta_in[first + count - 2]
        for j in range(count - 1):
            wp.atomic_add(edge_theta, first + j, anchor)
        return
    if local == count - 1:
        return
    torque = rod_torque(r, rod_vertex_start, rod_vertex_count, rod_twist_clamp, rod_twist_sum,
                        rod_twist_compliance, edge_theta_in)
    ea = v - 1 - r
    eb = v - r
    voronoi = 0.5 * (edge_rest_length[ea] + edge_rest_length[eb])
    beta = 0.5 * (edge_twist_stiffness[ea] + edge_twist_stiffness[eb])
    increment = vertex_rest_twist[v] + torque * voronoi / beta - vertex_reference_twist[v]
    if from_first:
        for j in range(local, count - 1):
            wp.atomic_add(edge_theta, first + j, increment)
    else:
        for j in range(local):
            wp.atomic_add(edge_theta, first + j, -increment)


@wp.kernel
def integrate_vertices(
    x: wp.array(dtype=wp.vec3),
    vel: wp.array(dtype=wp.vec3),
    edge_d1: wp.array(dtype=wp.vec3),
    edge_theta: wp.array(dtype=float),
    edge_theta_in: wp.array(dtype=float),
    vertex_rod: wp.array(dtype=int),
    rod_vertex_start: wp.array(dtype=int),
    rod_vertex_count: wp.array(dtype=int),
    rod_twist_clamp: wp.array(dtype=int),
    rod_twist_sum: wp.array(dtype=float),
    rod_twist_compliance: wp.array(dtype=float),
    vertex_mass: wp.array(dtype=float),
    vertex_driven: wp.array(dtype=int),
    vertex_rest_curvature: wp.array(dtype=wp.vec2),
    edge_rest_length: wp.array(dtype=float),
    edge_bend_stiffness: wp.array(dtype=float),
    edge_bend_damping: wp.array(dtype=float),
    edge_stretch_stiffness: wp.array(dtype=float),
    rod_linear_damping: wp.array(dtype=float),
    rod_air_drag: wp.array(dtype=float),
    gravity: wp.array(dtype=wp.vec3),
    driven_velocity: wp.array(dtype=wp.vec3),
    external_force: wp.array(dtype=wp.vec3),
    elastic_stretch: int,
    dt: float,
    x_out: wp.array(dtype=wp.vec3),
):
    """Forces at the start of the step, then symplectic Euler: v' = v + dt f / m, x' = x + dt v'.
    Driven vertices move with the Control's velocity instead."""
    v = wp.tid()
    if vertex_driven[v] != 0:
        x_out[v] = x[v] + dt * driven_velocity[v]
        return
    r = vertex_rod[v]
    start = rod_vertex_start[r]
    count = rod_vertex_count[r]
    local = v - start
    mass = vertex_mass[v]
    speed = vel[v]
    # air drag acts on the length of rod around the vertex
    around = float(0.0)
    if local > 0:
        around += 0.5 * edge_rest_length[v - 1 - r]
    if local < count - 1:
        around += 0.5 * edge_rest_length[v - r]
    force = mass * gravity[0] - rod_linear_damping[r] * mass * speed + external_force[v]
    force = force - rod_air_drag[r] * around * wp.length(speed) * speed
    if elastic_stretch != 0:
        if local > 0:
            e = x[v] - x[v - 1]
            le = wp.length(e)
            j = v - 1 - r
            force = force - edge_stretch_stiffness[j] * (le / edge_rest_length[j] - 1.0) * (e / le)
        if local < count - 1:
            e = x[v + 1] - x[v]
            le = wp.length(e)
            j = v - r
            force = force + edge_stretch_stiffness[j] * (le / edge_rest_length[j] - 1.0) * (e / le)
    torque = rod_torque(r, rod_vertex_start, rod_vertex_count, rod_twist_clamp, rod_twist_sum,
                        rod_twist_compliance, edge_theta_in)
    # vertex v-1's energy depends on x[v] through its e1, vertex v's through both, v+1's through e0
    if local >= 2:
        g = vertex_energy_gradient(v - 1, r, x, edge_d1, edge_theta, edge_rest_length, edge_bend_stiffness,
                                   vertex_rest_curvature, torque, vel, edge_bend_damping, dt)
        force = force - g.e1
    if local >= 1 and local <= count - 2:
        g = vertex_energy_gradient(v, r, x, edge_d1, edge_theta, edge_rest_length, edge_bend_stiffness,
                                   vertex_rest_curvature, torque, vel, edge_bend_damping, dt)
        force = force - g.e0 + g.e1
    if local <= count - 3:
        g = vertex_energy_gradient(v + 1, r, x, edge_d1, edge_theta, edge_rest_length, edge_bend_stiffness,
                                   vertex_rest_curvature, torque, vel, edge_bend_damping, dt)
        force = force + g.e0
    new_velocity = speed + (dt / mass) * force
    x_out[v] = x[v] + dt * new_velocity


@wp.func
def smooth_ramp(d: float, width: float):
    """max(d, 0) with the corner rounded over [-width, width]: contact and friction stay
    differentiable, so gradients do not jump when a vertex touches down or starts to slide."""
    out = float(0.0)
    if d >= width:
        out = d
    elif d > -width:
        out = (d + width) * (d + width) / (4.0 * width)
    return out


@wp.func
def contact_push(penetration: float, width: float):
    """Normal correction [m] for a ``penetration`` [m]: max(d, 0) with the corner rounded over
    [0, width], so it never exceeds the penetration. (A ramp rounded on both sides of zero pushes a
    vertex that merely touches ``width / 4`` beyond the surface, and the velocity taken from the
    position change turns that into a launch of ``width / (4 dt)``, 0.4 m/s at a cable's step.)"""
    return smooth_ramp(penetration - 0.5 * width, 0.5 * width)


@wp.func
def friction_limit(displacement: wp.vec3, normal: wp.vec3, push: float, friction: float, width: float):
    """Tangential slip [m] after Coulomb friction at position level: the normal correction
    ``push`` [m] bounds how much tangential motion friction may remove.

    The stick-slip corner is rounded over at most the friction budget ``friction * push``: a
    rounded ramp exceeds max(d, 0) by up to a quarter of its width, and were that more than the
    budget, friction would return more slip than it was given (anti-friction that accelerates
    every slow slide on the floor). With a width of at most the budget the slip only shrinks."""
    tangential = displacement - wp.dot(displacement, normal) * normal
    slip = wp.sqrt(wp.dot(tangential, tangential) + width * width * 1.0e-4)
    budget = friction * push
    rounding = width * budget / (width + budget)  # smooth, below min(width, budget)
    return tangential * (smooth_ramp(slip - budget, rounding) / slip)


@wp.kernel
def project_edges(
    x_in: wp.array(dtype=wp.vec3),
    x_start: wp.array(dtype=wp.vec3),
    vertex_rod: wp.array(dtype=int),
    rod_vertex_start: wp.array(dtype=int),
    rod_vertex_count: wp.array(dtype=int),
    vertex_mass: wp.array(dtype=float),
    vertex_driven: wp.array(dtype=int),
    edge_rest_length: wp.array(dtype=float),
    rod_contact_radius: wp.array(dtype=float),
    rod_world: wp.array(dtype=int),
    colliders: ColliderSet,
    contact_smoothing: float,
    relaxation: float,
    parity: int,
    contact: int,
    inv_dt2: float,
    x_out: wp.array(dtype=wp.vec3),
    wrench: wp.array(dtype=wp.vec3),
):
    """One half-sweep of mass-weighted length projection (edges of one ``parity``; -1: none), then,
    when ``contact`` is set, pushes the vertex out of every collider with Coulomb friction
    (``colliders`` posed at the end of the step, with their start poses). With ``contact`` = 2 it
    also adds what each collider receives to ``wrench`` (force [N] at ``2 slot``, torque [N m]
    about the collider's origin at ``2 slot + 1``): the step's velocity is the position change
    over dt, so moving a vertex of mass m by d in the step's last pass is an impulse m d / dt on
    it, a force m d / dt^2 over the step, and the collider takes the opposite."""
    v = wp.tid()
    p = x_in[v]
    if vertex_driven[v] != 0:
        x_out[v] = p
        return
    r = vertex_rod[v]
    local = v - rod_vertex_start[r]
    count = rod_vertex_count[r]
    # the edge of this parity touching v: edge (local - 1) ends at v, edge (local) starts at v
    edge = int(-1)
    sign = float(1.0)  # +1: v starts the edge, -1: v ends it
    if parity >= 0:
        if local >= 1 and (local - 1) % 2 == parity:
            edge = local - 1
            sign = -1.0
        elif local <= count - 2 and local % 2 == parity:
            edge = local
    if edge >= 0:
        a = rod_vertex_start[r] + edge
        other = a + 1
        if sign < 0.0:
            other = a
        w_self = 1.0 / vertex_mass[v]
        w_other = float(0.0)
        if vertex_driven[other] == 0:
            w_other = 1.0 / vertex_mass[other]
        e = x_in[a + 1] - x_in[a]
        le = wp.length(e)
        stretch = le - edge_rest_length[a - r]
        # when the edge is too long its start moves along +e and its end along -e
        p = p + (relaxation * sign * stretch * w_self / (w_self + w_other)) * (e / le)
    if contact != 0:
        radius = rod_contact_radius[r]
        for c in range(wp.static(MAX_COLLIDERS)):
            if c < colliders.count:
                slot = collider_slot(colliders, rod_world[r], c)
                q = collider_query(colliders, c, slot, p)
                push = contact_push(radius - q.distance, contact_smoothing)
                if push > 0.0:
                    normal = q.normal
                    # where the collider surface point under p was at the start of the step
                    before = collider_start_point(colliders, slot, collider_local_point(colliders, slot, p))
                    carried = p - before  # collider motion at this point during the step
                    p = p + push * normal
                    relative = p - x_start[v] - carried
                    slip = friction_limit(relative, normal, push, colliders.friction[c], contact_smoothing)
                    normal_part = wp.dot(relative, normal) * normal
                    pushed = x_start[v] + carried + normal_part + slip
                    if contact == 2:
                        force = (vertex_mass[v] * inv_dt2) * (p - push * normal - pushed)
                        wp.atomic_add(wrench, 2 * slot, force)
                        wp.atomic_add(wrench, 2 * slot + 1, wp.cross(pushed - colliders.position[slot], force))
                    p = pushed
    x_out[v] = p


@wp.kernel
def finish_step(
    x: wp.array(dtype=wp.vec3),
    x_new: wp.array(dtype=wp.vec3),
    edge_d1: wp.array(dtype=wp.vec3),
    edge_theta: wp.array(dtype=float),
    edge_theta_in: wp.array(dtype=float),
    edge_twist_rate: wp.array(dtype=float),
    vertex_rod: wp.array(dtype=int),
    rod_vertex_start: wp.array(dtype=int),
    rod_vertex_count: wp.array(dtype=int),
    rod_twist_clamp: wp.array(dtype=int),
    dt: float,
    x_out: wp.array(dtype=wp.vec3),
    vel_out: wp.array(dtype=wp.vec3),
    edge_d1_out: wp.array(dtype=wp.vec3),
    edge_theta_out: wp.array(dtype=float),
):
    """Velocities from the position change, and each edge's reference director carried to its new
    tangent by parallel transport in time (which defines twist-free motion)."""
    v = wp.tid()
    x_out[v] = x_new[v]
    vel_out[v] = (x_new[v] - x[v]) / dt
    r = vertex_rod[v]
    local = v - rod_vertex_start[r]
    count = rod_vertex_count[r]
    if local >= count - 1:
        return
    j = v - r
    t_old = wp.normalize(x[v + 1] - x[v])
    t_new = wp.normalize(x_new[v + 1] - x_new[v])
    d1 = parallel_transport(edge_d1[j], t_old, t_new)
    edge_d1_out[j] = wp.normalize(d1 - wp.dot(d1, t_new) * t_new)
    flags = rod_twist_clamp[r]
    clamped = (local == 0 and (flags & CLAMP_FIRST) != 0) or (local == count - 2 and (flags & CLAMP_LAST) != 0)
    if clamped:
        edge_theta_out[j] = edge_theta_in[j] + dt * edge_twist_rate[j]
    else:
        edge_theta_out[j] = edge_theta[j]


@wp.kernel
def rod_energy(
    x: wp.array(dtype=wp.vec3),
    vel: wp.array(dtype=wp.vec3),
    edge_d1: wp.array(dtype=wp.vec3),
    edge_theta: wp.array(dtype=float),
    vertex_reference_twist: wp.array(dtype=float),
    vertex_rod: wp.array(dtype=int),
    rod_vertex_start: wp.array(dtype=int),
    rod_vertex_count: wp.array(dtype=int),
    vertex_mass: wp.array(dtype=float),
    vertex_rest_curvature: wp.array(dtype=wp.vec2),
    vertex_rest_twist: wp.array(dtype=float),
    edge_rest_length: wp.array(dtype=float),
    edge_bend_stiffness: wp.array(dtype=float),
    edge_twist_stiffness: wp.array(dtype=float),
    edge_stretch_stiffness: wp.array(dtype=float),
    gravity: wp.array(dtype=wp.vec3),
    elastic_stretch: int,
    energy: wp.array2d(dtype=float),
):
    """Energy [J] per rod, by part: kinetic, gravity, stretching, bending, twisting (columns 0-4)."""
    v = wp.tid()
    r = vertex_rod[v]
    local = v - rod_vertex_start[r]
    count = rod_vertex_count[r]
    m = vertex_mass[v]
    wp.atomic_add(energy, r, 0, 0.5 * m * wp.dot(vel[v], vel[v]))
    wp.atomic_add(energy, r, 1, -m * wp.dot(gravity[0], x[v]))
    if local < count - 1 and elastic_stretch != 0:
        j = v - r
        strain = wp.length(x[v + 1] - x[v]) / edge_rest_length[j] - 1.0
        wp.atomic_add(energy, r, 2, 0.5 * edge_stretch_stiffness[j] * edge_rest_length[j] * strain * strain)
    if local == 0 or local == count - 1:
        return
    ea = v - 1 - r
    eb = v - r
    e0 = x[v] - x[v - 1]
    e1 = x[v + 1] - x[v]
    kb = curvature_binormal(e0, e1)
    voronoi = 0.5 * (edge_rest_length[ea] + edge_rest_length[eb])
    alpha = 0.5 * (edge_bend_stiffness[ea] + edge_bend_stiffness[eb])
    beta = 0.5 * (edge_twist_stiffness[ea] + edge_twist_stiffness[eb])
    rest = vertex_rest_curvature[v]
    b0 = rest_binormal(edge_d1[ea], wp.normalize(e0), edge_theta[ea], rest)
    b1 = rest_binormal(edge_d1[eb], wp.normalize(e1), edge_theta[eb], rest)
    bend = (alpha / (4.0 * voronoi)) * (wp.length_sq(kb - b0) + wp.length_sq(kb - b1))
    wp.atomic_add(energy, r, 3, bend)
    twist = edge_theta[eb] - edge_theta[ea] + vertex_reference_twist[v] - vertex_rest_twist[v]
    wp.atomic_add(energy, r, 4, 0.5 * beta / voronoi * twist * twist)
