"""Tetrahedral meshes for FEM bodies: procedural pads and domes, import through meshio, and the
checks that refuse inverted or degenerate elements before a solver ever sees them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffsim.errors import ConfigError, InvalidParameter

#: A tet whose volume is below this fraction of (longest edge)^3 / 6 counts as degenerate.
DEGENERATE_VOLUME_RATIO = 1.0e-6


@dataclass
class TetMesh:
    """Linear tetrahedra: ``vertices`` (N, 3) [m] and ``tets`` (M, 4) vertex indices, each tet
    positively oriented (det[b - a, c - a, d - a] > 0). Construction checks the mesh and raises
    :class:`~diffsim.errors.ConfigError` naming the first bad element.
    """

    vertices: np.ndarray
    tets: np.ndarray
    _faces: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self):
        self.vertices = np.ascontiguousarray(self.vertices, dtype=np.float64)
        self.tets = np.ascontiguousarray(self.tets, dtype=np.int64)
        if self.vertices.ndim != 2 or self.vertices.shape[1] != 3 or len(self.vertices) < 4:
            raise ConfigError(f"a tet mesh needs vertices of shape (N >= 4, 3); got {self.vertices.shape}.")
        if not np.all(np.isfinite(self.vertices)):
            row = int(np.flatnonzero(~np.all(np.isfinite(self.vertices), axis=1))[0])
            raise ConfigError(f"tet mesh vertex {row} is not finite: {self.vertices[row].tolist()}.")
        if self.tets.ndim != 2 or self.tets.shape[1] != 4 or len(self.tets) == 0:
            raise ConfigError(f"a tet mesh needs tets of shape (M >= 1, 4); got {self.tets.shape}.")
        bad = np.flatnonzero(np.any((self.tets < 0) | (self.tets >= len(self.vertices)), axis=1))
        if bad.size:
            raise ConfigError(f"tet {int(bad[0])} refers to vertex indices {self.tets[bad[0]].tolist()}, "
                              f"outside [0, {len(self.vertices) - 1}].")
        volumes = self.volumes()
        a, b, c, d = (self.vertices[self.tets[:, k]] for k in range(4))
        edges = np.stack([b - a, c - a, d - a, c - b, d - b, d - c], axis=1)
        longest = np.linalg.norm(edges, axis=2).max(axis=1)
        degenerate = np.abs(volumes) <= DEGENERATE_VOLUME_RATIO * longest**3 / 6.0
        inverted = (volumes < 0) & ~degenerate
        for name, flags in (("degenerate (zero volume)", degenerate), ("inverted (negative volume)", inverted)):
            if np.any(flags):
                k = int(np.flatnonzero(flags)[0])
                raise ConfigError(
                    f"tet {k} (vertices {self.tets[k].tolist()}) is {name}: volume {volumes[k]:.3e} m^3; "
                    f"{int(flags.sum())} of {len(self.tets)} tets are. Reorder inverted tets' vertices or remesh.")

    @property
    def vertex_count(self) -> int:
        return len(self.vertices)

    @property
    def tet_count(self) -> int:
        return len(self.tets)

    def volumes(self) -> np.ndarray:
        """Signed volume of each tet [m^3]."""
        a, b, c, d = (self.vertices[self.tets[:, k]] for k in range(4))
        return np.einsum("ij,ij->i", np.cross(b - a, c - a), d - a) / 6.0

    def boundary_faces(self) -> np.ndarray:
        """Boundary triangles (K, 3), ordered so that their normals point out of the body."""
        if self._faces is None:
            t = self.tets
            # the face opposite each vertex, wound so its normal points away from that vertex
            faces = np.concatenate([t[:, [1, 2, 3]], t[:, [0, 3, 2]], t[:, [0, 1, 3]], t[:, [0, 2, 1]]])
            keys = np.sort(faces, axis=1)
            _, first, counts = np.unique(keys, axis=0, return_index=True, return_counts=True)
            self._faces = np.ascontiguousarray(faces[np.sort(first[counts == 1])])
        return self._faces

    def boundary_vertices(self) -> np.ndarray:
        """Indices of the vertices on the boundary, sorted."""
        return np.unique(self.boundary_faces())

    def vertex_areas(self) -> np.ndarray:
        """Lumped boundary area of each vertex [m^2]: a third of each adjacent boundary triangle."""
        faces = self.boundary_faces()
        p = self.vertices
        area = 0.5 * np.linalg.norm(np.cross(p[faces[:, 1]] - p[faces[:, 0]], p[faces[:, 2]] - p[faces[:, 0]]), axis=1)
        out = np.zeros(len(p))
        for k in range(3):
            np.add.at(out, faces[:, k], area / 3.0)
        return out

    def min_altitude(self) -> np.ndarray:
        """Smallest altitude of each tet [m] (3 V / largest face area), the length that sets the
        fastest elastic wave an explicit step must resolve."""
        p, t = self.vertices, self.tets
        faces = [t[:, [1, 2, 3]], t[:, [0, 3, 2]], t[:, [0, 1, 3]], t[:, [0, 2, 1]]]
        areas = np.stack([0.5 * np.linalg.norm(np.cross(p[f[:, 1]] - p[f[:, 0]], p[f[:, 2]] - p[f[:, 0]]), axis=1)
                          for f in faces], axis=1)
        return 3.0 * np.abs(self.volumes()) / areas.max(axis=1)

    def transformed(self, function) -> TetMesh:
        """A new mesh with ``function`` (N, 3) -> (N, 3) applied to the vertices (checked again)."""
        return TetMesh(function(self.vertices.copy()), self.tets.copy())


# -------------------------------------------------------------------------------- generators


def _axis(name: str, value, count: int) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size < 2 or not np.all(np.isfinite(arr)) or not np.all(np.diff(arr) > 0):
        raise InvalidParameter(name, arr.tolist() if arr.size < 8 else f"array of {arr.size}",
                               "at least two finite, strictly increasing coordinates [m]")
    return arr


def tet_mesh_grid(xs: Sequence[float], ys: Sequence[float], zs: Sequence[float]) -> TetMesh:
    """A box meshed on the tensor grid ``xs`` x ``ys`` x ``zs`` [m], each cell split into six tets
    around its main diagonal (Kuhn's split, conforming between neighbouring cells)."""
    xs, ys, zs = _axis("xs", xs, 0), _axis("ys", ys, 0), _axis("zs", zs, 0)
    nx, ny, nz = len(xs), len(ys), len(zs)
    X, Y, Z = np.meshgrid(xs, ys, zs, indexing="ij")
    vertices = np.stack([X.ravel(), Y.ravel(), Z.ravel()], axis=1)
    i, j, k = np.meshgrid(np.arange(nx - 1), np.arange(ny - 1), np.arange(nz - 1), indexing="ij")
    i, j, k = i.ravel(), j.ravel(), k.ravel()

    def corner(di, dj, dk):
        return ((i + di) * ny + (j + dj)) * nz + (k + dk)

    tets = []
    for axes, parity in (((0, 1, 2), 1), ((1, 2, 0), 1), ((2, 0, 1), 1), ((0, 2, 1), -1), ((2, 1, 0), -1),
                         ((1, 0, 2), -1)):
        step = [0, 0, 0]
        path = [corner(0, 0, 0)]
        for a in axes:
            step[a] = 1
            path.append(corner(*step))
        if parity < 0:  # an odd permutation of the axes winds the tet the other way
            path[1], path[2] = path[2], path[1]
        tets.append(np.stack(path, axis=1))
    return TetMesh(vertices, np.concatenate(tets))


def graded_coordinates(length: float, cells: int, grading: float, *, centred: bool) -> np.ndarray:
    """``cells + 1`` coordinates over ``length`` [m] whose spacing grows by the factor ``grading``
    from the fine end (the middle when ``centred``, else the top, x = length) to the coarse end."""
    if grading < 1.0 or not math.isfinite(grading):
        raise InvalidParameter("grading", grading, "[1, inf) (ratio of the coarsest to the finest cell)")
    u = np.linspace(-1.0 if centred else 0.0, 1.0, cells + 1)
    beta = math.acosh(grading)
    if beta < 1e-9:
        shaped = u
    elif centred:
        shaped = np.sinh(beta * u) / math.sinh(beta)
    else:
        shaped = 1.0 - np.sinh(beta * (1.0 - u)) / math.sinh(beta)
    return 0.5 * length * shaped if centred else length * shaped


def _count(name: str, value, minimum: int = 1) -> int:
    if not isinstance(value, (int, np.integer)) or value < minimum:
        raise InvalidParameter(name, value, f"integers >= {minimum}")
    return int(value)


def tet_mesh_pad(size: Sequence[float], resolution: Sequence[int], *, grading: float = 1.0) -> TetMesh:
    """A rectangular elastomer pad: x and y in [-size/2, size/2], z in [0, size_z] [m].

    Args:
        size: (width, depth, thickness) [m], all > 0.
        resolution: cells along (x, y, z), each >= 1.
        grading: ratio of the coarsest to the finest cell; > 1 concentrates cells at the middle
            of the top face (z = thickness), where contact happens.
    """
    size = np.asarray(size, dtype=np.float64).reshape(-1)
    if size.size != 3 or not np.all(np.isfinite(size)) or not np.all(size > 0):
        raise InvalidParameter("size", size.tolist(), "three finite lengths > 0 m")
    if len(resolution) != 3:
        raise InvalidParameter("resolution", resolution, "three cell counts (x, y, z)")
    nx, ny, nz = (_count(f"resolution[{k}]", r) for k, r in enumerate(resolution))
    return tet_mesh_grid(graded_coordinates(size[0], nx, grading, centred=True),
                         graded_coordinates(size[1], ny, grading, centred=True),
                         graded_coordinates(size[2], nz, grading, centred=False))


def tet_mesh_dome(radius: float, height: float, *, base_thickness: float, resolution: Sequence[int]) -> TetMesh:
    """A dome elastomer: a disc of ``radius`` [m] at z = 0 (the bonded face) under a slab of
    ``base_thickness`` [m] topped by a spherical cap of apex height ``height`` [m].

    ``resolution`` = (cells across the diameter, cells through the thickness). The square grid is
    mapped onto the disc by scaling each concentric square ring onto a circle.
    """
    for name, value in (("radius", radius), ("height", height), ("base_thickness", base_thickness)):
        if not (math.isfinite(value) and value > 0):
            raise InvalidParameter(name, value, "(0, inf) m")
    if len(resolution) != 2:
        raise InvalidParameter("resolution", resolution, "two cell counts (across, through)")
    across, through = _count("resolution[0]", resolution[0], 2), _count("resolution[1]", resolution[1])
    grid = tet_mesh_grid(np.linspace(-1, 1, across + 1), np.linspace(-1, 1, across + 1), np.linspace(0, 1, through + 1))
    sphere = (radius**2 + height**2) / (2.0 * height)

    def to_dome(p):
        x, y, w = p[:, 0], p[:, 1], p[:, 2]
        r_square = np.maximum(np.abs(x), np.abs(y))
        r_plain = np.hypot(x, y)
        scale = np.where(r_plain > 0, r_square / np.where(r_plain > 0, r_plain, 1.0), 1.0)
        x, y = x * scale * radius, y * scale * radius
        cap = np.sqrt(np.maximum(sphere**2 - (x * x + y * y), 0.0)) - (sphere - height)
        return np.stack([x, y, w * (base_thickness + np.maximum(cap, 0.0))], axis=1)

    return grid.transformed(to_dome)


def load_tet_mesh(path: str | Path, *, scale: float = 1.0) -> TetMesh:
    """Read the tetrahedra of a ``.msh``, ``.vtk``, ``.vtu`` (or any meshio format) file.

    ``scale`` converts the file's units to metres. Other cell types are ignored; a file without
    tetrahedra, or with inverted or degenerate ones, is refused with a message naming the first.
    """
    import meshio

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no tet mesh file at {path}.")
    try:
        mesh = meshio.read(path)
    except Exception as exc:  # meshio raises many types; the message is what matters
        raise ConfigError(f"meshio could not read {path}: {exc}") from exc
    blocks = [block.data for block in mesh.cells if block.type == "tetra"]
    if not blocks:
        kinds = sorted({block.type for block in mesh.cells})
        raise ConfigError(f"{path} holds no linear tetrahedra ('tetra' cells); it has: {kinds}.")
    if not (math.isfinite(scale) and scale > 0):
        raise InvalidParameter("scale", scale, "(0, inf)")
    return TetMesh(np.asarray(mesh.points, dtype=np.float64)[:, :3] * scale, np.concatenate(blocks))


def save_tet_mesh(mesh: TetMesh, path: str | Path) -> None:
    """Write ``mesh`` with meshio (format from the suffix, e.g. ``.vtk`` or ``.msh``)."""
    import meshio

    meshio.write(Path(path), meshio.Mesh(mesh.vertices, [("tetra", mesh.tets)]))
