"""Signed-distance colliders: analytic primitives and triangle meshes as differentiable Warp functions.

Solvers call :func:`shape_query` from their kernels; :class:`Collider` and its ``collider_*`` factories
describe a validated collider (shape, size, friction, initial pose) on the Python side.

Shape-local conventions (every length in metres, ``size`` is a ``wp.vec3``):

* ``PLANE``: the solid is the half-space z <= 0, surface z = 0, outward normal +z; ``size`` unused.
* ``BOX``: centred at the origin, ``size`` = half extents (x, y, z).
* ``SPHERE``: centred at the origin, radius = ``size[0]``.
* ``CAPSULE``: radius = ``size[0]`` around the segment from (0, 0, -h) to (0, 0, h), h = ``size[1]``
  (the half-height of the central segment; the axis is local z).
* ``CYLINDER``: radius = ``size[0]``, half-height = ``size[1]``, axis = local z, flat caps.
* ``MESH``: the closed triangle mesh whose ``wp.Mesh.id`` is passed as ``mesh`` (built with
  ``support_winding_number=True``, see :meth:`TriangleMesh.warp_mesh`), with its vertices scaled per
  axis by ``size`` (usually (1, 1, 1)).

Distances are signed (negative inside) and normals are unit outward vectors in the local frame. Both
are finite everywhere, including the degenerate points (sphere centre, capsule axis, box centre and
corners), where a fixed normal is chosen; the distance gradient equals the returned normal.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import warp as wp

from diffsim.errors import InvalidParameter
from diffsim.geometry._validation import finite_number, finite_vector, positive_number, unit_quaternion
from diffsim.geometry.mesh import TriangleMesh

__all__ = [
    "ShapeType",
    "SurfaceQuery",
    "shape_query",
    "shape_query_world",
    "mesh_query",
    "mesh_smooth_normal",
    "shape_contact_normal",
    "closest_point_on_triangle",
    "world_to_local",
    "local_to_world_point",
    "local_to_world_vector",
    "Collider",
    "collider_plane",
    "collider_box",
    "collider_sphere",
    "collider_capsule",
    "collider_cylinder",
    "collider_mesh",
    "MESH_MAX_DISTANCE",
    "NO_SURFACE_DISTANCE",
    "TriangleMesh",
]


class ShapeType(enum.IntEnum):
    """Collider shape ids as passed to :func:`shape_query` (see the module docstring for frames)."""

    PLANE = 0
    BOX = 1
    SPHERE = 2
    CAPSULE = 3
    CYLINDER = 4
    MESH = 5


_PLANE = wp.constant(int(ShapeType.PLANE))
_BOX = wp.constant(int(ShapeType.BOX))
_SPHERE = wp.constant(int(ShapeType.SPHERE))
_CAPSULE = wp.constant(int(ShapeType.CAPSULE))
_CYLINDER = wp.constant(int(ShapeType.CYLINDER))
_MESH = wp.constant(int(ShapeType.MESH))

MESH_MAX_DISTANCE = 1.0e6
"""Search radius of the mesh closest-face query in unscaled mesh units [m]."""
NO_SURFACE_DISTANCE = 1.0e6
"""Distance [m] returned when a query finds no surface (unknown shape id, no face in range)."""

_MESH_MAX_DISTANCE = wp.constant(MESH_MAX_DISTANCE)
_NO_SURFACE_DISTANCE = wp.constant(NO_SURFACE_DISTANCE)
# Squared lengths below this count as zero when normalising (|v| < 1e-10 m): the direction is then
# undefined and a fixed normal is used, which keeps values and adjoints finite.
_TINY_SQUARED = wp.constant(1.0e-20)
_MESH_NOISE_RATIO_SQUARED = wp.constant(1.0e-10)


@wp.struct
class SurfaceQuery:
    """Result of a signed-distance query.

    Attributes:
        distance: signed distance to the surface [m], negative inside.
        normal: unit outward surface normal in the shape's local frame.
    """

    distance: float
    normal: wp.vec3


@wp.func
def _make_query(distance: float, normal: wp.vec3):
    q = SurfaceQuery()
    q.distance = distance
    q.normal = normal
    return q


@wp.func
def _sign_or_one(x: float):
    # sign(0) = +1 so that |x| = s * x stays differentiable with a defined branch at 0.
    s = 1.0
    if x < 0.0:
        s = -1.0
    return s


# ---------------------------------------------------------------------------- analytic primitives
# Each distance is written as dot(offset, unit_direction): equal to |offset|, but its gradient is the
# direction itself, also at the degenerate points where the direction is a fixed fallback.


@wp.func
def _plane_query(p: wp.vec3):
    return _make_query(p[2], wp.vec3(0.0, 0.0, 1.0))


@wp.func
def _sphere_query(radius: float, p: wp.vec3):
    normal = wp.vec3(0.0, 0.0, 1.0)
    length_sq = wp.dot(p, p)
    if length_sq > _TINY_SQUARED:
        normal = p / wp.sqrt(length_sq)
    return _make_query(wp.dot(p, normal) - radius, normal)


#: Width, as a fraction of the smallest half extent, over which the inside normal of a box or
#: cylinder turns from one face to the next.
_INSIDE_BLEND = wp.constant(0.1)


@wp.func
def _box_query(half_extents: wp.vec3, p: wp.vec3):
    s = wp.vec3(_sign_or_one(p[0]), _sign_or_one(p[1]), _sign_or_one(p[2]))
    # q: per-axis distance to the face planes of the octant the point lies in.
    q = wp.cw_mul(s, p) - half_extents
    excess = wp.vec3(wp.max(q[0], 0.0), wp.max(q[1], 0.0), wp.max(q[2], 0.0))
    excess_sq = wp.dot(excess, excess)
    if excess_sq > _TINY_SQUARED:
        direction = excess / wp.sqrt(excess_sq)
        return _make_query(wp.dot(excess, direction), wp.cw_mul(s, direction))
    # Inside (or on the surface): the distance is the largest q (nearest face). The normal blends
    # the face normals by a softmax of their distances, so it turns continuously across the
    # medial planes instead of flipping: a flip would make contact responses, and so losses,
    # jump as a collider moves. Near a single face the blend is that face's normal.
    depth = wp.max(q[0], wp.max(q[1], q[2]))
    temperature = _INSIDE_BLEND * wp.min(half_extents[0], wp.min(half_extents[1], half_extents[2]))
    w = wp.vec3(
        wp.exp((q[0] - depth) / temperature),
        wp.exp((q[1] - depth) / temperature),
        wp.exp((q[2] - depth) / temperature),
    )
    blended = wp.cw_mul(s, w)
    return _make_query(depth, blended / wp.length(blended))


@wp.func
def _capsule_query(radius: float, half_height: float, p: wp.vec3):
    axis_point = wp.vec3(0.0, 0.0, wp.clamp(p[2], -half_height, half_height))
    offset = p - axis_point
    normal = wp.vec3(1.0, 0.0, 0.0)  # any direction is nearest on the axis; +x by convention
    length_sq = wp.dot(offset, offset)
    if length_sq > _TINY_SQUARED:
        normal = offset / wp.sqrt(length_sq)
    return _make_query(wp.dot(offset, normal) - radius, normal)


@wp.func
def _cylinder_query(radius: float, half_height: float, p: wp.vec3):
    radial = wp.vec3(p[0], p[1], 0.0)
    radial_dir = wp.vec3(1.0, 0.0, 0.0)  # on the axis the nearest side point is ambiguous; +x
    radial_sq = wp.dot(radial, radial)
    if radial_sq > _TINY_SQUARED:
        radial_dir = radial / wp.sqrt(radial_sq)
    sz = _sign_or_one(p[2])
    axial_dir = wp.vec3(0.0, 0.0, sz)
    dx = wp.dot(radial, radial_dir) - radius  # beyond the side wall
    dz = sz * p[2] - half_height  # beyond the cap
    ex = wp.max(dx, 0.0)
    ez = wp.max(dz, 0.0)
    excess_sq = ex * ex + ez * ez
    if excess_sq > _TINY_SQUARED:
        excess_len = wp.sqrt(excess_sq)
        nx = ex / excess_len
        nz = ez / excess_len
        return _make_query(ex * nx + ez * nz, nx * radial_dir + nz * axial_dir)
    # inside: softmax-blended normal, as for boxes (continuous across the side/cap medial cone)
    depth = wp.max(dx, dz)
    temperature = _INSIDE_BLEND * wp.min(radius, half_height)
    blended = wp.exp((dx - depth) / temperature) * radial_dir + wp.exp((dz - depth) / temperature) * axial_dir
    return _make_query(depth, blended / wp.length(blended))


# ---------------------------------------------------------------------------- triangle meshes


@wp.func
def _safe_ratio(numerator: float, denominator: float):
    # Denominators below are squared edge lengths or areas: only zero for degenerate triangles.
    return numerator / wp.max(denominator, 1.0e-30)


@wp.func
def closest_point_on_triangle(a: wp.vec3, b: wp.vec3, c: wp.vec3, p: wp.vec3):
    """Closest point to ``p`` on triangle (a, b, c), differentiable in all four points.

    Classifies ``p`` into the Voronoi regions of the vertices, edges and face (Ericson,
    Real-Time Collision Detection, 5.1.5) and projects onto the matching feature.
    """
    ab = b - a
    ac = c - a
    ap = p - a
    d1 = wp.dot(ab, ap)
    d2 = wp.dot(ac, ap)
    if d1 <= 0.0 and d2 <= 0.0:
        return a
    bp = p - b
    d3 = wp.dot(ab, bp)
    d4 = wp.dot(ac, bp)
    if d3 >= 0.0 and d4 <= d3:
        return b
    vc = d1 * d4 - d3 * d2
    if vc <= 0.0 and d1 >= 0.0 and d3 <= 0.0:
        return a + _safe_ratio(d1, d1 - d3) * ab
    cp = p - c
    d5 = wp.dot(ab, cp)
    d6 = wp.dot(ac, cp)
    if d6 >= 0.0 and d5 <= d6:
        return c
    vb = d5 * d2 - d1 * d6
    if vb <= 0.0 and d2 >= 0.0 and d6 <= 0.0:
        return a + _safe_ratio(d2, d2 - d6) * ac
    va = d3 * d6 - d5 * d4
    if va <= 0.0 and (d4 - d3) >= 0.0 and (d5 - d6) >= 0.0:
        return b + _safe_ratio(d4 - d3, (d4 - d3) + (d5 - d6)) * (c - b)
    area_sq = va + vb + vc
    return a + _safe_ratio(vb, area_sq) * ab + _safe_ratio(vc, area_sq) * ac


@wp.func
def mesh_query(mesh: wp.uint64, scale: wp.vec3, p: wp.vec3, max_distance: float):
    """Signed distance [m] and outward normal of a closed mesh scaled per axis by ``scale``.

    ``mesh`` must be a ``wp.Mesh`` built with ``support_winding_number=True`` (as
    :meth:`TriangleMesh.warp_mesh` does). Warp's BVH query (which has no useful adjoint) only picks
    the closest face and the inside/outside sign, at ``p / scale`` within ``max_distance`` (unscaled
    units). The closest point on that face is then recomputed with differentiable math and mapped
    back to the scaled frame, so the distance is the distance from ``p`` to a point of the scaled
    surface: exact for uniform scales, and for non-uniform scales an approximation that is never
    shorter than the true distance.
    Returns :data:`NO_SURFACE_DISTANCE` and normal +z when no face lies within ``max_distance``.
    """
    p_unscaled = wp.cw_div(p, scale)
    # The winding-number sign (accuracy 2, threshold 0.5) stays right at points equidistant from many
    # faces, e.g. the centre of a sphere mesh, where the cheaper pseudo-normal sign flips.
    hit = wp.mesh_query_point_sign_winding_number(mesh, p_unscaled, max_distance, 2.0, 0.5)
    if not hit.result:
        return _make_query(_NO_SURFACE_DISTANCE, wp.vec3(0.0, 0.0, 1.0))
    sign = 1.0
    if hit.sign < 0.0:
        sign = -1.0
    geometry = wp.mesh_get(mesh)
    base = hit.face * 3
    a = geometry.points[geometry.indices[base + 0]]
    b = geometry.points[geometry.indices[base + 1]]
    c = geometry.points[geometry.indices[base + 2]]
    closest = wp.cw_mul(closest_point_on_triangle(a, b, c, p_unscaled), scale)
    offset = p - closest
    outward = wp.vec3(0.0, 0.0, 1.0)
    offset_sq = wp.dot(offset, offset)
    # The recomputed closest point carries float32 rounding of the coordinates (~1e-7 of their size),
    # so below 1e-5 of that size the direction of the offset is noise: use the face normal there.
    a_scaled = wp.cw_mul(a, scale)
    noise_sq = _MESH_NOISE_RATIO_SQUARED * wp.max(wp.dot(p, p), wp.dot(a_scaled, a_scaled))
    if offset_sq > wp.max(noise_sq, _TINY_SQUARED):
        outward = sign * offset / wp.sqrt(offset_sq)
    else:
        # The transposed inverse scale maps face normals to the scaled frame.
        face_normal = wp.cw_div(wp.cross(b - a, c - a), scale)
        face_sq = wp.dot(face_normal, face_normal)
        if face_sq > 0.0:
            outward = face_normal / wp.sqrt(face_sq)
    # sign * |offset| written as a dot product, so the gradient is the normal even on the surface.
    return _make_query(wp.dot(offset, outward), outward)


@wp.func
def _mesh_sample_distance(mesh: wp.uint64, scale: wp.vec3, p: wp.vec3, exact_sign: bool, sign_hint: float):
    """Signed distance [m] at ``p`` as :func:`mesh_query` gives it; with ``exact_sign`` false the
    cheaper unsigned closest-face query is used and the sign is ``sign_hint``."""
    p_unscaled = wp.cw_div(p, scale)
    face = int(-1)
    sign = sign_hint
    if exact_sign:
        hit = wp.mesh_query_point_sign_winding_number(mesh, p_unscaled, _MESH_MAX_DISTANCE, 2.0, 0.5)
        if hit.result:
            face = hit.face
            sign = 1.0
            if hit.sign < 0.0:
                sign = -1.0
    else:
        nearest = wp.mesh_query_point_no_sign(mesh, p_unscaled, _MESH_MAX_DISTANCE)
        if nearest.result:
            face = nearest.face
    if face < 0:
        return _NO_SURFACE_DISTANCE
    geometry = wp.mesh_get(mesh)
    base = face * 3
    a = geometry.points[geometry.indices[base + 0]]
    b = geometry.points[geometry.indices[base + 1]]
    c = geometry.points[geometry.indices[base + 2]]
    offset = p - wp.cw_mul(closest_point_on_triangle(a, b, c, p_unscaled), scale)
    return sign * wp.sqrt(wp.dot(offset, offset) + _TINY_SQUARED)


@wp.func
def mesh_smooth_normal(mesh: wp.uint64, scale: wp.vec3, p: wp.vec3, distance: float, normal: wp.vec3,
                       width: float):
    """A mesh's outward normal at ``p`` that turns continuously everywhere: the central-difference
    gradient of the signed distance over +-``width`` [m] per axis, normalised.

    The nearest-face normal of :func:`mesh_query` (``normal``, at signed distance ``distance``)
    flips where two faces are equally near: outside a concave edge (the inner corners of a cup,
    where the material rests) and on medial surfaces inside. A contact response built on it jumps
    when a moving mesh sweeps such a plane across a grid node, and the tape, which sees no jump,
    then misses the loss's slope. The difference gradient equals the face normal wherever the
    samples see one face (on flat parts of the surface, across it too) and blends the faces over
    ``width`` around their bisectors. ``width`` <= 0, or a gradient of (nearly) zero length (deep
    at a point of symmetry), gives ``normal``. Six more closest-face queries; the samples only
    need the exact inside/outside test within 2 ``width`` of the surface (the distance changes by at
    most ``width`` between ``p`` and a sample).
    """
    if width <= 0.0:
        return normal
    exact_sign = wp.abs(distance) < 2.0 * width
    sign_hint = 1.0
    if distance < 0.0:
        sign_hint = -1.0
    ex = wp.vec3(width, 0.0, 0.0)
    ey = wp.vec3(0.0, width, 0.0)
    ez = wp.vec3(0.0, 0.0, width)
    gradient = wp.vec3(
        _mesh_sample_distance(mesh, scale, p + ex, exact_sign, sign_hint)
        - _mesh_sample_distance(mesh, scale, p - ex, exact_sign, sign_hint),
        _mesh_sample_distance(mesh, scale, p + ey, exact_sign, sign_hint)
        - _mesh_sample_distance(mesh, scale, p - ey, exact_sign, sign_hint),
        _mesh_sample_distance(mesh, scale, p + ez, exact_sign, sign_hint)
        - _mesh_sample_distance(mesh, scale, p - ez, exact_sign, sign_hint),
    )
    length_sq = wp.dot(gradient, gradient)
    if length_sq > 1.0e-6 * width * width:
        return gradient / wp.sqrt(length_sq)
    return normal


@wp.func
def shape_contact_normal(shape_type: int, size: wp.vec3, mesh: wp.uint64, p: wp.vec3, query: SurfaceQuery,
                         width: float):
    """The normal for a contact response at local point ``p`` whose :func:`shape_query` is
    ``query``: ``query.normal``, except for meshes, whose nearest-face normal is replaced by
    :func:`mesh_smooth_normal` over ``width`` [m] (e.g. the solver's contact skin)."""
    if shape_type == _MESH:
        return mesh_smooth_normal(mesh, size, p, query.distance, query.normal, width)
    return query.normal


# ---------------------------------------------------------------------------- dispatch and frames


@wp.func
def shape_query(shape_type: int, size: wp.vec3, mesh: wp.uint64, p: wp.vec3):
    """Signed distance and outward normal of shape ``shape_type`` at local point ``p`` [m].

    ``size`` follows the per-shape conventions of this module; ``mesh`` is a ``wp.Mesh.id`` for
    ``ShapeType.MESH`` and ignored otherwise (pass 0). Differentiable w.r.t. ``p`` and ``size``.
    An unknown ``shape_type`` returns :data:`NO_SURFACE_DISTANCE` and normal +z.
    """
    if shape_type == _PLANE:
        return _plane_query(p)
    if shape_type == _BOX:
        return _box_query(size, p)
    if shape_type == _SPHERE:
        return _sphere_query(size[0], p)
    if shape_type == _CAPSULE:
        return _capsule_query(size[0], size[1], p)
    if shape_type == _CYLINDER:
        return _cylinder_query(size[0], size[1], p)
    if shape_type == _MESH:
        return mesh_query(mesh, size, p, _MESH_MAX_DISTANCE)
    return _make_query(_NO_SURFACE_DISTANCE, wp.vec3(0.0, 0.0, 1.0))


@wp.func
def world_to_local(p: wp.vec3, position: wp.vec3, rotation: wp.quat):
    """World point ``p`` [m] expressed in the frame at ``position`` [m] with orientation ``rotation``."""
    return wp.quat_rotate_inv(rotation, p - position)


@wp.func
def local_to_world_point(p: wp.vec3, position: wp.vec3, rotation: wp.quat):
    """Local point ``p`` [m] of the frame (``position``, ``rotation``) expressed in world coordinates."""
    return wp.quat_rotate(rotation, p) + position


@wp.func
def local_to_world_vector(v: wp.vec3, rotation: wp.quat):
    """Direction ``v`` of a frame with orientation ``rotation`` expressed in world axes."""
    return wp.quat_rotate(rotation, v)


@wp.func
def shape_query_world(
    shape_type: int, size: wp.vec3, mesh: wp.uint64, position: wp.vec3, rotation: wp.quat, p: wp.vec3
):
    """:func:`shape_query` for a world point ``p`` [m] of a shape posed at (position, rotation).

    The returned normal is in world axes; differentiable w.r.t. ``p``, ``size`` and the pose.
    """
    local = shape_query(shape_type, size, mesh, world_to_local(p, position, rotation))
    return _make_query(local.distance, local_to_world_vector(local.normal, rotation))


# ---------------------------------------------------------------------------- Python-side colliders


def _require_positive(name: str, value) -> float:
    return positive_number(name, value, "m")


def _require_vector(name: str, value, length: int, valid: str, *, positive: bool = False) -> tuple:
    return tuple(float(x) for x in finite_vector(name, value, length, valid, positive=positive))


@dataclass
class Collider:
    """A kinematic collider: a shape in its local frame, a friction coefficient and an initial pose.

    Prefer the ``collider_*`` factories, which name their parameters; construction validates too.

    Attributes:
        shape: the :class:`ShapeType`.
        size: per-shape size vector [m] (see the module docstring; unused for planes).
        friction: Coulomb friction coefficient, dimensionless, >= 0.
        mesh: the closed :class:`TriangleMesh` of a ``MESH`` collider, else ``None``.
        position: initial position of the local origin in world coordinates [m].
        rotation: initial orientation as a unit quaternion (x, y, z, w), Warp's storage order;
            normalised on construction.
    """

    shape: ShapeType
    size: tuple[float, float, float]
    friction: float
    mesh: TriangleMesh | None = None
    position: tuple[float, float, float] = (0.0, 0.0, 0.0)
    rotation: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 1.0)

    def __post_init__(self):
        try:
            self.shape = ShapeType(self.shape)
        except ValueError as exc:
            raise InvalidParameter("shape", self.shape, f"one of {[s.name for s in ShapeType]}") from exc
        self.size = _require_vector("size", self.size, 3, "three finite numbers [m]")
        needs_positive = {
            ShapeType.PLANE: 0,
            ShapeType.BOX: 3,
            ShapeType.SPHERE: 1,
            ShapeType.CAPSULE: 2,
            ShapeType.CYLINDER: 2,
            ShapeType.MESH: 3,
        }[self.shape]
        for k in range(needs_positive):
            _require_positive(f"size[{k}]", self.size[k])
        valid_friction = "finite numbers >= 0 (Coulomb coefficient)"
        friction = finite_number("friction", self.friction, valid_friction)
        if friction < 0.0:
            raise InvalidParameter("friction", self.friction, valid_friction)
        self.friction = friction
        self.position = _require_vector("position", self.position, 3, "three finite numbers [m]")
        self.rotation = tuple(float(x) for x in unit_quaternion("rotation", self.rotation))
        if self.shape == ShapeType.MESH:
            if not isinstance(self.mesh, TriangleMesh):
                raise InvalidParameter("mesh", self.mesh, "a TriangleMesh for MESH colliders")
        elif self.mesh is not None:
            raise InvalidParameter("mesh", self.mesh, f"None for {self.shape.name} colliders")

    def warp_mesh_id(self, device=None) -> int:
        """The ``mesh`` argument for :func:`shape_query`: the ``wp.Mesh.id`` on ``device``, or 0."""
        if self.mesh is None:
            return 0
        return int(self.mesh.warp_mesh(device).id)


def collider_plane(
    *,
    position: Sequence[float] = (0.0, 0.0, 0.0),
    normal: Sequence[float] = (0.0, 0.0, 1.0),
    friction: float = 0.5,
) -> Collider:
    """A half-space collider whose surface passes through ``position`` [m].

    Args:
        position: a point on the plane [m].
        normal: outward normal (pointing away from the solid); normalised, must be non-zero.
        friction: Coulomb friction coefficient (>= 0).

    The rotation maps local +z onto ``normal`` by the shortest arc (about x when anti-parallel).
    """
    n = np.asarray(_require_vector("normal", normal, 3, "three finite numbers, not all zero"))
    length = float(np.linalg.norm(n))
    if length < 1.0e-12:
        raise InvalidParameter("normal", tuple(n.tolist()), "non-zero vectors")
    n = n / length
    if n[2] < -1.0 + 1.0e-12:
        rotation = (1.0, 0.0, 0.0, 0.0)  # half turn about x
    else:
        # Half-way quaternion: axis z x n with w = 1 + z.n, normalised below.
        rotation = (-n[1], n[0], 0.0, 1.0 + n[2])
    return Collider(ShapeType.PLANE, (0.0, 0.0, 0.0), friction, None, position, rotation)


def collider_box(
    half_extents: Sequence[float],
    *,
    position: Sequence[float] = (0.0, 0.0, 0.0),
    rotation: Sequence[float] = (0.0, 0.0, 0.0, 1.0),
    friction: float = 0.5,
) -> Collider:
    """A box collider with ``half_extents`` (x, y, z) [m], centred at ``position`` [m].

    ``rotation`` is a quaternion (x, y, z, w), normalised; ``friction`` the Coulomb coefficient.
    """
    half = _require_vector("half_extents", half_extents, 3, "three finite numbers > 0 m", positive=True)
    return Collider(ShapeType.BOX, half, friction, None, position, rotation)


def collider_sphere(
    radius: float,
    *,
    position: Sequence[float] = (0.0, 0.0, 0.0),
    rotation: Sequence[float] = (0.0, 0.0, 0.0, 1.0),
    friction: float = 0.5,
) -> Collider:
    """A sphere collider of ``radius`` [m] centred at ``position`` [m]."""
    radius = _require_positive("radius", radius)
    return Collider(ShapeType.SPHERE, (radius, 0.0, 0.0), friction, None, position, rotation)


def collider_capsule(
    radius: float,
    half_height: float,
    *,
    position: Sequence[float] = (0.0, 0.0, 0.0),
    rotation: Sequence[float] = (0.0, 0.0, 0.0, 1.0),
    friction: float = 0.5,
) -> Collider:
    """A capsule: ``radius`` [m] around a local-z segment of half-length ``half_height`` [m]."""
    radius = _require_positive("radius", radius)
    half_height = _require_positive("half_height", half_height)
    return Collider(ShapeType.CAPSULE, (radius, half_height, 0.0), friction, None, position, rotation)


def collider_cylinder(
    radius: float,
    half_height: float,
    *,
    position: Sequence[float] = (0.0, 0.0, 0.0),
    rotation: Sequence[float] = (0.0, 0.0, 0.0, 1.0),
    friction: float = 0.5,
) -> Collider:
    """A flat-capped cylinder of ``radius`` [m] and ``half_height`` [m] along local z."""
    radius = _require_positive("radius", radius)
    half_height = _require_positive("half_height", half_height)
    return Collider(ShapeType.CYLINDER, (radius, half_height, 0.0), friction, None, position, rotation)


def collider_mesh(
    mesh: TriangleMesh,
    *,
    scale: Sequence[float] | float = (1.0, 1.0, 1.0),
    position: Sequence[float] = (0.0, 0.0, 0.0),
    rotation: Sequence[float] = (0.0, 0.0, 0.0, 1.0),
    friction: float = 0.5,
) -> Collider:
    """A collider from a closed, outward-oriented :class:`TriangleMesh` (vertices in metres).

    ``scale`` multiplies the vertices per axis (a single number scales uniformly); distances are
    exact for uniform scales and approximate otherwise (see :func:`mesh_query`).
    """
    if not isinstance(mesh, TriangleMesh):
        raise InvalidParameter("mesh", type(mesh).__name__, "TriangleMesh instances")
    if np.ndim(scale) == 0:
        scale = (scale, scale, scale)
    scale = _require_vector("scale", scale, 3, "a number > 0 or three numbers > 0", positive=True)
    return Collider(ShapeType.MESH, scale, friction, mesh, position, rotation)


def collider_model_fields(colliders: Sequence[Collider], num_worlds: int, device, *,
                          requires_grad: bool = False) -> dict:
    """The collider fields every solver's Model shares, as keyword arguments: per-collider
    ``collider_shape``, ``collider_size`` [m], ``collider_friction`` (with a gradient buffer when
    ``requires_grad``) and ``collider_mesh`` ids, the initial (world, collider) poses, and the
    colliders themselves."""
    nc = len(colliders)
    positions = np.array([c.position for c in colliders], dtype=np.float32).reshape(nc, 3)
    rotations = np.array([c.rotation for c in colliders], dtype=np.float32).reshape(nc, 4)
    return {
        "collider_shape": wp.array(np.array([int(c.shape) for c in colliders], dtype=np.int32), dtype=wp.int32,
                                   device=device),
        "collider_size": wp.array(np.array([c.size for c in colliders], dtype=np.float32).reshape(nc, 3),
                                  dtype=wp.vec3, device=device),
        "collider_friction": wp.array(np.array([c.friction for c in colliders], dtype=np.float32), dtype=float,
                                      device=device, requires_grad=requires_grad),
        "collider_mesh": wp.array(np.array([c.warp_mesh_id(device) for c in colliders], dtype=np.uint64),
                                  dtype=wp.uint64, device=device),
        "initial_collider_position": np.tile(positions, (num_worlds, 1)),
        "initial_collider_rotation": np.tile(rotations, (num_worlds, 1)),
        "colliders": list(colliders),
    }
