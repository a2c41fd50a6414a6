"""PlasticineLab's family on the MPM solver: Move, Pinch, RollingPin and Writer; RobotMove and
RobotPinch, the same with a MuJoCo gripper and arm as the tools; and Push, the quick-start demo's
task.

A block of plasticine (von Mises, ``preset("plasticine")``) sits on a rough floor in a 1 m domain;
rigid tools driven by velocity actions reshape it. The loss is the L1 distance between the
material's grid mass and the target's (normalised by the target's mass); the reward is its decrease;
the score is PlasticineLab's normalised incremental IoU (:class:`diffsim.tasks.common.ShapeTarget`).

Observation (float32): positions [m] and velocities [m/s] of 64 particles, each tool's position [m],
and the target's centre of mass [m] (so one policy can serve every variant).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import warp as wp

from diffsim.core.scene import Scene, velocity_actuator
from diffsim.coupling.mujoco import MujocoRobot, RobotModel, RobotSolver, robot_actuator
from diffsim.errors import InvalidParameter
from diffsim.geometry import collider_box, collider_capsule, collider_plane, collider_sphere
from diffsim.materials import preset
from diffsim.mpm import MPMBuilder, MPMSolver
from diffsim.mpm.losses import CenterOfMassLoss
from diffsim.mpm.model import BOUNDARY_CELLS
from diffsim.tasks.common import ShapeTarget, mpm_substeps, particle_observation, place_world
from diffsim.tasks.env import register_task
from diffsim.tasks.task import Gather, Observation, Task, TaskConfig


@dataclass
class PlasticineConfig(TaskConfig):
    """A plasticine block reshaped by tools. Lengths in metres, times in seconds.

    The defaults give ~10k particles on a 64^3 grid (PlasticineLab's scale); tests shrink
    ``grid_res`` to 24.
    """

    horizon: int = 50
    frame_dt: float = 1.0 / 50.0  #: one env step [s] (18 substeps at the default grid)
    grid_res: int = 64  #: MPM cells per axis of the 1 m domain
    block_size: float = 0.17  #: edge of the plasticine cube [m]
    floor_friction: float = 1.0  #: Coulomb coefficient of the floor [-]
    tool_speed: float = 0.5  #: largest tool speed per axis [m/s]
    loss_res: int = 32  #: cells per axis of the shape-loss grid (a 0.6 m box around the block)
    observed_particles: int = 64  #: particles in the observation

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.grid_res, int) or not 16 <= self.grid_res <= 256:
            raise InvalidParameter("grid_res", self.grid_res, "integers in [16, 256]")
        if not 0.05 <= self.block_size <= 0.3:
            raise InvalidParameter("block_size", self.block_size, "[0.05, 0.3] m")
        if not (0 < self.tool_speed <= 5.0):
            raise InvalidParameter("tool_speed", self.tool_speed, "(0, 5] m/s")
        if not isinstance(self.loss_res, int) or not 8 <= self.loss_res <= 128:
            raise InvalidParameter("loss_res", self.loss_res, "integers in [8, 128]")


class PlasticineTask(Task):
    """The scene every plasticine task shares; subclasses add tools, actuators and targets."""

    Config = PlasticineConfig
    tiny = {"grid_res": 24, "horizon": 4, "loss_res": 16}
    #: (collider, centre offset from the block's top centre [m]) per tool, set by ``tools``
    tool_offsets: list[np.ndarray]

    def tools(self, block_half: float) -> list:
        """The task's tool colliders, placed relative to the block's top centre at the origin."""
        raise NotImplementedError

    def actuators(self, model, tools: list[int]) -> list:
        """Velocity actuators of each tool (3-D, bounded by ``tool_speed``) unless overridden."""
        c = self.config
        return [velocity_actuator(f"tool{i}", "collider_velocity", self._slots(model, t), limit=c.tool_speed)
                for i, t in enumerate(tools)]

    def target_points(self, points: np.ndarray, variant: dict) -> np.ndarray:
        """The target shape as points [m], made from the block's particles."""
        raise NotImplementedError

    # -- the shared scene --------------------------------------------------------------------
    @property
    def floor_height(self) -> float:
        """The floor plane's height [m]: one cell above the domain's wall cells."""
        return (BOUNDARY_CELLS + 1) / self.config.grid_res

    @property
    def block_top(self) -> np.ndarray:
        return np.array([0.5, 0.5, self.floor_height + self.config.block_size])

    def build_scene(self, num_worlds: int, device) -> Scene:
        c = self.config
        builder = self._block_and_floor(num_worlds)
        placed = self.tools(0.5 * c.block_size)
        self.tool_colliders = []
        for collider, offset in placed:
            position = tuple(float(v) for v in self.block_top + offset)
            self.tool_colliders.append(builder.add_collider(dataclasses.replace(collider, position=position)))
        self.tool_offsets = [np.asarray(offset, dtype=np.float64) for _, offset in placed]
        model = builder.finalize(device, requires_grad=True)
        solver = MPMSolver(model)
        substeps = mpm_substeps(model, solver, c.frame_dt, c.tool_speed * math.sqrt(3))
        scene = Scene(model, solver, frame_dt=c.frame_dt, substeps=substeps,
                      actuators=self.actuators(model, self.tool_colliders))
        self._target_and_observation(model)
        return scene

    def _block_and_floor(self, num_worlds: int) -> MPMBuilder:
        c = self.config
        builder = MPMBuilder(grid_res=c.grid_res, domain_size=1.0, num_worlds=num_worlds)
        half = 0.5 * c.block_size
        center = (0.5, 0.5, self.floor_height + half)
        builder.add_box(center, (half, half, half), preset("plasticine"), jitter=0.1, seed=0)
        builder.add_collider(collider_plane(position=(0, 0, self.floor_height), friction=c.floor_friction))
        return builder

    def _target_and_observation(self, model) -> None:
        c = self.config
        lo = np.array([0.2, 0.2, self.floor_height - 0.02])
        self.shape = ShapeTarget(model, lo, 0.6, c.loss_res)
        self.goal = wp.zeros((model.num_worlds, 3), dtype=float, device=model.device)
        self._goal_host = np.zeros((model.num_worlds, 3), dtype=np.float32)
        self.observation = particle_observation(model, tools=self.tool_colliders, goal=self.goal,
                                                samples=c.observed_particles)
        self._block_points = model.initial_x[model.particle_world.numpy() == 0].astype(np.float64)
        self._block_mass = model.particle_mass.numpy()[model.particle_world.numpy() == 0]

    @staticmethod
    def _slots(model, collider: int) -> np.ndarray:
        return np.array([[w * model.collider_count + collider] for w in range(model.num_worlds)])

    # -- episodes ----------------------------------------------------------------------------
    def sample_variant(self, rng: np.random.Generator) -> dict:
        return {"offset": np.array([*rng.uniform(-0.03, 0.03, 2), 0.0]), **self.sample_target(rng)}

    def sample_target(self, rng: np.random.Generator) -> dict:
        return {}

    def set_variant(self, state, world: int, variant: dict) -> None:
        offset = variant["offset"]
        tools = {c: self.block_top + o + offset for c, o in zip(self.tool_colliders, self.tool_offsets, strict=True)}
        place_world(self.scene.model, state, world, offset=offset, tool_positions=tools)
        self._set_target(world, variant)

    def _set_target(self, world: int, variant: dict) -> None:
        offset = variant["offset"]
        target = self.target_points(self._block_points + offset, variant)
        # every particle of the block has the same mass: a target particle weighs as much
        self.shape.set_world(world, target, np.full(len(target), self._block_mass[0]))
        self._goal_host[world] = target.mean(axis=0)
        self.goal.assign(self._goal_host)

    def begin_episode(self, state, mask) -> None:
        self.shape.begin(state, mask)

    # -- loss and score ----------------------------------------------------------------------
    def loss(self, state, out) -> None:
        self.shape.loss(state, out)

    def score(self, state) -> np.ndarray:
        return self.shape.score(state)


@register_task
class Move(PlasticineTask):
    """Carry the block to a target place with two spherical grippers (PlasticineLab's Move).

    Actions: 3-D velocity of each sphere [m/s] (6 floats). Variant: the block's start (+-3 cm)
    and the target's displacement (+-10 cm sideways, up to 5 cm up).
    """

    id = "diffsim/Move-v0"

    def tools(self, half: float) -> list:
        r = 0.4 * half
        return [(collider_sphere(r, friction=1.0), np.array([-(half + r + 0.005), 0.0, -half])),
                (collider_sphere(r, friction=1.0), np.array([half + r + 0.005, 0.0, -half]))]

    def sample_target(self, rng) -> dict:
        return {"displacement": np.array([*rng.uniform(-0.1, 0.1, 2), rng.uniform(0.0, 0.05)])}

    def target_points(self, points, variant) -> np.ndarray:
        return points + variant["displacement"]


@register_task
class Pinch(PlasticineTask):
    """Press a dent into the top of the block with a sphere (PlasticineLab's Pinch).

    Actions: the sphere's 3-D velocity [m/s]. Variant: the block's start and the dent (a sphere
    of radius 3.5-5 cm whose centre is 1-2 cm below the top, +-3 cm off-centre).
    """

    id = "diffsim/Pinch-v0"

    def tools(self, half: float) -> list:
        return [(collider_sphere(0.04, friction=0.5), np.array([0.0, 0.0, 0.05]))]

    def sample_target(self, rng) -> dict:
        return {"dent_offset": np.array([*rng.uniform(-0.03, 0.03, 2), -rng.uniform(0.02, 0.03)]),
                "dent_radius": rng.uniform(0.035, 0.05)}

    def target_points(self, points, variant) -> np.ndarray:
        center = self.block_top + variant["offset"] + variant["dent_offset"]
        return points[np.linalg.norm(points - center, axis=1) > variant["dent_radius"]]


@register_task
class RollingPin(PlasticineTask):
    """Roll the block flat with a rolling pin (PlasticineLab's RollingPin).

    Actions: the pin's 3-D velocity [m/s] and its spin about its own axis [rad/s]. Variant: the
    block's start and the target sheet's thickness (45-70% of the block; volume kept, spread
    along x).
    """

    id = "diffsim/RollingPin-v0"

    def tools(self, half: float) -> list:
        axis_y = (math.sin(math.pi / 4), 0.0, 0.0, math.cos(math.pi / 4))  # local z -> world y
        return [(collider_capsule(0.03, 1.2 * half, rotation=(axis_y[0], 0, 0, axis_y[3]), friction=0.8),
                 np.array([0.0, 0.0, 0.035]))]

    def actuators(self, model, tools) -> list:
        c = self.config
        slots = self._slots(model, tools[0])
        return [velocity_actuator("pin", "collider_velocity", slots, limit=c.tool_speed),
                velocity_actuator("pin_spin", "collider_angular_velocity", slots, axes=(1,),
                                  limit=c.tool_speed / 0.03, unit="rad/s", labels=("wy",))]

    def sample_target(self, rng) -> dict:
        return {"thickness": rng.uniform(0.45, 0.7)}

    def target_points(self, points, variant) -> np.ndarray:
        s = variant["thickness"]
        floor, center_x = self.floor_height, points[:, 0].mean()
        out = points.copy()
        out[:, 2] = floor + (points[:, 2] - floor) * s
        out[:, 0] = center_x + (points[:, 0] - center_x) / s
        return out


@register_task
class Writer(PlasticineTask):
    """Carve a stroke into the block's top with a pen (PlasticineLab's Writer).

    Actions: the pen's 3-D velocity [m/s]. Variant: the block's start and the stroke (a 1.5 cm
    deep, 2 cm wide straight groove through the top at a random angle and offset).
    """

    id = "diffsim/Writer-v0"

    def tools(self, half: float) -> list:
        return [(collider_capsule(0.01, 0.05, friction=0.3), np.array([0.0, 0.0, 0.07]))]

    def sample_target(self, rng) -> dict:
        return {"angle": rng.uniform(0, math.pi), "shift": rng.uniform(-0.03, 0.03)}

    def target_points(self, points, variant) -> np.ndarray:
        top = self.block_top + variant["offset"]
        direction = np.array([math.cos(variant["angle"]), math.sin(variant["angle"]), 0.0])
        normal = np.array([-direction[1], direction[0], 0.0])
        across = (points - top) @ normal - variant["shift"]
        groove = (np.abs(across) < 0.01) & (points[:, 2] > top[2] - 0.015)
        return points[~groove]


# ------------------------------------------------------------------------------------ robots
class RobotPlasticineTask(PlasticineTask):
    """A plasticine task whose tools are the geoms of a MuJoCo robot (:mod:`diffsim.coupling.mujoco`,
    two-way: the material pushes back on the robot). Actions are the robot's MJCF actuator commands;
    the observation adds its joint positions; ``tool_speed`` is unused (the actuators bound it)."""

    robot_file: ClassVar[str] = ""  #: MJCF file (in ``assets/robots``)
    robot_bodies: ClassVar[tuple[str, ...]] = ()  #: bodies whose geoms touch the material
    #: bound on the speed of any coupled geom's surface under the actuators' limits [m/s] (it sets
    #: the MPM substeps)
    robot_speed: ClassVar[float] = 1.0

    def robot_home(self, variant: dict) -> np.ndarray:
        """Joint positions at an episode's start (default: the MJCF's home)."""
        return self.robot.initial_qpos

    def build_scene(self, num_worlds: int, device) -> Scene:
        c = self.config
        builder = self._block_and_floor(num_worlds)
        self.robot = MujocoRobot(self.robot_file, bodies=self.robot_bodies, num_worlds=num_worlds)
        self.tool_colliders = self.robot.add_to(builder)
        self.tool_offsets = []
        soft = builder.finalize(device, requires_grad=True)
        model = RobotModel(soft, self.robot, self.tool_colliders)
        mpm = MPMSolver(soft)
        substeps = mpm_substeps(soft, mpm, c.frame_dt, self.robot_speed)
        scene = Scene(model, RobotSolver(mpm, model), frame_dt=c.frame_dt, substeps=substeps,
                      actuators=[robot_actuator(model)])
        self._target_and_observation(soft)
        joints = np.arange(num_worlds)[:, None] * self.robot.nq + np.arange(self.robot.nq)[None, :]
        self.observation = Observation(*self.observation.terms, Gather("robot_qpos", joints, 1))
        return scene

    def set_variant(self, state, world: int, variant: dict) -> None:
        place_world(self.scene.model.soft, state, world, offset=variant["offset"])
        self.scene.model.set_joint_positions(state, world, self.robot_home(variant))
        self._set_target(world, variant)


@dataclass
class RobotMoveConfig(PlasticineConfig):
    """RobotMove's scene: a 10 cm block (1.5 kg) on a smoother floor, so that jaws of finite force
    can carry it (Move's 7 kg block on friction 1 needs 72 N to slide, and plasticine yields first)."""

    block_size: float = 0.10
    floor_friction: float = 0.3


@register_task
class RobotMove(RobotPlasticineTask, Move):
    """Move with a parallel-jaw gripper on a gantry (``assets/robots/gripper.xml``): grasp the block
    between the jaws and carry it to the target.

    Actions: the hand's velocity along x, y, z [m/s] and the closing of each jaw [m] (4 floats).
    Each episode starts with the open jaws straddling the block, 1 cm above the floor. Variant: the
    block's start (+-3 cm) and the target's displacement along the floor (+-10 cm in x and y). Unlike
    Move's kinematic tools, the jaws squeeze with at most 24 N, which holds the block against the
    floor's friction but cannot lift it: no target lies above the floor.
    """

    id = "diffsim/RobotMove-v0"
    Config = RobotMoveConfig
    tiny = {"grid_res": 24, "horizon": 8, "loss_res": 16, "block_size": 0.18}
    robot_file = "gripper.xml"
    robot_bodies = ("left_finger", "right_finger")
    robot_speed = 0.5 * math.sqrt(3) + 0.4  # the hand's speed limit plus a jaw's largest closing speed

    def sample_target(self, rng) -> dict:
        return {"displacement": np.array([*rng.uniform(-0.1, 0.1, 2), 0.0])}

    def robot_home(self, variant: dict) -> np.ndarray:
        # the pads' lowest face at the MJCF home: their centres less their half heights
        centres = self.robot.geom_poses(self.robot.initial_qpos)[0][:, 2]
        pad_bottom = float(np.min(centres - self.robot.mj_model.geom_size[self.robot.geom_ids, 2]))
        offset = variant["offset"]
        return np.array([offset[0], offset[1], self.floor_height + 0.01 - pad_bottom, 0.0, 0.0])


@register_task
class RobotPinch(RobotPlasticineTask, Pinch):
    """Pinch with a six-joint arm (``assets/robots/arm6.xml``): press the dent into the block with
    the arm's hand and fingertips.

    Actions: the six joints' velocities [rad/s] and the closing of each jaw [m] (7 floats). Each
    episode starts at the arm's home, the hand pointing down above the block's centre. Variant: as
    Pinch's.
    """

    id = "diffsim/RobotPinch-v0"
    tiny = {"grid_res": 24, "horizon": 4, "loss_res": 16, "block_size": 0.08}
    robot_file = "arm6.xml"
    robot_bodies = ("hand", "left_finger", "right_finger")
    # a bound over the joints: |w| times the farthest coupled point from each axis (0.75 m from the
    # base and shoulder axes, 0.45 m from the elbow's, 0.12 m from the wrist's) plus the jaws' 0.05 m/s
    robot_speed = 0.75 + 0.75 + 0.45 + 2 * (0.12 + 0.06 + 0.06) + 0.05


@dataclass
class PushConfig(TaskConfig):
    """A box pusher shoves a small plasticine block across a rough floor so that its centre of
    mass lands on a target (the quick-start demo's scene). Lengths in metres, times in seconds."""

    horizon: int = 20
    frame_dt: float = 1.0 / 60.0
    grid_res: int = 32  #: MPM cells per axis
    domain_size: float = 0.32  #: edge of the cubic domain [m]
    floor_height: float = 0.04  #: height of the floor plane [m] (above the 3-cell wall layer)
    floor_friction: float = 1.0  #: Coulomb coefficient of the rough floor [-]
    block_center_xy: tuple[float, float] = (0.12, 0.16)  #: block centre in the floor plane [m]
    block_half_extents: tuple[float, float, float] = (0.02, 0.02, 0.015)  #: [m]
    particle_spacing: float = 0.0035  #: distance between neighbouring particles [m]
    particle_jitter: float = 0.1  #: random offset of each particle, as a fraction of the spacing
    jitter_seed: int = 0  #: seed of the particle jitter
    pusher_half_extents: tuple[float, float, float] = (0.01, 0.035, 0.025)  #: [m]
    pusher_gap: float = 0.002  #: distance between the pusher face and the block at rest [m]
    pusher_lift: float = 0.003  #: clearance between the pusher and the floor [m]
    pusher_friction: float = 0.3  #: Coulomb coefficient of the pusher [-]
    target_offset: tuple[float, float, float] = (0.06, 0.0, 0.0)  #: target minus initial centre of mass [m]
    target_jitter: float = 0.02  #: variants move the target by up to this much in x and y [m]
    max_speed: float = 0.5  #: largest pusher speed per axis [m/s]

    def __post_init__(self):
        super().__post_init__()
        for name in ("domain_size", "particle_spacing", "max_speed"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise InvalidParameter(name, value, "(0, inf)")
        if not (0 <= self.target_jitter < 0.5 * self.domain_size):
            raise InvalidParameter("target_jitter", self.target_jitter, f"[0, {0.5 * self.domain_size:g}) m")


@register_task
class Push(Task):
    """Push a plasticine block so that its centre of mass reaches a target on the floor.

    Actions: the pusher's horizontal velocity (vx, vy) [m/s]. Variant: the target, ``target_offset``
    from the block's centre of mass plus up to ``target_jitter`` in x and y. Loss: squared distance
    of the centre of mass to the target [m^2]; score: 1 - final distance / initial distance, clamped
    to [0, 1]. Observation: 64 particles' positions [m] and velocities [m/s], the pusher's position
    [m] and the target [m].
    """

    id = "diffsim/Push-v0"
    Config = PushConfig
    tiny = {"horizon": 4, "particle_spacing": 0.006}

    def build_scene(self, num_worlds: int, device) -> Scene:
        c = self.config
        builder = MPMBuilder(grid_res=c.grid_res, domain_size=c.domain_size, num_worlds=num_worlds)
        half = np.asarray(c.block_half_extents, dtype=float)
        center = np.array([*c.block_center_xy, c.floor_height + half[2]])
        builder.add_box(tuple(center), tuple(half), preset("plasticine"), spacing=c.particle_spacing,
                        jitter=c.particle_jitter, seed=c.jitter_seed)
        builder.add_collider(collider_plane(position=(0.0, 0.0, c.floor_height), friction=c.floor_friction))
        pusher_half = np.asarray(c.pusher_half_extents, dtype=float)
        position = (center[0] - half[0] - c.pusher_gap - pusher_half[0], center[1],
                    c.floor_height + c.pusher_lift + pusher_half[2])
        self.pusher = builder.add_collider(collider_box(tuple(pusher_half), position=position,
                                                        friction=c.pusher_friction))
        model = builder.finalize(device, requires_grad=True)
        solver = MPMSolver(model)
        slots = np.array([[w * model.collider_count + self.pusher] for w in range(num_worlds)])
        pusher = velocity_actuator("pusher", "collider_velocity", slots, limit=c.max_speed, axes=(0, 1))
        mass = model.particle_mass.numpy().astype(np.float64)
        world0 = model.particle_world.numpy() == 0
        self.initial_com = (model.initial_x[world0] * mass[world0, None]).sum(axis=0) / mass[world0].sum()
        self.com = CenterOfMassLoss(model, self.initial_com)
        self.goal = wp.zeros((num_worlds, 3), dtype=float, device=model.device)
        self.observation = particle_observation(model, tools=[self.pusher], goal=self.goal)
        self._start = np.ones(num_worlds)
        substeps = mpm_substeps(model, solver, c.frame_dt, c.max_speed * math.sqrt(2))
        return Scene(model, solver, frame_dt=c.frame_dt, substeps=substeps, actuators=[pusher])

    def sample_variant(self, rng) -> dict:
        jitter = self.config.target_jitter
        shift = np.array([*rng.uniform(-jitter, jitter, 2), 0.0]) if jitter > 0 else np.zeros(3)
        return {"target": self.initial_com + np.asarray(self.config.target_offset) + shift}

    def set_variant(self, state, world: int, variant: dict) -> None:
        self.com.set_world(world, variant["target"])
        goal = self.goal.numpy()
        goal[world] = variant["target"]
        self.goal.assign(goal)

    def _distance(self, state) -> np.ndarray:
        return np.linalg.norm(self.com.centers(self.scene.model, state) - self.com.targets.numpy(), axis=1)

    def begin_episode(self, state, mask) -> None:
        self._start[mask] = self._distance(state)[mask]

    def score(self, state) -> np.ndarray:
        return np.clip(1.0 - self._distance(state) / np.maximum(self._start, 1e-12), 0.0, 1.0)

    # -- loss and score ----------------------------------------------------------------------
    def loss(self, state, out) -> None:
        self.com.per_world(self.scene.model, state, out)
