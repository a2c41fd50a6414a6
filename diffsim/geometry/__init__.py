"""Collision geometry: signed-distance colliders (analytic primitives and triangle meshes) for solvers,
samplers that fill shapes with particles, and tetrahedral meshes for FEM bodies.

Solver kernels take a scene's colliders as one :class:`ColliderSet` struct (packed by
:func:`pack_colliders`) and call :func:`collider_query` and friends, or :func:`shape_query` (local
frame) and :func:`shape_query_world` on bare shapes; Python code builds colliders with the
``collider_*`` factories (collected by :class:`ColliderSetBuilder`) and initial particle sets with
the ``sample_*`` functions.
"""

from diffsim.geometry.colliders import (
    MAX_COLLIDERS,
    ColliderSet,
    ColliderSetBuilder,
    ColliderSetCache,
    collider_query,
    collider_surface_velocity,
    pack_colliders,
)
from diffsim.geometry.mesh import TriangleMesh
from diffsim.geometry.motion import integrate_colliders, rotation_vector
from diffsim.geometry.sampling import (
    particle_volume,
    sample_box,
    sample_cylinder,
    sample_mesh,
    sample_sphere,
)
from diffsim.geometry.shapes import (
    MESH_MAX_DISTANCE,
    NO_SURFACE_DISTANCE,
    Collider,
    ShapeType,
    SurfaceQuery,
    closest_point_on_triangle,
    collider_box,
    collider_capsule,
    collider_cylinder,
    collider_mesh,
    collider_model_fields,
    collider_plane,
    collider_sphere,
    local_to_world_point,
    local_to_world_vector,
    mesh_query,
    shape_query,
    shape_query_world,
    world_to_local,
)
from diffsim.geometry.tetmesh import (
    TetMesh,
    load_tet_mesh,
    save_tet_mesh,
    tet_mesh_dome,
    tet_mesh_grid,
    tet_mesh_pad,
)

__all__ = [
    "MAX_COLLIDERS",
    "MESH_MAX_DISTANCE",
    "NO_SURFACE_DISTANCE",
    "Collider",
    "ColliderSet",
    "ColliderSetBuilder",
    "ColliderSetCache",
    "ShapeType",
    "SurfaceQuery",
    "TetMesh",
    "TriangleMesh",
    "closest_point_on_triangle",
    "collider_box",
    "collider_capsule",
    "collider_cylinder",
    "collider_mesh",
    "collider_model_fields",
    "collider_plane",
    "collider_query",
    "collider_sphere",
    "collider_surface_velocity",
    "integrate_colliders",
    "local_to_world_point",
    "local_to_world_vector",
    "mesh_query",
    "pack_colliders",
    "particle_volume",
    "rotation_vector",
    "sample_box",
    "sample_cylinder",
    "sample_mesh",
    "sample_sphere",
    "shape_query",
    "shape_query_world",
    "tet_mesh_dome",
    "tet_mesh_grid",
    "tet_mesh_pad",
    "load_tet_mesh",
    "save_tet_mesh",
    "world_to_local",
]
