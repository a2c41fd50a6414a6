"""Colliders as every solver shares them: :class:`ColliderSetBuilder` (what a scene builder adds,
up to :data:`MAX_COLLIDERS`) and :class:`ColliderSet`, the ``wp.struct`` contact kernels query.

A solver packs one :class:`ColliderSet` per launch with :func:`pack_colliders` from its Model
(shapes, sizes, friction, meshes), a State (the (world, collider) poses) and a Control (their
velocities); its contact code then calls :func:`collider_query` and friends on ``colliders``
instead of taking nine collider arrays. Gradients reach the member arrays' ``.grad`` (the tape
mirrors a struct's arrays by their gradients), so friction, poses and velocities stay
differentiable.
"""

from __future__ import annotations

from collections import OrderedDict

import warp as wp

from diffsim.errors import ConfigError
from diffsim.geometry.shapes import (
    Collider,
    SurfaceQuery,
    collider_model_fields,
    collider_plane,
    local_to_world_vector,
    shape_contact_normal,
    shape_query,
    world_to_local,
)

__all__ = [
    "MAX_COLLIDERS",
    "ColliderSet",
    "ColliderSetBuilder",
    "ColliderSetCache",
    "collider_contact_normal",
    "collider_local_point",
    "collider_local_query",
    "collider_query",
    "collider_slot",
    "collider_start_point",
    "collider_surface_velocity",
    "pack_colliders",
]

#: Colliders per scene, ground included. Contact kernels visit them in a loop unrolled at compile
#: time (``for c in range(wp.static(MAX_COLLIDERS)): if c < colliders.count``): Warp's adjoint of a
#: loop with a run-time trip count does not replay the loop's forward sweep, so a value carried
#: through such a loop gets a wrong gradient.
MAX_COLLIDERS = 8


@wp.struct
class ColliderSet:
    """Every collider of a scene as a contact kernel sees it during one launch.

    Per collider ``c``: ``shape`` (a :class:`~diffsim.geometry.ShapeType`), ``size`` [m],
    ``friction`` (Coulomb coefficient [-]) and ``mesh`` (``wp.Mesh`` id, 0 for analytic shapes).
    Per (world, collider) slot ``world * count + c`` (see :func:`collider_slot`): ``position`` [m]
    and ``rotation`` (quaternion x, y, z, w) at the time the solver queries, ``velocity`` [m/s] and
    ``angular_velocity`` [rad/s, world axes] over the step, and the pose at the step's start
    (``position_start``, ``rotation_start``; the same arrays as the pose when the solver queries
    at the start).
    """

    shape: wp.array(dtype=int)
    size: wp.array(dtype=wp.vec3)
    friction: wp.array(dtype=float)
    mesh: wp.array(dtype=wp.uint64)
    position: wp.array(dtype=wp.vec3)
    rotation: wp.array(dtype=wp.quat)
    velocity: wp.array(dtype=wp.vec3)
    angular_velocity: wp.array(dtype=wp.vec3)
    position_start: wp.array(dtype=wp.vec3)
    rotation_start: wp.array(dtype=wp.quat)
    count: int


def pack_colliders(model, state, control, *, start_state=None) -> ColliderSet:
    """The :class:`ColliderSet` of ``model``'s colliders posed as in ``state`` and moving as
    ``control`` says; ``start_state`` holds the poses at the start of the step (default ``state``)."""
    start = state if start_state is None else start_state
    colliders = ColliderSet()
    colliders.shape = model.collider_shape
    colliders.size = model.collider_size
    colliders.friction = model.collider_friction
    colliders.mesh = model.collider_mesh
    colliders.position = state.collider_position
    colliders.rotation = state.collider_rotation
    colliders.velocity = control.collider_velocity
    colliders.angular_velocity = control.collider_angular_velocity
    colliders.position_start = start.collider_position
    colliders.rotation_start = start.collider_rotation
    colliders.count = model.collider_count
    return colliders


def _collider_arrays(model, state, control, start) -> tuple:
    return (model.collider_shape, model.collider_size, model.collider_friction, model.collider_mesh,
            state.collider_position, state.collider_rotation, control.collider_velocity,
            control.collider_angular_velocity, start.collider_position, start.collider_rotation)


class ColliderSetCache:
    """:func:`pack_colliders` that hands out the same struct again while the arrays it holds are
    the same objects: packing costs ~20 us of Python, as much as a small scene's contact launch,
    and a re-used struct also lets a recorded launch command keep it packed.

    Holds at most ``max_entries`` structs (the least recently used go), and with them only the
    collider arrays they reference (a few floats per collider).
    """

    def __init__(self, *, max_entries: int = 32):
        self.max_entries = max_entries
        self._entries: OrderedDict = OrderedDict()

    def pack(self, model, state, control, *, start_state=None) -> ColliderSet:
        start = state if start_state is None else start_state
        arrays = _collider_arrays(model, state, control, start)
        key = tuple(id(a) for a in arrays)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry[1]
        colliders = pack_colliders(model, state, control, start_state=start_state)
        # the arrays stay referenced, so their ids cannot be re-used while the entry lives
        self._entries[key] = (arrays, colliders)
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return colliders


# ---------------------------------------------------------------------------- kernel side


@wp.func
def collider_slot(colliders: ColliderSet, world: int, c: int):
    """Index of collider ``c`` of ``world`` in the per-(world, collider) pose arrays."""
    return world * colliders.count + c


@wp.func
def collider_local_point(colliders: ColliderSet, slot: int, x: wp.vec3):
    """World point ``x`` [m] in the frame of the collider posed at ``slot``."""
    return world_to_local(x, colliders.position[slot], colliders.rotation[slot])


@wp.func
def collider_local_query(colliders: ColliderSet, c: int, local: wp.vec3):
    """Signed distance [m] and local-frame normal of collider ``c`` at its local point ``local``."""
    return shape_query(colliders.shape[c], colliders.size[c], colliders.mesh[c], local)


@wp.func
def collider_query(colliders: ColliderSet, c: int, slot: int, x: wp.vec3):
    """Signed distance [m] and world-axis outward normal of collider ``c`` posed at ``slot``, at
    world point ``x`` [m]; differentiable in ``x``, the size and the pose."""
    local = collider_local_query(colliders, c, collider_local_point(colliders, slot, x))
    q = SurfaceQuery()
    q.distance = local.distance
    q.normal = local_to_world_vector(local.normal, colliders.rotation[slot])
    return q


@wp.func
def collider_contact_normal(colliders: ColliderSet, c: int, slot: int, local: wp.vec3, query: SurfaceQuery,
                            width: float):
    """World-axis contact normal at local point ``local`` whose :func:`collider_local_query` is
    ``query``: see :func:`~diffsim.geometry.shapes.shape_contact_normal` (meshes: smoothed over
    ``width`` [m])."""
    normal = shape_contact_normal(colliders.shape[c], colliders.size[c], colliders.mesh[c], local, query, width)
    return local_to_world_vector(normal, colliders.rotation[slot])


@wp.func
def collider_surface_velocity(colliders: ColliderSet, slot: int, x: wp.vec3):
    """Velocity [m/s] of the collider's (rigid) material at world point ``x`` [m]."""
    return colliders.velocity[slot] + wp.cross(colliders.angular_velocity[slot], x - colliders.position[slot])


@wp.func
def collider_start_point(colliders: ColliderSet, slot: int, local: wp.vec3):
    """Where the collider's local point ``local`` [m] was at the start of the step (world frame)."""
    return colliders.position_start[slot] + wp.quat_rotate(colliders.rotation_start[slot], local)


# ---------------------------------------------------------------------------- builder side


class ColliderSetBuilder:
    """The colliders a scene builder collects: validated, at most :data:`MAX_COLLIDERS`.

    Args:
        scene: how the limit's error names the scene, e.g. ``"an MPM scene"``.
    """

    def __init__(self, scene: str = "a scene"):
        self.scene = scene
        self.colliders: list[Collider] = []

    def __len__(self) -> int:
        return len(self.colliders)

    def add(self, collider: Collider) -> int:
        """Add a kinematic collider (see ``diffsim.geometry.collider_*``); returns its index."""
        if not isinstance(collider, Collider):
            raise ConfigError(f"add_collider expects a diffsim.geometry.Collider, got {type(collider).__name__}.")
        if len(self.colliders) >= MAX_COLLIDERS:
            raise ConfigError(f"{self.scene} holds at most {MAX_COLLIDERS} colliders (ground included); "
                              "merge shapes into one mesh collider instead.")
        self.colliders.append(collider)
        return len(self.colliders) - 1

    def add_ground(self, *, height: float = 0.0, friction: float = 0.5) -> int:
        """Add the ground plane z = ``height`` [m] with Coulomb ``friction``; returns its index."""
        return self.add(collider_plane(position=(0.0, 0.0, float(height)), friction=friction))

    def model_fields(self, num_worlds: int, device, *, requires_grad: bool = False) -> dict:
        """The Model's collider fields (see :func:`~diffsim.geometry.collider_model_fields`)."""
        return collider_model_fields(self.colliders, num_worlds, device, requires_grad=requires_grad)
