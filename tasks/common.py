"""What MPM task files share: shape targets scored by PlasticineLab's IoU, the standard particle
observation, per-world placement of material and tools, and the advective substep count."""

from __future__ import annotations

import math

import numpy as np
import warp as wp

from diffsim.core.task import Gather, Observation, subsample
from diffsim.mpm.losses import GridMass, grid_iou, grid_l1
from diffsim.mpm.model import MPMModel, MPMState

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
