"""Triangle meshes the renderer draws colliders with, in each shape's local frame (see
:mod:`diffsim.geometry.shapes`): boxes, spheres, capsules, cylinders, meshes and checkered planes.
"""

from __future__ import annotations

import math

import numpy as np

from diffsim.errors import InvalidParameter
from diffsim.geometry import Collider, ShapeType, TriangleMesh

#: Segments around the axis of drawn capsules and cylinders.
ROUND_SEGMENTS = 24


def _lathe(profile: np.ndarray, segments: int) -> tuple[np.ndarray, np.ndarray]:
    """Revolve a (radius, z) profile about local z. The first and last profile points must lie on
    the axis (radius 0): they become single pole vertices."""
    angles = 2.0 * math.pi * np.arange(segments) / segments
    ring = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    inner = profile[1:-1]
    vertices = [np.array([[0.0, 0.0, profile[0, 1]]])]
    for r, z in inner:
        vertices.append(np.column_stack([r * ring, np.full(segments, z)]))
    vertices.append(np.array([[0.0, 0.0, profile[-1, 1]]]))
    vertices = np.concatenate(vertices)
    rings = len(inner)
    top = len(vertices) - 1
    faces = []
    for s in range(segments):
        t = (s + 1) % segments
        faces.append((0, 1 + t, 1 + s))
        for k in range(rings - 1):
            a, b = 1 + k * segments, 1 + (k + 1) * segments
            faces.append((a + s, a + t, b + t))
            faces.append((a + s, b + t, b + s))
        last = 1 + (rings - 1) * segments
        faces.append((last + s, last + t, top))
    return vertices, np.asarray(faces, dtype=np.int64)


def capsule_mesh(radius: float, half_height: float, *, segments: int = ROUND_SEGMENTS) -> TriangleMesh:
    """A capsule of ``radius`` [m] around the segment z in [-half_height, half_height] [m]."""
    arc = np.linspace(0.0, 0.5 * math.pi, segments // 4 + 1)
    bottom = np.column_stack([radius * np.sin(arc), -half_height - radius * np.cos(arc)])
    top = np.column_stack([radius * np.cos(arc), half_height + radius * np.sin(arc)])
    return TriangleMesh(*_lathe(np.concatenate([bottom, top]), segments))


def cylinder_mesh(radius: float, half_height: float, *, segments: int = ROUND_SEGMENTS) -> TriangleMesh:
    """A cylinder of ``radius`` [m], axis z, flat caps at z = +-half_height [m]."""
    profile = np.array([[0.0, -half_height], [radius, -half_height], [radius, half_height], [0.0, half_height]])
    return TriangleMesh(*_lathe(profile, segments))


def checker_plane(half_size: float, tiles: int, *, center_xy=(0.0, 0.0)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A square of ``tiles`` x ``tiles`` squares on local z = 0, ``half_size`` [m] from its centre
    ``center_xy`` [m] to each edge. Returns vertices (V, 3), faces (F, 3) and each face's checker
    parity (F,) in {0, 1}. Small tiles keep the triangles that reach behind the camera small."""
    if not (half_size > 0 and math.isfinite(half_size)):
        raise InvalidParameter("half_size", half_size, "(0, inf) m")
    n = int(tiles)
    grid = np.linspace(-half_size, half_size, n + 1)
    gx, gy = np.meshgrid(grid + center_xy[0], grid + center_xy[1], indexing="ij")
    vertices = np.column_stack([gx.ravel(), gy.ravel(), np.zeros(gx.size)])
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    i, j = i.ravel(), j.ravel()
    v00, v10, v01, v11 = i * (n + 1) + j, (i + 1) * (n + 1) + j, i * (n + 1) + j + 1, (i + 1) * (n + 1) + j + 1
    faces = np.concatenate([np.stack([v00, v10, v11], 1), np.stack([v00, v11, v01], 1)])
    parity = np.tile((i + j) % 2, 2)
    return vertices, faces, parity


def collider_mesh(collider: Collider) -> TriangleMesh:
    """The drawn surface of a non-plane collider in its local frame [m]."""
    shape, size = collider.shape, collider.size
    if shape == ShapeType.BOX:
        return TriangleMesh.box(size)
    if shape == ShapeType.SPHERE:
        return TriangleMesh.icosphere(size[0], 3)
    if shape == ShapeType.CAPSULE:
        return capsule_mesh(size[0], size[1])
    if shape == ShapeType.CYLINDER:
        return cylinder_mesh(size[0], size[1])
    if shape == ShapeType.MESH:
        return TriangleMesh(collider.mesh.vertices * np.asarray(size), collider.mesh.faces)
    raise InvalidParameter("collider.shape", shape, "BOX, SPHERE, CAPSULE, CYLINDER or MESH (planes are drawn apart)")
