"""Warp kernels of the contact between the FEM sensor surface and the other solvers: an untaped
candidate search (BVH of the sensor faces) for MPM particles and rod vertices, and taped,
differentiable forces recomputed from the candidates.
"""

from __future__ import annotations

import warp as wp

from diffsim.fem.kernels import smooth_penetration
from diffsim.geometry import closest_point_on_triangle
from diffsim.mpm.kernels import particle_stencil, stencil_weight

#: no candidate
NONE = wp.constant(-1)


@wp.func
def barycentric(a: wp.vec3, b: wp.vec3, c: wp.vec3, q: wp.vec3):
    """Barycentric weights of a point ``q`` of triangle (a, b, c)."""
    v0 = b - a
    v1 = c - a
    v2 = q - a
    d00 = wp.dot(v0, v0)
    d01 = wp.dot(v0, v1)
    d11 = wp.dot(v1, v1)
    d20 = wp.dot(v2, v0)
    d21 = wp.dot(v2, v1)
    denominator = d00 * d11 - d01 * d01
    v = (d11 * d20 - d01 * d21) / denominator
    w = (d00 * d21 - d01 * d20) / denominator
    return wp.vec3(1.0 - v - w, v, w)


@wp.func
def smooth_min(a: float, b: float):
    """min(a, b) for a >= 0, b > 0, rounded where they are close ((a^-4 + b^-4)^(-1/4), within 16%
    of the minimum): friction then switches smoothly between sliding and sticking."""
    r = a / b
    return a / wp.pow(1.0 + r * r * r * r, 0.25)


@wp.func
def coupled_contact_force(
    reduced_mass: float,
    penetration: float,
    smoothing: float,
    relative_velocity: wp.vec3,
    normal: wp.vec3,
    stiffness: float,
    damping_ratio: float,
    friction: float,
    friction_velocity: float,
    dt: float,
):
    """Force [N] on the first of two bodies in contact along ``normal`` (pointing to it), shared by
    every coupling: the reduced mass [kg] times ``stiffness`` [1/s^2] times the penetration [m],
    damped at ``damping_ratio`` of critical while approaching (faded in over ``smoothing`` [m]),
    never pulling; friction against the relative slip, viscous below ``friction_velocity`` [m/s],
    up to the Coulomb limit and never more than what stops the slip in one step. Scaling by the
    reduced mass keeps both sides' explicit updates below their stable rate at any mass ratio."""
    approach = wp.dot(relative_velocity, normal)
    omega = wp.sqrt(stiffness)
    engaged = penetration / (penetration + smoothing)
    normal_force = reduced_mass * wp.max(stiffness * penetration - 2.0 * damping_ratio * omega * approach * engaged,
                                         0.0)
    slip = relative_velocity - approach * normal
    speed = wp.sqrt(wp.dot(slip, slip) + friction_velocity * friction_velocity)
    tangential = smooth_min(friction * normal_force, reduced_mass * speed / dt)
    return normal_force * normal - (tangential / speed) * slip


# ------------------------------------------------------------------------ points <-> sensor faces


@wp.kernel
def point_candidates(
    point_x: wp.array(dtype=wp.vec3),
    point_world: wp.array(dtype=int),
    world_mesh: wp.array(dtype=wp.uint64),
    search_distance: float,
    candidate: wp.array(dtype=int),
):
    """The nearest sensor contact face of each point (MPM particle or rod vertex) within
    ``search_distance`` [m], in the point's world (an index into that world's faces), or NONE."""
    p = wp.tid()
    candidate[p] = NONE
    mesh = world_mesh[point_world[p]]
    if mesh == wp.uint64(0):
        return
    query = wp.mesh_query_point_no_sign(mesh, point_x[p], search_distance)
    if query.result:
        candidate[p] = query.face


@wp.kernel
def face_normals_to_vertices(faces: wp.array(dtype=wp.vec3i), node_x: wp.array(dtype=wp.vec3),
                             normal_sum: wp.array(dtype=wp.vec3)):
    """Area-weighted normals of the contact faces summed at their vertices (cross products are
    twice the area times the normal)."""
    i = wp.tid()
    f = faces[i]
    a = node_x[f[0]]
    n = wp.cross(node_x[f[1]] - a, node_x[f[2]] - a)
    wp.atomic_add(normal_sum, f[0], n)
    wp.atomic_add(normal_sum, f[1], n)
    wp.atomic_add(normal_sum, f[2], n)


@wp.kernel
def normalize_vec3(v: wp.array(dtype=wp.vec3), out: wp.array(dtype=wp.vec3)):
    """Unit vectors (zero stays zero: nodes of no contact face)."""
    i = wp.tid()
    x = v[i]
    if wp.dot(x, x) > 0.0:
        out[i] = wp.normalize(x)
    else:
        out[i] = wp.vec3()


@wp.func
def contact_normal(offset: wp.vec3, surface_normal: wp.vec3, width: float):
    """Unit normal of a ball's contact at ``offset`` = centre - closest surface point [m]: the
    direction of the offset once the centre is ``width`` [m] or more above the surface (exact for a
    ball on faces, edges and corners alike), blended into ``surface_normal`` (the vertex normals
    interpolated at the closest point) below that and used alone at and under the surface, where
    the offset's direction is lost. Both are continuous where the closest point is, so the force
    does not jump when the nearest face changes (a flat face normal flips by 90 degrees at the
    pad's edges and so did the penetration measured along it)."""
    height = wp.dot(offset, surface_normal)
    if height <= 0.0:
        return surface_normal
    if height >= width:
        return wp.normalize(offset)
    s = height / width
    t = s * s * (3.0 - 2.0 * s)
    return wp.normalize(t * wp.normalize(offset) + (1.0 - t) * surface_normal)


@wp.kernel
def point_face_forces(
    candidate: wp.array(dtype=int),
    point_x: wp.array(dtype=wp.vec3),
    point_v: wp.array(dtype=wp.vec3),
    point_world: wp.array(dtype=int),
    point_mass: wp.array(dtype=float),
    point_kinematic: wp.array(dtype=int),
    point_radius: wp.array(dtype=float),
    world_face_start: wp.array(dtype=int),
    faces: wp.array(dtype=wp.vec3i),
    node_x: wp.array(dtype=wp.vec3),
    node_v: wp.array(dtype=wp.vec3),
    node_mass: wp.array(dtype=float),
    node_fixed: wp.array(dtype=int),
    vertex_normal: wp.array(dtype=wp.vec3),
    stiffness: float,
    damping_ratio: float,
    friction: wp.array(dtype=float),
    friction_velocity: float,
    smoothing_ratio: float,
    normal_blend_ratio: float,
    dt: float,
    point_force: wp.array(dtype=wp.vec3),
    node_force: wp.array(dtype=wp.vec3),
):
    """Contact of a ball (a particle, half its spacing wide, or a rod vertex of the rod's contact
    radius) with its candidate face by :func:`coupled_contact_force`, with the reduced mass of
    the point and the face's contact point, along :func:`contact_normal` (blended over
    ``normal_blend_ratio`` radii from the ``vertex_normal`` surface normal). The force goes to
    ``point_force``, the opposite force to the face's nodes by the barycentric weights of the
    closest point."""
    p = wp.tid()
    point_force[p] = wp.vec3()
    face = candidate[p]
    if face == NONE:
        return
    f = faces[world_face_start[point_world[p]] + face]
    a = node_x[f[0]]
    b = node_x[f[1]]
    c = node_x[f[2]]
    x = point_x[p]
    radius = point_radius[p]
    smoothing = smoothing_ratio * radius
    q = closest_point_on_triangle(a, b, c, x)
    w = barycentric(a, b, c, q)
    surface_normal = wp.normalize(w[0] * vertex_normal[f[0]] + w[1] * vertex_normal[f[1]]
                                  + w[2] * vertex_normal[f[2]])
    normal = contact_normal(x - q, surface_normal, normal_blend_ratio * radius)
    penetration = smooth_penetration(radius - wp.dot(x - q, normal), smoothing)
    if penetration <= 0.0:
        return
    surface_velocity = w[0] * node_v[f[0]] + w[1] * node_v[f[1]] + w[2] * node_v[f[2]]
    # inverse mass of the contact point: a force f spread by w accelerates it by f sum(w^2 / m)
    inverse_mass = float(0.0)
    if point_kinematic[p] == 0:
        inverse_mass = 1.0 / point_mass[p]
    for corner in range(3):
        if node_fixed[f[corner]] == 0:
            inverse_mass = inverse_mass + w[corner] * w[corner] / node_mass[f[corner]]
    if inverse_mass <= 0.0:
        return  # both sides are kinematic
    force = coupled_contact_force(1.0 / inverse_mass, penetration, smoothing, point_v[p] - surface_velocity, normal,
                                  stiffness, damping_ratio, friction[0], friction_velocity, dt)
    point_force[p] = force
    wp.atomic_add(node_force, f[0], -w[0] * force)
    wp.atomic_add(node_force, f[1], -w[1] * force)
    wp.atomic_add(node_force, f[2], -w[2] * force)


@wp.kernel
def particle_forces_to_grid(
    particle_x: wp.array(dtype=wp.vec3),
    particle_world: wp.array(dtype=int),
    particle_force: wp.array(dtype=wp.vec3),
    origin: wp.vec3,
    inv_dx: float,
    grid_res: int,
    grid_offset: wp.vec3i,
    grid_force: wp.array4d(dtype=wp.vec3),
):
    """Forces on particles [N] as nodal forces of their B-spline stencils (what P2G does to momentum)."""
    p = wp.tid()
    force = particle_force[p]
    if wp.dot(force, force) == 0.0:
        return
    world = particle_world[p]
    st = particle_stencil(particle_x[p], origin, inv_dx, grid_res, grid_offset)
    for i in range(3):
        for j in range(3):
            for k in range(3):
                wp.atomic_add(grid_force, world, st.local[0] + i, st.local[1] + j, st.local[2] + k,
                              stencil_weight(st, i, j, k) * force)


@wp.kernel
def add_vec3(a: wp.array(dtype=wp.vec3), b: wp.array(dtype=wp.vec3), out: wp.array(dtype=wp.vec3)):
    i = wp.tid()
    out[i] = a[i] + b[i]


@wp.kernel
def copy_vec3(source: wp.array(dtype=wp.vec3), destination: wp.array(dtype=wp.vec3)):
    i = wp.tid()
    destination[i] = source[i]
