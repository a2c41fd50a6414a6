"""MuJoCo robots driving MPM material, cables and mounted sensors (diffsim.coupling.mujoco): geoms
as colliders that track MuJoCo's poses, the soft bodies' wrench fed back through xfrc_applied (a
held plate's joint torque equals its load's weight times its lever arm, for a block and for a
cable; a pushing servo lags by force / gain; a mounted pad carrying MPM material in a coupled
scene), gradients from a loss on the material or cable to the joint commands (or from the robot's
pose to the cable) against central differences, and bad input."""

from __future__ import annotations

import contextlib

import mujoco
import numpy as np
import pytest
import warp as wp

from diffsim.core.scene import Scene
from diffsim.coupling.mujoco import ASSETS, MujocoRobot, RobotModel, RobotSolver, robot_actuator
from diffsim.errors import ConfigError
from diffsim.geometry import ShapeType, collider_plane
from diffsim.materials import preset
from diffsim.mpm import MPMBuilder, MPMSolver


def _mjcf(tmp_path, name: str, body: str, actuators: str = "") -> str:
    path = tmp_path / f"{name}.xml"
    path.write_text(f"""<mujoco model="{name}"><compiler angle="radian"/>
<option timestep="0.001" gravity="0 0 -9.81" integrator="implicitfast"/>
<default><geom contype="0" conaffinity="0" friction="0.5"/></default>
<worldbody>{body}</worldbody><actuator>{actuators}</actuator></mujoco>""")
    return str(path)


def _scene(robot: MujocoRobot, add_material, *, two_way=True, substeps=24, frame_dt=1 / 60, **grid):
    b = MPMBuilder(**grid)
    add_material(b)
    colliders = robot.add_to(b)
    soft = b.finalize("cpu", requires_grad=True)
    model = RobotModel(soft, robot, colliders)
    solver = RobotSolver(MPMSolver(soft), model, two_way=two_way)
    return Scene(model, solver, frame_dt=frame_dt, substeps=substeps, actuators=[robot_actuator(model)])


# -- geometry ------------------------------------------------------------------------------------

def test_every_geom_shape_becomes_a_collider_that_tracks_mujocos_pose(tmp_path):
    """Box, sphere, capsule and cylinder geoms of a spinning, sliding body: same shapes and sizes,
    and after 30 coupled steps the colliders sit where MuJoCo puts the geoms (no drift)."""
    path = _mjcf(tmp_path, "shapes", """
<body name="tool" pos="0.5 0.5 0.6" euler="0.3 0.2 0.1">
  <joint name="spin" type="hinge" axis="0.3 0.4 0.87" damping="1"/>
  <joint name="slide" type="slide" axis="1 0 0" damping="1"/>
  <geom type="box" size="0.03 0.02 0.01" pos="0.05 0 0" mass="0.2"/>
  <geom type="sphere" size="0.02" pos="-0.05 0 0" mass="0.2"/>
  <geom type="capsule" size="0.01 0.03" pos="0 0.05 0" euler="0.5 0 0" mass="0.2"/>
  <geom type="cylinder" size="0.015 0.02" pos="0 -0.05 0.02" mass="0.2"/>
</body>""", '<motor joint="spin" gear="20" ctrlrange="-1 1"/><motor joint="slide" ctrlrange="-1 1"/>')
    robot = MujocoRobot(path, bodies=["tool"])
    colliders = robot.colliders()
    assert [c.shape for c in colliders] == [ShapeType.BOX, ShapeType.SPHERE, ShapeType.CAPSULE, ShapeType.CYLINDER]
    np.testing.assert_allclose([c.size for c in colliders],
                               [[0.03, 0.02, 0.01], [0.02, 0, 0], [0.01, 0.03, 0], [0.015, 0.02, 0]], atol=1e-7)
    scene = _scene(robot, lambda b: b.add_box((0.5, 0.5, 0.3), (0.03, 0.03, 0.03), preset("plasticine")),
                   substeps=4, grid_res=16)
    state, nxt, control = scene.state(), scene.state(), scene.control()
    control.robot_ctrl.assign(np.array([0.6, 0.3], np.float32))
    for _ in range(10):
        scene.advance(state, nxt, control)
        state, nxt = nxt, state
    d = robot.datas[0]
    assert abs(d.qpos[0]) > 0.5  # it really turned (about 30 degrees) and slid
    pos, quat = robot.geom_poses(d.qpos)
    np.testing.assert_allclose(state.collider_position.numpy()[:4], pos, atol=2e-5)
    q = state.collider_rotation.numpy()[:4]
    np.testing.assert_allclose(np.abs(np.sum(q * quat, axis=1)), 1.0, atol=1e-5)  # same orientation


# -- two-way coupling ----------------------------------------------------------------------------

def _plate_arm(tmp_path) -> MujocoRobot:
    """A gravity-compensated arm that holds a 40 x 24 cm plate level by a hinge position servo
    (hinge at x = 0.2 m, plate top at z = 0.3 m)."""
    return MujocoRobot(_mjcf(tmp_path, "plate_arm", """
<body name="arm" pos="0.2 0.5 0.3" gravcomp="1">
  <joint name="hinge" type="hinge" axis="0 1 0" damping="200" armature="0.1"/>
  <geom name="plate" type="box" size="0.2 0.12 0.02" pos="0.35 0 -0.02" mass="2"/>
</body>""", '<position name="hold" joint="hinge" kp="20000" ctrlrange="-1 1"/>'), bodies=["arm"])


def _hold(scene, robot, frames: int = 40):
    """Step the plate scene ``frames`` frames at rest: the last state and the servo's torque per frame."""
    state, nxt, control = scene.state(), scene.state(), scene.control()
    torque = []
    for _ in range(frames):
        scene.advance(state, nxt, control)
        state, nxt = nxt, state
        torque.append(robot.datas[0].qfrc_actuator[0])
    return state, torque


def _load_moment(mass: np.ndarray, x: np.ndarray) -> float:
    """The torque [N m] a servo at x = 0.2 m holds against a load of these masses at these points."""
    mass = mass.astype(np.float64)
    return -mass.sum() * 9.81 * (float(mass @ x[:, 0].astype(np.float64) / mass.sum()) - 0.2)


def test_held_plate_joint_torque_is_the_load_weight_times_its_lever_arm(tmp_path):
    """A gravity-compensated arm holds a plate level with a position servo about a hinge; an
    elastic block rests on the plate. The servo's torque must equal the block's weight times the
    horizontal distance from the hinge axis to its centre of mass (mean over the last 20 frames)."""
    robot = _plate_arm(tmp_path)
    res = 32
    block = preset("rubber").with_(young_modulus=2e5)
    scene = _scene(robot, lambda b: b.add_box((0.55, 0.5, 0.3 + 0.04 + 0.3 / res), (0.05, 0.05, 0.04), block),
                   substeps="auto", frame_dt=1 / 100, grid_res=res)
    state, torque = _hold(scene, robot)
    expected = _load_moment(scene.model.particle_mass.numpy(), state.particle_x.numpy())  # about +y
    held = float(np.mean(torque[-20:]))
    assert abs(held - expected) <= 0.05 * abs(expected), (held, expected)
    assert abs(robot.datas[0].qpos[0]) < 1e-3  # the plate stayed level


def _block_on_floor(material, half=0.03, center=(0.55, 0.5)):
    def add(b):
        floor = b.domain_origin[2] + 3 * b.dx + 0.002
        b.add_collider(collider_plane(position=(0, 0, floor), friction=0.5))
        b.add_box((*center, floor + half + 0.001), (half, half, half), material)
    return add


def _press(tmp_path, joint: str):
    if joint == "slide":
        body = """<body name="press" pos="0.55 0.5 0.3" gravcomp="1">
  <joint name="q" type="slide" axis="0 0 1" damping="60" armature="0.01"/>
  <geom type="box" size="0.05 0.05 0.02" mass="1"/></body>"""
    else:  # a lever about a horizontal hinge 0.25 m away, its pad over the block
        body = """<body name="press" pos="0.30 0.5 0.3" gravcomp="1">
  <joint name="q" type="hinge" axis="0 1 0" damping="6" armature="0.01"/>
  <geom type="box" size="0.05 0.05 0.02" pos="0.25 0 0" mass="1"/></body>"""
    gain = 3000.0 if joint == "slide" else 3000.0 * 0.25**2
    return _mjcf(tmp_path, f"press_{joint}", body, f'<position joint="q" kp="{gain}" ctrlrange="-1 1"/>')


def _press_start(model) -> float:
    """Slide joint position that holds the press's pad 5 mm above the block of _block_on_floor."""
    floor = model.domain_origin[2] + 3 * model.dx + 0.002
    return floor + 0.062 + 0.02 + 0.005 - 0.3


def test_a_pressing_servo_feels_the_block_it_presses(tmp_path):
    """A position-servoed pad presses an elastic block against the floor, its target 1 cm into
    it: fed back, the material's force F makes the servo settle short of its target by F / kp (a
    static balance); one-way the pad reaches its target."""
    kp = 3000.0
    final = {}
    for two_way in (True, False):
        robot = MujocoRobot(_press(tmp_path, "slide"), bodies=["press"])
        scene = _scene(robot, _block_on_floor(preset("rubber").with_(young_modulus=5e4)), two_way=two_way,
                       grid_res=20, domain_size=0.4, domain_origin=(0.35, 0.3, 0.15))
        model = scene.model
        state, nxt, control = scene.state(), scene.state(), scene.control()
        start = _press_start(model)
        model.set_joint_positions(state, 0, [start])
        control.robot_ctrl.assign(np.array([start - 0.015], np.float32))
        for _ in range(40):
            scene.advance(state, nxt, control)
            state, nxt = nxt, state
        final[two_way] = (float(state.robot_qpos.numpy()[0]), float(state.robot_wrench.numpy()[2]),
                          float(np.abs(state.robot_qvel.numpy()[0])))
    (z_on, force, speed), (z_off, force_off, _) = final[True], final[False]
    assert force > 5.0 and force_off == 0.0  # the material pushes the pad up
    assert speed < 2e-3  # settled: the joint damping takes < 1% of the force
    assert abs((z_on - z_off) - force / kp) <= 0.05 * force / kp, (z_on - z_off, force / kp)


# -- gradients -----------------------------------------------------------------------------------

def _advance(scene, state, control, frames: int):
    """``frames`` frames from ``state``, each into a fresh state (a tape then spans them all)."""
    for _ in range(frames):
        nxt = scene.solver.new_state(scene.model, requires_grad=True)
        scene.advance(state, nxt, control)
        state = nxt
    return state


@wp.kernel
def _mean_height(x: wp.array(dtype=wp.vec3), m: wp.array(dtype=float), total: float, out: wp.array(dtype=float)):
    i = wp.tid()
    wp.atomic_add(out, 0, m[i] * x[i][2] / total)


@pytest.mark.parametrize("joint", ["slide", "hinge"])
def test_gradient_of_a_material_loss_reaches_the_joint_command(tmp_path, joint):
    """A servoed pad presses plasticine 1 cm deep over 12 frames; d(mean material height) /
    d(joint command) through the two-way coupled rollout against central differences (2%)."""
    robot = MujocoRobot(_press(tmp_path, joint), bodies=["press"])
    scene = _scene(robot, _block_on_floor(preset("plasticine")), grid_res=20, domain_size=0.4,
                   domain_origin=(0.35, 0.3, 0.15))
    model = scene.model
    top_gap = _press_start(model)
    lever = 0.25
    start = top_gap if joint == "slide" else -np.arcsin(top_gap / lever)  # hinge: +q turns the pad down
    depth_to_ctrl = (lambda d: start - 0.005 - d) if joint == "slide" else (
        lambda d: -np.arcsin((top_gap - 0.005 - d) / lever))
    total = float(model.particle_mass.numpy().sum())

    def loss(depth: float, grad: bool = False):
        state = scene.state(requires_grad=True)
        model.set_joint_positions(state, 0, [start])
        control = scene.control(requires_grad=True)
        control.robot_ctrl.assign(np.array([depth_to_ctrl(depth)], np.float32))
        tape = wp.Tape() if grad else None
        out = wp.zeros(1, dtype=float, requires_grad=True)
        with tape if grad else contextlib.nullcontext():
            state = _advance(scene, state, control, 12)
            wp.launch(_mean_height, model.particle_count, inputs=[state.particle_x, model.particle_mass, total],
                      outputs=[out])
        if not grad:
            return float(out.numpy()[0])
        tape.backward(out)
        return float(control.robot_ctrl.grad.numpy()[0])

    d_ctrl = loss(0.01, grad=True)
    eps = 1e-3
    dc = depth_to_ctrl(0.01 + eps) - depth_to_ctrl(0.01 - eps)
    fd = (loss(0.01 + eps) - loss(0.01 - eps)) / dc
    assert abs(fd) > 0.05  # pressing deeper really lowers the material
    assert abs(d_ctrl - fd) <= 0.02 * abs(fd), (d_ctrl, fd)


# -- assets and bad input ------------------------------------------------------------------------

@pytest.mark.parametrize("name, bodies, actuators", [
    ("gripper.xml", ["hand", "left_finger", "right_finger"], ["x", "y", "z", "grip"]),
    ("arm6.xml", ["hand", "left_finger", "right_finger"],
     ["base_yaw", "shoulder", "elbow", "wrist_pitch", "wrist_roll", "wrist_yaw", "grip"]),
])
def test_shipped_robots_load_and_hold_their_home_pose(name, bodies, actuators):
    robot = MujocoRobot(name, bodies=bodies)
    assert robot.actuator_names() == actuators
    low, high = robot.ctrl_range()
    assert np.all(np.isfinite(low)) and np.all(np.isfinite(high))
    m, d = robot.mj_model, robot.datas[0]
    d.qpos[:], d.ctrl[:] = robot.initial_qpos, robot.initial_ctrl
    for _ in range(500):
        mujoco.mj_step(m, d)
    np.testing.assert_allclose(d.qpos, robot.initial_qpos, atol=2e-3)  # servos and gravcomp hold home
    hand = d.body("hand").xpos
    assert np.all((0.0 < hand) & (hand < 1.0))  # inside a 1 m soft-matter domain
    assert (ASSETS / name).is_file()


def test_bad_robot_input_is_refused_with_a_sentence(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        MujocoRobot(tmp_path / "nothing.xml", bodies=["hand"])
    broken = tmp_path / "broken.xml"
    broken.write_text("<mujoco><worldbody><body name='a'><geom type='box'/></body></worldbody>")
    with pytest.raises(ConfigError, match="could not load"):
        MujocoRobot(broken, bodies=["a"])
    with pytest.raises(ConfigError, match="no body named 'palm'.*'hand'"):
        MujocoRobot("gripper.xml", bodies=["palm"])
    path = _mjcf(tmp_path, "ellipsoid", '<body name="egg"><joint type="slide"/><geom type="ellipsoid" '
                 'size="0.1 0.05 0.05" mass="1"/></body>')
    with pytest.raises(ConfigError, match="no box, sphere"), pytest.warns(UserWarning, match="do not touch"):
        MujocoRobot(path, bodies=["egg"])
    path = _mjcf(tmp_path, "mixed", '<body name="tool"><joint type="slide"/><geom type="box" size="0.1 0.1 0.1" '
                 'mass="1"/><geom name="egg" type="ellipsoid" size="0.1 0.05 0.05" mass="1"/></body>')
    with pytest.warns(UserWarning, match=r"\['egg'\] are not boxes"):
        assert MujocoRobot(path, bodies=["tool"]).geom_count == 1
    robot = MujocoRobot("gripper.xml", bodies=["right_finger"])
    b = MPMBuilder(grid_res=16)
    b.add_box((0.5, 0.5, 0.3), (0.05, 0.05, 0.05), preset("plasticine"))
    colliders = robot.add_to(b)
    model = RobotModel(b.finalize("cpu"), robot, colliders)
    with pytest.raises(ConfigError, match="no actuator named 'wrist'"):
        robot_actuator(model, actuators=["wrist"])


def test_a_robot_pad_sweeps_a_cable_one_way(tmp_path):
    """The rod solver takes robot colliders one way: a servoed pad sweeps across a cable lying on
    the ground and carries the cable along ahead of its leading face."""
    from diffsim.rod import RodBuilder, RodSolver

    path = _mjcf(tmp_path, "sweeper", """
<body name="pad" pos="0.5 0.40 0.02" gravcomp="1">
  <joint name="y" type="slide" axis="0 1 0" damping="40"/>
  <geom type="box" size="0.03 0.01 0.02" mass="1"/></body>""",
                 '<position name="y" joint="y" kp="2000" ctrlrange="-0.3 0.3"/>')
    robot = MujocoRobot(path, bodies=["pad"])
    b = RodBuilder()
    b.add_ground(friction=0.3)
    points = np.stack([np.linspace(0.2, 0.8, 31), np.full(31, 0.5), np.full(31, 0.005)], axis=1)
    b.add_rod(points, mass_per_length=0.05, bend_stiffness=1e-4, twist_stiffness=1e-4, linear_damping=2.0)
    colliders = robot.add_to(b)
    soft = b.finalize("cpu")
    model = RobotModel(soft, robot, colliders)
    scene = Scene(model, RobotSolver(RodSolver(soft), model, two_way=False), frame_dt=1 / 60, substeps=20,
                  actuators=[robot_actuator(model)])
    state, nxt, control = scene.state(), scene.state(), scene.control()
    control.robot_ctrl.assign(np.array([0.2], np.float32))  # sweep 20 cm along +y, through the cable
    for _ in range(30):
        scene.advance(state, nxt, control)
        state, nxt = nxt, state
    x = state.vertex_x.numpy()
    pad_y = float(robot.geom_poses(robot.datas[0].qpos)[0][0, 1])
    assert pad_y > 0.55  # the pad crossed the cable's line
    assert x[15, 1] > pad_y + 0.01 - 1e-3  # the middle rides ahead of the pad's leading face
    assert np.all(x[:, 1] > 0.55)  # all of it: an inextensible cable on light friction follows
    np.testing.assert_allclose(state.collider_position.numpy()[colliders[0]], robot.geom_poses(
        robot.datas[0].qpos)[0][0], atol=1e-5)


def test_held_plate_joint_torque_is_a_cables_weight_times_its_lever_arm(tmp_path):
    """The rod solver couples both ways: a cable laid across the held plate, bent into an arc so
    that its mass sits at several lever arms, loads the servo with its weight times the distance
    from the hinge to its centre of mass (mean of the last 20 of 40 frames)."""
    from diffsim.rod import RodBuilder, RodSolver

    robot = _plate_arm(tmp_path)
    b = RodBuilder()
    t = np.linspace(-1.0, 1.0, 21)
    radius = 0.004
    points = np.stack([0.45 + 0.1 * t**2, 0.5 + 0.1 * t, np.full(t.size, 0.3 + radius)], axis=1)
    b.add_rod(points, mass_per_length=0.2, bend_stiffness=1e-4, twist_stiffness=1e-4, linear_damping=5.0,
              contact_radius=radius, rest_points=points)
    colliders = robot.add_to(b)
    soft = b.finalize("cpu")
    model = RobotModel(soft, robot, colliders)
    scene = Scene(model, RobotSolver(RodSolver(soft), model), frame_dt=1 / 100, substeps="auto",
                  actuators=[robot_actuator(model)])
    state, torque = _hold(scene, robot)
    x = state.vertex_x.numpy()
    expected = _load_moment(soft.vertex_mass.numpy(), x)
    held = float(np.mean(torque[-20:]))
    assert abs(held - expected) <= 0.05 * abs(expected), (held, expected)
    assert np.all(np.abs(x[:, 2] - (0.3 + radius)) < 1e-3)  # it lies on the plate
    assert abs(robot.datas[0].qpos[0]) < 1e-3  # which stayed level


def test_gradient_of_the_held_plates_sag_reaches_the_cables_mass(tmp_path):
    """The plate's servo is soft (its target level): a cable dropped on it tilts it down by its
    moment over the gain. That sag reaches the cable's vertex masses only through the fed-back
    wrench; its gradient along a uniform relative mass change against central differences (2%)."""
    from diffsim.rod import RodBuilder, RodSolver

    path = _mjcf(tmp_path, "soft_plate", """
<body name="arm" pos="0.2 0.5 0.3" gravcomp="1">
  <joint name="hinge" type="hinge" axis="0 1 0" damping="5" armature="0.01"/>
  <geom name="plate" type="box" size="0.2 0.12 0.02" pos="0.35 0 -0.02" mass="2"/>
</body>""", '<position name="hold" joint="hinge" kp="20" ctrlrange="-1 1"/>')
    robot = MujocoRobot(path, bodies=["arm"])
    b = RodBuilder()
    t = np.linspace(-1.0, 1.0, 11)
    points = np.stack([0.45 + 0.1 * t**2, 0.5 + 0.1 * t, np.full(t.size, 0.306)], axis=1)
    b.add_rod(points, mass_per_length=0.2, bend_stiffness=1e-4, twist_stiffness=1e-4, linear_damping=5.0,
              contact_radius=0.004, rest_points=points)
    colliders = robot.add_to(b)
    soft = b.finalize("cpu", requires_grad=True)
    model = RobotModel(soft, robot, colliders)
    scene = Scene(model, RobotSolver(RodSolver(soft), model), frame_dt=1 / 100, substeps="auto",
                  actuators=[robot_actuator(model)])
    mass = soft.vertex_mass.numpy().copy()

    def sag(scale: float, grad: bool = False):
        soft.vertex_mass.assign(mass * scale)
        state = scene.state(requires_grad=True)
        control = scene.control(requires_grad=True)
        tape = wp.Tape() if grad else None
        with tape if grad else contextlib.nullcontext():
            state = _advance(scene, state, control, 15)
        if not grad:
            return float(state.robot_qpos.numpy()[0])
        soft.vertex_mass.grad.zero_()
        tape.backward(grads={state.robot_qpos: wp.array([1.0], dtype=float)})
        return float(soft.vertex_mass.grad.numpy() @ mass), float(state.robot_qpos.numpy()[0])

    tape_grad, q = sag(1.0, grad=True)
    eps = 0.02
    fd = (sag(1.0 + eps) - sag(1.0 - eps)) / (2 * eps)
    assert q > 0.001 and fd > 0.001  # the cable tilts the plate (+q turns it down), more when heavier
    assert abs(tape_grad - fd) <= 0.02 * abs(fd), (tape_grad, fd)


# -- a tactile sensor mounted on a robot -----------------------------------------------------------

def _mounted_sensor(tmp_path, *, two_way=True):
    """A gel pad (12 x 12 x 3 mm) on a servoed slide, pressed up into a fixed 4 mm ball."""
    from diffsim.fem import FEMBuilder, FEMSolver, TactileSensor
    from diffsim.geometry import collider_sphere
    from diffsim.geometry.tetmesh import tet_mesh_pad

    path = _mjcf(tmp_path, "sensor_slide", """
<body name="finger" pos="0 0 0" gravcomp="1">
  <joint name="z" type="slide" axis="0 0 1" damping="28" armature="0.001"/>
  <geom type="box" size="0.006 0.006 0.002" pos="0 0 -0.002" mass="0.1"/></body>""",
                 '<position name="z" joint="z" kp="2000" ctrlrange="-0.01 0.01"/>')
    robot = MujocoRobot(path, bodies=[])
    mesh = tet_mesh_pad((12e-3, 12e-3, 3e-3), (6, 6, 2))
    builder = FEMBuilder(gravity=(0.0, 0.0, 0.0))
    builder.add_body(mesh, position=(-6e-3, -6e-3, 0.0), young_modulus=2e5, poisson_ratio=0.45, density=1100.0,
                     contact_stiffness=1e10, fixed_nodes=mesh.vertices[:, 2] < 1e-12)
    builder.add_collider(collider_sphere(4e-3, position=(0.0, 0.0, 3e-3 + 4e-3 + 0.1e-3), friction=0.5))
    soft = builder.finalize("cpu", requires_grad=True)
    model = RobotModel(soft, robot, [], mounts={"finger": 0})
    solver = RobotSolver(FEMSolver(soft, integrator="quasistatic", contact_smoothing=2e-5, friction_velocity=5e-3,
                                   newton_tolerance=5e-5), model, two_way=two_way)
    scene = Scene(model, solver, frame_dt=1e-3, substeps=1, actuators=[robot_actuator(model)])
    return scene, TactileSensor(soft, 0, marker_grid=(3, 3), image_shape=(2, 2))


def test_a_sensor_mounted_on_a_robot_presses_a_ball_and_the_servo_feels_it(tmp_path):
    """The slide's target is 0.5 mm past first touch: the pad's backing follows the robot body,
    and fed back, the ball's push (the sensor's force reading) leaves the servo short of its
    target by force / kp; one-way it reaches it."""
    kp, final = 2000.0, {}
    for two_way in (True, False):
        scene, sensor = _mounted_sensor(tmp_path, two_way=two_way)
        model = scene.model
        state, nxt, control = scene.state(), scene.state(), scene.control()
        control.robot_ctrl.assign(np.array([0.6e-3], np.float32))
        for _ in range(150):
            scene.advance(state, nxt, control)
            state, nxt = nxt, state
        z = float(state.robot_qpos.numpy()[0])
        np.testing.assert_allclose(state.body_position.numpy()[0], [-6e-3, -6e-3, z], atol=1e-7)  # carried
        reading = sensor.read(model.soft, state).numpy()
        final[two_way] = (z, float(reading["force"][0, 2]), float(state.robot_wrench.numpy()[2]),
                          float(abs(state.robot_qvel.numpy()[0])))
    (z_on, sensed, fed_back, speed), (z_off, _, _, _) = final[True], final[False]
    assert z_off == pytest.approx(0.6e-3, abs=1e-6)
    assert sensed < -0.05 and speed < 1e-4  # the ball pushes the pad down (-z), and it settled
    assert fed_back == pytest.approx(sensed, rel=0.02)  # the robot feels what the sensor reads
    assert abs((z_on - z_off) - fed_back / kp) <= 0.05 * abs(fed_back) / kp, (z_on - z_off, fed_back / kp)


def _command_gradient(scene, measure, *, frames: int, command: float, eps: float) -> tuple[float, float]:
    """d(measure after ``frames`` frames) / d(the one robot command): (tape, central differences).
    ``measure(state, out)`` writes the quantity into the one-element array ``out`` (taped)."""

    def run(command: float, grad: bool = False):
        state = scene.state(requires_grad=True)
        control = scene.control(requires_grad=True)
        control.robot_ctrl.assign(np.array([command], np.float32))
        out = wp.zeros(1, dtype=float, requires_grad=True)
        tape = wp.Tape() if grad else None
        with tape if grad else contextlib.nullcontext():
            measure(_advance(scene, state, control, frames), out)
        if not grad:
            return float(out.numpy()[0])
        tape.backward(out)
        return float(control.robot_ctrl.grad.numpy()[0])

    return run(command, grad=True), (run(command + eps) - run(command - eps)) / (2 * eps)


@wp.kernel
def _force_z(force: wp.array(dtype=wp.vec3), out: wp.array(dtype=float)):
    out[0] = force[0][2]


def test_gradient_of_a_mounted_sensor_reading_reaches_the_joint_command(tmp_path):
    """d(the sensor's normal force after 40 frames) / d(the slide's command), through quasi-static
    gel frames (implicit differentiation) and the two-way coupled robot, against central
    differences (2%)."""
    scene, sensor = _mounted_sensor(tmp_path)
    model = scene.model

    def force_z(state, out):
        wp.launch(_force_z, 1, inputs=[sensor.read(model.soft, state).force], outputs=[out])

    tape_grad, fd = _command_gradient(scene, force_z, frames=40, command=0.6e-3, eps=2e-5)
    assert fd < -50.0  # pressing further up pushes the ball harder into the pad (-z on the sensor)
    assert abs(tape_grad - fd) <= 0.02 * abs(fd), (tape_grad, fd)



PAD_SERVO_GAIN = 2000.0  #: [N/m], the slide's position servo in _pad_under_cube


def _pad_under_cube(tmp_path, *, drop: float, requires_grad: bool = False) -> Scene:
    """A coupled scene under a robot: a sensor pad mounted on a servoed slide, a rubber cube (MPM)
    ``drop`` [m] above it, in two-way contact with the pad. The pad is weightless: a mounted body's
    own weight is carried by its backing, which the robot does not measure."""
    from diffsim.coupling import CoupledModel, CoupledSolver
    from diffsim.coupling.scenes import PAD_THICKNESS, add_sensor_pad
    from diffsim.fem import FEMBuilder

    path = _mjcf(tmp_path, "pad_slide", """
<body name="finger" pos="0 0 0" gravcomp="1">
  <joint name="z" type="slide" axis="0 0 1" damping="28" armature="0.001"/>
  <geom type="box" size="0.01 0.01 0.002" pos="0 0 -0.002" mass="0.1"/></body>""",
                 f'<position name="z" joint="z" kp="{PAD_SERVO_GAIN}" ctrlrange="-0.01 0.01"/>')
    robot = MujocoRobot(path, bodies=[])
    fem = FEMBuilder(gravity=(0.0, 0.0, 0.0))
    add_sensor_pad(fem, position=(0.0, 0.0, 0.0))
    half = 0.006
    mpm = MPMBuilder(grid_res=16, domain_size=0.06, domain_origin=(-0.03, -0.03, -0.01))
    mpm.add_box((0.0, 0.0, PAD_THICKNESS + half + drop), (half, half, half), preset("rubber"))
    soft = CoupledModel(fem.finalize("cpu", requires_grad=requires_grad),
                        mpm.finalize("cpu", requires_grad=requires_grad), material_friction=0.5)
    model = RobotModel(soft, robot, {}, mounts={"finger": 0})
    return Scene(model, RobotSolver(CoupledSolver(soft, mpm=MPMSolver(soft.mpm)), model), frame_dt=1e-3,
                 actuators=[robot_actuator(model)])


def test_a_mounted_sensor_holds_mpm_material_and_the_servo_feels_its_weight(tmp_path):
    """Settled, the contact forces on the mounted pad's nodes bring the cube's weight to the robot
    (3%, means over 0.1 s), and the servo sags by weight / kp (5%)."""
    scene = _pad_under_cube(tmp_path, drop=1e-3)
    soft = scene.model.soft
    state, nxt, control = scene.state(), scene.state(), scene.control()
    assert state.array("robot_qpos") is state.robot_qpos and state.array("fem.node_x") is state.fem.node_x
    force, sag = [], []
    for frame in range(250):
        scene.advance(state, nxt, control)
        state, nxt = nxt, state
        if frame >= 150:
            force.append(float(state.robot_wrench.numpy()[2]))
            sag.append(float(state.robot_qpos.numpy()[0]))
    weight = float(soft.mpm.particle_mass.numpy().astype(np.float64).sum() * 9.81)
    np.testing.assert_allclose(state.fem.body_position.numpy()[0], [0.0, 0.0, sag[-1]], atol=1e-7)  # carried
    assert np.mean(force) == pytest.approx(-weight, rel=0.03), (np.mean(force), -weight)
    assert np.mean(sag) == pytest.approx(np.mean(force) / PAD_SERVO_GAIN, rel=0.05), (np.mean(sag), np.mean(force))


@wp.kernel
def _mean_z(x: wp.array(dtype=wp.vec3), scale: float, out: wp.array(dtype=float)):
    wp.atomic_add(out, 0, scale * x[wp.tid()][2])


def test_gradient_from_mpm_material_on_a_mounted_sensor_reaches_the_joint_command(tmp_path):
    """d(the cube's mean height after 15 frames) / d(the slide's command), the cube landing on the
    pad the robot lifts: through MuJoCo's Jacobians, the carried pad and its two-way contact with
    the material, against central differences (2%)."""
    scene = _pad_under_cube(tmp_path, drop=0.2e-3, requires_grad=True)
    mpm = scene.model.soft.mpm

    def height(state, out):
        wp.launch(_mean_z, mpm.particle_count, inputs=[state.mpm.particle_x, 1.0 / mpm.particle_count],
                  outputs=[out])

    tape_grad, fd = _command_gradient(scene, height, frames=15, command=1e-3, eps=5e-5)
    assert fd > 0.3  # commanding the slide higher lifts the cube with the pad
    assert abs(tape_grad - fd) <= 0.02 * abs(fd), (tape_grad, fd)


def test_a_coupled_scene_takes_robot_colliders_per_part(tmp_path):
    scene = _pad_under_cube(tmp_path, drop=1e-3)
    soft, robot = scene.model.soft, scene.model.robot
    with pytest.raises(ConfigError, match="per part"):
        RobotModel(soft, robot, [])
    with pytest.raises(ConfigError, match="no part 'rod'"):
        RobotModel(soft, robot, {"rod": []})
