"""Physics and gradient checks of the FEM tactile sensor: Hertz sphere indentation, steady sliding
friction, static equilibrium of a resting body, the patch test, and finite-difference gradients.

The tests and ``diffsim validate tactile`` call these same functions, so the tolerances live here, once.
Checks of the sensor in two-way contact with other solvers live in :mod:`diffsim.coupling.validation`.
"""

from __future__ import annotations

import functools
import math
import time

import numpy as np
import warp as wp

from diffsim.core.scene import Scene
from diffsim.core.validation import CheckResult, rollout_gradient_check, rollout_input, run_checks, simulate, timed
from diffsim.errors import InvalidParameter
from diffsim.fem.model import FEMBuilder, FEMModel
from diffsim.fem.solver import FEMSolver
from diffsim.fem.tactile import TactileSensor
from diffsim.geometry import collider_box, collider_sphere
from diffsim.geometry.tetmesh import TetMesh, tet_mesh_pad

GRAVITY = 9.81


def quasi_static_density(mesh: TetMesh, density: float) -> np.ndarray:
    """Per-tet density [kg/m^3] that gives every tet the stable step of the largest one: small
    tets get heavier by (largest altitude / own altitude)^2. Static equilibria do not depend on
    mass, and a graded mesh then relaxes in far fewer steps (mass scaling)."""
    h = mesh.min_altitude()
    return density * (h.max() / h) ** 2


def _pad_sensor(mesh: TetMesh, *, young_modulus: float, poisson_ratio: float, density, damping: float,
                gravity=(0.0, 0.0, 0.0), device=None, requires_grad: bool = False, colliders=()):
    builder = FEMBuilder(gravity=gravity)
    builder.add_body(mesh, young_modulus=young_modulus, poisson_ratio=poisson_ratio, density=density,
                     damping=damping, fixed_nodes=mesh.vertices[:, 2] < 1e-12)
    for collider in colliders:
        builder.add_collider(collider)
    return builder.finalize(device, requires_grad=requires_grad)


def bonded_layer_factor(depth, *, radius: float, thickness: float, poisson_ratio: float):
    """Stiffening of a sphere's Hertz force by a layer of finite ``thickness`` [m] bonded to a
    rigid base (Dimitriadis et al., Biophys. J. 82, 2002, eq. 12): F / F_Hertz as a series in
    chi = sqrt(R d) / h, the contact radius over the thickness, to chi^3 (the chi^4 term is
    below 1e-4 for chi < 0.2)."""
    nu = poisson_ratio
    alpha = -(1.2876 - 1.4678 * nu + 1.3442 * nu**2) / (1.0 - nu)
    beta = (0.6387 - 1.0277 * nu + 1.5164 * nu**2) / (1.0 - nu)
    chi = np.sqrt(radius * np.asarray(depth)) / thickness
    return (1.0 - 2.0 * alpha / math.pi * chi + 4.0 * alpha**2 / math.pi**2 * chi**2
            - 8.0 / math.pi**3 * (alpha**3 + 4.0 * math.pi**2 * beta / 15.0) * chi**3)


@timed
def hertz_indentation(*, device: str | None = None, resolution: int = 28, hold_steps: int = 2000,
                      integrator: str = "explicit") -> list[CheckResult]:
    """A rigid frictionless sphere (R = 5 mm) pressed into a pad (16 x 16 x 8 mm, E = 100 kPa,
    nu = 0.3, bonded at its base) to depths of 0.05-0.3 mm, each held until static: the
    force-depth curve must follow Hertz, F = (4/3) E* sqrt(R) d^1.5 with E* = E / (1 - nu^2),
    times the bonded-layer factor of :func:`bonded_layer_factor`.

    The exponent fitted to F / factor must be 1.5 +- 0.1 and the mean of F / (Hertz x factor)
    within 15% of 1. The factor is 1.06-1.15 here (contact radius / thickness 0.06-0.15): against
    bare Hertz the force came out 13.6% high (15.4%, a fail, with resolution 24), against the
    layer 2.9%. What remains is linear tets, too stiff where few of them touch: 4.7% at the
    shallowest depth, 1.3% at the deepest.

    With ``integrator="quasistatic"`` each depth is one equilibrium solve (a 10 ms frame that moves
    the sphere there) and one more that holds it; ``"implicit"`` takes 1 ms backward-Euler steps,
    ``hold_steps / 20`` of them per depth.
    """
    radius, E, nu, size, thickness = 5e-3, 1e5, 0.3, 16e-3, 8e-3
    mesh = tet_mesh_pad((size, size, thickness), (resolution, resolution, resolution // 2), grading=6.0)
    # damping near critical for the slowest mode of the mass-scaled pad, found by trial; holding
    # 1.5x longer changed the mean force ratio by 0.1%
    model = _pad_sensor(mesh, young_modulus=E, poisson_ratio=nu, density=quasi_static_density(mesh, 1000.0),
                        damping=1500.0, device=device,
                        colliders=[collider_sphere(radius, position=(0.0, 0.0, thickness + radius), friction=0.0)])
    solver = FEMSolver(model, stability=0.9, integrator=integrator)
    if integrator == "explicit":
        dt = solver.max_stable_dt(model)
    else:
        dt = 1e-2 if integrator == "quasistatic" else 1e-3
        hold_steps = 1 if integrator == "quasistatic" else max(1, hold_steps // 20)
    state, hold = model.state(), model.control()
    depths_target = [0.05e-3, 0.1e-3, 0.15e-3, 0.2e-3, 0.3e-3]
    depths, forces, previous = [], [], 0.0
    move = model.control()
    move_steps = max(1, hold_steps // 4)
    for d in depths_target:
        move.collider_velocity.assign(np.array([[0.0, 0.0, -(d - previous) / (move_steps * dt)]], dtype=np.float32))
        previous = d
        state = simulate(model, solver, state, move_steps, dt, control=move)
        state = simulate(model, solver, state, hold_steps, dt, control=hold)
        depths.append(thickness + radius - float(state.collider_position.numpy()[0, 2]))
        forces.append(-float(state.node_contact_force.numpy()[:, 2].sum()))
    depths, forces = np.array(depths), np.array(forces)
    layer = bonded_layer_factor(depths, radius=radius, thickness=thickness, poisson_ratio=nu)
    exponent = float(np.polyfit(np.log(depths), np.log(forces / layer), 1)[0])
    hertz = 4.0 / 3.0 * E / (1 - nu**2) * math.sqrt(radius) * depths**1.5
    expected = hertz * layer
    ratio = float(np.mean(forces / expected))
    details = {"depths_m": depths.tolist(), "forces_N": forces.tolist(), "hertz_N": hertz.tolist(),
               "layer_factor": layer.tolist(), "force_over_bare_hertz": float(np.mean(forces / hertz)),
               "tets": model.tet_count, "dt": dt}
    return [
        CheckResult("hertz: force-depth exponent", exponent, 1.5, abs(exponent - 1.5), 0.1, "absolute", "",
                    details),
        CheckResult("hertz: force magnitude", ratio * float(expected[-1]), float(expected[-1]), abs(ratio - 1.0),
                    0.15, "relative (mean over depths)", "N", details),
    ]


@timed
def sliding_friction(*, device: str | None = None, friction: float = 0.4, integrator: str = "explicit",
                     frame_dt: float | None = None) -> CheckResult:
    """A flat rigid plate, wider than the pad, pressed 0.1 mm into it slides across it at 20 mm/s:
    in steady sliding the tangential to normal force ratio on the sensor equals the friction
    coefficient (5%). (A sphere would add the tilt of its normals to the ratio.) The implicit
    integrators take 1 ms (implicit) or 5 ms (quasi-static) steps, or ``frame_dt`` [s]; the plate
    slides 3 mm, or 12 steps where those are longer (8 mm at 30 Hz frames, still over the pad)."""
    if frame_dt is not None and not (integrator != "explicit" and 0 < frame_dt < math.inf):
        raise InvalidParameter("frame_dt", frame_dt, "(0, inf) s, for the implicit integrators only "
                               "(the explicit one steps at its stability limit)")
    half, thickness = 5e-3, 4e-3
    mesh = tet_mesh_pad((16e-3, 16e-3, thickness), (12, 12, 4), grading=2.0)
    model = _pad_sensor(mesh, young_modulus=1e5, poisson_ratio=0.4, density=quasi_static_density(mesh, 1000.0),
                        damping=800.0, device=device,
                        colliders=[collider_box((20e-3, 20e-3, half), position=(0.0, 0.0, thickness + half),
                                                friction=friction)])
    solver = FEMSolver(model, stability=0.9, integrator=integrator)
    dt = frame_dt or {"explicit": solver.max_stable_dt(model), "implicit": 1e-3, "quasistatic": 5e-3}[integrator]
    press = model.control()
    press_steps = 400 if integrator == "explicit" else 10
    press.collider_velocity.assign(np.array([[0.0, 0.0, -0.1e-3 / (press_steps * dt)]], dtype=np.float32))
    state = simulate(model, solver, model.state(), press_steps, dt, control=press)
    state = simulate(model, solver, state, press_steps, dt)
    speed = 0.02
    slide = model.control()
    slide.collider_velocity.assign(np.array([[speed, 0.0, 0.0]], dtype=np.float32))
    slide_steps = max(12, int(round(3e-3 / speed / dt)))
    ratios = []

    def record(i, s):
        if i >= slide_steps // 2:
            f = s.node_contact_force.numpy().astype(np.float64).sum(axis=0)
            ratios.append(math.hypot(f[0], f[1]) / abs(f[2]))

    simulate(model, solver, state, slide_steps, dt, control=slide, on_step=record)
    ratio = float(np.mean(ratios))
    return CheckResult("sliding: tangential / normal force", ratio, friction, abs(ratio / friction - 1.0), 0.05,
                       "relative", "", {"speed_m_s": speed, "friction_velocity_m_s": solver.friction_velocity,
                                        "ratio_min": float(np.min(ratios)), "ratio_max": float(np.max(ratios))})


@timed
def resting_equilibrium(*, device: str | None = None, integrator: str = "explicit") -> CheckResult:
    """An elastic block (10 mm cube, 1000 kg/m^3) dropped onto the ground settles: the summed
    contact force equals its weight (2%). The implicit integrators take 1 ms (implicit) or 10 ms
    (quasi-static) steps."""
    mesh = tet_mesh_pad((10e-3, 10e-3, 10e-3), (4, 4, 4))
    builder = FEMBuilder(gravity=(0.0, 0.0, -GRAVITY))
    builder.add_body(mesh, position=(0.0, 0.0, 0.2e-3), young_modulus=5e4, poisson_ratio=0.3, density=1000.0,
                     damping=200.0)
    builder.add_ground(friction=0.5)
    model = builder.finalize(device)
    solver = FEMSolver(model, integrator=integrator)
    dt = {"explicit": solver.max_stable_dt(model), "implicit": 1e-3, "quasistatic": 1e-2}[integrator]
    state = simulate(model, solver, model.state(), int(round(0.15 / dt)), dt)
    weight = float(model.node_mass.numpy().astype(np.float64).sum() * GRAVITY)
    support = float(state.node_contact_force.numpy().astype(np.float64)[:, 2].sum())
    return CheckResult("equilibrium: contact force / weight", support, weight, abs(support / weight - 1.0), 0.02,
                       "relative", "N", {"max_speed_m_s": float(np.abs(state.node_v.numpy()).max())})


@timed
def patch_test(*, device: str | None = None) -> CheckResult:
    """Nodes placed by an affine map (stretch and shear) of an irregular mesh: every interior
    node must feel zero net elastic force (a linear field is represented exactly)."""
    rng = np.random.default_rng(0)
    mesh = tet_mesh_pad((1e-2, 1e-2, 1e-2), (4, 4, 4))
    boundary = np.zeros(mesh.vertex_count, dtype=bool)
    boundary[mesh.boundary_vertices()] = True
    jitter = np.where(boundary[:, None], 0.0, rng.uniform(-0.6e-3, 0.6e-3, mesh.vertices.shape))
    mesh = TetMesh(mesh.vertices + jitter, mesh.tets)
    builder = FEMBuilder(gravity=(0.0, 0.0, 0.0))
    builder.add_body(mesh, young_modulus=1e5, poisson_ratio=0.4)
    model = builder.finalize(device)
    solver = FEMSolver(model)
    state = model.state()
    A = np.eye(3) + np.array([[0.08, 0.03, 0.0], [0.0, -0.05, 0.02], [0.01, 0.0, 0.06]])
    state.node_x.assign((mesh.vertices @ A.T).astype(np.float32))
    force = solver.elastic_forces(model, state)
    interior = np.linalg.norm(force[~boundary], axis=1).max()
    scale = np.linalg.norm(force[boundary], axis=1).max()
    return CheckResult("patch test: interior force / boundary force", float(interior / scale), 0.0,
                       float(interior / scale), 1e-3, "absolute", "")


PHYSICS_CHECKS = {
    "hertz": hertz_indentation,
    "sliding": sliding_friction,
    "equilibrium": resting_equilibrium,
    "patch": patch_test,
}


# ------------------------------------------------------------------------------- gradients


@wp.kernel
def weighted_vec3(values: wp.array(dtype=wp.vec3), weights: wp.array(dtype=wp.vec3), loss: wp.array(dtype=float)):
    i = wp.tid()
    wp.atomic_add(loss, 0, wp.dot(values[i], weights[i]))


@wp.kernel
def _weighted_float(values: wp.array(dtype=float), weights: wp.array(dtype=float), loss: wp.array(dtype=float)):
    i = wp.tid()
    wp.atomic_add(loss, 0, values[i] * weights[i])


@wp.kernel
def _weighted_vec2(values: wp.array(dtype=wp.vec2), weights: wp.array(dtype=wp.vec2), loss: wp.array(dtype=float)):
    i = wp.tid()
    wp.atomic_add(loss, 0, wp.dot(values[i], weights[i]))


def indentation_scene(*, device: str | None = None, frames: int = 8, integrator: str = "explicit"):
    """A small sensor pad (12 x 12 x 3 mm) whose backing moves while a sphere presses and drags
    across it; every fittable array carries gradients. Returns (scene, sensor, state0, controls):
    1 ms frames, explicit substeps at 0.8 of the stable step (implicit integrators: one step)."""
    thickness = 3e-3
    mesh = tet_mesh_pad((12e-3, 12e-3, thickness), (5, 5, 2))
    builder = FEMBuilder(gravity=(0.0, 0.0, -GRAVITY))
    # well damped, with a moderate contact stiffness: the sampled contact force then follows the
    # motion instead of ringing at the contact spring's frequency
    builder.add_body(mesh, young_modulus=1.2e5, poisson_ratio=0.4, density=1100.0, damping=200.0,
                     stiffness_damping=3e-4, contact_stiffness=5e8, fixed_nodes=mesh.vertices[:, 2] < 1e-12)
    builder.add_collider(collider_sphere(4e-3, position=(0.5e-3, 0.3e-3, thickness + 4e-3 - 0.15e-3), friction=0.5))
    model = builder.finalize(device, requires_grad=True)
    solver = FEMSolver(model, integrator=integrator, contact_smoothing=2e-5, friction_velocity=5e-3)
    sensor = TactileSensor(model, 0, marker_grid=(3, 3), image_shape=(4, 4))
    frame_dt = 1e-3
    # a margin below the stable step: the finite differences stiffen the model a little
    substeps = max(1, math.ceil(frame_dt / (0.8 * solver.max_stable_dt(model))))
    controls = []
    for k in range(frames):
        c = model.control(requires_grad=True)
        c.collider_velocity.assign(np.array([[0.02, 0.01, -0.05 - 0.01 * k]], dtype=np.float32))
        c.body_velocity.assign(np.array([[0.0, 0.005, 0.01]], dtype=np.float32))
        controls.append(c)
    return (Scene(model, solver, frame_dt=frame_dt, substeps=substeps), sensor, model.state(requires_grad=True),
            controls)


def _gradient_check(name: str, target: str, *, eps: float, relative: bool, device: str | None,
                    proportional: bool = False, directions: int = 2, tolerance: float = 0.02,
                    integrator: str = "explicit") -> CheckResult:
    start = time.perf_counter()
    scene, sensor, state0, controls = indentation_scene(device=device, integrator=integrator)
    model = scene.model
    rng = np.random.default_rng(5)
    markers = sensor.marker_grid[0] * sensor.marker_grid[1]
    w_markers = wp.array(rng.standard_normal((markers, 3)).astype(np.float32) * 1e3, dtype=wp.vec3,
                         device=model.device)
    w_uv = wp.array(rng.standard_normal((markers, 2)).astype(np.float32) * 0.1, dtype=wp.vec2, device=model.device)
    w_force = wp.array(rng.standard_normal((1, 3)).astype(np.float32) * 10.0, dtype=wp.vec3, device=model.device)
    w_torque = wp.array(rng.standard_normal((1, 3)).astype(np.float32) * 1e3, dtype=wp.vec3, device=model.device)
    pixels = sensor.image_shape[0] * sensor.image_shape[1]
    w_pressure = wp.array(rng.standard_normal(pixels).astype(np.float32) * 1e-4, dtype=float, device=model.device)
    w_rgb = wp.array(rng.standard_normal((pixels, 3)).astype(np.float32) * 10.0, dtype=wp.vec3, device=model.device)

    def frame_loss(m: FEMModel, s, frame, loss):
        # every sensor output enters the loss, so each one's gradient is checked
        if frame % 3 == 2 or frame == len(controls) - 1:
            reading = sensor.read(m, s)
            for values, weights in ((reading.marker_position, w_markers), (reading.force, w_force),
                                    (reading.torque, w_torque), (reading.rgb, w_rgb)):
                wp.launch(weighted_vec3, dim=values.shape[0], inputs=[values, weights], outputs=[loss],
                          device=m.device)
            wp.launch(_weighted_vec2, dim=markers, inputs=[reading.marker_displacement, w_uv], outputs=[loss],
                      device=m.device)
            wp.launch(_weighted_float, dim=pixels, inputs=[reading.pressure, w_pressure], outputs=[loss],
                      device=m.device)

    rollout = scene.rollout(state0, controls, checkpoint_every=40, frame_loss=frame_loss)
    array = rollout_input(model, state0, controls, target)
    explicit = None
    if proportional:
        values = array.numpy().astype(np.float64)
        explicit = [values * np.random.default_rng(seed).standard_normal(values.shape) for seed in (1, 2)]
    result = rollout_gradient_check(name, rollout, array, (model, state0, *controls), eps=eps, relative=relative,
                                    directions=directions, explicit=explicit, tolerance=tolerance,
                                    details={"substeps": rollout.substeps})
    result.seconds = time.perf_counter() - start
    return result


GRADIENT_CHECKS = {
    "young_modulus": lambda d, i="explicit": _gradient_check(
        "Young's modulus (per tet)", "model.tet_young_modulus", eps=0.01, relative=True, device=d,
        proportional=True, integrator=i),
    "poisson_ratio": lambda d, i="explicit": _gradient_check(
        "Poisson's ratio (per tet)", "model.tet_poisson_ratio", eps=0.01, relative=True, device=d,
        proportional=True, integrator=i),
    "friction": lambda d, i="explicit": _gradient_check(
        "friction coefficient", "model.collider_friction", eps=0.02, relative=True, device=d, directions=1,
        integrator=i),
    # 1 mm/s over a 1 ms frame moves the backing 1 um: at 0.2 um (2e-4) the float32 rounding of
    # positions and of the converged solves left the central difference 1-2.4% off the tape's
    # gradient under every integrator, from 1 um on within 0.25%
    "sensor_pose": lambda d, i="explicit": _gradient_check(
        "sensor trajectory (backing velocity, frame 2)", "controls[2].body_velocity", eps=1e-3, relative=False,
        device=d, integrator=i),
    "indenter_pose": lambda d, i="explicit": _gradient_check(
        "indenter pose (initial position)", "state0.collider_position", eps=2e-6, relative=False, device=d,
        integrator=i),
}


#: the physics checks that step in time, and so take an ``integrator`` (the patch test evaluates
#: forces only); quasi-static steps cannot hold the free block of the equilibrium check
STEPPED_CHECKS = {"explicit": ("hertz", "sliding", "equilibrium"), "implicit": ("hertz", "sliding", "equilibrium"),
                  "quasistatic": ("hertz", "sliding")}


def run_physics_checks(*, device: str | None = None, only: list[str] | None = None,
                       integrator: str = "explicit") -> list[CheckResult]:
    """Run the physics checks (all, or those named in ``only``) and return their results; with an
    implicit ``integrator`` the stepped checks take it (and the others run unchanged, except the
    free-block equilibrium, which quasi-static steps cannot hold and is left out)."""
    checks = {}
    for name, check in PHYSICS_CHECKS.items():
        if name in STEPPED_CHECKS["explicit"] and name not in STEPPED_CHECKS[integrator]:
            continue
        if integrator != "explicit" and name in STEPPED_CHECKS[integrator]:
            checks[name] = functools.partial(check, integrator=integrator)
        else:
            checks[name] = check
    return run_checks(checks, device=device, only=only, known=[*PHYSICS_CHECKS, *GRADIENT_CHECKS])


def run_gradient_checks(*, device: str | None = None, only: list[str] | None = None,
                        integrator: str = "explicit") -> list[CheckResult]:
    """Run the finite-difference gradient checks (all, or those named in ``only``) with the FEM
    solver's ``integrator`` (implicit integrators take one step per 1 ms frame)."""
    checks = {name: (lambda d, check=check: check(d, integrator)) for name, check in GRADIENT_CHECKS.items()}
    return run_checks(checks, device=device, only=only, known=[*PHYSICS_CHECKS, *GRADIENT_CHECKS],
                      gradients=True)
