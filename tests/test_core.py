"""Core: checkpointed rollouts against a store-everything tape, memory bounds, torch bridge."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import warp as wp

from diffsim.core import Control, Model, Rollout, Solver, State, check_grad
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
@pytest.mark.parametrize("rescale", [False, True], ids=["float32", "rescaled"])
def test_checkpointed_gradient_equals_store_everything(checkpoint_every, fresh_scratch, rescale):
    model, solver, state0, controls = make_toy(n=5, frames=6)
    solver.fresh_scratch = fresh_scratch
    frame_loss, final_loss = _losses(5)
    substeps, frame_dt = 3, 0.03
    ref_loss, ref = _store_everything_grads(model, state0, controls, substeps, frame_dt / substeps,
                                            frame_loss, final_loss)
    _zero_all(model, state0, controls)
    rollout = Rollout(solver, model, state0, controls, frame_dt=frame_dt, substeps=substeps,
                      checkpoint_every=checkpoint_every, frame_loss=frame_loss, final_loss=final_loss,
                      rescale_adjoint=rescale)
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


# -- adjoints beyond float32's range (Rollout(rescale_adjoint=True)) ------------------------------

@dataclass
class _MapModel(Model):
    gain: wp.array  # float per entry
    shift: wp.array  # float per entry
    device: str = "cpu"


@dataclass
class _MapState(State):
    x: wp.array


@dataclass
class _MapControl(Control):
    u: wp.array


@wp.kernel
def _stretch_and_fold(x: wp.array(dtype=float), gain: wp.array(dtype=float), shift: wp.array(dtype=float),
                      u: wp.array(dtype=float), out: wp.array(dtype=float)):
    i = wp.tid()
    out[i] = wp.mod(gain[i] * x[i] + shift[i] + u[i], 1.0)  # bounded state, d out / d x = gain


@wp.kernel
def _sum_into(x: wp.array(dtype=float), loss: wp.array(dtype=float)):
    wp.atomic_add(loss, 0, x[wp.tid()])


class _MapSolver(Solver):
    """x <- (gain x + shift + u) mod 1: the state stays in [0, 1) while the adjoint of an entry
    with gain 2 doubles every step, like a chaotic system's."""

    tape_spans_steps = True

    def new_state(self, model, *, requires_grad=False):
        return _MapState(x=wp.zeros(model.gain.shape[0], dtype=float, requires_grad=requires_grad))

    def step(self, model, state_in, state_out, control, dt):
        wp.launch(_stretch_and_fold, model.gain.shape[0], inputs=[state_in.x, model.gain, model.shift, control.u],
                  outputs=[state_out.x])


def test_rescaled_adjoint_gives_gradients_beyond_float32_range():
    """Over 160 steps an entry of gain 2 has d(loss)/d(x0) ~ 2^161 (float32 ends at 2^128): the
    plain backward pass overflows and says so; with ``rescale_adjoint`` every gradient matches the
    float64 recursion, for entries whose adjoint grew past 2^64 and 2^128 and one that shrank."""
    from diffsim.errors import GradientDiverged

    gain = np.array([2.0, 1.5, 0.9])
    steps = 160

    def build():
        model = _MapModel(gain=wp.array(gain.astype(np.float32), requires_grad=True),
                          shift=wp.array(np.array([0.1234, 0.377, 0.05], np.float32), requires_grad=True))
        state0 = _MapState(x=wp.array(np.array([0.3, 0.6, 0.2], np.float32), requires_grad=True))
        controls = [_MapControl(u=wp.zeros(3, dtype=float, requires_grad=True)) for _ in range(steps)]
        return model, state0, controls

    def losses(model, state, frame, loss):
        wp.launch(_sum_into, 3, inputs=[state.x], outputs=[loss])

    model, state0, controls = build()
    plain = Rollout(_MapSolver(), model, state0, controls, frame_dt=1.0, checkpoint_every=16, frame_loss=losses,
                    final_loss=lambda m, s, loss: losses(m, s, 0, loss))
    plain.forward()
    with pytest.raises(GradientDiverged):
        plain.backward()

    model, state0, controls = build()
    rollout = Rollout(_MapSolver(), model, state0, controls, frame_dt=1.0, checkpoint_every=16, frame_loss=losses,
                      final_loss=lambda m, s, loss: losses(m, s, 0, loss), rescale_adjoint=True)
    rollout.forward()
    rollout.backward()
    # the float64 recursion: lambda_T = 2 (frame and final loss), lambda_t = gain lambda_{t+1} + 1
    lam = np.zeros((steps + 1, 3))
    lam[steps] = 2.0
    for t in range(steps - 1, 0, -1):
        lam[t] = gain * lam[t + 1] + 1.0
    expected = {"x0": gain * lam[1], "shift": lam[1:].sum(axis=0), "u7": lam[8]}
    got = {"x0": rollout.gradient(state0.x), "shift": rollout.gradient(model.shift),
           "u7": rollout.gradient(controls[7].u)}
    assert expected["x0"][0] > 1e48  # past float32 (3.4e38)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-4, err_msg=key)
    assert rollout.adjoint_exponent == 128
    assert np.isinf(state0.x.grad.numpy()[0]) and np.isfinite(state0.x.grad.numpy()[1:]).all()  # .grad is float32
