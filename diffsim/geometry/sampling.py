"""Particle samplers: fill boxes, spheres, cylinders and closed meshes with a regular particle lattice.

Each particle stands for a cube of volume ``spacing**3`` (see :func:`particle_volume`), so the particle
count times that volume approximates the shape's volume; positions come back as float32 (N, 3) [m].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import warp as wp

from diffsim.errors import InvalidParameter
from diffsim.geometry._validation import finite_number, finite_vector, positive_number, unit_quaternion
from diffsim.geometry.mesh import TriangleMesh
from diffsim.geometry.motion import rotation_matrix

__all__ = ["particle_volume", "sample_box", "sample_sphere", "sample_cylinder", "sample_mesh"]


def _check_spacing(spacing) -> float:
    return positive_number("spacing", spacing, "m")


def _check_point(name: str, value) -> np.ndarray:
    return finite_vector(name, value, 3, "three finite numbers [m]")


def _check_jitter(jitter) -> float:
    valid = "[0, 0.5) in units of the spacing"
    jitter = finite_number("jitter", jitter, valid)
    if not 0.0 <= jitter < 0.5:
        raise InvalidParameter("jitter", jitter, valid)
    return jitter


def _check_fits(extents: np.ndarray, spacing: float, shape: str) -> None:
    smallest = float(np.min(extents))
    if smallest < spacing:
        raise InvalidParameter(
            "spacing",
            spacing,
            f"(0, {smallest:.6g}] m for this {shape}",
            hint=f"The {shape} is only {smallest:.6g} m across, less than one particle spacing, so it "
            "would get no particles; use a smaller spacing or a larger shape.",
        )


def particle_volume(spacing: float) -> float:
    """Volume [m^3] each sampled particle represents: ``spacing**3`` with ``spacing`` in metres."""
    return _check_spacing(spacing) ** 3


def _lattice(center: np.ndarray, half_extents: np.ndarray, spacing: float) -> np.ndarray:
    """Cell centres of a lattice centred on ``center`` covering the box of ``half_extents``.

    Per axis round(2 h / spacing) cells are used, so the outermost centres lie at most h - spacing/4
    from the middle: inside the box, and with count * spacing**3 as close as possible to its volume.
    """
    counts = np.maximum(np.rint(2.0 * half_extents / spacing).astype(np.int64), 1)
    axes = [center[k] + (np.arange(counts[k]) - 0.5 * (counts[k] - 1)) * spacing for k in range(3)]
    grid = np.meshgrid(*axes, indexing="ij")
    return np.stack([g.reshape(-1) for g in grid], axis=1)


def _finish(points: np.ndarray, depth, spacing: float, jitter: float, seed: int, shape: str) -> np.ndarray:
    """Keep the lattice points inside the shape, then jitter them where the moved point stays inside.

    ``depth(x)`` is negative exactly inside the shape, and inside its magnitude is a lower bound on
    the distance to the surface [m], so deep points need no second test after jittering.
    """
    lattice_depth = depth(points)
    inside = lattice_depth < 0.0
    points, point_depth = points[inside], lattice_depth[inside]
    if points.shape[0] == 0:
        raise InvalidParameter(
            "spacing",
            spacing,
            f"values small enough to put a particle inside this {shape}",
            hint="No lattice point fell inside the shape; use a smaller spacing.",
        )
    if jitter > 0.0:
        rng = np.random.default_rng(seed)
        moved = points + rng.uniform(-jitter, jitter, size=points.shape) * spacing
        # A point jittered out of the shape stays at its cell centre: the count never depends on
        # the jitter, and every particle stays inside.
        keep = np.ones(points.shape[0], dtype=bool)
        near_surface = -point_depth <= math.sqrt(3.0) * jitter * spacing * 1.001
        if np.any(near_surface):
            keep[near_surface] = depth(moved[near_surface]) < 0.0
        points = np.where(keep[:, None], moved, points)
    return np.ascontiguousarray(points, dtype=np.float32)


def sample_box(
    center: Sequence[float],
    half_extents: Sequence[float],
    spacing: float,
    *,
    jitter: float = 0.0,
    seed: int = 0,
) -> np.ndarray:
    """Particles filling an axis-aligned box.

    Args:
        center: box centre [m].
        half_extents: half extents (x, y, z) [m], each > 0 and at least spacing / 2.
        spacing: lattice spacing [m]; each particle represents ``spacing**3``.
        jitter: random offset per axis as a fraction of the spacing, in [0, 0.5).
        seed: random seed of the jitter.

    Returns:
        float32 array (N, 3) of positions [m]. When ``2 * half_extents / spacing`` are integers,
        N * spacing**3 equals the box volume exactly.
    """
    spacing = _check_spacing(spacing)
    center = _check_point("center", center)
    half = finite_vector("half_extents", half_extents, 3, "three finite numbers > 0 m", positive=True)
    jitter = _check_jitter(jitter)
    _check_fits(2.0 * half, spacing, "box")

    def depth(x: np.ndarray) -> np.ndarray:
        return np.max(np.abs(x - center) - half, axis=1)

    return _finish(_lattice(center, half, spacing), depth, spacing, jitter, seed, "box")


def sample_sphere(
    center: Sequence[float], radius: float, spacing: float, *, jitter: float = 0.0, seed: int = 0
) -> np.ndarray:
    """Particles filling a sphere of ``radius`` [m] around ``center`` [m] (lattice centred on it).

    Options as in :func:`sample_box`. The count times ``spacing**3`` is within about 1 % of the
    sphere's volume once the radius is ten spacings or more.
    """
    spacing = _check_spacing(spacing)
    center = _check_point("center", center)
    radius = positive_number("radius", radius)
    jitter = _check_jitter(jitter)
    _check_fits(np.array([2.0 * radius]), spacing, "sphere")

    def depth(x: np.ndarray) -> np.ndarray:
        return np.linalg.norm(x - center, axis=1) - radius

    return _finish(_lattice(center, np.full(3, radius), spacing), depth, spacing, jitter, seed, "sphere")


def sample_cylinder(
    center: Sequence[float],
    radius: float,
    half_height: float,
    spacing: float,
    *,
    axis: int = 2,
    jitter: float = 0.0,
    seed: int = 0,
) -> np.ndarray:
    """Particles filling a flat-capped cylinder.

    Args:
        center: centre of the cylinder [m].
        radius: radius [m].
        half_height: half of the length along ``axis`` [m].
        spacing: lattice spacing [m].
        axis: world axis of the cylinder, 0 (x), 1 (y) or 2 (z).
        jitter, seed: as in :func:`sample_box`.
    """
    spacing = _check_spacing(spacing)
    center = _check_point("center", center)
    radius = positive_number("radius", radius)
    half_height = positive_number("half_height", half_height)
    if axis not in (0, 1, 2) or isinstance(axis, bool):
        raise InvalidParameter("axis", axis, "0 (x), 1 (y) or 2 (z)")
    jitter = _check_jitter(jitter)
    _check_fits(np.array([2.0 * radius, 2.0 * half_height]), spacing, "cylinder")
    radial_axes = [k for k in range(3) if k != axis]
    half = np.full(3, radius)
    half[axis] = half_height

    def depth(x: np.ndarray) -> np.ndarray:
        offset = x - center
        radial = np.hypot(offset[:, radial_axes[0]], offset[:, radial_axes[1]])
        return np.maximum(radial - radius, np.abs(offset[:, axis]) - half_height)

    return _finish(_lattice(center, half, spacing), depth, spacing, jitter, seed, "cylinder")


# Coarse cells (in spacings per axis) used to classify mesh lattice points in bulk.
_COARSE_CELLS = 4


@wp.kernel
def _mesh_signed_distance_kernel(
    mesh: wp.uint64,
    points: wp.array(dtype=wp.vec3),
    signed_distance: wp.array(dtype=float),
):
    i = wp.tid()
    p = points[i]
    hit = wp.mesh_query_point_sign_winding_number(mesh, p, 1.0e6, 2.0, 0.5)
    signed_distance[i] = 1.0e6
    if hit.result:
        signed_distance[i] = hit.sign * wp.length(p - wp.mesh_eval_position(mesh, hit.face, hit.u, hit.v))


def sample_mesh(
    mesh: TriangleMesh,
    spacing: float,
    *,
    position: Sequence[float] = (0.0, 0.0, 0.0),
    rotation: Sequence[float] = (0.0, 0.0, 0.0, 1.0),
    scale: float | Sequence[float] = 1.0,
    jitter: float = 0.0,
    seed: int = 0,
) -> np.ndarray:
    """Particles filling a closed, outward-oriented triangle mesh placed in the world.

    The mesh's vertices are scaled by ``scale`` (a number, or per axis), rotated by the quaternion
    ``rotation`` (x, y, z, w; normalised) and moved to ``position`` [m]. The lattice is world-aligned
    and centred on the placed mesh's bounding box, so a box mesh gives the same particles as
    :func:`sample_box`. Inside tests use Warp's BVH winding-number query on the CPU.

    Args:
        mesh: the :class:`TriangleMesh` (must be closed for the inside test to be meaningful).
        spacing: lattice spacing [m].
        position, rotation, scale: placement of the mesh.
        jitter, seed: as in :func:`sample_box`.
    """
    if not isinstance(mesh, TriangleMesh):
        raise InvalidParameter("mesh", type(mesh).__name__, "TriangleMesh instances")
    spacing = _check_spacing(spacing)
    position = _check_point("position", position)
    rot = rotation_matrix(unit_quaternion("rotation", rotation))
    scale_values = (scale, scale, scale) if np.ndim(scale) == 0 else scale
    scale_vec = finite_vector("scale", scale_values, 3, "a number > 0 or three numbers > 0", positive=True)
    jitter = _check_jitter(jitter)

    used = mesh.vertices[np.unique(mesh.faces)]
    world_vertices = (used * scale_vec) @ rot.T + position
    lower, upper = world_vertices.min(axis=0), world_vertices.max(axis=0)
    _check_fits(upper - lower, spacing, "mesh")
    warp_mesh = mesh.warp_mesh("cpu")

    # Mesh-frame distances times the smallest scale factor bound the world distances from below.
    min_scale = float(scale_vec.min())

    def exact_depth(x: np.ndarray) -> np.ndarray:
        # Row-vector form of R^T (x - position), then undo the scale: the mesh's own frame.
        local = ((x - position) @ rot) / scale_vec
        points = wp.array(local.astype(np.float32), dtype=wp.vec3, device="cpu")
        result = wp.empty(points.shape[0], dtype=float, device="cpu")
        wp.launch(
            _mesh_signed_distance_kernel,
            dim=points.shape[0],
            inputs=[warp_mesh.id, points],
            outputs=[result],
            device="cpu",
        )
        return result.numpy().astype(np.float64) * min_scale

    coarse_step = _COARSE_CELLS * spacing

    def depth(x: np.ndarray) -> np.ndarray:
        # The distance is 1-Lipschitz: a point nearer to a coarse cell centre than that centre is to
        # the surface lies on the same side, at least the difference away. Only points near the
        # surface need their own BVH query, which makes filling large meshes several times faster.
        cell = np.floor((x - lower) / coarse_step).astype(np.int64)
        cell_lower = cell.min(axis=0)
        cell -= cell_lower
        counts = cell.max(axis=0) + 1
        # Dense coarse grid over the points' cells: about one query per _COARSE_CELLS**3 points.
        grid = np.stack(np.meshgrid(*[np.arange(n) for n in counts], indexing="ij"), axis=-1).reshape(-1, 3)
        grid_depth = exact_depth(lower + (grid + cell_lower + 0.5) * coarse_step)
        centre_depth = grid_depth[np.ravel_multi_index(cell.T, counts)]
        centres = lower + (cell + cell_lower + 0.5) * coarse_step
        margin = np.abs(centre_depth) - np.linalg.norm(x - centres, axis=1)
        result = np.sign(centre_depth) * margin
        unresolved = margin <= 1.0e-3 * spacing
        if np.any(unresolved):
            result[unresolved] = exact_depth(x[unresolved])
        return result

    lattice = _lattice(0.5 * (lower + upper), 0.5 * (upper - lower), spacing)
    return _finish(lattice, depth, spacing, jitter, seed, "mesh")
