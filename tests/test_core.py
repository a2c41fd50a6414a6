"""Core: checkpointed rollouts against a store-everything tape, memory bounds, torch bridge."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import warp as wp

from diffsim.core import Rollout, check_grad
from diffsim.core.torch import rollout_loss
from diffsim.errors import ConfigError, InvalidParameter, SimulationDiverged
from tests.toy_solver import ToySolver, make_toy


@wp.kernel
def _sum_dot(x: wp.array(dtype=wp.vec3), w: wp.array(dtype=wp.vec3), loss: wp.array(dtype=float)):
    i = wp.tid()
    wp.atomic_add(loss, 0, wp.dot(x[i], w[i]))


def _losses(n, seed=1):
    rng = np.random.default_rng(seed)
    w_frame = wp.array(rng.standard_normal((n, 3)).astype(np.float32), dtype=wp.vec3)
    w_final = wp.array(rng.standard_normal((n, 3)).astype(np.float32), dtype=wp.vec3)

    def frame_loss(model, state, frame, loss):
        wp.launch(_sum_dot, n, inputs=[state.v, w_frame], outputs=[loss])

    def final_loss(model, state, loss):
        wp.launch(_sum_dot, n, inputs=[state.x, w_final], outputs=[loss])

    return frame_loss, final_loss


def _store_everything_grads(model, state0, controls, substeps, dt, frame_loss, final_loss):
    """Reference: one tape over the whole horizon, a fresh solver (fresh scratch) per step."""
    n = state0.x.shape[0]
    loss = wp.zeros(1, dtype=float, requires_grad=True)
    tape = wp.Tape()
    states = [state0]
    with tape:
        for t in range(len(controls) * substeps):
            solver = ToySolver(n)
            nxt = solver.new_state(model, requires_grad=True)
            solver.step(model, states[-1], nxt, controls[t // substeps], dt)
            states.append(nxt)
            if (t + 1) % substeps == 0:
                frame_loss(model, nxt, (t + 1) // substeps - 1, loss)
        final_loss(model, states[-1], loss)
    tape.backward(loss)
    return float(loss.numpy()[0]), {
        "x0": state0.x.grad.numpy().copy(),
        "stiffness": model.stiffness.grad.numpy().copy(),
        "force3": controls[3].force.grad.numpy().copy(),
    }


def _zero_all(model, state0, controls):
    model.zero_grad()
    state0.zero_grad()
    for c in controls:
        c.zero_grad()


@pytest.mark.parametrize("checkpoint_every", [1, 4, 7, 1000])
@pytest.mark.parametrize("fresh_scratch", [False, True], ids=["shared-scratch", "tape-per-segment"])
def test_checkpointed_gradient_equals_store_everything(checkpoint_every, fresh_scratch):
    model, solver, state0, controls = make_toy(n=5, frames=6)
    solver.fresh_scratch = fresh_scratch
    frame_loss, final_loss = _losses(5)
    substeps, frame_dt = 3, 0.03
    ref_loss, ref = _store_everything_grads(model, state0, controls, substeps, frame_dt / substeps,
                                            frame_loss, final_loss)
    _zero_all(model, state0, controls)
    rollout = Rollout(solver, model, state0, controls, frame_dt=frame_dt, substeps=substeps,
                      checkpoint_every=checkpoint_every, frame_loss=frame_loss, final_loss=final_loss)
    loss = rollout.forward()
    rollout.backward()
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    got = {"x0": state0.x.grad.numpy(), "stiffness": model.stiffness.grad.numpy(),
           "force3": controls[3].force.grad.numpy()}
    for key, value in ref.items():
        scale = np.max(np.abs(value))
        assert scale > 0
        np.testing.assert_allclose(got[key], value, rtol=0, atol=1e-5 * scale, err_msg=key)


def test_gradient_matches_finite_differences():
    model, solver, state0, controls = make_toy(n=3, frames=5, seed=3)
    frame_loss, final_loss = _losses(3, seed=4)
    rollout = Rollout(solver, model, state0, controls, frame_dt=0.05, substeps=2, checkpoint_every=3,
                      frame_loss=frame_loss, final_loss=final_loss)

    def run():
        return rollout.forward()

    _zero_all(model, state0, controls)
    run()
    rollout.backward()
    for array, name in [(model.stiffness, "stiffness"), (state0.v, "v0"), (controls[2].force, "force")]:
        result = check_grad(run, array, array.grad.numpy(), name=name, eps=1e-2, num_directions=3)
        assert result.passed(0.01), str(result)


def test_memory_bound_long_horizon():
    """A 2,000-step rollout keeps at most T/K + K states, and its gradient stays right."""
    model, solver, state0, controls = make_toy(n=2, frames=2000, seed=5)
    for c in controls:
        c.force.zero_()
    frame_loss, final_loss = _losses(2)
    K = 40
    rollout = Rollout(solver, model, state0, controls, frame_dt=1e-3, substeps=1, checkpoint_every=K,
                      final_loss=final_loss)
    rollout.forward()
    _zero_all(model, state0, controls)
    rollout.backward()
    T = 2000
    assert rollout.stats.states_allocated <= math.ceil(T / K) + K
    assert rollout.stats.checkpoints == T // K - 1
    assert rollout.stats.backward_steps_run == T
    assert np.all(np.isfinite(state0.x.grad.numpy()))


def test_torch_bridge_matches_warp_gradients():
    model, solver, state0, controls = make_toy(n=4, frames=4, seed=6)
    frame_loss, final_loss = _losses(4, seed=7)
    rollout = Rollout(solver, model, state0, controls, frame_dt=0.04, substeps=2,
                      frame_loss=frame_loss, final_loss=final_loss)
    stiffness = torch.tensor(model.stiffness.numpy(), requires_grad=True)
    forces = torch.tensor(np.stack([c.force.numpy() for c in controls]), requires_grad=True)
    loss = rollout_loss(rollout, {"model.stiffness": stiffness, "controls.force": forces})
    (2.0 * loss).backward()
    _zero_all(model, state0, controls)
    rollout.forward()
    rollout.backward()
    np.testing.assert_allclose(stiffness.grad.numpy(), 2.0 * model.stiffness.grad.numpy(), rtol=1e-6)
    np.testing.assert_allclose(forces.grad[1].numpy(), 2.0 * controls[1].force.grad.numpy(), rtol=1e-6)


def test_rollout_rejects_bad_arguments():
    model, solver, state0, controls = make_toy()
    with pytest.raises(ConfigError):
        Rollout(solver, model, state0, [], frame_dt=0.1)
    with pytest.raises(InvalidParameter, match="frame_dt"):
        Rollout(solver, model, state0, controls, frame_dt=-1.0)
    with pytest.raises(InvalidParameter, match="substeps"):
        Rollout(solver, model, state0, controls, frame_dt=0.1, substeps=0)
    with pytest.raises(ConfigError, match="forward"):
        Rollout(solver, model, state0, controls, frame_dt=0.1).backward()


def test_divergence_is_reported_with_step_and_array():
    model, solver, state0, controls = make_toy(n=2, frames=50)
    model.stiffness.fill_(1e9)  # explicit integration of a stiff cubic spring blows up
    rollout = Rollout(solver, model, state0, controls, frame_dt=0.1, check_every=1)
    with pytest.raises(SimulationDiverged, match=r"holds a non-finite value .* after step \d+"):
        rollout.forward()


def test_non_finite_controls_are_refused_by_name():
    model, solver, state0, controls = make_toy(n=2, frames=3)
    controls[1].force.assign(np.array([[0, np.nan, 0], [0, 0, 0]], dtype=np.float32))
    rollout = Rollout(solver, model, state0, controls, frame_dt=0.01)
    with pytest.raises(InvalidParameter, match=r"controls\[1\]\.force"):
        rollout.forward()
    forces = torch.zeros((3, 2, 3))
    forces[2, 0, 0] = float("inf")
    with pytest.raises(InvalidParameter, match="controls.force"):
        rollout_loss(rollout, {"controls.force": forces})


def test_simulate_never_writes_its_input_state():
    from diffsim.core.validation import simulate
    from diffsim.materials import preset
    from diffsim.mpm import MPMBuilder, MPMSolver

    builder = MPMBuilder(grid_res=16, domain_size=0.3)
    builder.add_box((0.15, 0.15, 0.1), (0.02, 0.02, 0.02), preset("rubber"))
    model = builder.finalize("cpu")
    solver = MPMSolver(model)
    state = model.state()
    x0 = state.particle_x.numpy().copy()
    final = simulate(model, solver, state, 3, solver.max_stable_dt(model))
    np.testing.assert_array_equal(state.particle_x.numpy(), x0)  # three steps, two buffers: none is the input
    assert not np.array_equal(final.particle_x.numpy(), x0)
