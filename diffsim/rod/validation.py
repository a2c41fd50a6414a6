"""Physics and gradient checks of the rod solver against closed-form results (Euler-Bernoulli
cantilever, catenary, uniform twist), energy conservation and finite differences.

The tests and ``diffsim validate rod`` call these same functions, so the tolerances live here, once.
"""

from __future__ import annotations

import math
import time

import numpy as np

from diffsim.core.validation import CheckResult, rollout_gradient_check, rollout_input, run_checks, simulate, timed
from diffsim.rod.model import RodBuilder, RodModel, RodState, controls_from_driven_positions
from diffsim.rod.solver import RodSolver

GRAVITY = 9.81


def material_frames(model: RodModel, state: RodState, theta: np.ndarray) -> np.ndarray:
    """First material director m1 of every edge (world axes) for material angles ``theta``."""
    x = state.vertex_x.numpy().astype(np.float64)
    d1 = state.edge_d1.numpy().astype(np.float64)
    out = []
    for r, sl in enumerate(model.rod_slices()):
        t = np.diff(x[sl], axis=0)
        t /= np.linalg.norm(t, axis=1, keepdims=True)
        first = sl.start - r
        d = d1[first:first + len(t)]
        th = theta[first:first + len(t)]
        d2 = np.cross(t, d)
        out.append(np.cos(th)[:, None] * d + np.sin(th)[:, None] * d2)
    return np.concatenate(out)


@timed
def cantilever(*, device: str | None = None) -> CheckResult:
    """A horizontal rod clamped at one end sags under its weight: tip deflection q L^4 / (8 E I).

    The clamped first edge straddles the wall at x = 0 (vertices at -h/2 and h/2), so bending, which
    a vertex carries over its Voronoi length, starts exactly at the wall.
    """
    length, vertices, rho, bend = 1.0, 21, 0.1, 10.0
    h = length / (vertices - 1.5)
    x = np.stack([(np.arange(vertices) - 0.5) * h, np.zeros(vertices), np.zeros(vertices)], axis=1)
    builder = RodBuilder(gravity=(0.0, 0.0, -GRAVITY))
    # critical damping of the first bending mode, so the rod settles in a few periods
    omega1 = 1.875**2 * math.sqrt(bend / (rho * length**4))
    builder.add_rod(x, mass_per_length=rho, bend_stiffness=bend, twist_stiffness=bend, linear_damping=2.0 * omega1,
                    driven_vertices=(0, 1))
    model = builder.finalize(device)
    solver = RodSolver(model)
    dt = solver.max_stable_dt(model)
    steps = int(math.ceil(12.0 / omega1 / dt))
    state = simulate(model, solver, model.state(), steps, dt)
    deflection = -float(state.vertex_x.numpy()[-1, 2])
    expected = rho * GRAVITY * length**4 / (8.0 * bend)
    return CheckResult("cantilever: tip deflection", deflection, expected, abs(deflection - expected) / expected,
                       0.03, "relative", "m", details={"vertices": vertices, "steps": steps,
                                                       "deflection_over_length": expected / length})


def catenary_sag(span: float, length: float) -> float:
    """Sag [m] of an inextensible catenary of ``length`` hung between level points ``span`` apart."""
    low, high = 1e-6, 1e6  # a: the catenary parameter; 2 a sinh(span / 2a) decreases with a
    for _ in range(200):
        a = math.sqrt(low * high)
        if 2.0 * a * math.sinh(span / (2.0 * a)) > length:
            low = a
        else:
            high = a
    return a * (math.cosh(span / (2.0 * a)) - 1.0)


@timed
def catenary(*, device: str | None = None) -> CheckResult:
    """A flexible cable hung between two fixed points: mid-span sag equals the catenary's."""
    length, span, vertices, rho = 1.0, 0.8, 41, 0.1
    # start on a parabola of the right length, so the projection has little to correct
    s = np.linspace(-0.5, 0.5, vertices)
    best = None
    for depth in np.linspace(0.01, 0.5, 2000):
        z = depth * (4.0 * s * s - 1.0)
        pts = np.stack([s * span, np.zeros_like(s), z], axis=1)
        if np.linalg.norm(np.diff(pts, axis=0), axis=1).sum() >= length:
            best = pts
            break
    pts = best
    pts *= 1.0  # rest lengths equal along the cable
    seg = length / (vertices - 1)
    rest = np.stack([np.linspace(0.0, length, vertices), np.zeros(vertices), np.zeros(vertices)], axis=1)
    del seg
    builder = RodBuilder(gravity=(0.0, 0.0, -GRAVITY))
    builder.add_rod(pts, rest_points=rest, mass_per_length=rho, bend_stiffness=1e-6, twist_stiffness=1e-6,
                    linear_damping=5.0, driven_vertices=(0, vertices - 1))
    model = builder.finalize(device)
    solver = RodSolver(model, projection_iterations=20)
    dt = min(2e-3, solver.max_stable_dt(model))
    state = simulate(model, solver, model.state(), int(4.0 / dt), dt)
    z = state.vertex_x.numpy()[:, 2]
    sag = float(z[0] - z[vertices // 2])
    expected = catenary_sag(span, length)
    stretch = float(np.linalg.norm(np.diff(state.vertex_x.numpy(), axis=0), axis=1).sum() / length - 1.0)
    return CheckResult("catenary: mid-span sag", sag, expected, abs(sag - expected) / expected, 0.02, "relative",
                       "m", details={"vertices": vertices, "stretch": stretch})


@timed
def uniform_twist(*, device: str | None = None, angle: float = math.pi) -> CheckResult:
    """Both end edges of a straight rod clamped, one turned by ``angle`` [rad] over 0.5 s: the twist
    between neighbouring material frames, measured geometrically, is the same at every vertex."""
    vertices, length = 21, 1.0
    x = np.stack([np.linspace(0.0, length, vertices), np.zeros(vertices), np.zeros(vertices)], axis=1)
    builder = RodBuilder(gravity=(0.0, 0.0, 0.0))
    builder.add_rod(x, bend_stiffness=1e-2, twist_stiffness=1e-2, linear_damping=2.0,
                    driven_vertices=(0, 1, vertices - 2, vertices - 1), clamp_twist=("first", "last"))
    model = builder.finalize(device)
    solver = RodSolver(model)
    frames, frame_dt = 50, 0.01
    positions = np.repeat(x[None, model.driven_vertices], frames + 1, axis=0)
    angles = np.zeros((frames + 1, 2))
    angles[:, 1] = np.linspace(0.0, angle, frames + 1)
    controls = controls_from_driven_positions(model, positions, frame_dt, twist_angles=angles)
    dt = min(frame_dt, solver.max_stable_dt(model))
    substeps = int(math.ceil(frame_dt / dt))
    state = model.state()
    for control in controls:
        state = simulate(model, solver, state, substeps, frame_dt / substeps, control=control)
    m1 = material_frames(model, state, solver.material_angles(model, state))
    t = np.diff(state.vertex_x.numpy().astype(np.float64), axis=0)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    twists = []
    for i in range(1, vertices - 1):
        a, b = t[i - 1], t[i]
        w, c = np.cross(a, b), float(np.dot(a, b))
        u = m1[i - 1] * c + np.cross(w, m1[i - 1]) + w * np.dot(w, m1[i - 1]) / (1.0 + c)
        twists.append(math.atan2(float(np.dot(np.cross(u, m1[i]), b)), float(np.dot(u, m1[i]))))
    twists = np.array(twists)
    per_vertex = angle / (vertices - 2)
    deviation = float(np.max(np.abs(twists - per_vertex)) / per_vertex)
    return CheckResult("twisted rod: uniform twist", float(twists.sum()), angle, deviation, 0.01,
                       "relative (max per vertex)", "rad", details={"twist_per_vertex": twists.tolist()})


@timed
def energy_conservation(*, device: str | None = None, duration: float = 10.0,
                        inextensible: bool = False) -> CheckResult:
    """A rod pinned at one end swings and flexes under gravity without damping or contact: total
    energy (kinetic, gravity, stretching, bending, twisting) is conserved."""
    vertices, length, rho = 11, 0.5, 0.1
    x = np.stack([np.linspace(0.0, length, vertices), np.zeros(vertices), np.zeros(vertices)], axis=1)
    curl = np.stack([np.zeros(vertices), np.full(vertices, 0.4), np.linspace(0.0, 1.0, vertices)], axis=1)
    builder = RodBuilder(gravity=(0.0, 0.0, -GRAVITY))
    builder.add_rod(x, mass_per_length=rho, bend_stiffness=2e-3, twist_stiffness=2e-3, stretch_stiffness=200.0,
                    rest_curvature=np.zeros((vertices, 2)), driven_vertices=(0,), velocities=curl)
    model = builder.finalize(device)
    solver = RodSolver(model, inextensible=inextensible)
    dt = solver.max_stable_dt(model)
    steps = int(math.ceil(duration / dt))
    dt = duration / steps
    energies = []

    def record(i, s):
        if i % 50 == 0 or i == steps - 1:
            energies.append(solver.energy(model, s)[0])

    state0 = model.state()
    energies.append(solver.energy(model, state0)[0])
    simulate(model, solver, state0, steps, dt, on_step=record)
    e = np.array(energies)
    total = e.sum(axis=1)
    scale = float(e[:, 0].max())  # the energy that moves around: the largest kinetic energy
    drift = float(abs(total[-1] - total[0]) / scale)
    return CheckResult(f"energy drift over {duration:g} s ({'projected' if inextensible else 'elastic'} stretch)",
                       float(total[-1]), float(total[0]), drift, 0.01, "relative (to max kinetic)", "J",
                       details={"max_deviation": float(np.abs(total - total[0]).max() / scale), "steps": steps})


PHYSICS_CHECKS = {
    "cantilever": cantilever,
    "catenary": catenary,
    "uniform_twist": uniform_twist,
    "energy": energy_conservation,
}


# -- gradients ---------------------------------------------------------------------------------
def gripper_scene(*, device: str | None = None, frames: int = 20, vertices: int = 14, ground: bool = True,
                  contact_smoothing: float = 2e-4):
    """Two grippers hold a naturally curved cable whose middle lies on the ground; one gripper moves
    and turns. Returns (model, solver, state0, controls, frame_dt)."""
    s = np.linspace(0.0, 1.0, vertices)
    # a sagging arc whose middle rests on the ground, with the rest lengths of its own shape
    x = np.stack([0.5 * s, 0.02 * np.sin(np.pi * s), 0.06 - 0.056 * np.sin(np.pi * s)], axis=1)
    curvature = np.zeros((vertices, 2))
    curvature[1:-1] = (0.06, 0.03)  # a natural curl [rad per vertex]
    builder = RodBuilder()
    builder.add_rod(x, rest_curvature=curvature, mass_per_length=0.08, bend_stiffness=4e-3, twist_stiffness=3e-3,
                    linear_damping=0.5, air_drag=0.5, contact_radius=0.005,
                    driven_vertices=(0, 1, vertices - 2, vertices - 1), clamp_twist=("first", "last"))
    if ground:
        builder.add_ground(friction=0.4)
    model = builder.finalize(device, requires_grad=True)
    solver = RodSolver(model, contact_smoothing=contact_smoothing)
    frame_dt = 0.01
    t = np.arange(frames + 1) * frame_dt
    driven = x[model.driven_vertices]
    positions = np.repeat(driven[None], frames + 1, axis=0)
    positions[:, 2:, 0] += 0.4 * t[:, None] ** 1.5
    positions[:, 2:, 1] += 0.3 * t[:, None]
    angles = np.stack([np.zeros(frames + 1), 30.0 * t], axis=1)
    controls = controls_from_driven_positions(model, positions, frame_dt, twist_angles=angles, requires_grad=True)
    state0 = model.state(requires_grad=True)
    return model, solver, state0, controls, frame_dt


def _gradient_check(name: str, target: str, *, eps: float, relative: bool = True, device: str | None = None,
                    tolerance: float = 0.02, directions: int = 2, mask_driven: bool = False,
                    proportional: bool = False) -> CheckResult:
    from diffsim.core.rollout import Rollout
    from diffsim.rod.losses import VertexLinearLoss

    start = time.perf_counter()
    model, solver, state0, controls, frame_dt = gripper_scene(device=device)
    rng = np.random.default_rng(2)
    weights = rng.standard_normal((model.vertex_count, 3))
    loss_x = VertexLinearLoss(model, weights)

    def frame_loss(m, s, frame, loss):
        if frame % 5 == 4:
            loss_x(m, s, loss)

    rollout = Rollout(solver, model, state0, controls, frame_dt=frame_dt, substeps="auto", checkpoint_every=7,
                      frame_loss=frame_loss)
    array = rollout_input(model, state0, controls, target)
    mask = None
    if mask_driven:
        driven = model.vertex_driven.numpy().astype(bool)
        mask = np.repeat(driven[:, None], 3, axis=1)
    explicit = None
    if proportional:
        # Parameters that are positive scales (stiffness, rest length, curvature) are probed by
        # random relative changes of every entry: value * N(0, 1), entry by entry.
        values = array.numpy().astype(np.float64)
        explicit = [values * np.random.default_rng(seed).standard_normal(values.shape) for seed in (1, 2)]
    result = rollout_gradient_check(name, rollout, array, (model, state0, *controls), eps=eps, relative=relative,
                                    directions=directions, explicit=explicit, mask=mask, tolerance=tolerance,
                                    details={"substeps": rollout.substeps})
    result.seconds = time.perf_counter() - start
    return result


# eps per quantity: the largest step whose finite difference has converged on this scene (checked
# by sweeping eps); relative to the values probed. Rest length acts strongly non-linearly (it sets
# where the cable lies on the ground), so its step is small.
GRADIENT_CHECKS = {
    "bend_stiffness": lambda d: _gradient_check("bend stiffness", "model.edge_bend_stiffness", eps=0.02, device=d,
                                                proportional=True),
    "twist_stiffness": lambda d: _gradient_check("twist stiffness", "model.edge_twist_stiffness", eps=0.05,
                                                 device=d, proportional=True),
    "damping": lambda d: _gradient_check("linear damping", "model.rod_linear_damping", eps=0.2, device=d,
                                         directions=1),
    "air_drag": lambda d: _gradient_check("air drag", "model.rod_air_drag", eps=0.05, device=d, directions=1),
    "rest_curvature": lambda d: _gradient_check("rest curvature", "model.vertex_rest_curvature", eps=0.05,
                                                device=d),
    "rest_length": lambda d: _gradient_check("rest length", "model.edge_rest_length", eps=2e-4, device=d,
                                             proportional=True),
    "driven_end": lambda d: _gradient_check("driven-end velocity (frame 3)", "controls[3].vertex_velocity", eps=0.02,
                                            device=d, mask_driven=True),
    "twist_rate": lambda d: _gradient_check("clamped-end twist rate (frame 3)", "controls[3].edge_twist_rate",
                                            eps=0.2, device=d, directions=1),
}


def run_physics_checks(*, device: str | None = None, only: list[str] | None = None) -> list[CheckResult]:
    """Run the physics checks (all, or those named in ``only``) and return their results."""
    return run_checks(PHYSICS_CHECKS, device=device, only=only, known=[*PHYSICS_CHECKS, *GRADIENT_CHECKS])


def run_gradient_checks(*, device: str | None = None, only: list[str] | None = None) -> list[CheckResult]:
    """Run the finite-difference gradient checks (all, or those named in ``only``)."""
    return run_checks(GRADIENT_CHECKS, device=device, only=only, known=[*PHYSICS_CHECKS, *GRADIENT_CHECKS],
                      gradients=True)
