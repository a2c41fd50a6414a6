"""Closed triangle meshes for colliders and samplers: validation, a small OBJ reader, simple builders.

A :class:`TriangleMesh` keeps its data in numpy and builds a ``wp.Mesh`` (BVH) lazily per device.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import warp as wp

from diffsim.errors import ConfigError, InvalidParameter

__all__ = ["TriangleMesh"]


class TriangleMesh:
    """A triangle mesh in its own local frame (lengths in metres).

    Colliders and :func:`~diffsim.geometry.sampling.sample_mesh` expect the mesh to be closed
    (watertight) and consistently oriented with counter-clockwise faces seen from outside, so that
    :meth:`volume` is positive; :meth:`is_closed` checks this.

    Args:
        vertices: vertex positions, array-like of shape (V, 3) [m].
        faces: vertex indices of each triangle, integer array-like of shape (F, 3), F >= 1.

    Raises:
        InvalidParameter: when the arrays have the wrong shape, hold non-finite vertices, or a face
            refers to a vertex that does not exist.
    """

    def __init__(self, vertices, faces):
        vertices = np.array(vertices, dtype=np.float64, copy=True)
        if vertices.ndim != 2 or vertices.shape[1] != 3 or vertices.shape[0] < 3:
            raise InvalidParameter(
                "vertices", f"array of shape {vertices.shape}", "arrays of shape (V, 3) with V >= 3"
            )
        if not np.all(np.isfinite(vertices)):
            bad = int(np.flatnonzero(~np.all(np.isfinite(vertices), axis=1))[0])
            raise InvalidParameter(
                "vertices", f"vertex {bad} = {vertices[bad].tolist()}", "finite coordinates in metres"
            )
        faces_in = np.asarray(faces)
        if faces_in.size and not np.issubdtype(faces_in.dtype, np.integer):
            # Accept integral floats (e.g. from np.loadtxt) but not fractional indices.
            if not np.all(np.isfinite(faces_in)) or np.any(faces_in != np.round(faces_in)):
                raise InvalidParameter("faces", "non-integer indices", "integer vertex indices")
        faces = np.array(faces_in, dtype=np.int64, copy=True)
        if faces.ndim != 2 or faces.shape[1] != 3 or faces.shape[0] < 1:
            raise InvalidParameter(
                "faces",
                f"array of shape {faces.shape}",
                "integer arrays of shape (F, 3) with at least one face",
                hint="Polygons with more than three corners must be triangulated first.",
            )
        if faces.min() < 0 or faces.max() >= vertices.shape[0]:
            bad = int(np.flatnonzero(np.any((faces < 0) | (faces >= vertices.shape[0]), axis=1))[0])
            raise InvalidParameter(
                "faces",
                f"face {bad} = {faces[bad].tolist()}",
                f"indices in [0, {vertices.shape[0] - 1}] (the mesh has {vertices.shape[0]} vertices)",
            )
        vertices.setflags(write=False)
        faces = faces.astype(np.int32)
        faces.setflags(write=False)
        self._vertices = vertices
        self._faces = faces
        self._warp_meshes: dict[str, wp.Mesh] = {}

    # ------------------------------------------------------------------ data
    @property
    def vertices(self) -> np.ndarray:
        """Vertex positions, read-only float64 array of shape (V, 3) [m]."""
        return self._vertices

    @property
    def faces(self) -> np.ndarray:
        """Triangle vertex indices, read-only int32 array of shape (F, 3)."""
        return self._faces

    @property
    def num_vertices(self) -> int:
        return int(self._vertices.shape[0])

    @property
    def num_faces(self) -> int:
        return int(self._faces.shape[0])

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned bounding box of the vertices that faces use: (lower, upper) [m]."""
        used = self._vertices[np.unique(self._faces)]
        return used.min(axis=0), used.max(axis=0)

    def volume(self) -> float:
        """Signed enclosed volume [m^3] by the divergence theorem (positive for outward faces)."""
        a, b, c = (self._vertices[self._faces[:, k]] for k in range(3))
        return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0)

    def is_closed(self) -> bool:
        """True when the mesh is watertight and consistently oriented.

        That is, every directed edge (i, j) occurs exactly once and its reverse (j, i) also occurs
        exactly once, so each edge is shared by exactly two faces that traverse it in opposite ways.
        """
        f = self._faces.astype(np.int64)
        starts = f.reshape(-1)
        ends = f[:, [1, 2, 0]].reshape(-1)
        n = np.int64(self.num_vertices)
        directed = starts * n + ends
        unique, counts = np.unique(directed, return_counts=True)
        if np.any(counts != 1) or np.any(starts == ends):
            return False
        reverse = ends * n + starts
        return bool(np.all(np.isin(reverse, unique)))

    # ------------------------------------------------------------------ warp
    def warp_mesh(self, device=None) -> wp.Mesh:
        """The ``wp.Mesh`` for ``device`` (default: Warp's current device), built once and cached.

        Points are float32 copies of :attr:`vertices`, built with ``support_winding_number=True`` as
        :func:`~diffsim.geometry.shapes.shape_query` requires; pass ``warp_mesh(device).id`` to kernels.
        """
        device = wp.get_device(device)
        key = str(device)
        mesh = self._warp_meshes.get(key)
        if mesh is None:
            points = wp.array(self._vertices.astype(np.float32), dtype=wp.vec3, device=device)
            indices = wp.array(self._faces.reshape(-1), dtype=wp.int32, device=device)
            # Winding-number support: the colliders and samplers take the inside/outside sign from
            # it, because the pseudo-normal sign fails at points equidistant from many faces.
            mesh = wp.Mesh(points=points, indices=indices, support_winding_number=True)
            self._warp_meshes[key] = mesh
        return mesh

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_obj(cls, path: str | os.PathLike) -> TriangleMesh:
        """Read vertices and faces from a Wavefront OBJ file.

        Only ``v`` and ``f`` records are used; ``f`` accepts ``a``, ``a/b``, ``a//c`` and ``a/b/c``
        corners and negative (relative) indices; polygons are fan-triangulated. Other records
        (normals, texture coordinates, groups, materials) are ignored. Units are taken as metres.

        Raises:
            ConfigError: when the file cannot be read or a record is malformed.
        """
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                lines = handle.readlines()
        except OSError as exc:
            raise ConfigError(f"Cannot read the OBJ file {os.fspath(path)!r}: {exc}.") from exc

        vertices: list[tuple[float, float, float]] = []
        faces: list[tuple[int, int, int]] = []
        for line_number, raw in enumerate(lines, start=1):
            fields = raw.split("#", 1)[0].split()
            if not fields:
                continue
            where = f"{os.fspath(path)}:{line_number}"
            if fields[0] == "v":
                try:
                    x, y, z = (float(value) for value in fields[1:4])
                except ValueError as exc:
                    raise ConfigError(
                        f"{where}: a 'v' record needs three numbers, got {raw.strip()!r}."
                    ) from exc
                vertices.append((x, y, z))
            elif fields[0] == "f":
                corners = []
                for token in fields[1:]:
                    try:
                        index = int(token.split("/", 1)[0])
                    except ValueError as exc:
                        raise ConfigError(f"{where}: cannot read the face corner {token!r}.") from exc
                    if index == 0:
                        raise ConfigError(f"{where}: OBJ indices start at 1 (or are negative); got 0.")
                    # Negative indices count back from the vertices read so far.
                    corners.append(index - 1 if index > 0 else len(vertices) + index)
                if len(corners) < 3:
                    raise ConfigError(f"{where}: a face needs at least three corners, got {raw.strip()!r}.")
                for k in range(1, len(corners) - 1):
                    faces.append((corners[0], corners[k], corners[k + 1]))
        if not faces:
            raise ConfigError(f"The OBJ file {os.fspath(path)!r} holds no faces ('f' records).")
        if len(vertices) < 3:
            raise ConfigError(f"The OBJ file {os.fspath(path)!r} holds fewer than three vertices.")
        return cls(np.asarray(vertices), np.asarray(faces))

    @classmethod
    def box(cls, half_extents: Sequence[float] = (0.5, 0.5, 0.5)) -> TriangleMesh:
        """A closed box centred at the origin with the given half extents (x, y, z) [m]; 12 faces."""
        half = np.asarray(half_extents, dtype=np.float64).reshape(-1)
        if half.shape != (3,) or not np.all(np.isfinite(half)) or np.any(half <= 0.0):
            raise InvalidParameter("half_extents", tuple(half.tolist()), "three finite numbers > 0 m")
        # Corner index = x_bit + 2*y_bit + 4*z_bit.
        bits = np.array([[(i >> k) & 1 for k in range(3)] for i in range(8)], dtype=np.float64)
        vertices = (2.0 * bits - 1.0) * half
        faces = []
        for axis in range(3):
            u, v = (axis + 1) % 3, (axis + 2) % 3
            for side in (0, 1):
                quad = []
                # Walking (u-,v-), (u+,v-), (u+,v+), (u-,v+) turns counter-clockwise about +axis.
                for bu, bv in ((0, 0), (1, 0), (1, 1), (0, 1)):
                    quad.append((side << axis) | (bu << u) | (bv << v))
                if side == 0:
                    quad.reverse()
                faces.append((quad[0], quad[1], quad[2]))
                faces.append((quad[0], quad[2], quad[3]))
        return cls(vertices, np.asarray(faces))

    @classmethod
    def icosphere(cls, radius: float = 1.0, subdivisions: int = 2) -> TriangleMesh:
        """A closed sphere approximation centred at the origin [m].

        Starts from an icosahedron and splits every triangle into four ``subdivisions`` times,
        giving 20 * 4**subdivisions faces with all vertices on the sphere of ``radius``.
        """
        radius = float(radius)
        if not math.isfinite(radius) or radius <= 0.0:
            raise InvalidParameter("radius", radius, "finite numbers > 0 m")
        if int(subdivisions) != subdivisions or not 0 <= subdivisions <= 7:
            raise InvalidParameter("subdivisions", subdivisions, "integers in [0, 7]")
        t = (1.0 + math.sqrt(5.0)) / 2.0
        points = [
            (-1, t, 0), (1, t, 0), (-1, -t, 0), (1, -t, 0),
            (0, -1, t), (0, 1, t), (0, -1, -t), (0, 1, -t),
            (t, 0, -1), (t, 0, 1), (-t, 0, -1), (-t, 0, 1),
        ]  # fmt: skip
        triangles = [
            (0, 11, 5), (0, 5, 1), (0, 1, 7), (0, 7, 10), (0, 10, 11),
            (1, 5, 9), (5, 11, 4), (11, 10, 2), (10, 7, 6), (7, 1, 8),
            (3, 9, 4), (3, 4, 2), (3, 2, 6), (3, 6, 8), (3, 8, 9),
            (4, 9, 5), (2, 4, 11), (6, 2, 10), (8, 6, 7), (9, 8, 1),
        ]  # fmt: skip
        points = [tuple(np.asarray(p, dtype=np.float64) / math.sqrt(1.0 + t * t)) for p in points]
        for _ in range(int(subdivisions)):
            midpoint_of: dict[tuple[int, int], int] = {}

            def midpoint(i: int, j: int, midpoint_of=midpoint_of) -> int:
                key = (min(i, j), max(i, j))
                if key not in midpoint_of:
                    m = (np.asarray(points[i]) + np.asarray(points[j])) * 0.5
                    points.append(tuple(m / np.linalg.norm(m)))
                    midpoint_of[key] = len(points) - 1
                return midpoint_of[key]

            refined = []
            for a, b, c in triangles:
                ab, bc, ca = midpoint(a, b), midpoint(b, c), midpoint(c, a)
                refined += [(a, ab, ca), (b, bc, ab), (c, ca, bc), (ab, bc, ca)]
            triangles = refined
        return cls(np.asarray(points) * radius, np.asarray(triangles))

    def __repr__(self) -> str:
        return f"TriangleMesh(num_vertices={self.num_vertices}, num_faces={self.num_faces})"
