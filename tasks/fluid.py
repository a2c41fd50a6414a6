"""FluidLab's family on the MPM solver: Pour (water from a moving cup into a container) and
GatherSand (sand pushed into a region of the floor by a spatula).

Both scenes live in a 0.5 m domain; the material should end up in a target region per world (the
container's cavity, a disc on the floor). The loss is the mass-weighted mean squared distance of
the material outside that region [m^2]; the reward is its decrease; the score is the share of mass
inside the region, normalised from the episode's start (:class:`diffsim.tasks.common.RegionTarget`).

Observation (float32): positions [m] and velocities [m/s] of 64 material particles, the tool's
position [m] and orientation quaternion (x, y, z, w), and the target region's centre [m] (so one
policy can serve every variant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import warp as wp

from diffsim.core.scene import Scene, velocity_actuator
from diffsim.errors import InvalidParameter
from diffsim.geometry import collider_box, collider_mesh, collider_plane
from diffsim.materials import preset
from diffsim.mpm import MPMBuilder, MPMSolver
from diffsim.mpm.model import BOUNDARY_CELLS
from diffsim.tasks.common import (
    RegionTarget,
    mpm_substeps,
    open_box_mesh,
    particle_observation,
    place_world,
    tool_rotations,
)
from diffsim.tasks.env import register_task
from diffsim.tasks.task import Observation, Task, TaskConfig

#: edge of the cubic simulation domain of both tasks [m]
DOMAIN_SIZE = 0.5
GRAVITY = 9.81


def _check_grid(grid_res) -> None:
    if not isinstance(grid_res, int) or not 16 <= grid_res <= 256:
        raise InvalidParameter("grid_res", grid_res, "integers in [16, 256]")


def _check_range(name: str, value, lo: float, hi: float, unit: str) -> None:
    if not (lo < value <= hi):
        raise InvalidParameter(name, value, f"({lo:g}, {hi:g}] {unit}")


class RegionTask(Task):
    """What both tasks share: a floor, material moved by one tool into a region per world, the
    standard particle observation with the tool's pose and the region's centre as goal."""

    region: RegionTarget

    @property
    def dx(self) -> float:
        return DOMAIN_SIZE / self.config.grid_res

    @property
    def floor_height(self) -> float:
        """The floor plane's height [m]: one cell above the domain's wall cells."""
        return (BOUNDARY_CELLS + 1) * self.dx

    def _finish(self, model, substeps: int, actuators: list, tool: int) -> Scene:
        c = self.config
        scene = Scene(model, MPMSolver(model), frame_dt=c.frame_dt, substeps=substeps, actuators=actuators)
        self.goal = wp.zeros((model.num_worlds, 3), dtype=float, device=model.device)
        self._goal_host = np.zeros((model.num_worlds, 3), dtype=np.float32)
        observed = particle_observation(model, tools=[tool], goal=self.goal, samples=c.observed_particles)
        self.observation = Observation(*observed.terms, tool_rotations(model, [tool]))
        return scene

    @staticmethod
    def _slots(model, tool: int) -> np.ndarray:
        return np.array([[w * model.collider_count + tool] for w in range(model.num_worlds)])

    def _set_goal(self, world: int, center) -> None:
        self._goal_host[world] = center
        self.goal.assign(self._goal_host)

    def begin_episode(self, state, mask) -> None:
        self.region.begin(state, mask)

    # -- loss and score ----------------------------------------------------------------------
    def loss(self, state, out) -> None:
        self.region.loss(state, out)

    def score(self, state) -> np.ndarray:
        return self.region.score(state)

    def render_options(self, world: int) -> dict:
        return {}


# ------------------------------------------------------------------------------------ Pour
@dataclass
class PourConfig(TaskConfig):
    """Water poured from a cup into a container. Lengths in metres, times in seconds.

    The defaults give ~4.2k water particles on a 64^3 grid over the 0.5 m domain (36 substeps per
    env step, ~0.2-0.5 s on one CPU core); tests shrink ``grid_res`` to 24 (180 particles).
    """

    horizon: int = 100
    frame_dt: float = 1.0 / 50.0  #: one env step [s]
    grid_res: int = 64  #: MPM cells per axis of the 0.5 m domain
    #: bulk modulus of the weakly compressible water [Pa]: real water's 2.2e9 Pa would need a
    #: ~300x smaller explicit step; 3e4 Pa (sound speed 5.5 m/s) keeps the step affordable, with
    #: density errors of a few percent at the ~2 m/s of the falling stream
    bulk_modulus: float = 3.0e4
    water_depth: float = 0.05  #: height of the water in the cup at the start [m]
    cup_speed: float = 0.3  #: largest cup speed per axis [m/s]
    tilt_rate: float = 2.5  #: largest tilt rate [rad/s]
    observed_particles: int = 64  #: particles in the observation

    def __post_init__(self):
        super().__post_init__()
        _check_grid(self.grid_res)
        _check_range("bulk_modulus", self.bulk_modulus, 1.0e3, 1.0e7, "Pa")
        _check_range("water_depth", self.water_depth, 0.01, 0.07, "m")
        _check_range("cup_speed", self.cup_speed, 0.0, 2.0, "m/s")
        _check_range("tilt_rate", self.tilt_rate, 0.0, 10.0, "rad/s")


@register_task
class Pour(RegionTask):
    """Pour the water of a cup into a container on the floor (FluidLab's Pouring).

    The cup (an 8 x 8 x 8 cm cavity in walls 1.6 cm and at least 3.5 grid cells thick, one mesh
    collider) turns about its pivot, the middle of its rim on the +x side; a positive tilt rate
    lowers that lip, pouring towards +x. The container (a 14 x 14 x 6 cm cavity, also one mesh)
    stands still on the floor, 13-23 cm along +x from the cup.

    Actions: the cup's velocity (vx, vy, vz) [m/s] and its tilt rate about the world y axis
    [rad/s] (4 floats). Variant: the cup's start (+-2 cm per axis) and the container's place
    (+-3 cm along x, +-4 cm along y). Goal: the centre of the container's cavity [m].
    """

    id = "diffsim/Pour-v0"
    Config = PourConfig
    tiny = dict(grid_res=24, horizon=4, observed_particles=16)

    cup_inner = (0.04, 0.04)  #: half widths of the cup's cavity [m]
    cup_depth = 0.08  #: depth of the cup's cavity [m]
    container_inner = (0.07, 0.07)  #: half widths of the container's cavity [m]
    container_depth = 0.06  #: depth of the container's cavity [m]
    cup_start = np.array([0.16, 0.25, 0.12])  #: the cup's centre (x, y) and bottom's height above the floor [m]
    container_start = np.array([0.34, 0.25])  #: the container's centre (x, y) [m]

    @property
    def wall(self) -> float:
        """Wall thickness of cup and container [m]: 1.6 cm, and 3.5 grid cells at least, because grid
        contact pushes material out of a wall through its nearest face: a node that the stencil of
        water against one face reaches (1.5 cells deep) must stay nearer that face than the other."""
        return max(0.016, 3.5 * self.dx)

    def build_scene(self, num_worlds: int, device) -> Scene:
        c = self.config
        wall, floor = self.wall, self.floor_height
        builder = MPMBuilder(grid_res=c.grid_res, domain_size=DOMAIN_SIZE, num_worlds=num_worlds)
        # the cup's mesh frame has its origin at the pivot; cup_base is the pivot seen from the
        # outer bottom's centre
        top = self.cup_depth + wall
        self.cup_base = np.array([self.cup_inner[0] + 0.5 * wall, 0.0, top])
        cup = collider_mesh(open_box_mesh(self.cup_inner, self.cup_depth, wall, origin=self.cup_base), friction=0.2,
                            position=tuple(self._cup_bottom(np.zeros(3)) + self.cup_base))
        container = collider_mesh(open_box_mesh(self.container_inner, self.container_depth, wall), friction=0.2,
                                  position=(*self.container_start, floor))
        # water fills the cup's cavity, kept half a cell off its walls (outside their contact skin)
        margin = 0.5 * self.dx
        half = (self.cup_inner[0] - margin, self.cup_inner[1] - margin, 0.5 * c.water_depth)
        center = self._cup_bottom(np.zeros(3)) + np.array([0.0, 0.0, wall + margin + half[2]])
        builder.add_box(tuple(center), half, preset("water").with_(bulk_modulus=c.bulk_modulus), jitter=0.1, seed=0)
        self.cup = builder.add_collider(cup)
        self.container = builder.add_collider(container)
        builder.add_collider(collider_plane(position=(0, 0, floor), friction=0.5))
        model = builder.finalize(device, requires_grad=True)
        solver = MPMSolver(model)
        # the stream falls from the cup's rim (raised by tilting) into the container
        reach = math.hypot(2 * (self.cup_inner[0] + wall), top)
        fall = self.cup_start[2] + 0.04 + top + reach
        speed = max(c.cup_speed * math.sqrt(3) + c.tilt_rate * reach, math.sqrt(2 * GRAVITY * fall))
        substeps = mpm_substeps(model, solver, c.frame_dt, speed)
        slots = self._slots(model, self.cup)
        actuators = [velocity_actuator("cup", "collider_velocity", slots, limit=c.cup_speed),
                     velocity_actuator("cup_tilt", "collider_angular_velocity", slots, axes=(1,),
                                       limit=c.tilt_rate, unit="rad/s", labels=("wy",))]
        scene = self._finish(model, substeps, actuators, self.cup)
        self.region = RegionTarget(model, "box")
        return scene

    def _cup_bottom(self, offset: np.ndarray) -> np.ndarray:
        """The centre of the cup's outer bottom [m], for a start shifted by ``offset``."""
        return np.array([self.cup_start[0], self.cup_start[1], self.floor_height + self.cup_start[2]]) + offset

    def sample_variant(self, rng: np.random.Generator) -> dict:
        return {"cup_offset": rng.uniform(-0.02, 0.02, 3),
                "container": self.container_start + np.array([rng.uniform(-0.03, 0.03), rng.uniform(-0.04, 0.04)])}

    def set_variant(self, state, world: int, variant: dict) -> None:
        offset = variant["cup_offset"]
        floor = self.floor_height
        container = np.array([*variant["container"], floor])
        place_world(self.scene.model, state, world, offset=offset,
                    tool_positions={self.cup: self._cup_bottom(offset) + self.cup_base, self.container: container})
        # the cavity, from half a cell under its floor (water resting in the contact skin) to the rim
        lo = floor + self.wall - 0.5 * self.dx
        hi = floor + self.wall + self.container_depth
        center = np.array([container[0], container[1], 0.5 * (lo + hi)])
        self.region.set_world(world, center, (*self.container_inner, 0.5 * (hi - lo)))
        self._set_goal(world, center)


# ------------------------------------------------------------------------------------ GatherSand
@dataclass
class GatherSandConfig(TaskConfig):
    """A patch of sand gathered into a disc on the floor. Lengths in metres, times in seconds.

    The defaults give ~3.6k sand particles on a 48^3 grid over the 0.5 m domain (66 substeps
    per env step: sand's 17 m/s elastic waves set the step); tests shrink ``grid_res`` to 24.
    """

    horizon: int = 80
    frame_dt: float = 1.0 / 50.0  #: one env step [s]
    grid_res: int = 48  #: MPM cells per axis of the 0.5 m domain
    patch_size: float = 0.14  #: edge of the square sand patch [m]
    layer: float = 0.025  #: thickness of the sand layer [m]
    disc_radius: float = 0.05  #: radius of the target disc [m]
    spatula_speed: float = 0.3  #: largest spatula speed per axis [m/s]
    yaw_rate: float = 2.0  #: largest spatula turning rate about the vertical [rad/s]
    floor_friction: float = 0.5  #: Coulomb coefficient of the floor [-]
    observed_particles: int = 64  #: particles in the observation

    def __post_init__(self):
        super().__post_init__()
        _check_grid(self.grid_res)
        _check_range("patch_size", self.patch_size, 0.04, 0.18, "m")
        _check_range("layer", self.layer, 0.005, 0.05, "m")
        _check_range("disc_radius", self.disc_radius, 0.01, 0.1, "m")
        _check_range("spatula_speed", self.spatula_speed, 0.0, 2.0, "m/s")
        _check_range("yaw_rate", self.yaw_rate, 0.0, 10.0, "rad/s")
        if not (0 <= self.floor_friction <= 5):
            raise InvalidParameter("floor_friction", self.floor_friction, "[0, 5]")


@register_task
class GatherSand(RegionTask):
    """Push a patch of sand into a disc on the floor with a spatula (FluidLab's Gathering, on a
    granular material).

    The spatula is an upright blade (a box as wide as the patch, 6 cm tall, 1.6 cm and at least
    3.5 grid cells thick) standing on the floor behind the patch, facing +x. The disc lies 13-17 cm
    from the patch's centre, within 25 degrees of +x.

    Actions: the spatula's velocity (vx, vy, vz) [m/s] and its turning rate about the vertical
    [rad/s] (4 floats). Variant: the patch's place (+-2 cm along x, +-3 cm along y) and the disc's
    centre. Goal: the disc's centre on the floor [m].
    """

    id = "diffsim/GatherSand-v0"
    Config = GatherSandConfig
    tiny = dict(grid_res=24, horizon=4, observed_particles=16)

    patch_start = np.array([0.17, 0.25])  #: the patch's centre (x, y) [m]
    blade_height = 0.06  #: height of the spatula [m]

    @property
    def blade_thickness(self) -> float:
        """1.6 cm, and 3.5 grid cells at least (see :attr:`Pour.wall`), so no sand leaks through."""
        return max(0.016, 3.5 * self.dx)

    def build_scene(self, num_worlds: int, device) -> Scene:
        c = self.config
        floor = self.floor_height
        builder = MPMBuilder(grid_res=c.grid_res, domain_size=DOMAIN_SIZE, num_worlds=num_worlds)
        half = 0.5 * c.patch_size
        builder.add_box((*self.patch_start, floor + 0.5 * c.layer), (half, half, 0.5 * c.layer), preset("sand"),
                        jitter=0.1, seed=0)
        blade = collider_box((0.5 * self.blade_thickness, half, 0.5 * self.blade_height), friction=0.5,
                             position=tuple(self._blade_start(np.zeros(2))))
        self.spatula = builder.add_collider(blade)
        # the floor acts last: a node inside both is never pushed into the floor by the blade
        builder.add_collider(collider_plane(position=(0, 0, floor), friction=c.floor_friction))
        model = builder.finalize(device, requires_grad=True)
        solver = MPMSolver(model)
        reach = math.hypot(0.5 * self.blade_thickness, half)
        substeps = mpm_substeps(model, solver, c.frame_dt, c.spatula_speed * math.sqrt(3) + c.yaw_rate * reach)
        slots = self._slots(model, self.spatula)
        actuators = [velocity_actuator("spatula", "collider_velocity", slots, limit=c.spatula_speed),
                     velocity_actuator("spatula_yaw", "collider_angular_velocity", slots, axes=(2,),
                                       limit=c.yaw_rate, unit="rad/s", labels=("wz",))]
        scene = self._finish(model, substeps, actuators, self.spatula)
        self.region = RegionTarget(model, "disc")
        return scene

    def _blade_start(self, offset: np.ndarray) -> np.ndarray:
        """The blade's centre [m]: one cell behind the patch (shifted by ``offset``), on the floor."""
        x = self.patch_start[0] + offset[0] - 0.5 * self.config.patch_size - 0.5 * self.blade_thickness - self.dx
        return np.array([x, self.patch_start[1] + offset[1], self.floor_height + 0.5 * self.blade_height])

    def sample_variant(self, rng: np.random.Generator) -> dict:
        offset = np.array([rng.uniform(-0.02, 0.02), rng.uniform(-0.03, 0.03)])
        distance, angle = rng.uniform(0.13, 0.17), rng.uniform(-1, 1) * math.radians(25)
        disc = self.patch_start + offset + distance * np.array([math.cos(angle), math.sin(angle)])
        return {"patch_offset": offset, "disc": disc}

    def set_variant(self, state, world: int, variant: dict) -> None:
        offset = variant["patch_offset"]
        place_world(self.scene.model, state, world, offset=(*offset, 0.0),
                    tool_positions={self.spatula: self._blade_start(offset)})
        center = np.array([*variant["disc"], self.floor_height])
        self.region.set_world(world, center, self.config.disc_radius)
        self._set_goal(world, center)
