"""Cables on the discrete elastic rod solver: CableShape and CableRoute.

A 0.5 m cable (21 vertices, 50 g/m, bending stiffness 2e-3 N m^2) lies on a rough floor in a
shallow arc (ends 98% of its length apart). Grippers
hold end vertices (the two end vertices of a held end are driven together, so they also hold the
end's direction). The loss is the mean squared distance of the vertices to their target positions
[m^2]; the reward is its decrease; the score is 1 - (mean distance at the end) / (at the start),
clamped to [0, 1].

Observation (float32): every vertex's position [m] and velocity [m/s], and the target positions
of every fifth vertex [m].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from diffsim.core.scene import Scene, velocity_actuator
from diffsim.errors import InvalidParameter
from diffsim.geometry import collider_cylinder
from diffsim.rod import RodBuilder, RodSolver
from diffsim.rod.losses import VertexTargetLoss
from diffsim.tasks.env import register_task
from diffsim.tasks.task import Gather, Observation, Task, TaskConfig


def _arc_half_angle(chord_over_length: float) -> float:
    """Half the angle of a circular arc whose chord is ``chord_over_length`` of its length
    (solves sin(a) / a = ratio by Newton's method)."""
    a = math.sqrt(6 * (1 - chord_over_length))  # the small-angle guess
    for _ in range(20):
        f = math.sin(a) / a - chord_over_length
        a -= f / ((a * math.cos(a) - math.sin(a)) / (a * a))
    return a


@dataclass
class CableConfig(TaskConfig):
    """A cable on a floor. Lengths in metres, times in seconds."""

    horizon: int = 60
    frame_dt: float = 1.0 / 30.0  #: one env step [s]
    vertices: int = 21  #: rod vertices
    length: float = 0.5  #: cable length [m]
    bend_stiffness: float = 2e-3  #: E I [N m^2]
    floor_friction: float = 0.6  #: Coulomb coefficient of the floor [-]
    gripper_speed: float = 0.3  #: largest gripper speed per axis [m/s]

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.vertices, int) or not 5 <= self.vertices <= 200:
            raise InvalidParameter("vertices", self.vertices, "integers in [5, 200]")
        if not 0.05 <= self.length <= 5.0:
            raise InvalidParameter("length", self.length, "[0.05, 5] m")
        if not (self.bend_stiffness > 0 and math.isfinite(self.bend_stiffness)):
            raise InvalidParameter("bend_stiffness", self.bend_stiffness, "(0, inf) N m^2")
        if not 0 < self.gripper_speed <= 5:
            raise InvalidParameter("gripper_speed", self.gripper_speed, "(0, 5] m/s")


class CableTask(Task):
    """The cable scene; subclasses choose the held ends, obstacles and targets."""

    Config = CableConfig
    tiny = {"horizon": 3, "vertices": 11}
    radius = 0.005  #: contact radius of the cable [m]
    held_ends: tuple[str, ...] = ("first", "last")

    def obstacles(self) -> list:
        return []

    #: end-to-end distance of the resting cable over its length: a little slack, so that no
    #: gripper motion asks the inextensible cable to stretch (a taut start whips when pulled)
    slack = 0.98

    def straight(self) -> np.ndarray:
        """The resting cable: a shallow arc along x on the floor, ``slack`` of its length end to end."""
        c = self.config
        half_angle = _arc_half_angle(self.slack)
        radius = c.length / (2 * half_angle)
        angle = np.linspace(-half_angle, half_angle, c.vertices)
        y = radius * (np.cos(angle) - np.cos(half_angle))
        return np.stack([radius * np.sin(angle), y - y.mean(), np.full_like(angle, self.radius)], axis=1)

    def build_scene(self, num_worlds: int, device) -> Scene:
        c = self.config
        builder = RodBuilder(num_worlds=num_worlds)
        n = c.vertices
        ends = {"first": (0, 1), "last": (n - 2, n - 1)}
        driven = [v for end in self.held_ends for v in ends[end]]
        for w in range(num_worlds):
            builder.add_rod(self.straight(), mass_per_length=0.05, bend_stiffness=c.bend_stiffness,
                            twist_stiffness=c.bend_stiffness, linear_damping=1.0, bend_damping=1e-5,
                            contact_radius=self.radius, driven_vertices=driven, world=w)
        builder.add_ground(friction=c.floor_friction)
        for obstacle in self.obstacles():
            builder.add_collider(obstacle)
        model = builder.finalize(device, requires_grad=True)
        solver = RodSolver(model)
        starts = model.rod_vertex_start.numpy()
        self.grippers = [starts[:, None] + np.array(ends[end])[None] for end in self.held_ends]
        actuators = [velocity_actuator(f"gripper_{end}", "vertex_velocity", slots, limit=c.gripper_speed)
                     for end, slots in zip(self.held_ends, self.grippers, strict=True)]
        self.targets = VertexTargetLoss(model)
        self.goal_vertices = np.arange(0, n, 5)
        per_world = starts[:, None] + np.arange(n)[None]
        self.observation = Observation(
            Gather("vertex_x", per_world, 3),
            Gather("vertex_v", per_world, 3),
            Gather(self.targets.targets, per_world[:, self.goal_vertices], 3),
        )
        self._start_distance = np.ones(num_worlds)
        return Scene(model, solver, frame_dt=c.frame_dt, substeps="auto", actuators=actuators)

    # -- episodes ----------------------------------------------------------------------------
    def initial_points(self, variant: dict) -> np.ndarray:
        yaw = variant["yaw"]
        rotation = np.array([[math.cos(yaw), -math.sin(yaw), 0], [math.sin(yaw), math.cos(yaw), 0], [0, 0, 1]])
        return self.straight() @ rotation.T + variant["shift"]

    def set_variant(self, state, world: int, variant: dict) -> None:
        model = self.scene.model
        index = np.flatnonzero(self.targets.vertex_world_host == world)
        x = state.vertex_x.numpy()
        x[index] = self.initial_points(variant)
        state.vertex_x.assign(x)
        self.targets.set_world(world, self.target_points(variant))
        del model

    def target_points(self, variant: dict) -> np.ndarray:
        raise NotImplementedError

    def _distance(self, state) -> np.ndarray:
        x = state.vertex_x.numpy().astype(np.float64)
        d = np.linalg.norm(x - self.targets._targets, axis=1)
        w = self.targets.vertex_world_host
        return np.bincount(w, weights=d, minlength=self.num_worlds) / np.bincount(w, minlength=self.num_worlds)

    def begin_episode(self, state, mask) -> None:
        self._start_distance[mask] = self._distance(state)[mask]

    def score(self, state) -> np.ndarray:
        return np.clip(1.0 - self._distance(state) / np.maximum(self._start_distance, 1e-12), 0.0, 1.0)

    # -- loss and score ----------------------------------------------------------------------
    def loss(self, state, out) -> None:
        self.targets(self.scene.model, state, out)


@register_task
class CableShape(CableTask):
    """Two grippers bring the cable into a target curve on the floor.

    Actions: each gripper's 3-D velocity [m/s] (6 floats). Variant: the cable's start (yaw +-15
    degrees, +-3 cm shift) and the target, a circular arc of the cable's length with a random
    bend (turning 60-180 degrees, either way) placed +-5 cm from the start.
    """

    id = "diffsim/CableShape-v0"

    def sample_variant(self, rng) -> dict:
        return {"yaw": rng.uniform(-0.26, 0.26), "shift": np.array([*rng.uniform(-0.03, 0.03, 2), 0.0]),
                "turn": rng.uniform(math.pi / 3, math.pi) * rng.choice([-1, 1]),
                "target_shift": np.array([*rng.uniform(-0.05, 0.05, 2), 0.0])}

    def target_points(self, variant) -> np.ndarray:
        c = self.config
        s = np.linspace(-0.5, 0.5, c.vertices) * c.length
        k = variant["turn"] / c.length  # signed curvature [1/m]
        # the arc (sin(ks)/k, (1 - cos(ks))/k) written with sinc, so a straight cable (k = 0) is
        # its limit rather than 0/0: transfer paths between bends either way pass through it
        points = np.stack([s * np.sinc(k * s / np.pi), 0.5 * k * s**2 * np.sinc(k * s / (2 * np.pi)) ** 2,
                           np.full_like(s, self.radius)], axis=1)
        points[:, 1] -= points[:, 1].mean()
        return points + variant["target_shift"]


@register_task
class CableRoute(CableTask):
    """Lay the cable around a peg into a target slot: the far end is held still, a gripper carries
    the near end around the peg.

    Actions: the near gripper's 3-D velocity [m/s]. Variant: the cable's start (yaw +-5 degrees,
    +-1 cm) and the slot: the near half must wrap the peg (2 cm radius, touching the cable's
    middle, on a random side) by 70-110 degrees and leave straight along the slot.
    """

    id = "diffsim/CableRoute-v0"
    peg_radius = 0.02

    def interpolate_variant(self, a: dict, b: dict, t: float) -> dict:
        """Linear, but the peg's side is a choice: it switches half-way, never lands on the cable."""
        return {**super().interpolate_variant(a, b, t), "side": a["side"] if t < 0.5 else b["side"]}

    def obstacles(self) -> list:
        return [collider_cylinder(self.peg_radius, 0.05, position=(0.0, 0.1, 0.05), friction=0.3)]

    def build_scene(self, num_worlds, device):
        scene = super().build_scene(num_worlds, device)
        scene.actuators.pop("gripper_last")  # the far end is held still
        return scene

    def sample_variant(self, rng) -> dict:
        return {"yaw": rng.uniform(-0.09, 0.09), "shift": np.array([*rng.uniform(-0.01, 0.01, 2), 0.0]),
                "turn": rng.uniform(math.radians(70), math.radians(110)), "side": float(rng.choice([-1, 1]))}

    def _peg_center(self, variant) -> tuple[np.ndarray, np.ndarray]:
        start = self.initial_points(variant)
        middle = start[self.config.vertices // 2]
        along = (start[-1] - start[0]) / np.linalg.norm(start[-1] - start[0])
        normal = np.array([-along[1], along[0], 0.0]) * variant["side"]
        return middle + normal * (self.peg_radius + self.radius), middle

    def set_variant(self, state, world: int, variant: dict) -> None:
        super().set_variant(state, world, variant)
        center, _ = self._peg_center(variant)
        p = state.collider_position.numpy()
        p[world * self.scene.model.collider_count + 1] = [center[0], center[1], 0.05]
        state.collider_position.assign(p)

    def target_points(self, variant) -> np.ndarray:
        """The far half stays where it lies; the near half wraps the peg, then runs straight."""
        c = self.config
        start = self.initial_points(variant)
        center, middle = self._peg_center(variant)
        radius = self.peg_radius + self.radius
        spacing = c.length / (c.vertices - 1)
        half = c.vertices // 2
        heading = (start[0] - middle) / np.linalg.norm(start[0] - middle)
        spoke = middle - center

        def rotate(v, angle):
            ca, sa = math.cos(angle), math.sin(angle)
            return np.array([ca * v[0] - sa * v[1], sa * v[0] + ca * v[1], v[2]])

        # wrap the way the cable's heading turns: the sign for which the arc leaves along it
        sign = 1.0 if np.dot(rotate(spoke, 1e-3) - spoke, heading) > 0 else -1.0
        out = start.copy()
        arc = variant["turn"] * radius
        for i in range(1, half + 1):
            s = i * spacing
            if s <= arc:
                point = center + rotate(spoke, sign * s / radius)
            else:
                end = center + rotate(spoke, sign * variant["turn"])
                tangent = rotate(heading, sign * variant["turn"])
                point = end + tangent * (s - arc)
            out[half - i] = [point[0], point[1], self.radius]
        return out
