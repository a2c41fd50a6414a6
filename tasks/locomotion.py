"""Complex-Locomotion's family on the MPM solver: SoftWalker, a soft quadruped walking at a
commanded velocity by contracting and extending its muscles (active stress, as in DiffTaichi).

A body of soft elastic material (16 x 8 x 4 cm, E = 30 kPa) stands on four 5 cm legs on a rough
floor in a 1 m domain. Each leg is two muscles, its front and its rear half, with vertical fibres
(8 actuation groups): activation a in [-1, 1] adds the Kirchhoff stress a s (F d)(F d)^T, so a > 0
shortens a half-leg and a < 0 lengthens it; a half contracting against its partner bends the leg.

Running cost (per world, per env step) [-]: e / horizon, with the walk error e = |v_xy - v_cmd|^2
/ |v_cmd|^2 + height_weight * (max(0, h_min - h) / h_min)^2, v_xy the horizontal velocity of the
robot's centre of mass (mass-weighted particle velocity) [m/s], v_cmd the commanded velocity, h the
centre of mass's height above the floor [m] and h_min = ``min_height``; e is 1 at rest. The task
has no loss of the state alone, so the episode's objective is the mean walk error over the steps
so far (Complex-Locomotion's objective: track the command all along, not only at the end), each
reward is minus a step's cost, and a robot that stands still returns -1.

Score in [0, 1]: clamp(1 - |v_mean - v_cmd| / |v_cmd|, 0, 1), with v_mean = (horizontal
displacement of the centre of mass since the episode's start) / (time elapsed) [m/s]: 1 when the
robot covered exactly the commanded distance in the commanded direction.

Observation (float32), per world: positions of ``observed_particles`` particles relative to the
centre of mass [m] (3 each), their velocities [m/s] (3 each), the centre of mass's velocity [m/s]
(3) and height above the floor [m] (1), the command (vx, vy) [m/s] (2), and a clock (sin, cos of
2 pi t / ``gait_period``) (2), with t the world's time since the episode's start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import warp as wp

from diffsim.core.scene import Scene, group_actuator
from diffsim.errors import ConfigError, InvalidParameter
from diffsim.geometry import collider_plane
from diffsim.materials import Material, MaterialModel
from diffsim.mpm import MPMBuilder, MPMSolver
from diffsim.mpm.model import BOUNDARY_CELLS, Actuation
from diffsim.tasks.common import mpm_substeps, place_world
from diffsim.tasks.env import register_task
from diffsim.tasks.task import Gather, Task, TaskConfig, subsample

#: the robot's parts [m]: body half extents, leg height, leg half extents (x, y)
BODY_HALF = (0.08, 0.04, 0.02)
LEG_HEIGHT = 0.05
LEG_HALF = (0.02, 0.015)
#: where the body's centre starts, as (x, y) [m] in the 1 m domain
START = (0.2, 0.5)


@dataclass
class WalkerConfig(TaskConfig):
    """A soft quadruped on a rough floor. Lengths in metres, times in seconds.

    The defaults give 1480 particles on a 64^3 grid (19 substeps, ~25-50 ms per env step on one
    CPU core); tests use the ``tiny`` options (32^3 grid, 160 particles, 10 substeps, ~6 ms).
    """

    horizon: int = 100  #: env steps per episode (2 s)
    frame_dt: float = 1.0 / 50.0  #: one env step [s]
    grid_res: int = 64  #: MPM cells per axis of the 1 m domain
    young_modulus: float = 3.0e4  #: of the robot's material [Pa]
    actuation_strength: float = 1.2e4  #: active stress at activation 1 [Pa]
    floor_friction: float = 1.0  #: Coulomb coefficient of the floor [-]
    min_speed: float = 0.05  #: slowest commanded speed [m/s]
    max_speed: float = 0.3  #: fastest commanded speed [m/s]
    max_heading: float = 0.0  #: commanded headings are drawn from [-max_heading, max_heading] [rad] (0: along +x)
    start_offset: float = 0.01  #: the robot starts up to this far off its place along x and y [m]
    gait_period: float = 1.0  #: period of the observation's clock [s]
    min_height: float = 0.04  #: centre-of-mass height above the floor under which the walk error grows [m]
    height_weight: float = 1.0  #: weight of the height term of the walk error [-]
    observed_particles: int = 32  #: particles in the observation

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.grid_res, int) or not 32 <= self.grid_res <= 256:
            raise InvalidParameter("grid_res", self.grid_res, "integers in [32, 256]")
        if not (self.young_modulus > 0 and math.isfinite(self.young_modulus)):
            raise InvalidParameter("young_modulus", self.young_modulus, "(0, inf) Pa")
        if not 0 <= self.actuation_strength <= 0.8 * self.young_modulus:
            raise InvalidParameter("actuation_strength", self.actuation_strength,
                                   f"[0, {0.8 * self.young_modulus:.4g}] Pa (0.8 young_modulus: stronger muscles "
                                   "stretch the material without bound)")
        if not 0 <= self.floor_friction <= 5:
            raise InvalidParameter("floor_friction", self.floor_friction, "[0, 5]")
        if not 0 < self.min_speed <= self.max_speed:
            raise InvalidParameter("min_speed", self.min_speed, f"(0, max_speed = {self.max_speed}] m/s")
        if not 0 <= self.max_heading <= math.pi / 4:
            raise InvalidParameter("max_heading", self.max_heading, "[0, pi/4] rad")
        if not 0 <= self.start_offset <= 0.05:
            raise InvalidParameter("start_offset", self.start_offset, "[0, 0.05] m")
        if not (self.gait_period > 0 and math.isfinite(self.gait_period)):
            raise InvalidParameter("gait_period", self.gait_period, "(0, inf) s")
        if not 0 < self.min_height <= LEG_HEIGHT + 2 * BODY_HALF[2]:
            raise InvalidParameter("min_height", self.min_height, f"(0, {LEG_HEIGHT + 2 * BODY_HALF[2]}] m")
        if not self.height_weight >= 0:
            raise InvalidParameter("height_weight", self.height_weight, "[0, inf)")
        if not isinstance(self.observed_particles, int) or self.observed_particles < 1:
            raise InvalidParameter("observed_particles", self.observed_particles, "integers >= 1")
        # the commanded walk must stay inside the domain (its walls take BOUNDARY_CELLS cells)
        reach = self.max_speed * self.horizon * self.frame_dt
        room = 1.0 - (BOUNDARY_CELLS + 1) / self.grid_res - START[0] - BODY_HALF[0] - self.start_offset
        if reach * math.cos(self.max_heading) > room:
            raise InvalidParameter("max_speed", self.max_speed,
                                   f"(0, {room / (self.horizon * self.frame_dt):.3g}] m/s for a {self.horizon}-step "
                                   "episode: faster walks leave the 1 m domain",
                                   hint="Shorten the horizon or lower max_speed.")


# ------------------------------------------------------------------------------------ kernels
@wp.kernel
def _body_sums(particle_x: wp.array(dtype=wp.vec3), particle_v: wp.array(dtype=wp.vec3),
               particle_world: wp.array(dtype=int), weight: wp.array(dtype=float),
               com_x: wp.array(dtype=wp.vec3), com_v: wp.array(dtype=wp.vec3)):
    p = wp.tid()
    w = particle_world[p]
    wp.atomic_add(com_x, w, weight[p] * particle_x[p])
    wp.atomic_add(com_v, w, weight[p] * particle_v[p])


@wp.kernel
def _walk_error(com_x: wp.array(dtype=wp.vec3), com_v: wp.array(dtype=wp.vec3), command: wp.array(dtype=wp.vec3),
                floor: float, min_height: float, height_weight: float, scale: float, out: wp.array(dtype=float)):
    w = wp.tid()
    c = command[w]
    v = com_v[w]
    error = wp.vec3(v[0] - c[0], v[1] - c[1], 0.0)
    sag = wp.max(min_height - (com_x[w][2] - floor), 0.0) / min_height
    wp.atomic_add(out, w, scale * (wp.dot(error, error) / wp.max(wp.dot(c, c), 1.0e-12) + height_weight * sag * sag))


@wp.kernel
def _relative_positions(particle_x: wp.array(dtype=wp.vec3), index: wp.array2d(dtype=int),
                        com_x: wp.array(dtype=wp.vec3), out: wp.array2d(dtype=float)):
    w, j = wp.tid()
    d = particle_x[index[w, j]] - com_x[w]
    for k in range(3):
        out[w, 3 * j + k] = d[k]


@wp.kernel
def _body_terms(com_x: wp.array(dtype=wp.vec3), com_v: wp.array(dtype=wp.vec3), command: wp.array(dtype=wp.vec3),
                world_time: wp.array(dtype=float), floor: float, omega: float, offset: int,
                out: wp.array2d(dtype=float)):
    w = wp.tid()
    v = com_v[w]
    c = command[w]
    phase = omega * world_time[w]
    out[w, offset + 0] = v[0]
    out[w, offset + 1] = v[1]
    out[w, offset + 2] = v[2]
    out[w, offset + 3] = com_x[w][2] - floor
    out[w, offset + 4] = c[0]
    out[w, offset + 5] = c[1]
    out[w, offset + 6] = wp.sin(phase)
    out[w, offset + 7] = wp.cos(phase)


@register_task
class SoftWalker(Task):
    """Walk at the commanded velocity (Complex-Locomotion's task on a DiffTaichi-style soft robot).

    Actions: the activation of each of the 8 muscles (front and rear half of each leg, legs in
    the order front-left, front-right, rear-left, rear-right) in [-1, 1]. Variant: the commanded
    speed (``min_speed`` .. ``max_speed``) and heading (within ``max_heading`` of +x), and the
    robot's start (within ``start_offset`` along x and y).
    """

    Config = WalkerConfig
    id = "diffsim/SoftWalker-v0"
    tiny = {"grid_res": 32, "horizon": 4, "observed_particles": 8}

    # -- the scene ---------------------------------------------------------------------------
    @property
    def floor_height(self) -> float:
        """The floor plane's height [m]: one cell above the domain's wall cells."""
        return (BOUNDARY_CELLS + 1) / self.config.grid_res

    def robot(self, spacing: float) -> list[tuple[np.ndarray, int]]:
        """The robot's parts as (particle positions [m], actuation group or -1), all from one
        lattice of ``spacing`` [m] so that parts meet without gaps or overlaps."""
        bx, by, bz = BODY_HALF
        lx, ly = LEG_HALF
        lower = np.array([START[0] - bx, START[1] - by, self.floor_height + 0.001])
        counts = np.floor(np.array([2 * bx, 2 * by, LEG_HEIGHT + 2 * bz]) / spacing).astype(int)
        grid = np.stack(np.meshgrid(*[np.arange(n) for n in counts], indexing="ij"), axis=-1).reshape(-1, 3)
        points = lower + (grid + 0.5) * spacing
        rel = points - np.array([START[0], START[1], lower[2]])
        in_body = rel[:, 2] >= LEG_HEIGHT
        parts = [(points[in_body], -1)]
        # legs at the body's corners: front-left, front-right, rear-left, rear-right
        for leg, (sx, sy) in enumerate([(1, 1), (1, -1), (-1, 1), (-1, -1)]):
            cx, cy = sx * (bx - lx), sy * (by - ly)
            in_leg = ~in_body & (np.abs(rel[:, 0] - cx) < lx) & (np.abs(rel[:, 1] - cy) < ly)
            front = rel[:, 0] >= cx
            parts += [(points[in_leg & front], 2 * leg), (points[in_leg & ~front], 2 * leg + 1)]
        for points_of_part, group in parts:
            if len(points_of_part) == 0:
                raise ConfigError(f"grid_res {self.config.grid_res} is too coarse for the robot: "
                                  f"actuation group {group} got no particles.")
        return parts

    def build_scene(self, num_worlds: int, device) -> Scene:
        c = self.config
        builder = MPMBuilder(grid_res=c.grid_res, domain_size=1.0, num_worlds=num_worlds)
        material = Material(MaterialModel.FIXED_COROTATED, density=1000.0, young_modulus=c.young_modulus,
                            poisson_ratio=0.3)
        spacing = 0.5 * builder.dx
        for points, group in self.robot(spacing):
            muscle = Actuation(group, c.actuation_strength, (0.0, 0.0, 1.0)) if group >= 0 else None
            builder.add_particles(points, material, volume=spacing**3, actuation=muscle)
        builder.add_collider(collider_plane(position=(0, 0, self.floor_height), friction=c.floor_friction))
        model = builder.finalize(device, requires_grad=True)
        solver = MPMSolver(model)
        # legs swing at up to ~1 m/s
        substeps = mpm_substeps(model, solver, c.frame_dt, 1.0)
        muscles = group_actuator("muscles", "particle_actuation", model.particle_actuation_group.numpy(),
                                 model.particle_world.numpy(), model.actuation_groups, limit=1.0)
        scene = Scene(model, solver, frame_dt=c.frame_dt, substeps=substeps, actuators=[muscles])
        world = model.particle_world.numpy()
        mass = model.particle_mass.numpy().astype(np.float64)
        world_mass = np.bincount(world, weights=mass, minlength=num_worlds)
        self.weight = wp.array((mass / world_mass[world]).astype(np.float32), dtype=float, device=model.device)
        self.command = wp.zeros(num_worlds, dtype=wp.vec3, device=model.device)
        self._command_host = np.zeros((num_worlds, 3), dtype=np.float32)
        self._start_com = np.zeros((num_worlds, 3))
        self.observed = subsample(world, num_worlds, c.observed_particles)
        self._observed = wp.array(self.observed, dtype=int, device=model.device)
        self.velocities = Gather("particle_v", self.observed, 3)
        return scene

    # -- episodes ----------------------------------------------------------------------------
    def sample_variant(self, rng: np.random.Generator) -> dict:
        c = self.config
        return {"speed": rng.uniform(c.min_speed, c.max_speed),
                "heading": rng.uniform(-c.max_heading, c.max_heading),
                "offset": np.array([*rng.uniform(-c.start_offset, c.start_offset, 2), 0.0])}

    def set_variant(self, state, world: int, variant: dict) -> None:
        place_world(self.scene.model, state, world, offset=variant["offset"])
        speed, heading = variant["speed"], variant["heading"]
        self._command_host[world] = (speed * math.cos(heading), speed * math.sin(heading), 0.0)
        self.command.assign(self._command_host)

    def begin_episode(self, state, mask) -> None:
        com = self.center_of_mass(state)[0].numpy()
        self._start_com[mask] = com[mask]

    # -- observation, cost, score -------------------------------------------------------------
    def center_of_mass(self, state) -> tuple[wp.array, wp.array]:
        """Each world's centre of mass [m] and its velocity [m/s], taped (num_worlds,) vec3 arrays."""
        model = self.scene.model
        grad = state.particle_x.requires_grad
        com_x = wp.zeros(self.num_worlds, dtype=wp.vec3, device=model.device, requires_grad=grad)
        com_v = wp.zeros(self.num_worlds, dtype=wp.vec3, device=model.device, requires_grad=grad)
        wp.launch(_body_sums, dim=model.particle_count,
                  inputs=[state.particle_x, state.particle_v, model.particle_world, self.weight],
                  outputs=[com_x, com_v], device=model.device)
        return com_x, com_v

    @property
    def observation_dim(self) -> int:
        return 6 * self.observed.shape[1] + 8

    def observe(self, state, out) -> None:
        com_x, com_v = self.center_of_mass(state)
        wp.launch(_relative_positions, dim=self.observed.shape, inputs=[state.particle_x, self._observed, com_x],
                  outputs=[out], device=out.device)
        self.velocities(state, out, 3 * self.observed.shape[1])
        wp.launch(_body_terms, dim=self.num_worlds,
                  inputs=[com_x, com_v, self.command, state.world_time, self.floor_height,
                          2.0 * math.pi / self.config.gait_period, 6 * self.observed.shape[1]],
                  outputs=[out], device=out.device)

    running_cost = True

    def loss(self, state, out) -> None:
        """None: the walk is paid for step by step (:meth:`cost`)."""

    def walk_error(self, state, out, scale: float = 1.0) -> None:
        """Add ``scale`` times each world's walk error e (the module header) in ``state`` into
        ``out`` [-]; taped."""
        c = self.config
        com_x, com_v = self.center_of_mass(state)
        wp.launch(_walk_error, dim=self.num_worlds,
                  inputs=[com_x, com_v, self.command, self.floor_height, c.min_height, c.height_weight, scale],
                  outputs=[out], device=out.device)

    def cost(self, state, out) -> None:
        self.walk_error(state, out, 1.0 / self.config.horizon)

    def mean_velocity(self, state) -> np.ndarray:
        """Horizontal displacement of each world's centre of mass since its episode began, over
        the time elapsed [m/s], (num_worlds, 2); zero before the first step."""
        com = self.center_of_mass(state)[0].numpy().astype(np.float64)
        t = state.world_time.numpy().astype(np.float64)
        return (com - self._start_com)[:, :2] / np.where(t > 0, t, np.inf)[:, None]

    def score(self, state) -> np.ndarray:
        command = self._command_host[:, :2].astype(np.float64)
        error = np.linalg.norm(self.mean_velocity(state) - command, axis=1)
        return np.clip(1.0 - error / np.linalg.norm(command, axis=1), 0.0, 1.0)
