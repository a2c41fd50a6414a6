"""MuJoCo robots driving the soft solvers: :class:`MujocoRobot` (an MJCF robot whose chosen bodies'
geoms become colliders), :class:`RobotModel` and :class:`RobotSolver` (a soft solver and the robot
stepped together under the Model/State/Control protocol).

The robot's joint state lives in the State (``robot_qpos``, ``robot_qvel``, ``robot_act``, and
``robot_wrench``, what the material pushes on each coupled body with) and its commands in the
Control (``robot_ctrl``, one entry per MJCF actuator), beside the soft solver's own arrays under
their usual names; so scenes, rollouts, checkpoints, tasks and world resets handle a robot scene
like any other, and a robot is actuated by a plain :class:`~diffsim.core.scene.Actuator` on
``robot_ctrl`` (:func:`robot_actuator`).

One coupled step of ``dt`` (staggered, explicit):

1. MuJoCo advances ``dt`` in ``ceil(dt / timestep)`` equal steps under ``robot_ctrl``, with the
   wrench the material exerted during the previous step applied to each coupled body as
   ``xfrc_applied`` (held over the step);
2. each coupled geom's collider moves from its pose in the soft state to the geom's new pose at a
   constant linear and angular velocity (so soft and rigid poses never drift apart), the soft solver
   steps, and measures the force and torque the material exerts on every collider.

Staggering delays the reaction by one soft step (well under a millisecond); it is stable while
the robot's servos and inertia respond slowly over one step, which holds for position-servoed arms
and grippers against soft matter.

Every soft frame the robot carries (a geom's collider, a mounted FEM body) is a *follower*: a
body of the robot and a fixed pose in that body's frame.

Gradients: MuJoCo is not on Warp's tape, so a taped step records two custom functions there. One
maps gradients on the followers' velocities and poses to the robot's joint positions through
MuJoCo's Jacobians at each follower (``mj_jac``), and through MuJoCo's step by its transition
Jacobians (``mjd_transitionFD``, centred differences) to the previous joint state, to
``robot_ctrl`` and to the wrench applied during the step (centred differences of ``mj_step`` in
``xfrc_applied``). The other carries gradients on that wrench back to what the soft solver
measured (its taped collider wrench, or a mounted body's nodal contact forces), so the material's
reaction on the robot is differentiated too. Held constant in the backward pass: the lever arms
from the contact points to the body's centre of mass (exact for a single-geom body's collider).
Gradients need hinge and slide joints (``nq == nv``). ``tests/test_mujoco_coupling.py`` checks
them against central differences of whole two-way rollouts.

MPM material and rods couple both ways (their solvers measure collider wrenches). FEM bodies (a
tactile sensor's backing) can be mounted on robot bodies (``RobotModel(mounts=...)``): the robot
carries them and feels the contact force on their nodes. The soft model may be a coupled scene's
:class:`~diffsim.coupling.CoupledModel`: the robot's geoms are then colliders of the parts named
(``{"mpm": [...], "rod": [...]}``), a mounted sensor presses the material and rods through the
coupled solver's contact, and the robot's arrays sit beside the parts' (``state.robot_qpos``
beside ``state.fem.node_x``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import warp as wp

from diffsim.core.protocol import BundleGroup, Solver
from diffsim.core.scene import Actuator, taping
from diffsim.errors import ConfigError, InvalidParameter, SimulationDiverged
from diffsim.geometry import Collider, ShapeType, TriangleMesh
from diffsim.geometry.motion import rotation_vector

__all__ = ["MujocoRobot", "RobotModel", "RobotSolver", "robot_actuator", "ASSETS"]

#: the MJCF robots shipped with diffsim (``assets/robots``)
ASSETS = Path(__file__).resolve().parents[2] / "assets" / "robots"

_SHAPES = {"box": ShapeType.BOX, "sphere": ShapeType.SPHERE, "capsule": ShapeType.CAPSULE,
           "cylinder": ShapeType.CYLINDER, "mesh": ShapeType.MESH}


def _runtime():
    from warp._src.context import runtime

    return runtime


def _quat_xyzw(xmat: np.ndarray) -> np.ndarray:
    import mujoco

    q = np.empty(4)
    mujoco.mju_mat2Quat(q, np.ascontiguousarray(xmat, dtype=np.float64).reshape(9))
    return np.array([q[1], q[2], q[3], q[0]])


def _quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ax, ay, az, aw = a
    bx, by, bz, bw = b
    return np.array([aw * bx + ax * bw + ay * bz - az * by, aw * by - ax * bz + ay * bw + az * bx,
                     aw * bz + ax * by - ay * bx + az * bw, aw * bw - ax * bx - ay * by - az * bz])


def _rotation_to_quaternion_gradient(q: np.ndarray, g_theta: np.ndarray) -> np.ndarray:
    """d(loss)/d(q) (4 floats) of a loss whose gradient with respect to a small world-axis rotation
    of the orientation ``q`` (x, y, z, w) is ``g_theta``: the rotation is 2 vec(dq q*)."""
    conj = np.array([-q[0], -q[1], -q[2], q[3]])
    m = np.stack([2.0 * _quat_mul(e, conj)[:3] for e in np.eye(4)], axis=1)  # (3, 4)
    return m.T @ g_theta


class MujocoRobot:
    """An MJCF robot for the soft solvers: MuJoCo's model, one ``MjData`` per world, and the geoms of
    ``bodies`` as colliders.

    Args:
        mjcf: path of an MJCF file (relative names are looked up in :data:`ASSETS` too).
        bodies: names of the bodies whose geoms (box, sphere, capsule, cylinder, mesh) touch soft matter
            (may be empty when the robot only carries FEM bodies, see :class:`RobotModel`).
        num_worlds: worlds (one ``MjData`` each).
        friction: Coulomb coefficient of those geoms against soft matter (default: each geom's
            MJCF sliding friction).
        keyframe: name of the MJCF keyframe that gives the initial joint state (default: the
            model's reference configuration ``qpos0``, or the keyframe ``"home"`` if there is one).

    Raises:
        ConfigError: when the file is missing or MuJoCo cannot load it, a body does not exist, or a
            body has no geom of a supported shape.
    """

    def __init__(self, mjcf: str | Path, *, bodies: Sequence[str], num_worlds: int = 1,
                 friction: float | None = None, keyframe: str | None = None):
        import mujoco

        path = Path(mjcf)
        if not path.is_file() and (ASSETS / path).is_file():
            path = ASSETS / path
        if not path.is_file():
            raise ConfigError(f"MJCF file {str(mjcf)!r} does not exist (nor in {ASSETS}).")
        try:
            self.mj_model = mujoco.MjModel.from_xml_path(str(path))
        except Exception as exc:  # mujoco raises ValueError with the parser's message
            raise ConfigError(f"MuJoCo could not load MJCF file {str(path)!r}: {str(exc).strip()}") from exc
        if not isinstance(num_worlds, int) or num_worlds < 1:
            raise InvalidParameter("num_worlds", num_worlds, "integers >= 1")
        m = self.mj_model
        self.path = path
        self.num_worlds = num_worlds
        names = [m.body(i).name for i in range(m.nbody)]
        if isinstance(bodies, str):
            bodies = [bodies]
        self.body_ids = []  # none: the robot only carries mounted bodies (RobotModel's mounts)
        for name in bodies:
            if name not in names:
                raise ConfigError(f"MJCF file {path.name} has no body named {name!r}; its bodies are {names[1:]}.")
            self.body_ids.append(names.index(name))
        self.body_names = list(bodies)
        type_names = {int(getattr(mujoco.mjtGeom, f"mjGEOM_{k.upper()}")): k for k in _SHAPES}
        self.geom_ids, self.geom_body = [], []  # coupled geoms and the index (into body_ids) of each one's body
        for b, body in enumerate(self.body_ids):
            geoms = [g for g in range(m.ngeom) if m.geom_bodyid[g] == body and int(m.geom_type[g]) in type_names]
            skipped = [m.geom(g).name or f"geom {g}" for g in range(m.ngeom)
                       if m.geom_bodyid[g] == body and int(m.geom_type[g]) not in type_names]
            if skipped:
                warnings.warn(f"body {names[body]!r} of {path.name}: {skipped} are not boxes, spheres, capsules, "
                              "cylinders or meshes and do not touch soft matter.", stacklevel=2)
            if not geoms:
                raise ConfigError(f"body {names[body]!r} of {path.name} has no box, sphere, capsule, cylinder or "
                                  "mesh geom to collide with.")
            self.geom_ids += geoms
            self.geom_body += [b] * len(geoms)
        self._type_names = type_names
        self.friction = friction
        self.datas = [mujoco.MjData(m) for _ in range(num_worlds)]
        self._kinematics = mujoco.MjData(m)  # for geom_poses, which must not disturb a world's data
        self.timestep = float(m.opt.timestep)
        key = keyframe if keyframe is not None else ("home" if mujoco.mj_name2id(
            m, mujoco.mjtObj.mjOBJ_KEY, "home") >= 0 else None)
        self.initial_qpos = m.qpos0.copy()
        self.initial_ctrl = np.zeros(m.nu)
        if key is not None:
            k = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_KEY, key)
            if k < 0:
                raise ConfigError(f"MJCF file {path.name} has no keyframe named {key!r}.")
            self.initial_qpos = m.key_qpos[k].copy()
            self.initial_ctrl = m.key_ctrl[k].copy()

    # -- sizes -------------------------------------------------------------------------------
    @property
    def nq(self) -> int:
        return int(self.mj_model.nq)

    @property
    def nv(self) -> int:
        return int(self.mj_model.nv)

    @property
    def na(self) -> int:
        return int(self.mj_model.na)

    @property
    def nu(self) -> int:
        return int(self.mj_model.nu)

    @property
    def geom_count(self) -> int:
        return len(self.geom_ids)

    def actuator_names(self) -> list[str]:
        return [self.mj_model.actuator(i).name or f"actuator{i}" for i in range(self.nu)]

    def ctrl_range(self) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bound of each actuator's command (MJCF ``ctrlrange``; +-inf when unlimited)."""
        m = self.mj_model
        limited = m.actuator_ctrllimited.astype(bool)
        low = np.where(limited, m.actuator_ctrlrange[:, 0], -np.inf)
        high = np.where(limited, m.actuator_ctrlrange[:, 1], np.inf)
        return low, high

    # -- geometry ----------------------------------------------------------------------------
    def geom_poses(self, qpos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World positions [m] (G, 3) and orientations (G, 4; x, y, z, w) of the coupled geoms at
        joint positions ``qpos``."""
        import mujoco

        d = self._kinematics
        d.qpos[:] = qpos
        mujoco.mj_kinematics(self.mj_model, d)
        return self._read_poses(d)

    def _read_poses(self, d) -> tuple[np.ndarray, np.ndarray]:
        pos = np.array([d.geom_xpos[g] for g in self.geom_ids])
        quat = np.array([_quat_xyzw(d.geom_xmat[g]) for g in self.geom_ids])
        return pos, quat

    def colliders(self) -> list[Collider]:
        """One collider per coupled geom, posed as at the initial joint positions."""
        m = self.mj_model
        pos, quat = self.geom_poses(self.initial_qpos)
        out = []
        for i, g in enumerate(self.geom_ids):
            kind = self._type_names[int(m.geom_type[g])]
            size = tuple(float(v) for v in m.geom_size[g])
            mesh = None
            if kind == "mesh":
                k = int(m.geom_dataid[g])
                start, count = int(m.mesh_vertadr[k]), int(m.mesh_vertnum[k])
                fstart, fcount = int(m.mesh_faceadr[k]), int(m.mesh_facenum[k])
                mesh = TriangleMesh(m.mesh_vert[start:start + count], m.mesh_face[fstart:fstart + fcount])
                size = (1.0, 1.0, 1.0)
            elif kind == "sphere":
                size = (size[0], 0.0, 0.0)
            elif kind in ("capsule", "cylinder"):
                size = (size[0], size[1], 0.0)
            friction = float(m.geom_friction[g, 0]) if self.friction is None else float(self.friction)
            out.append(Collider(_SHAPES[kind], size, friction, mesh, tuple(pos[i]), tuple(quat[i])))
        return out

    def add_to(self, builder) -> list[int]:
        """Add :meth:`colliders` to a soft solver's builder (``add_collider``); returns their indices,
        which :class:`RobotModel` needs."""
        return [builder.add_collider(c) for c in self.colliders()]


def _extend(cls: type, name: str, fields: Sequence[str]) -> type:
    """A dataclass subclass of ``cls`` with extra ``wp.array`` fields."""
    return dataclasses.make_dataclass(name, [(f, wp.array) for f in fields], bases=(cls,))


class _GroupWithRobot:
    """A :class:`~diffsim.core.protocol.BundleGroup` (a coupled scene's State or Control) that also
    holds the robot's arrays under their own names: ``state.robot_qpos`` and
    ``state.array("robot_qpos")`` beside ``state.array("fem.node_x")``, as on a single solver's."""

    def __init__(self, robot_arrays: dict, **parts):
        super().__init__(**parts)
        object.__setattr__(self, "robot_arrays", dict(robot_arrays))

    def __getattr__(self, name):
        own = self.__dict__.get("robot_arrays", {})
        if name in own:
            return own[name]
        return super().__getattr__(name)

    def arrays(self):
        yield from super().arrays()
        yield from self.robot_arrays.items()

    def array(self, name: str) -> wp.array:
        return self.robot_arrays[name] if name in self.robot_arrays else super().array(name)

    def _with_parts(self, parts: dict):
        return type(self)(self.robot_arrays, **parts)

    def clone(self, *, requires_grad: bool | None = None):
        out = super().clone(requires_grad=requires_grad)
        for name, arr in self.robot_arrays.items():
            out.robot_arrays[name] = wp.clone(arr, requires_grad=arr.requires_grad if requires_grad is None
                                              else requires_grad)
        return out

    def with_arrays(self, arrays: dict[str, wp.array]):
        out = super().with_arrays({k: a for k, a in arrays.items() if k not in self.robot_arrays})
        out.robot_arrays.update({k: a for k, a in arrays.items() if k in self.robot_arrays})
        return out


def _with_robot(cls: type, fields: Sequence[str]) -> type:
    """``cls`` (a dataclass bundle, or a bundle group) made to carry the robot's arrays ``fields``
    too: as extra dataclass fields, or (a group) beside its parts."""
    if issubclass(cls, BundleGroup):
        return type("Robot" + cls.__name__, (_GroupWithRobot, cls), {})
    return _extend(cls, "Robot" + cls.__name__, fields)


_STATE_FIELDS = ("robot_qpos", "robot_qvel", "robot_act", "robot_wrench")
_CONTROL_FIELDS = ("robot_ctrl",)
#: the soft arrays a follower of each kind moves: (State position, State rotation, Control
#: velocity, Control angular velocity)
_POSE_ARRAYS = {"collider": ("collider_position", "collider_rotation", "collider_velocity",
                             "collider_angular_velocity"),
                "fem_body": ("body_position", "body_rotation", "body_velocity", "body_angular_velocity")}


@dataclass
class _Follower:
    """A soft-solver frame carried rigidly by a robot body: a coupled geom's collider, or a
    mounted FEM body (a tactile sensor's backing)."""

    kind: str  #: a key of _POSE_ARRAYS
    part: str  #: the soft bundle's prefix of the pose arrays: "" for a single solver, else e.g. "mpm."
    body: int  #: MuJoCo body id
    local_position: np.ndarray  #: (3,) in the body's frame [m]
    local_rotation: np.ndarray  #: (4,) x, y, z, w, in the body's frame
    slots: np.ndarray  #: (W,) index of the frame in the soft pose arrays, per world
    wrench_body: int  #: index of ``body`` in RobotModel.wrench_bodies
    nodes: list | None = None  #: per world, the FEM body's node slice (mounted bodies)

    @property
    def names(self) -> tuple[str, str, str, str]:
        """Its (State position, State rotation, Control velocity, Control angular velocity) arrays."""
        return tuple(self.part + name for name in _POSE_ARRAYS[self.kind])


def _compose(body_pos, body_quat, local_pos, local_quat):
    """World pose of a frame at ``local_*`` in a body posed at ``body_*`` (quaternions x, y, z, w)."""
    from diffsim.geometry.motion import rotation_matrix

    return body_pos + rotation_matrix(body_quat) @ local_pos, _quat_mul(body_quat, local_quat)


def _relative(body_pos, body_quat, pos, quat):
    """The pose (pos, quat) expressed in the frame of a body posed at ``body_*``."""
    from diffsim.geometry.motion import rotation_matrix

    conj = np.array([-body_quat[0], -body_quat[1], -body_quat[2], body_quat[3]])
    return rotation_matrix(body_quat).T @ (np.asarray(pos) - body_pos), _quat_mul(conj, np.asarray(quat))


class RobotModel:
    """A soft solver's Model with a :class:`MujocoRobot` mounted on it: every attribute of the soft
    model reads through (``num_worlds``, ``collider_count``, ...), and States and Controls carry the
    robot's arrays too.

    Args:
        soft: the soft solver's Model, built with the robot's colliders (:meth:`MujocoRobot.add_to`),
            or a coupled scene's :class:`~diffsim.coupling.CoupledModel` (a sensor on a fingertip
            pressing MPM material or rods).
        robot: the robot; its ``num_worlds`` must equal the soft model's.
        colliders: the soft-model collider index of each coupled geom (what ``add_to`` returned);
            for a coupled scene, per part, ``{"mpm": [...], "rod": [...]}`` (a geom may be a
            collider of several parts; parts not named have none of the robot's).
        mounts: FEM bodies carried by robot bodies, ``{robot body name: FEM body index per world}``
            (an int for one world): a tactile sensor on a fingertip. Each keeps the pose it was
            built at relative to its robot body at the initial joint positions; the robot feels the
            contact force on its nodes (in a coupled scene, the material's and rods' too).
    """

    def __init__(self, soft, robot: MujocoRobot, colliders, *, mounts: dict | None = None):
        if robot.num_worlds != soft.num_worlds:
            raise ConfigError(f"the robot has {robot.num_worlds} worlds and the soft model {soft.num_worlds}.")
        grouped = isinstance(soft, BundleGroup)
        if grouped:
            if not isinstance(colliders, dict):
                raise ConfigError(f"a coupled scene's robot colliders are given per part, e.g. {{'mpm': [...]}}; "
                                  f"got {type(colliders).__name__}.")
            unknown = sorted(set(colliders) - set(soft.parts))
            if unknown:
                raise ConfigError(f"the coupled model has no part {unknown[0]!r}; its parts are {list(soft.parts)}.")
            by_part = {f"{part}.": indices for part, indices in colliders.items()}
        else:
            by_part = {"": colliders}
        for part, indices in by_part.items():
            if len(indices) != robot.geom_count:
                where = f" of part {part[:-1]!r}" if part else ""
                raise ConfigError(f"the robot couples {robot.geom_count} geoms; {len(indices)} collider indices "
                                  f"given{where}.")
        self.soft = soft
        self.robot = robot
        self.robot_colliders = {part: np.asarray(indices, dtype=np.int64) for part, indices in by_part.items()}
        self._state_type = _with_robot(type(soft.state()), _STATE_FIELDS)
        self._control_type = _with_robot(type(soft.control()), _CONTROL_FIELDS)
        m, worlds = robot.mj_model, soft.num_worlds
        names = [m.body(i).name for i in range(m.nbody)]
        mounts = dict(mounts or {})
        for name in mounts:
            if name not in names:
                raise ConfigError(f"MJCF file {robot.path.name} has no body named {name!r} to mount on; its bodies "
                                  f"are {names[1:]}.")
        #: MuJoCo ids of the bodies the material pushes on (their wrench is fed back)
        self.wrench_bodies = list(dict.fromkeys([*robot.body_ids, *(names.index(n) for n in mounts)]))
        d = robot._kinematics
        d.qpos[:] = robot.initial_qpos
        import mujoco

        mujoco.mj_kinematics(m, d)

        def body_pose(b):
            return d.xpos[b].copy(), np.array([d.xquat[b][1], d.xquat[b][2], d.xquat[b][3], d.xquat[b][0]])

        self.followers: list[_Follower] = []
        for part, indices in self.robot_colliders.items():
            nc = (soft.parts[part[:-1]] if part else soft).collider_count
            for i, g in enumerate(robot.geom_ids):
                b = int(m.geom_bodyid[g])
                q = m.geom_quat[g]
                self.followers.append(_Follower("collider", part, b, m.geom_pos[g].copy(),
                                                np.array([q[1], q[2], q[3], q[0]]),
                                                np.arange(worlds) * nc + int(indices[i]), self.wrench_bodies.index(b)))
        fem_part = "fem." if grouped else ""
        fem = soft.parts.get("fem") if grouped else soft
        if mounts and not hasattr(fem, "body_node_start"):
            raise ConfigError(f"{type(soft).__name__} has no bodies to mount on robot bodies (an FEM model has).")
        for name, bodies in mounts.items():
            bodies = np.atleast_1d(np.asarray(bodies, dtype=np.int64))
            if bodies.shape != (worlds,):
                raise ConfigError(f"mount {name!r} needs one FEM body per world ({worlds}); got {bodies.tolist()}.")
            b = names.index(name)
            state = fem.state()
            pos, quat = state.body_position.numpy()[bodies[0]], state.body_rotation.numpy()[bodies[0]]
            local_pos, local_quat = _relative(*body_pose(b), pos.astype(np.float64), quat.astype(np.float64))
            nodes = [fem.body_nodes(int(k)) for k in bodies]
            self.followers.append(_Follower("fem_body", fem_part, b, local_pos, local_quat, bodies,
                                            self.wrench_bodies.index(b), nodes))

    def __getattr__(self, name):
        if name in ("soft", "robot"):
            raise AttributeError(name)
        return getattr(self.soft, name)

    def arrays(self):
        return self.soft.arrays()

    def _robot_arrays(self, requires_grad: bool) -> dict:
        r, w = self.robot, self.soft.num_worlds
        kw = dict(dtype=float, device=self.soft.device, requires_grad=requires_grad)
        return {"robot_qpos": wp.array(np.tile(r.initial_qpos, w), **kw),
                "robot_qvel": wp.zeros(w * r.nv, **kw), "robot_act": wp.zeros(w * r.na, **kw),
                "robot_wrench": wp.zeros(w * len(self.wrench_bodies) * 6, **kw)}

    def _wrap(self, cls: type, soft_bundle, robot_arrays: dict):
        if isinstance(soft_bundle, BundleGroup):
            return cls(robot_arrays, **soft_bundle.parts)
        return cls(**{f.name: getattr(soft_bundle, f.name) for f in dataclasses.fields(soft_bundle)}, **robot_arrays)

    def state(self, *, requires_grad: bool = False):
        return self.wrap_state(self.soft.state(requires_grad=requires_grad), requires_grad=requires_grad)

    def wrap_state(self, soft_state, *, requires_grad: bool = False):
        """``soft_state`` (a soft solver State) with fresh robot arrays at the initial joint state."""
        return self._wrap(self._state_type, soft_state, self._robot_arrays(requires_grad))

    def control(self, *, requires_grad: bool = False):
        r, w = self.robot, self.soft.num_worlds
        ctrl = wp.array(np.tile(r.initial_ctrl, w), dtype=float, device=self.soft.device, requires_grad=requires_grad)
        return self._wrap(self._control_type, self.soft.control(requires_grad=requires_grad), {"robot_ctrl": ctrl})

    def world_of(self, name: str) -> np.ndarray:
        r, w = self.robot, self.soft.num_worlds
        per_world = {"robot_qpos": r.nq, "robot_qvel": r.nv, "robot_act": r.na,
                     "robot_wrench": 6 * len(self.wrench_bodies), "robot_ctrl": r.nu}
        if name in per_world:
            return np.repeat(np.arange(w), per_world[name])
        return self.soft.world_of(name)

    def follower_poses(self, world_data) -> tuple[np.ndarray, np.ndarray]:
        """World positions (n, 3) and orientations (n, 4) of every follower, for an ``MjData`` whose
        kinematics are current."""
        d = world_data
        out = [_compose(d.xpos[f.body], np.array([d.xquat[f.body][1], d.xquat[f.body][2], d.xquat[f.body][3],
                                                 d.xquat[f.body][0]]), f.local_position, f.local_rotation)
               for f in self.followers]
        return np.array([p for p, _ in out]), np.array([q for _, q in out])

    def set_joint_positions(self, state, world: int, qpos: Sequence[float]) -> None:
        """Put world ``world``'s robot at rest at joint positions ``qpos``, its colliders and mounted
        bodies (their nodes moved rigidly, at rest) with it."""
        import mujoco

        from diffsim.geometry.motion import rotation_matrix

        r = self.robot
        qpos = np.asarray(qpos, dtype=np.float64).reshape(-1)
        if qpos.shape != (r.nq,):
            raise InvalidParameter("qpos", f"{qpos.size} values", f"{r.nq} joint positions of {r.path.name}")
        for name, values in (("robot_qpos", qpos), ("robot_qvel", np.zeros(r.nv)), ("robot_act", np.zeros(r.na)),
                             ("robot_wrench", np.zeros(6 * len(self.wrench_bodies)))):
            arr = state.array(name)
            host = arr.numpy()
            n = values.size
            host[world * n:(world + 1) * n] = values
            arr.assign(host)
        d = r._kinematics
        d.qpos[:] = qpos
        mujoco.mj_kinematics(r.mj_model, d)
        positions, rotations = self.follower_poses(d)
        hosts = {}
        for f, pos, quat in zip(self.followers, positions, rotations, strict=True):
            p_name, q_name, _, _ = f.names
            for name in (p_name, q_name):
                hosts.setdefault(name, state.array(name).numpy())
            slot = f.slots[world]
            if f.kind == "fem_body":  # carry the body's nodes rigidly from its old pose to the new one
                old_p, old_q = hosts[p_name][slot].astype(np.float64), hosts[q_name][slot].astype(np.float64)
                turn = rotation_matrix(quat) @ rotation_matrix(old_q).T
                x_name, v_name = f.part + "node_x", f.part + "node_v"
                for name in (x_name, v_name):
                    hosts.setdefault(name, state.array(name).numpy())
                nodes = f.nodes[world]
                hosts[x_name][nodes] = (hosts[x_name][nodes] - old_p) @ turn.T + pos
                hosts[v_name][nodes] = 0.0
            hosts[p_name][slot], hosts[q_name][slot] = pos, quat
        for name, host in hosts.items():
            state.array(name).assign(host)


def robot_actuator(model: RobotModel, name: str = "robot", *, actuators: Sequence[str] | None = None,
                   unit: str = "MJCF ctrl") -> Actuator:
    """The robot's commands as a scene :class:`~diffsim.core.scene.Actuator`: one action component per
    MJCF actuator (all, or those named in ``actuators``), written to ``robot_ctrl`` as is and
    bounded by its ``ctrlrange`` (position servos: joint targets in rad or m)."""
    r = model.robot
    names = r.actuator_names()
    chosen = list(range(r.nu)) if actuators is None else []
    for a in actuators or ():
        if a not in names:
            raise ConfigError(f"{r.path.name} has no actuator named {a!r}; its actuators are {names}.")
        chosen.append(names.index(a))
    low, high = r.ctrl_range()
    if not np.all(np.isfinite(low[chosen])) or not np.all(np.isfinite(high[chosen])):
        raise ConfigError(f"actuators of {r.path.name} used as actions need a ctrlrange (ctrllimited).")
    w = model.soft.num_worlds
    target = np.arange(w)[:, None] * r.nu + np.asarray(chosen)[None, :]
    return Actuator(name, "robot_ctrl", target, np.arange(len(chosen)), np.ones(len(chosen)), low[chosen],
                    high[chosen], unit, tuple(names[i] for i in chosen))


@dataclasses.dataclass
class _StepRecord:
    """What the adjoint of one taped step needs."""

    dt: float
    A: np.ndarray  # (W, 2nv+na, 2nv+na) transition Jacobian of the whole step
    B: np.ndarray  # (W, 2nv+na, nu)
    C: np.ndarray  # (W, 2nv+na, 6 bodies): d(next state) / d(applied wrench)
    jac: np.ndarray  # (W, followers, 6, nv) follower position / rotation Jacobians at the step's end
    rotation_in: np.ndarray  # (W, followers, 4) follower orientations at the step's start
    velocities: dict  # a follower's array names -> (velocity array, angular velocity array) the soft step read


class RobotSolver(Solver):
    """A soft solver and a MuJoCo robot stepped together (see the module docstring for the split).

    Args:
        soft: the soft solver (built for ``model.soft``).
        model: the :class:`RobotModel`.
        two_way: feed the material's wrench back to the robot (colliders need a soft solver that
            measures collider wrenches, :class:`~diffsim.mpm.MPMSolver` or
            :class:`~diffsim.rod.RodSolver`; mounted FEM bodies
            report their nodes' contact forces).
        fd_eps: step of MuJoCo's finite-difference transition Jacobians (taped steps only).
        wrench_eps: step [N, N m] of the central differences of MuJoCo's step with respect to
            the applied wrench (taped two-way steps only; the step is linear in it).
    """

    def __init__(self, soft: Solver, model: RobotModel, *, two_way: bool = True, fd_eps: float = 1e-6,
                 wrench_eps: float = 1e-2):
        self.soft = soft
        self.two_way = bool(two_way)
        #: per soft part ("" for a single solver) whose colliders the robot moves, the solver that
        #: measures their wrenches (a coupled scene's part solvers are its attributes)
        self._measuring = {}
        if self.two_way:
            for part in dict.fromkeys(f.part for f in model.followers if f.kind == "collider"):
                measuring = getattr(soft, part[:-1]) if part else soft
                if not hasattr(measuring, "measure_collider_wrench"):
                    raise ConfigError(f"{type(measuring).__name__} does not measure collider wrenches; "
                                      "use two_way=False.")
                measuring.measure_collider_wrench = True
                self._measuring[part] = measuring
        self.fd_eps = float(fd_eps)
        self.wrench_eps = float(wrench_eps)
        self.tape_spans_steps = getattr(soft, "tape_spans_steps", False)
        self._velocity: dict = {}

    # -- protocol, mostly the soft solver's ----------------------------------------------------
    def new_state(self, model: RobotModel, *, requires_grad: bool = False):
        return model.wrap_state(self.soft.new_state(model.soft, requires_grad=requires_grad),
                                requires_grad=requires_grad)

    def max_stable_dt(self, model: RobotModel) -> float:
        return self.soft.max_stable_dt(model.soft)

    def stability_limit(self, model: RobotModel) -> str:
        return self.soft.stability_limit(model.soft)

    def validate_dt(self, model: RobotModel, dt: float) -> None:
        self.soft.validate_dt(model.soft, dt)

    def begin_step_scratch(self):
        return self.soft.begin_step_scratch()

    def end_step_scratch(self, claim) -> None:
        self.soft.end_step_scratch(claim)

    def release_step_scratch(self, claim) -> None:
        self.soft.release_step_scratch(claim)

    def scratch_arrays(self) -> list:
        return self.soft.scratch_arrays()

    def zero_scratch_grad(self) -> None:
        self.soft.zero_scratch_grad()

    def check_finite(self, model: RobotModel, state, step: int) -> None:
        for name in _STATE_FIELDS:
            values = state.array(name).numpy()
            if not np.all(np.isfinite(values)):
                raise SimulationDiverged(f"the robot's {name} turned non-finite by step {step}: MuJoCo diverged "
                                         "(lower its timestep, or stiffen the soft material's contact less).")
        self.soft.check_finite(model.soft, state, step)

    def check_finite_adjoint(self, model: RobotModel, state, step: int, **kw) -> None:
        self.soft.check_finite_adjoint(model.soft, state, step, **kw)

    # -- the coupled step ----------------------------------------------------------------------
    def _velocity_arrays(self, control, names: tuple, recording: bool):
        """The velocity arrays of one kind of follower (of one soft part) the soft step reads: new
        ones under a tape, else reused."""
        _, _, v_name, w_name = names
        v_in, w_in = control.array(v_name), control.array(w_name)
        if recording:
            return wp.clone(v_in, requires_grad=True), wp.clone(w_in, requires_grad=True)
        cached = self._velocity.get(names)
        if cached is None or cached[0].shape != v_in.shape:
            cached = self._velocity[names] = (wp.empty_like(v_in, requires_grad=False),
                                             wp.empty_like(w_in, requires_grad=False))
        wp.copy(cached[0], v_in)
        wp.copy(cached[1], w_in)
        return cached

    def step(self, model: RobotModel, state_in, state_out, control, dt: float) -> None:
        import mujoco

        robot, m = model.robot, model.robot.mj_model
        followers = model.followers
        w_count, n_f, nb = robot.num_worlds, len(followers), len(model.wrench_bodies)
        recording = taping()
        if recording and robot.nq != robot.nv:
            raise ConfigError(f"gradients through {robot.path.name} need hinge and slide joints only "
                              f"(nq = {robot.nq}, nv = {robot.nv}).")
        nsub = max(1, math.ceil(dt / robot.timestep * (1 - 1e-9)))
        m.opt.timestep = dt / nsub
        qpos = state_in.robot_qpos.numpy().reshape(w_count, robot.nq).astype(np.float64)
        qvel = state_in.robot_qvel.numpy().reshape(w_count, robot.nv).astype(np.float64)
        act = state_in.robot_act.numpy().reshape(w_count, robot.na).astype(np.float64)
        ctrl = control.robot_ctrl.numpy().reshape(w_count, robot.nu).astype(np.float64)
        wrench = state_in.robot_wrench.numpy().reshape(w_count, nb, 6).astype(np.float64)
        out_qpos, out_qvel, out_act = np.empty_like(qpos), np.empty_like(qvel), np.empty_like(act)
        pos_after = np.empty((w_count, n_f, 3))
        quat_after = np.empty((w_count, n_f, 4))
        com_after = np.empty((w_count, nb, 3))
        n_x = 2 * robot.nv + robot.na
        if recording:
            A_tot = np.empty((w_count, n_x, n_x))
            B_tot = np.empty((w_count, n_x, robot.nu))
            C_tot = np.zeros((w_count, n_x, 6 * nb))
            jac = np.empty((w_count, n_f, 6, robot.nv))
            A = np.empty((n_x, n_x))
            B = np.empty((n_x, robot.nu))
        for w in range(w_count):
            d = robot.datas[w]
            d.qpos[:], d.qvel[:], d.ctrl[:] = qpos[w], qvel[w], ctrl[w]
            if robot.na:
                d.act[:] = act[w]
            d.xfrc_applied[:] = 0.0
            if self.two_way:
                d.xfrc_applied[model.wrench_bodies] = wrench[w]
            if recording:
                A_w, B_w, C_w = np.eye(n_x), np.zeros((n_x, robot.nu)), np.zeros((n_x, 6 * nb))
            for _ in range(nsub):
                if recording:
                    mujoco.mjd_transitionFD(m, d, self.fd_eps, True, A, B, None, None)
                    A_w, B_w = A @ A_w, A @ B_w + B
                    if self.two_way:
                        C_w = A @ C_w + self._wrench_jacobian(model, d)
                mujoco.mj_step(m, d)
            mujoco.mj_kinematics(m, d)
            mujoco.mj_comPos(m, d)
            out_qpos[w], out_qvel[w] = d.qpos, d.qvel
            if robot.na:
                out_act[w] = d.act
            pos_after[w], quat_after[w] = model.follower_poses(d)
            com_after[w] = d.xipos[model.wrench_bodies]
            if recording:
                A_tot[w], B_tot[w], C_tot[w] = A_w, B_w, C_w
                jp, jr = np.empty((3, robot.nv)), np.empty((3, robot.nv))
                for i, f in enumerate(followers):
                    mujoco.mj_jac(m, d, jp, jr, pos_after[w, i], f.body)
                    jac[w, i, :3], jac[w, i, 3:] = jp, jr
        if not (np.all(np.isfinite(out_qpos)) and np.all(np.isfinite(out_qvel))):
            raise SimulationDiverged(f"MuJoCo's step of {robot.path.name} turned non-finite (joint state "
                                     f"{out_qpos.tolist()}): lower the MJCF timestep ({robot.timestep} s) or the "
                                     "soft material's stiffness.")

        # every follower moves from its soft-state pose to the robot's new pose over dt
        q_in = np.empty((w_count, n_f, 4))
        arrays, hosts = {}, {}
        for names in dict.fromkeys(f.names for f in followers):
            arrays[names] = self._velocity_arrays(control, names, recording)
            hosts[names] = (arrays[names][0].numpy(), arrays[names][1].numpy())
        for i, f in enumerate(followers):
            p_name, q_name, _, _ = f.names
            p_in = state_in.array(p_name).numpy()[f.slots].astype(np.float64)
            q_in[:, i] = state_in.array(q_name).numpy()[f.slots].astype(np.float64)
            v_host, w_host = hosts[f.names]
            v_host[f.slots] = (pos_after[:, i] - p_in) / dt
            w_host[f.slots] = rotation_vector(q_in[:, i], quat_after[:, i]) / dt
        changes = {}
        for names, (velocity, angular) in arrays.items():
            velocity.assign(hosts[names][0])
            angular.assign(hosts[names][1])
            changes[names[2]], changes[names[3]] = velocity, angular
        soft_control = control.with_arrays(changes)

        if recording:
            record = _StepRecord(dt, A_tot, B_tot, C_tot, jac, q_in, arrays)
            _runtime().tape.record_func(lambda: self._adjoint(model, state_in, state_out, control, record),
                                        [a for pair in arrays.values() for a in pair])
        self.soft.step(model.soft, state_in, state_out, soft_control, dt)

        out_wrench = np.zeros((w_count, nb, 6))
        if self.two_way:
            wrenches = {part: solver.collider_wrench for part, solver in self._measuring.items()}
            measured = {part: w.numpy().reshape(-1, 2, 3) for part, w in wrenches.items()}
            node_x = node_f = None
            arms = {}
            for i, f in enumerate(followers):
                b = f.wrench_body
                if f.kind == "collider":
                    wrench = measured[f.part]
                    force, torque = wrench[f.slots, 0].astype(np.float64), wrench[f.slots, 1].astype(np.float64)
                    # xfrc_applied acts at the body's centre of mass: the geom's torque gains r x F
                    arm = pos_after[:, i] - com_after[:, b]
                    out_wrench[:, b, :3] += force
                    out_wrench[:, b, 3:] += torque + np.cross(arm, force)
                    arms[i] = arm
                else:  # the contact force on a mounted body's nodes reaches the robot through its backing
                    if node_x is None:
                        node_x = state_out.array(f.part + "node_x").numpy().astype(np.float64)
                        node_f = state_out.array(f.part + "node_contact_force").numpy().astype(np.float64)
                    arms[i] = []
                    for w in range(w_count):
                        nodes = f.nodes[w]
                        arm = node_x[nodes] - com_after[w, b]
                        out_wrench[w, b, :3] += node_f[nodes].sum(axis=0)
                        out_wrench[w, b, 3:] += np.cross(arm, node_f[nodes]).sum(axis=0)
                        arms[i].append(arm)
            if recording:
                _runtime().tape.record_func(lambda: self._wrench_adjoint(model, state_out, wrenches, arms),
                                            list(wrenches.values()))
        state_out.robot_qpos.assign(out_qpos.reshape(-1))
        state_out.robot_qvel.assign(out_qvel.reshape(-1))
        state_out.robot_act.assign(out_act.reshape(-1))
        state_out.robot_wrench.assign(out_wrench.reshape(-1))

    def _wrench_jacobian(self, model: RobotModel, d) -> np.ndarray:
        """d(state after one MuJoCo step) / d(xfrc_applied of the wrench bodies), (2nv+na, 6 bodies),
        by central differences (``d`` is left as it was)."""
        import mujoco

        robot = model.robot
        m = robot.mj_model
        scratch = getattr(self, "_fd_data", None)
        if scratch is None or scratch[0] is not m:
            scratch = self._fd_data = (m, mujoco.MjData(m))
        work = scratch[1]
        out = np.empty((2 * robot.nv + robot.na, 6 * len(model.wrench_bodies)))
        for b, body in enumerate(model.wrench_bodies):
            for k in range(6):
                sides = []
                for sign in (1.0, -1.0):
                    mujoco.mj_copyData(work, m, d)
                    work.xfrc_applied[body, k] += sign * self.wrench_eps
                    mujoco.mj_step(m, work)
                    sides.append(np.concatenate([work.qpos, work.qvel, work.act]))
                out[:, 6 * b + k] = (sides[0] - sides[1]) / (2 * self.wrench_eps)
        return out

    @staticmethod
    def _wrench_adjoint(model: RobotModel, state_out, wrenches: dict, arms: dict) -> None:
        """Gradients on the fed-back wrench (state_out.robot_wrench) back to what the soft solver
        measured: the collider wrenches, and the contact forces on mounted bodies' nodes (lever arms
        held: their change with the pose is not differentiated)."""
        if state_out.robot_wrench.grad is None:
            return
        robot = model.robot
        g = state_out.robot_wrench.grad.numpy().reshape(robot.num_worlds, len(model.wrench_bodies), 6)
        g = g.astype(np.float64)
        collider_grads = {part: w.grad.numpy().reshape(-1, 2, 3) for part, w in wrenches.items()}
        node_grads = {}
        for i, f in enumerate(model.followers):
            g_force, g_torque = g[:, f.wrench_body, :3], g[:, f.wrench_body, 3:]
            if f.kind == "collider":
                collider_grad = collider_grads[f.part]
                collider_grad[f.slots, 0] += g_force + np.cross(g_torque, arms[i])  # d(r x F)/dF^T g = g x r
                collider_grad[f.slots, 1] += g_torque
            else:
                forces = state_out.array(f.part + "node_contact_force")
                if forces.grad is None:
                    continue
                node_grad = node_grads.setdefault(f.part, (forces, forces.grad.numpy()))[1]
                for w in range(robot.num_worlds):
                    node_grad[f.nodes[w]] += g_force[w] + np.cross(g_torque[w], arms[i][w])
        for part, collider_grad in collider_grads.items():
            wrenches[part].grad.assign(collider_grad.reshape(-1, 3))
        for forces, node_grad in node_grads.values():
            forces.grad.assign(node_grad)

    def _adjoint(self, model: RobotModel, state_in, state_out, control, record: _StepRecord):
        robot = model.robot
        w_count, nv, na = robot.num_worlds, robot.nv, robot.na
        dt = record.dt
        followers = model.followers
        g_pose = np.zeros((w_count, len(followers), 6))
        for names, (velocity, angular) in record.velocities.items():
            g_v = velocity.grad.numpy().astype(np.float64)
            g_w = angular.grad.numpy().astype(np.float64)
            p_name, q_name, v_name, w_name = names
            mine = [i for i, f in enumerate(followers) if f.names == names]
            # the frames no follower drives kept the caller's control: their gradients go back there
            mask = np.ones(len(g_v), bool)
            for i in mine:
                mask[followers[i].slots] = False
            for src, name in ((g_v, v_name), (g_w, w_name)):
                dst = control.array(name)
                if dst.grad is not None and mask.any():
                    host = dst.grad.numpy()
                    host[mask] += src[mask]
                    dst.grad.assign(host)
            # v = (p_after - p_in) / dt and w = rotvec(q_in -> q_after) / dt
            p_grad, q_grad = state_in.array(p_name).grad, state_in.array(q_name).grad
            p_host = p_grad.numpy() if p_grad is not None else None
            q_host = q_grad.numpy() if q_grad is not None else None
            for i in mine:
                f = followers[i]
                gv, gw = g_v[f.slots], g_w[f.slots]
                g_pose[:, i] = np.concatenate([gv, gw], axis=1) / dt
                if p_host is not None:
                    p_host[f.slots] -= gv / dt
                if q_host is not None:
                    for w in range(w_count):
                        q_host[f.slots[w]] += _rotation_to_quaternion_gradient(record.rotation_in[w, i], -gw[w] / dt)
            if p_host is not None:
                p_grad.assign(p_host)
            if q_host is not None:
                q_grad.assign(q_host)

        def grad(arr, n):
            return (np.zeros((w_count, n)) if arr.grad is None
                    else arr.grad.numpy().reshape(w_count, n).astype(np.float64))

        g_x = np.concatenate([grad(state_out.robot_qpos, robot.nq), grad(state_out.robot_qvel, nv),
                              grad(state_out.robot_act, na)], axis=1)
        g_x[:, :nv] += np.einsum("wfkn,wfk->wn", record.jac, g_pose)
        g_in = np.einsum("wij,wi->wj", record.A, g_x)
        g_ctrl = np.einsum("wiu,wi->wu", record.B, g_x)
        g_wrench = np.einsum("wib,wi->wb", record.C, g_x)
        for arr, values in ((state_in.robot_qpos, g_in[:, :nv]), (state_in.robot_qvel, g_in[:, nv:2 * nv]),
                            (state_in.robot_act, g_in[:, 2 * nv:]), (control.robot_ctrl, g_ctrl),
                            (state_in.robot_wrench, g_wrench)):
            if arr.grad is not None and values.size:
                arr.grad.assign(arr.grad.numpy() + values.reshape(-1).astype(np.float32))
