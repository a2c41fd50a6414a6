"""Discrete elastic rods: forces against energy gradients, closed-form physics checks, contact and
friction, finite-difference gradients, batching, checkpointing and input validation."""

import math

import numpy as np
import pytest
import warp as wp

from diffsim.core.rollout import Rollout
from diffsim.errors import InvalidParameter, UnstableTimeStep
from diffsim.rod import RodBuilder, RodSolver, controls_from_driven_positions
from diffsim.rod import validation as checks


def _wavy(n=6):
    k = np.arange(n)
    return np.stack([np.linspace(0.0, 0.5, n), 0.03 * np.sin(k), 0.02 * np.cos(1.3 * k)], axis=1)


def _transport(d, a, b):
    w, c = np.cross(a, b), a @ b
    d = d * c + np.cross(w, d) + w * (w @ d) / (1 + c)
    d = d - (d @ b) * b
    return d / np.linalg.norm(d)


@pytest.mark.parametrize("part", ["bend", "twist"])
def test_forces_are_minus_the_energy_gradient(part):
    """One explicit step from rest moves each vertex by dt^2 F / m; F must equal -dE/dx, with the
    reference frames carried by parallel transport in time exactly as the solver does."""
    pts = _wavy()
    n = len(pts)
    bend, twist, clamp = (0.01, 1e-9, ()) if part == "bend" else (1e-9, 0.02, ("first", "last"))
    builder = RodBuilder(gravity=(0.0, 0.0, 0.0))
    builder.add_rod(pts, bend_stiffness=bend, twist_stiffness=twist, stretch_stiffness=1e-9, clamp_twist=clamp,
                    mass_per_length=0.2, rest_curvature=np.zeros((n, 2)))
    model = builder.finalize("cpu")
    solver = RodSolver(model, inextensible=False, stability=1.0)
    state = model.state()
    state.edge_theta.assign(np.array([0.3, 0, 0, 0, -0.5], dtype=np.float32))
    out = model.state()
    dt = 4e-3
    solver.step(model, state, out, model.control(), dt)
    force = (out.vertex_x.numpy().astype(np.float64) - pts) / dt**2 * model.vertex_mass.numpy()[:, None]

    d1 = state.edge_d1.numpy().astype(np.float64)
    t_old = np.diff(pts, axis=0)
    t_old /= np.linalg.norm(t_old, axis=1, keepdims=True)

    def energy(x):
        s = model.state()
        s.edge_theta.assign(state.edge_theta.numpy())
        t_new = np.diff(x, axis=0)
        t_new /= np.linalg.norm(t_new, axis=1, keepdims=True)
        s.vertex_x.assign(x.astype(np.float32))
        s.edge_d1.assign(np.array([_transport(d, a, b) for d, a, b in zip(d1, t_old, t_new, strict=True)],
                                  dtype=np.float32))
        return solver.energy(model, s)[0, 2:].sum()

    h = 1e-3
    gradient = np.zeros_like(pts)
    for i in range(n):
        for k in range(3):
            p, m = pts.copy(), pts.copy()
            p[i, k] += h
            m[i, k] -= h
            gradient[i, k] = (energy(p) - energy(m)) / (2 * h)
    assert np.abs(force + gradient).max() < 2e-3 * np.abs(gradient).max()


@pytest.mark.parametrize("name", list(checks.PHYSICS_CHECKS))
def test_physics_check(name):
    result = checks.PHYSICS_CHECKS[name](device="cpu")
    assert result.passed, f"{result.name}: error {result.error:.4g} > {result.tolerance}"


@pytest.mark.parametrize("name", list(checks.GRADIENT_CHECKS))
def test_gradient_check(name):
    result = checks.GRADIENT_CHECKS[name]("cpu")
    assert result.passed, f"{result.name}: error {result.error:.4g} (fd {result.details['fd']}, " \
                          f"tape {result.details['tape']})"


def test_rod_comes_to_rest_on_the_ground_at_its_radius():
    n, radius = 8, 0.01
    x = np.stack([np.linspace(0, 0.4, n), np.zeros(n), np.full(n, 0.05)], axis=1)
    builder = RodBuilder()
    builder.add_rod(x, bend_stiffness=1e-3, linear_damping=2.0, contact_radius=radius)
    builder.add_ground(friction=0.5)
    model = builder.finalize("cpu")
    solver = RodSolver(model)
    state = checks.simulate(model, solver, model.state(), 600, 2e-3)
    z = state.vertex_x.numpy()[:, 2]
    assert np.all(np.abs(z - radius) < 2e-4), z


def test_sliding_distance_matches_coulomb_friction():
    """A straight rod lying on the floor, launched along its axis at v0, slides v0^2 / (2 mu g)."""
    n, radius, v0, mu = 6, 0.005, 0.5, 0.4
    x = np.stack([np.linspace(0, 0.3, n), np.zeros(n), np.full(n, radius)], axis=1)
    builder = RodBuilder()
    builder.add_rod(x, bend_stiffness=1e-3, contact_radius=radius, velocities=np.tile([v0, 0.0, 0.0], (n, 1)))
    builder.add_ground(friction=mu)
    model = builder.finalize("cpu")
    solver = RodSolver(model, contact_smoothing=1e-6)
    dt = 1e-3
    state = checks.simulate(model, solver, model.state(), int(0.3 / dt), dt)
    distance = float(state.vertex_x.numpy()[0, 0])
    expected = v0**2 / (2 * mu * 9.81)
    assert abs(distance - expected) / expected < 0.03, (distance, expected)
    assert np.abs(state.vertex_v.numpy()).max() < 1e-3


def _two_rods(device="cpu", *, together=True):
    a = _wavy(7)
    b = _wavy(5) + np.array([0.0, 0.3, 0.0])
    models = []
    for group in ([a, b],) if together else ([a], [b]):
        builder = RodBuilder()
        for pts in group:
            builder.add_rod(pts, bend_stiffness=2e-3, linear_damping=0.3, driven_vertices=(0,))
        builder.add_ground(height=-0.05)
        models.append(builder.finalize(device))
    return models


def test_batch_equals_rods_run_alone():
    (both,) = _two_rods()
    alone = _two_rods(together=False)
    finals = []
    for model in (both, *alone):
        solver = RodSolver(model)
        finals.append(checks.simulate(model, solver, model.state(), 200, 2e-3).vertex_x.numpy())
    np.testing.assert_allclose(finals[0][:7], finals[1], atol=1e-6)
    np.testing.assert_allclose(finals[0][7:], finals[2], atol=1e-6)


def test_checkpointed_gradient_equals_storing_everything():
    model, solver, state0, controls, frame_dt = checks.gripper_scene(device="cpu", frames=10)
    weights = np.random.default_rng(0).standard_normal((model.vertex_count, 3))
    from diffsim.rod.losses import VertexLinearLoss

    loss = VertexLinearLoss(model, weights)
    grads = []
    for every in (1, 1000):
        rollout = Rollout(solver, model, state0, controls, frame_dt=frame_dt, substeps=8, checkpoint_every=every,
                          final_loss=lambda m, s, out: loss(m, s, out))
        model.zero_grad()
        rollout.forward()
        rollout.backward()
        grads.append(model.edge_bend_stiffness.grad.numpy().copy())
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_taped_steps_hold_at_most_one_segment_of_scratch():
    model, solver, state0, controls, frame_dt = checks.gripper_scene(device="cpu", frames=20)
    rollout = Rollout(solver, model, state0, controls, frame_dt=frame_dt, substeps=8, checkpoint_every=5,
                      final_loss=lambda m, s, out: None)
    rollout.forward()
    rollout.backward()
    assert solver.scratch_sets_created <= 5


def test_unstable_step_is_refused_with_the_limit():
    model, solver, state0, controls, _ = checks.gripper_scene(device="cpu", frames=2)
    limit = solver.max_stable_dt(model)
    with pytest.raises(UnstableTimeStep, match="explicit bending"):
        solver.step(model, state0, model.state(), controls[0], 3 * limit)


@pytest.mark.parametrize("kwargs, match", [
    ({"points": np.zeros((2, 3))}, "points"),
    ({"bend_stiffness": -1.0}, "bend_stiffness"),
    ({"driven_vertices": (9,)}, "driven_vertices"),
    ({"clamp_twist": ("middle",)}, "clamp_twist"),
    ({"mass_per_length": 0.0}, "mass_per_length"),
])
def test_bad_rod_parameters_are_named(kwargs, match):
    args = {"points": _wavy()}
    args.update(kwargs)
    with pytest.raises(InvalidParameter, match=match):
        RodBuilder().add_rod(args.pop("points"), **args)


def test_driven_trajectory_is_followed_exactly():
    pts = _wavy()
    builder = RodBuilder()
    builder.add_rod(pts, driven_vertices=(0, 5), bend_stiffness=1e-3)
    model = builder.finalize("cpu")
    frames = 10
    path = np.repeat(pts[None, [0, 5]], frames + 1, axis=0)
    path[:, :, 2] += np.linspace(0, 0.05, frames + 1)[:, None]
    controls = controls_from_driven_positions(model, path, 0.01)
    solver = RodSolver(model)
    rollout = Rollout(solver, model, model.state(), controls, frame_dt=0.01, substeps="auto")
    rollout.forward()
    np.testing.assert_allclose(rollout.final_state.vertex_x.numpy()[[0, 5]], path[-1], atol=1e-6)
    with pytest.raises(InvalidParameter, match="positions"):
        controls_from_driven_positions(model, path[:, :1], 0.01)


def test_collider_pushes_rod_aside():
    from diffsim.geometry import collider_sphere

    n = 9
    x = np.stack([np.linspace(-0.2, 0.2, n), np.zeros(n), np.full(n, 0.1)], axis=1)
    builder = RodBuilder(gravity=(0, 0, 0))
    builder.add_rod(x, bend_stiffness=1e-3, driven_vertices=(0, n - 1), contact_radius=0.005)
    builder.add_collider(collider_sphere(radius=0.05, position=(0.0, 0.0, 0.2), friction=0.0))
    model = builder.finalize("cpu")
    control = model.control()
    control.collider_velocity.assign(np.array([[0.0, 0.0, -0.5]], dtype=np.float32))
    solver = RodSolver(model)
    state = checks.simulate(model, solver, model.state(), 100, 2e-3, control=control)  # sphere moves 0.1 m down
    centre = state.collider_position.numpy()[0]
    gap = np.linalg.norm(state.vertex_x.numpy() - centre, axis=1).min()
    assert gap > 0.05 + 0.005 - 1e-3
    assert state.vertex_x.numpy()[n // 2, 2] < 0.1 - 0.02  # the middle was pushed down
    assert math.isfinite(gap)
    wp.synchronize()


def test_validate_and_bench_commands(capsys):
    import json

    from diffsim.cli import main

    assert main(["validate", "rod", "--only", "uniform_twist", "--json", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["checks"][0]["name"].startswith("twisted rod")
    assert main(["bench", "rod", "--frames", "3", "--batch", "3", "--repeats", "1", "--json", "--device", "cpu"]) == 0
    bench = json.loads(capsys.readouterr().out)
    for key in ("frame_ms_batch1", "frame_ms_batch1_forward_backward", "batch3_speedup"):
        assert bench[key] > 0
    assert main(["validate", "rod", "--only", "no_such_check"]) == 2
