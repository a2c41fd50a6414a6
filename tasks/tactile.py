"""DiffTactile's family on the FEM tactile sensor: TactileGrasp (two sensor fingers lift an MPM object)
and SurfaceFollow (one sensor slides over a rigid sphere at a target normal force).

The sensors are 20 x 20 x 4 mm silicone pads (``diffsim.coupling.scenes.add_sensor_pad``) driven
through their backing's velocity; they read markers, pressure, an RGB image and the contact force
(:class:`diffsim.fem.tactile.TactileSensor`). Frames are 2 ms. TactileGrasp's pads step
explicitly with the MPM object, the Scene picking the substeps from the stability limit (~14 us
for the pads); SurfaceFollow's pad takes one implicit step per frame by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import warp as wp

from diffsim.core.scene import Scene, opening_actuator, velocity_actuator
from diffsim.coupling import CoupledModel, CoupledSolver
from diffsim.coupling.scenes import PAD_SIZE, PAD_THICKNESS, add_sensor_pad
from diffsim.errors import InvalidParameter
from diffsim.fem import FEMBuilder, FEMSolver
from diffsim.fem.tactile import TactileSensor
from diffsim.geometry import collider_plane, collider_sphere
from diffsim.materials import preset
from diffsim.mpm import MPMBuilder, MPMSolver
from diffsim.mpm.model import BOUNDARY_CELLS
from diffsim.tasks.common import WorldMean, pack_rows, place_world
from diffsim.tasks.env import register_task
from diffsim.tasks.task import Task, TaskConfig


@dataclass
class TactileConfig(TaskConfig):
    """Settings of the sensor pads. Lengths in metres, times in seconds."""

    horizon: int = 100
    frame_dt: float = 2e-3  #: one env step [s]
    pad_resolution: tuple[int, int, int] = (6, 6, 2)  #: tet-grid cells of each pad (x, y, thickness)
    pad_young_modulus: float = 1e5  #: Young's modulus of the silicone [Pa]
    marker_grid: tuple[int, int] = (4, 4)  #: observed markers per pad (rows, cols)
    image_shape: tuple[int, int] = (24, 32)  #: tactile RGB image of the render inset (height, width) [px]
    speed: float = 0.05  #: largest sensor speed per axis [m/s]
    pad_damping_time: float = 0.0  #: stiffness-proportional (Rayleigh) damping of the silicone [s]
    #: False blinds the policy: the tactile block of the observation (marker displacements, contact
    #: force) reads zero, its size unchanged, so one controller compares with and without touch
    tactile_observation: bool = True

    def __post_init__(self):
        super().__post_init__()
        _in("pad_damping_time", self.pad_damping_time, 0.0, 1e-3, "s")
        res = self.pad_resolution
        if len(res) != 3 or not all(isinstance(n, int) and 1 <= n <= 16 for n in res):
            raise InvalidParameter("pad_resolution", res, "three integers in [1, 16] (cells along x, y, thickness)")
        if not (1e4 <= self.pad_young_modulus <= 1e7):
            raise InvalidParameter("pad_young_modulus", self.pad_young_modulus, "[1e4, 1e7] Pa")
        for name, shape, low in (("marker_grid", self.marker_grid, 1), ("image_shape", self.image_shape, 2)):
            if len(shape) != 2 or not all(isinstance(n, int) and low <= n <= 128 for n in shape):
                raise InvalidParameter(name, shape, f"two integers in [{low}, 128]")
        if not (0 < self.speed <= 0.5):
            raise InvalidParameter("speed", self.speed, "(0, 0.5] m/s")


def _in(name: str, value: float, low: float, high: float, unit: str) -> None:
    if not (low <= value <= high):
        raise InvalidParameter(name, value, f"[{low}, {high}] {unit}".rstrip())


class TactileTask(Task):
    """What both tasks share: the pads' tactile sensor, its observation block and the inset."""

    Config = TactileConfig
    tiny: ClassVar[dict] = {}

    def _sensor(self, fem_model, bodies: np.ndarray) -> TactileSensor:
        c = self.config
        if c.pad_damping_time > 0:
            fem_model.tet_damping.fill_(c.pad_damping_time)
        self.sensor = TactileSensor(fem_model, [int(b) for b in bodies], marker_grid=c.marker_grid,
                                    image_shape=c.image_shape)
        self.sensors_per_world = len(bodies) // self.num_worlds
        rest = self.sensor.read(fem_model, fem_model.state())
        self._marker_rest = wp.clone(rest.marker_position)
        self._reading = None
        return self.sensor

    @property
    def tactile_dim(self) -> int:
        rows, cols = self.config.marker_grid
        return self.sensors_per_world * (3 * rows * cols + 3)

    def observe_tactile(self, fem_model, fem_state, out: wp.array, offset: int) -> int:
        """Marker displacements [mm] (sensor frame, from rest) and contact force [N] (sensor frame)
        of each pad of each world; returns the next free column."""
        reading = self.sensor.read(fem_model, fem_state)
        self._reading = reading  # the render inset shows the last observed image
        if not self.config.tactile_observation:
            return offset + self.tactile_dim  # the block stays zero (observation buffers start zeroed)
        offset += pack_rows(reading.marker_position, out, offset, scale=1e3, reference=self._marker_rest)
        offset += pack_rows(reading.force, out, offset)
        return offset

    def render_options(self, world: int) -> dict:
        if self._reading is None:
            return {}
        h, w = self.config.image_shape
        rgb = self._reading.rgb.numpy().reshape(-1, h, w, 3)[world * self.sensors_per_world]
        return {"inset": (np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)}


# ------------------------------------------------------------------------------------ TactileGrasp
@dataclass
class GraspConfig(TactileConfig):
    """A parallel-jaw gripper of two sensor pads and a cube of MPM material on the ground.

    Loss per world [-]: ``lift_weight * (shortfall / lift)^2 + slip_weight * |slip|^2 /
    slip_length^2 + crush_weight * (max(grip - grip_limit, 0) / grip_limit)^2``, with shortfall =
    max(lift - rise of the object's centre of mass, 0), slip the object's displacement relative to
    the gripper (the mean of the two backings) since the episode began, across the jaw axis (y
    and z) [m], and grip the mean normal force of the two pads [N].
    """

    horizon: int = 100  #: 0.2 s: enough to close 2 mm and lift 8 mm at the default speeds
    grid_res: int = 16  #: MPM cells across the 8 cm domain
    object_size: float = 0.016  #: edge of the cube [m]; smaller than the 20 mm pads, whose edges would push it
    particles_per_edge: int = 8  #: MPM particles along each edge of the cube
    material: str = "rubber"  #: a diffsim.materials preset: "rubber", "silicone" (elastic) or "plasticine"
    gap: float = 0.002  #: initial distance of each pad to the cube [m]
    finger_friction: float = 0.8  #: Coulomb coefficient pad-material [-]
    floor_friction: float = 0.5  #: Coulomb coefficient of the ground [-]
    opening_speed: float = 0.05  #: largest rate the gap widens or closes [m/s]
    lift_range: tuple[float, float] = (0.004, 0.008)  #: lift target of the centre of mass [m]
    grip_limit: float = 1.0  #: grip force above which the object counts as crushed [N]
    crush_force: float = 3.0  #: grip force that ends the episode [N]
    slip_length: float = 0.002  #: relative displacement that costs slip_weight [m]
    lift_weight: float = 1.0
    slip_weight: float = 0.1
    crush_weight: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.grid_res, int) or not 8 <= self.grid_res <= 64:
            raise InvalidParameter("grid_res", self.grid_res, "integers in [8, 64]")
        _in("object_size", self.object_size, 0.008, 0.02, "m")
        if not isinstance(self.particles_per_edge, int) or not 2 <= self.particles_per_edge <= 32:
            raise InvalidParameter("particles_per_edge", self.particles_per_edge, "integers in [2, 32]")
        if self.material not in ("rubber", "silicone", "plasticine"):
            raise InvalidParameter("material", self.material, "'rubber', 'silicone' or 'plasticine'")
        _in("gap", self.gap, 0.0, 0.005, "m")
        _in("finger_friction", self.finger_friction, 0.0, 5.0, "")
        _in("floor_friction", self.floor_friction, 0.0, 5.0, "")
        _in("opening_speed", self.opening_speed, 1e-3, 0.5, "m/s")
        lo, hi = self.lift_range
        if not (0.001 <= lo <= hi <= 0.02):
            raise InvalidParameter("lift_range", self.lift_range, "(low, high) with 1 mm <= low <= high <= 20 mm")
        _in("grip_limit", self.grip_limit, 1e-3, 100.0, "N")
        _in("crush_force", self.crush_force, self.grip_limit, 1000.0, "N (at least grip_limit)")
        _in("slip_length", self.slip_length, 1e-5, 0.1, "m")
        for name in ("lift_weight", "slip_weight", "crush_weight"):
            _in(name, getattr(self, name), 0.0, 1e3, "")


@wp.kernel
def _grasp_terms(com: wp.array(dtype=wp.vec3), gripper: wp.array(dtype=wp.vec3), force: wp.array(dtype=wp.vec3),
                 rest_height: wp.array(dtype=float), start_offset: wp.array(dtype=wp.vec3), slip_length: float,
                 terms: wp.array2d(dtype=float)):
    w = wp.tid()
    # the pads' contact forces in their own frames: pressing is along -z (into the pad)
    grip = -0.5 * (force[2 * w][2] + force[2 * w + 1][2])
    # positions, not velocities: the cube's centre-of-mass velocity rings with every contact
    slip = (com[w] - gripper[w] - start_offset[w]) / slip_length
    terms[w, 0] = com[w][2] - rest_height[w]  # rise [m]
    terms[w, 1] = grip  # [N]
    terms[w, 2] = slip[1] * slip[1] + slip[2] * slip[2]  # across the jaw axis [-]


@wp.kernel
def _grasp_loss(terms: wp.array2d(dtype=float), lift: wp.array(dtype=float), grip_limit: float, lift_weight: float,
                slip_weight: float, crush_weight: float, out: wp.array(dtype=float)):
    w = wp.tid()
    short = wp.max(lift[w] - terms[w, 0], 0.0) / lift[w]
    over = wp.max(terms[w, 1] - grip_limit, 0.0) / grip_limit
    out[w] = out[w] + lift_weight * short * short + slip_weight * terms[w, 2] + crush_weight * over * over


@register_task
class TactileGrasp(TactileTask):
    """Squeeze a 16 mm rubber cube (MPM, 512 particles) between two sensor fingers and lift it to a
    target height without slip or crushing (DiffTactile's grasping task).

    Actions (4 floats): the gripper's translation, both fingers together (3, [m/s], up to
    ``speed``), and the rate the gap between the fingers widens (1, [m/s], up to
    ``opening_speed``; negative closes). Variant: the cube's place (+-1.5 mm along the jaw axis,
    +-2 mm across, so it stays inside the pads' width) and the lift target of its centre of mass
    (4-8 mm).

    Observation (float32, 115 at the defaults): per finger (left, right), the displacements of a
    4 x 4 marker grid from rest in the sensor frame [mm] and the sensor's contact force in its frame
    [N]; both fingers' backing positions [m]; the cube's centre of mass [m] and its velocity
    [m/s]; the target height of the centre of mass [m].

    Score: clamp(rise / lift target, 0, 1), times 0 once the grip force has exceeded
    ``grip_limit`` in the episode (crushed). Terminated: the grip force exceeds ``crush_force``,
    or the cube, once lifted past half the target, falls back below 10% of it (dropped).
    """

    id = "diffsim/TactileGrasp-v0"
    Config = GraspConfig
    tiny = {"horizon": 3, "frame_dt": 5e-4, "grid_res": 12, "particles_per_edge": 4, "pad_resolution": (3, 3, 1),
            "marker_grid": (2, 2), "image_shape": (4, 4)}
    ground = 0.004  #: height of the ground [m]
    domain_size = 0.08  #: edge of the MPM domain [m]

    def build_scene(self, num_worlds: int, device) -> Scene:
        c = self.config
        half, ground = 0.5 * c.object_size, self.ground
        height = ground + 0.5 * PAD_SIZE + 0.001  # the pads' centres, their lower edges 1 mm above the ground
        fem = FEMBuilder(num_worlds=num_worlds)
        turn = math.sqrt(0.5)
        fingers = []
        for w in range(num_worlds):
            # the pads' touching faces (local +z) turned to face the cube: +x for the left, -x for the right
            fingers.append([
                add_sensor_pad(fem, position=(-half - PAD_THICKNESS - c.gap, 0.0, height),
                               rotation=(0.0, turn, 0.0, turn), resolution=c.pad_resolution,
                               young_modulus=c.pad_young_modulus, world=w),
                add_sensor_pad(fem, position=(half + PAD_THICKNESS + c.gap, 0.0, height),
                               rotation=(0.0, -turn, 0.0, turn), resolution=c.pad_resolution,
                               young_modulus=c.pad_young_modulus, world=w)])
        fingers = np.array(fingers)
        # an 8 cm domain whose wall cells end one cell below the ground
        dx = self.domain_size / c.grid_res
        mpm = MPMBuilder(grid_res=c.grid_res, domain_size=self.domain_size, num_worlds=num_worlds,
                         domain_origin=(-0.5 * self.domain_size, -0.5 * self.domain_size,
                                        ground - (BOUNDARY_CELLS + 1) * dx))
        mpm.add_collider(collider_plane(position=(0.0, 0.0, ground), friction=c.floor_friction))
        mpm.add_box((0.0, 0.0, ground + half), (half, half, half), preset(c.material),
                    spacing=c.object_size / c.particles_per_edge)
        mpm_model = mpm.finalize(device, requires_grad=True)
        fem_model = fem.finalize(device, requires_grad=True)
        model = CoupledModel(fem_model, mpm_model, material_friction=c.finger_friction, requires_grad=True)
        solver = CoupledSolver(model, mpm=MPMSolver(mpm_model))
        actuators = [velocity_actuator("gripper", "fem.body_velocity", fingers, limit=c.speed),
                     opening_actuator("opening", "fem.body_velocity", fingers[:, 0], fingers[:, 1], (1.0, 0.0, 0.0),
                                      limit=c.opening_speed)]
        self._sensor(model.fem, fingers.reshape(-1))
        # the object's centre of mass and velocity; the fingers' mean backing velocity
        particle_world = mpm_model.particle_world.numpy()
        particles = np.stack([np.flatnonzero(particle_world == w) for w in range(num_worlds)])
        self.object_mean = WorldMean(particles, mpm_model.particle_mass.numpy()[particles], device=model.device)
        self.gripper_mean = WorldMean(fingers, device=model.device)
        self._gripper_start = model.fem.initial_body_position[fingers[0]].astype(np.float64).mean(axis=0)
        self._host = {"rest_height": np.zeros(num_worlds, np.float32), "lift": np.ones(num_worlds, np.float32),
                      "goal": np.zeros(num_worlds, np.float32), "start_offset": np.zeros((num_worlds, 3), np.float32)}
        self._device = {k: wp.array(v, dtype=wp.vec3 if v.ndim == 2 else float, device=model.device)
                        for k, v in self._host.items()}
        self._initial_x = mpm_model.initial_x[particle_world == 0].astype(np.float64)
        self._mass = mpm_model.particle_mass.numpy()[particle_world == 0].astype(np.float64)
        self._peak_grip = np.zeros(num_worlds)
        self._lifted = np.zeros(num_worlds, bool)
        self._dropped = np.zeros(num_worlds, bool)
        self._grip = np.zeros(num_worlds)
        return Scene(model, solver, frame_dt=c.frame_dt, substeps="auto", actuators=actuators)

    # -- episodes ----------------------------------------------------------------------------
    def sample_variant(self, rng: np.random.Generator) -> dict:
        return {"offset": np.array([rng.uniform(-0.0015, 0.0015), rng.uniform(-0.002, 0.002), 0.0]),
                "lift": rng.uniform(*self.config.lift_range)}

    def set_variant(self, state, world: int, variant: dict) -> None:
        model = self.scene.model
        place_world(model.mpm, state.mpm, world, offset=variant["offset"])
        com = self._mass @ (self._initial_x + variant["offset"]) / self._mass.sum()
        rest = float(com[2])
        self._host["rest_height"][world] = rest
        self._host["start_offset"][world] = com - self._gripper_start
        self._host["lift"][world] = variant["lift"]
        self._host["goal"][world] = rest + variant["lift"]
        for k, v in self._host.items():
            self._device[k].assign(v)

    def begin_episode(self, state, mask) -> None:
        self._peak_grip[mask] = 0.0
        self._lifted[mask] = False
        self._dropped[mask] = False
        self._grip[mask] = 0.0

    # -- observation, loss, score ------------------------------------------------------------
    @property
    def observation_dim(self) -> int:
        return self.tactile_dim + 6 + 3 + 3 + 1

    def observe(self, state, out) -> None:
        model = self.scene.model
        offset = self.observe_tactile(model.fem, state.fem, out, 0)
        offset += pack_rows(state.fem.body_position, out, offset)
        offset += pack_rows(self.object_mean(state.mpm.particle_x), out, offset)
        offset += pack_rows(self.object_mean(state.mpm.particle_v), out, offset)
        pack_rows(self._device["goal"], out, offset)

    def _terms(self, state) -> wp.array:
        c = self.config
        model = self.scene.model
        force, _ = self.sensor.wrench(model.fem, state.fem)
        grad = state.fem.node_x.requires_grad
        terms = wp.zeros((self.num_worlds, 3), dtype=float, device=model.device, requires_grad=grad)
        wp.launch(_grasp_terms, dim=self.num_worlds,
                  inputs=[self.object_mean(state.mpm.particle_x), self.gripper_mean(state.fem.body_position),
                          force, self._device["rest_height"], self._device["start_offset"], c.slip_length],
                  outputs=[terms], device=model.device)
        return terms

    def loss(self, state, out) -> None:
        c = self.config
        wp.launch(_grasp_loss, dim=self.num_worlds,
                  inputs=[self._terms(state), self._device["lift"], c.grip_limit, c.lift_weight, c.slip_weight,
                          c.crush_weight],
                  outputs=[out], device=out.device)

    def after_step(self, state) -> None:
        """Track the episode's peak grip and whether the cube was lifted (for score and drop)."""
        terms = self._terms(state).numpy().astype(np.float64)
        rise, grip = terms[:, 0], terms[:, 1]
        lift = self._host["lift"].astype(np.float64)
        self._peak_grip = np.maximum(self._peak_grip, grip)
        self._dropped = self._lifted & (rise < 0.1 * lift)
        self._lifted |= rise >= 0.5 * lift
        self._grip = grip

    def terminated(self, state) -> np.ndarray:
        """Dropped after a lift, or crushed (grip above ``crush_force``)."""
        return self._dropped | (self._grip > self.config.crush_force)

    def score(self, state) -> np.ndarray:
        rise = self._terms(state).numpy()[:, 0].astype(np.float64)
        intact = self._peak_grip <= self.config.grip_limit
        return np.clip(rise / self._host["lift"], 0.0, 1.0) * intact


# ------------------------------------------------------------------------------------ SurfaceFollow
@dataclass
class FollowConfig(TactileConfig):
    """One sensor pad, facing down, slides over a rigid sphere.

    Loss per world [-]: ``progress_weight * d / L``, with d the great-circle distance [m] from
    the point under the pad's centre to the target point and L that distance at the start; running
    cost per env step [-]: ``force_weight * ((Fn - F*) / F*)^2 / horizon``, with Fn the pad's
    normal contact force [N] and F* the target force. The episode's objective is so the distance
    left plus the mean squared force error over the steps so far: the force is tracked all along,
    as the score measures it.
    """

    horizon: int = 150  #: 0.3 s
    pad_resolution: tuple[int, int, int] = (8, 8, 2)
    speed: float = 0.1
    #: damps the kHz ringing of the pad's surface nodes on the stiff contact springs, which made the
    #: force at a frame's end a sample of that ringing (FD gradients scattered by 5-20%); about 1.5%
    #: of critical at 100 Hz
    pad_damping_time: float = 5e-5
    #: the pad's FEM integrator: "implicit" (one backward-Euler step per frame, see
    #: diffsim.fem.implicit), "quasistatic", or "explicit" (substeps at the stability limit). The
    #: implicit frame's normal force is within 0.13% (of the largest) of steps 8x shorter, where
    #: the explicit one is 2.2% off its own at a quarter step, and it costs 0.8x an explicit frame
    #: (benchmarks/surface_follow_integrators.py)
    integrator: str = "implicit"
    tilt_rate: float = 4.0  #: largest tilt rate of the pad about world x and y [rad/s]
    sphere_radius: float = 0.05  #: [m]
    friction: float = 0.3  #: Coulomb coefficient pad-sphere [-]
    gap: float = 2e-4  #: initial distance of the pad above the sphere's top [m]
    force_range: tuple[float, float] = (0.3, 1.0)  #: target normal force [N]
    path_range: tuple[float, float] = (0.01, 0.02)  #: length of the path along the surface [m]
    shift: float = 0.003  #: largest offset of the sphere's centre from under the pad, per axis [m]
    force_weight: float = 1.0
    progress_weight: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.integrator not in ("explicit", "implicit", "quasistatic"):
            raise InvalidParameter("integrator", self.integrator, "'explicit', 'implicit' or 'quasistatic'")
        _in("tilt_rate", self.tilt_rate, 1e-3, 50.0, "rad/s")
        _in("sphere_radius", self.sphere_radius, 0.015, 1.0, "m")
        _in("friction", self.friction, 0.0, 5.0, "")
        _in("gap", self.gap, 0.0, 0.005, "m")
        lo, hi = self.force_range
        if not (0.01 <= lo <= hi <= 20.0):
            raise InvalidParameter("force_range", self.force_range, "(low, high) with 0.01 N <= low <= high <= 20 N")
        lo, hi = self.path_range
        if not (1e-3 <= lo <= hi <= 0.5 * math.pi * self.sphere_radius):
            raise InvalidParameter("path_range", self.path_range, "(low, high) with 1 mm <= low <= high <= "
                                   f"{0.5 * math.pi * self.sphere_radius:.4g} m (a quarter circle)")
        _in("shift", self.shift, 0.0, 0.2 * self.sphere_radius, "m")
        for name in ("force_weight", "progress_weight"):
            _in(name, getattr(self, name), 0.0, 1e3, "")


@wp.kernel
def _follow_terms(force: wp.array(dtype=wp.vec3), body_position: wp.array(dtype=wp.vec3),
                  body_rotation: wp.array(dtype=wp.quat), collider_position: wp.array(dtype=wp.vec3),
                  collider_count: int, sphere: int, surface_offset: float, radius: float,
                  target_direction: wp.array(dtype=wp.vec3), terms: wp.array2d(dtype=float)):
    w = wp.tid()
    # the point under the pad's centre, seen from the sphere's centre
    p = body_position[w] + wp.quat_rotate(body_rotation[w], wp.vec3(0.0, 0.0, surface_offset))
    r = wp.normalize(p - collider_position[w * collider_count + sphere])
    d = r - target_direction[w]
    chord = wp.sqrt(wp.dot(d, d) + 1.0e-12)
    terms[w, 0] = -force[w][2]  # normal force [N]: pressing is along the pad's -z
    terms[w, 1] = 2.0 * radius * wp.asin(wp.min(0.5 * chord, 1.0))  # distance to go [m]


@wp.kernel
def _follow_loss(terms: wp.array2d(dtype=float), target_force: wp.array(dtype=float),
                 path_length: wp.array(dtype=float), force_weight: float, progress_weight: float,
                 out: wp.array(dtype=float)):
    w = wp.tid()
    e = (terms[w, 0] - target_force[w]) / target_force[w]
    out[w] = out[w] + force_weight * e * e + progress_weight * terms[w, 1] / path_length[w]


@register_task
class SurfaceFollow(TactileTask):
    """Slide a sensor pad over a rigid sphere (5 cm radius) along a great circle to a target point,
    pressing at a target normal force (DiffTactile's surface following).

    Actions (5 floats): the pad's velocity (3, [m/s], up to ``speed``) and its tilt rate about
    world x and y (2, [rad/s], up to ``tilt_rate``). Variant: the sphere's centre (+-3 mm
    sideways from under the pad, so the surface starts tilted), the heading of the path (any
    direction), its length (1-2 cm) and the target force (0.3-1 N).

    Observation (float32, 65 at the defaults): the displacements of a 4 x 4 marker grid from rest
    in the sensor frame [mm], the sensor's contact force in its frame [N], the pad's backing
    position [m] and orientation (quaternion x, y, z, w), the sphere's centre [m], the target
    point on the surface [m] and the target force [N].

    Score: progress x tracking, where progress = clamp(1 - d / L, 0, 1) at the current step and
    tracking = the mean over the episode's steps of clamp(1 - |Fn - F*| / F*, 0, 1) (0 before
    the first step). Never terminated (the horizon truncates).
    """

    id = "diffsim/SurfaceFollow-v0"
    Config = FollowConfig
    tiny = {"horizon": 3, "frame_dt": 5e-4, "pad_resolution": (3, 3, 1), "marker_grid": (2, 2),
            "image_shape": (4, 4)}

    def build_scene(self, num_worlds: int, device) -> Scene:
        c = self.config
        fem = FEMBuilder(num_worlds=num_worlds)
        # the sphere's top at z = 0, where float32 positions are finest (at z = R the rounding of node
        # positions alone moved the contact force by ~1%); the pad faces down (local +z -> world -z)
        self._center = np.array([0.0, 0.0, -c.sphere_radius])
        pads = np.array([[add_sensor_pad(fem, position=(0.0, 0.0, c.gap + PAD_THICKNESS), rotation=(1.0, 0.0, 0.0, 0.0),
                                         resolution=c.pad_resolution, young_modulus=c.pad_young_modulus, world=w)]
                         for w in range(num_worlds)])
        self.sphere = fem.add_collider(collider_sphere(c.sphere_radius, position=tuple(self._center),
                                                       friction=c.friction))
        model = fem.finalize(device, requires_grad=True)
        solver = FEMSolver(model, integrator=c.integrator)
        actuators = [velocity_actuator("sensor", "body_velocity", pads, limit=c.speed),
                     velocity_actuator("tilt", "body_angular_velocity", pads, axes=(0, 1), limit=c.tilt_rate,
                                       unit="rad/s", labels=("wx", "wy"))]
        self._sensor(model, pads.reshape(-1))
        self._start_point = np.array([0.0, 0.0, c.gap])
        vectors, scalars = np.zeros((num_worlds, 3), np.float32), np.ones(num_worlds, np.float32)
        self._host = {"direction": vectors.copy(), "point": vectors.copy(), "center": vectors.copy(),
                      "force": scalars.copy(), "length": scalars.copy()}
        self._device = {k: wp.array(v, dtype=wp.vec3 if v.ndim == 2 else float, device=model.device)
                        for k, v in self._host.items()}
        self._tracking = np.zeros(num_worlds)
        self._steps = np.zeros(num_worlds, np.int64)
        return Scene(model, solver, frame_dt=c.frame_dt, substeps="auto", actuators=actuators)

    # -- episodes ----------------------------------------------------------------------------
    def sample_variant(self, rng: np.random.Generator) -> dict:
        c = self.config
        return {"center": np.array([*rng.uniform(-c.shift, c.shift, 2), 0.0]), "heading": rng.uniform(0, 2 * math.pi),
                "length": rng.uniform(*c.path_range), "force": rng.uniform(*c.force_range)}

    def set_variant(self, state, world: int, variant: dict) -> None:
        c = self.config
        center = self._center + variant["center"]
        p = state.collider_position.numpy()
        p[world * self.scene.model.collider_count + self.sphere] = center
        state.collider_position.assign(p)
        start = self._start_point - center
        start /= np.linalg.norm(start)
        heading = np.array([math.cos(variant["heading"]), math.sin(variant["heading"]), 0.0])
        heading -= heading @ start * start
        heading /= np.linalg.norm(heading)
        angle = variant["length"] / c.sphere_radius
        direction = math.cos(angle) * start + math.sin(angle) * heading
        h = self._host
        h["direction"][world] = direction
        h["point"][world] = center + c.sphere_radius * direction
        h["center"][world] = center
        h["force"][world] = variant["force"]
        h["length"][world] = variant["length"]
        for k, v in h.items():
            self._device[k].assign(v)

    def begin_episode(self, state, mask) -> None:
        self._tracking[mask] = 0.0
        self._steps[mask] = 0

    # -- observation, loss, score ------------------------------------------------------------
    @property
    def observation_dim(self) -> int:
        return self.tactile_dim + 3 + 4 + 3 + 3 + 1

    def observe(self, state, out) -> None:
        offset = self.observe_tactile(self.scene.model, state, out, 0)
        offset += pack_rows(state.body_position, out, offset)
        offset += pack_rows(state.body_rotation, out, offset)
        offset += pack_rows(self._device["center"], out, offset)
        offset += pack_rows(self._device["point"], out, offset)
        pack_rows(self._device["force"], out, offset)

    def _terms(self, state) -> wp.array:
        model = self.scene.model
        force, _ = self.sensor.wrench(model, state)
        terms = wp.zeros((self.num_worlds, 2), dtype=float, device=model.device,
                         requires_grad=state.node_x.requires_grad)
        wp.launch(_follow_terms, dim=self.num_worlds,
                  inputs=[force, state.body_position, state.body_rotation, state.collider_position,
                          model.collider_count, self.sphere, PAD_THICKNESS, self.config.sphere_radius,
                          self._device["direction"]],
                  outputs=[terms], device=model.device)
        return terms

    running_cost = True

    def loss(self, state, out) -> None:
        self._follow_loss(state, out, 0.0, self.config.progress_weight)

    def cost(self, state, out) -> None:
        self._follow_loss(state, out, self.config.force_weight / self.config.horizon, 0.0)

    def _follow_loss(self, state, out, force_weight: float, progress_weight: float) -> None:
        wp.launch(_follow_loss, dim=self.num_worlds,
                  inputs=[self._terms(state), self._device["force"], self._device["length"], force_weight,
                          progress_weight],
                  outputs=[out], device=out.device)

    def _measure(self, state) -> tuple[np.ndarray, np.ndarray]:
        terms = self._terms(state).numpy().astype(np.float64)
        target = self._host["force"].astype(np.float64)
        tracking = np.clip(1.0 - np.abs(terms[:, 0] - target) / target, 0.0, 1.0)
        progress = np.clip(1.0 - terms[:, 1] / self._host["length"], 0.0, 1.0)
        return tracking, progress

    def after_step(self, state) -> None:
        """Accumulate the force-tracking measure the score averages over the episode."""
        tracking, _ = self._measure(state)
        self._tracking += tracking
        self._steps += 1

    def score(self, state) -> np.ndarray:
        _, progress = self._measure(state)
        return progress * self._tracking / np.maximum(self._steps, 1)
