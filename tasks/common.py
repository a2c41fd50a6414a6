"""What MPM task files share: shape targets scored by PlasticineLab's IoU, target regions scored by
the share of mass inside, the standard particle observation, per-world placement of material and
tools, the advective substep count, and an open-box mesh for cups and trays."""

from __future__ import annotations

import math

import numpy as np
import warp as wp

from diffsim.errors import InvalidParameter
from diffsim.geometry import TriangleMesh
from diffsim.mpm.losses import (
    GridMass,
    box_mass_fraction,
    box_outside_distance,
    disc_mass_fraction,
    disc_outside_distance,
    grid_iou,
    grid_l1,
)
from diffsim.mpm.model import MPMModel, MPMState
from diffsim.tasks.task import Gather, Observation, subsample

#: largest share of a grid cell a particle or tool may cross in one substep
ADVECTIVE_CFL = 0.3


def mpm_substeps(model: MPMModel, solver, frame_dt: float, max_speed: float) -> int:
    """Substeps per frame under both the elastic CFL limit and the advective limit for material and
    tools moving at up to ``max_speed`` [m/s] (tools push material to about their own speed; the
    factor 1.5 covers splashes and rebounds)."""
    stable = solver.max_stable_dt(model)
    advective = ADVECTIVE_CFL * model.dx / max(1.5 * max_speed, 1e-9)
    return max(1, math.ceil(frame_dt / min(stable, advective) * (1 - 1e-9)))


class ShapeTarget:
    """A target shape per world, as grid mass: the L1 shape loss and the normalised IoU score.

    loss = sum |m - t| / sum t per world [-] (0 when the grids agree).
    score = clamp((IoU_T - IoU_0) / (IoU_target - IoU_0), 0, 1), PlasticineLab's normalised
    incremental IoU, with IoU_target = IoU(t, t), the best any state can reach on this grid.
    """

    def __init__(self, model: MPMModel, origin, size: float, res: int):
        self.model = model
        self.grid = GridMass(origin, size, res, model.num_worlds, model.device)
        self.single = GridMass(origin, size, res, 1, model.device)
        shape = (model.num_worlds, res, res, res)
        self.target = wp.zeros(shape, dtype=float, device=model.device)
        self.inv_mass = wp.zeros(model.num_worlds, dtype=float, device=model.device)
        self.iou_start = np.zeros(model.num_worlds)
        self.iou_best = np.ones(model.num_worlds)
        self._target_host = np.zeros(shape, dtype=np.float32)
        self._inv_host = np.zeros(model.num_worlds, dtype=np.float32)

    def set_world(self, world: int, points: np.ndarray, masses: np.ndarray) -> None:
        """World ``world``'s target: particles ``points`` [m] of ``masses`` [kg]."""
        device = self.model.device
        grid = self.single(wp.array(points.astype(np.float32), dtype=wp.vec3, device=device),
                           wp.array(masses.astype(np.float32), dtype=float, device=device),
                           wp.zeros(len(points), dtype=int, device=device)).numpy()[0]
        self._target_host[world] = grid
        self._inv_host[world] = 1.0 / max(float(grid.sum()), 1e-30)
        self.target.assign(self._target_host)
        self.inv_mass.assign(self._inv_host)
        self.iou_best[world] = grid_iou(grid[None], grid[None])[0]

    def mass(self, state: MPMState) -> wp.array:
        return self.grid(state.particle_x, self.model.particle_mass, self.model.particle_world)

    def loss(self, state: MPMState, out: wp.array) -> None:
        grid_l1(self.mass(state), self.target, self.inv_mass, out)

    def iou(self, state: MPMState) -> np.ndarray:
        return grid_iou(self.mass(state).numpy(), self._target_host)

    def begin(self, state: MPMState, mask: np.ndarray) -> None:
        self.iou_start[mask] = self.iou(state)[mask]

    def score(self, state: MPMState) -> np.ndarray:
        gain = self.iou(state) - self.iou_start
        return np.clip(gain / np.maximum(self.iou_best - self.iou_start, 1e-12), 0.0, 1.0)


def world_particles(model: MPMModel, world: int) -> np.ndarray:
    """Indices of the particles of ``world``."""
    return np.flatnonzero(model.particle_world.numpy() == world)


def place_world(model: MPMModel, state: MPMState, world: int, *, offset=(0.0, 0.0, 0.0),
                tool_positions: dict[int, np.ndarray] | None = None) -> None:
    """Write world ``world``'s material (its initial particles shifted by ``offset`` [m], at rest)
    and the positions [m] of some of its tools into ``state``."""
    x = state.particle_x.numpy()
    index = world_particles(model, world)
    x[index] = model.initial_x[index] + np.asarray(offset, dtype=np.float32)
    state.particle_x.assign(x)
    if tool_positions:
        p = state.collider_position.numpy()
        for collider, position in tool_positions.items():
            p[world * model.collider_count + collider] = position
        state.collider_position.assign(p)


def particle_observation(model: MPMModel, *, tools: list[int], goal: wp.array, samples: int = 64,
                         velocity_scale: float = 1.0) -> Observation:
    """Positions [m] and velocities of ``samples`` particles per world, tool positions [m] and a
    per-world goal vector, side by side."""
    index = subsample(model.particle_world.numpy(), model.num_worlds, samples)
    slots = np.array([[w * model.collider_count + c for c in tools] for w in range(model.num_worlds)])
    return Observation(
        Gather("particle_x", index, 3),
        Gather("particle_v", index, 3, scale=velocity_scale),
        Gather("collider_position", slots, 3),
        Gather(goal, np.repeat(np.arange(model.num_worlds)[:, None], 1, axis=1), goal.shape[1]),
    )


def open_box_mesh(inner_half: tuple[float, float], depth: float, wall: float, *, bottom: float | None = None,
                  origin=(0.0, 0.0, 0.0)) -> TriangleMesh:
    """A thick-walled, open-topped box (a cup, a tray) as one closed, outward-oriented mesh of 28
    triangles: a cavity of half widths ``inner_half`` (x, y) [m] and ``depth`` [m] inside walls
    ``wall`` [m] thick over a floor ``bottom`` [m] thick (default ``wall``).

    The outer bottom lies at z = 0 and the rim at z = depth + bottom, with the cavity centred on
    the z axis, before every vertex is shifted by ``-origin`` (so ``origin`` becomes the mesh's
    local origin, e.g. the pivot a tilting cup turns about).
    """
    ix, iy = (float(v) for v in inner_half)
    bottom = wall if bottom is None else float(bottom)
    if min(ix, iy, depth, wall, bottom) <= 0:
        raise InvalidParameter("open_box_mesh sizes", (ix, iy, depth, wall, bottom), "numbers > 0 m")
    ox, oy, top = ix + wall, iy + wall, depth + bottom
    corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]  # counter-clockwise about +z
    rings = [(ox, oy, 0.0), (ox, oy, top), (ix, iy, top), (ix, iy, bottom)]  # outer bottom/top, inner top/bottom
    vertices = np.array([(sx * hx, sy * hy, z) for hx, hy, z in rings for sx, sy in corners]) - np.asarray(origin)
    ob, ot, it, ib = (np.arange(4) + 4 * r for r in range(4))
    # quads with the outward normal of the solid there
    quads = [((ob[0], ob[1], ob[2], ob[3]), (0, 0, -1)), ((ib[0], ib[1], ib[2], ib[3]), (0, 0, 1))]
    for a in range(4):
        b = (a + 1) % 4
        side = np.array([corners[a][0] + corners[b][0], corners[a][1] + corners[b][1], 0.0]) / 2
        quads += [((ob[a], ob[b], ot[b], ot[a]), side), ((ot[a], ot[b], it[b], it[a]), (0, 0, 1)),
                  ((it[a], it[b], ib[b], ib[a]), -side)]
    faces = []
    for (i, j, k, m), normal in quads:
        for tri in ((i, j, k), (i, k, m)):
            p = vertices[list(tri)]
            if np.dot(np.cross(p[1] - p[0], p[2] - p[0]), normal) < 0:
                tri = tri[::-1]
            faces.append(tri)
    return TriangleMesh(vertices, np.array(faces))


class RegionTarget:
    """A region per world that the material should end up in: an axis-aligned box (e.g. a
    container's cavity) or a disc on the floor (a vertical cylinder of unbounded height).

    loss = the mass-weighted mean squared distance of the material outside the region [m^2].
    score = clamp((f_T - f_0) / (1 - f_0), 0, 1), with f the share of mass inside the region and
    f_0 its value at the episode's start.

    Args:
        model: the scene (material masses and worlds).
        kind: ``"box"`` or ``"disc"``.
    """

    def __init__(self, model: MPMModel, kind: str):
        if kind not in ("box", "disc"):
            raise InvalidParameter("kind", kind, "'box' or 'disc'")
        self.model = model
        self.kind = kind
        n = model.num_worlds
        world_mass = np.bincount(model.particle_world.numpy(), weights=model.particle_mass.numpy(), minlength=n)
        self.inv_mass = wp.array((1.0 / np.maximum(world_mass, 1e-30)).astype(np.float32), dtype=float,
                                 device=model.device)
        self._center_host = np.zeros((n, 3), dtype=np.float32)
        self._size_host = np.zeros((n, 3) if kind == "box" else n, dtype=np.float32)
        self.center = wp.zeros(n, dtype=wp.vec3, device=model.device)
        self.size = wp.zeros(n, dtype=wp.vec3 if kind == "box" else float, device=model.device)
        self.start = np.zeros(n)

    def set_world(self, world: int, center, size) -> None:
        """World ``world``'s region: its centre [m] and half extents (box, 3) or radius (disc) [m]."""
        self._center_host[world] = center
        self._size_host[world] = size
        self.center.assign(self._center_host)
        self.size.assign(self._size_host)

    def _args(self, state: MPMState) -> list:
        m = self.model
        return [state.particle_x, m.particle_mass, m.particle_world, self.center, self.size, self.inv_mass]

    def loss(self, state: MPMState, out: wp.array) -> None:
        (box_outside_distance if self.kind == "box" else disc_outside_distance)(*self._args(state), out)

    def fraction(self, state: MPMState) -> np.ndarray:
        """Share of each world's material mass inside its region [-]."""
        return (box_mass_fraction if self.kind == "box" else disc_mass_fraction)(*self._args(state))

    def begin(self, state: MPMState, mask: np.ndarray) -> None:
        self.start[mask] = self.fraction(state)[mask]

    def score(self, state: MPMState) -> np.ndarray:
        gain = self.fraction(state) - self.start
        return np.clip(gain / np.maximum(1.0 - self.start, 1e-12), 0.0, 1.0)


def tool_rotations(model: MPMModel, tools: list[int]) -> Gather:
    """Observation term: the orientation quaternion (x, y, z, w) of each of ``tools``, per world."""
    slots = np.array([[w * model.collider_count + c for c in tools] for w in range(model.num_worlds)])
    return Gather("collider_rotation", slots, 4)


# ------------------------------------------------------------------------------------ per-world reductions
@wp.kernel
def _weighted_sum_vec3(values: wp.array(dtype=wp.vec3), index: wp.array2d(dtype=int),
                       weight: wp.array2d(dtype=float), out: wp.array(dtype=wp.vec3)):
    w, k = wp.tid()
    wp.atomic_add(out, w, weight[w, k] * values[index[w, k]])


class WorldMean:
    """Per-world weighted mean of chosen elements of a vec3 array (a centre of mass, the mean
    velocity of a set of nodes), as a taped (num_worlds,) vec3 array.

    Args:
        index: element index per (world, entry), shape (num_worlds, entries).
        weight: weight per (world, entry) (e.g. particle masses); normalised per world here.
    """

    def __init__(self, index: np.ndarray, weight: np.ndarray | None = None, *, device=None):
        index = np.asarray(index, dtype=np.int32)
        weight = np.ones(index.shape) if weight is None else np.asarray(weight, dtype=np.float64)
        weight = weight / weight.sum(axis=1, keepdims=True)
        self.index = wp.array(index, dtype=int, device=device)
        self.weight = wp.array(weight.astype(np.float32), dtype=float, device=device)
        self.shape = index.shape

    def __call__(self, values: wp.array) -> wp.array:
        out = wp.zeros(self.shape[0], dtype=wp.vec3, device=values.device, requires_grad=values.requires_grad)
        wp.launch(_weighted_sum_vec3, dim=self.shape, inputs=[values, self.index, self.weight], outputs=[out],
                  device=values.device)
        return out


@wp.kernel
def _pack_rows(src: wp.array(dtype=float), reference: wp.array(dtype=float), per_world: int, scale: float,
               offset: int, out: wp.array2d(dtype=float)):
    w, j = wp.tid()
    value = src[w * per_world + j]
    if reference.shape[0] > 0:
        value = value - reference[w * per_world + j]
    out[w, offset + j] = value * scale


def pack_rows(values: wp.array, out: wp.array, offset: int, *, scale: float = 1.0,
              reference: wp.array | None = None) -> int:
    """Write a world-major array (each world's elements contiguous, e.g. the sensors of each
    world in turn, or one vec3 per world), minus ``reference`` (same layout) when given, times
    ``scale``, into columns ``offset ...`` of the observation ``out`` (num_worlds, dim), taped;
    returns the floats written per world."""
    from diffsim.core.scene import flat_view

    flat = flat_view(values)
    ref = flat_view(reference) if reference is not None else wp.zeros(0, dtype=float, device=out.device)
    per_world = flat.shape[0] // out.shape[0]
    wp.launch(_pack_rows, dim=(out.shape[0], per_world), inputs=[flat, ref, per_world, scale, offset],
              outputs=[out], device=out.device)
    return per_world

