"""Trajectory optimiser: the loss goes down, bounds hold, and a crashed run resumes from its
checkpoint at the saved iteration with exactly the result of an uninterrupted run.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import warp as wp

from diffsim.controllers import Bounds, optimize
from diffsim.controllers.trajectory import load_checkpoint
from diffsim.core import Rollout
from diffsim.errors import ConfigError
from tests.toy_solver import make_toy

FRAMES = 8


@wp.kernel
def _squared_distance(x: wp.array(dtype=wp.vec3), target: wp.array(dtype=wp.vec3),
                      loss: wp.array(dtype=float)):
    i = wp.tid()
    d = x[i] - target[i]
    wp.atomic_add(loss, 0, wp.dot(d, d))


def _toy_rollout(seed: int = 0) -> Rollout:
    """Toy particles on cubic springs, pushed by per-frame forces towards fixed targets."""
    model, solver, state0, controls = make_toy(n=4, frames=FRAMES, seed=seed)
    target = wp.array(np.full((4, 3), 0.3, dtype=np.float32), dtype=wp.vec3)

    def final_loss(model, state, loss):
        wp.launch(_squared_distance, 4, inputs=[state.x, target], outputs=[loss])

    return Rollout(solver, model, state0, controls, frame_dt=0.05, substeps=2, final_loss=final_loss)


def _forces() -> dict[str, torch.Tensor]:
    return {"controls.force": torch.zeros(FRAMES, 4, 3)}


def test_loss_decreases_on_toy():
    result = optimize(_toy_rollout(), _forces(), iterations=15, learning_rate=0.5, progress=False)
    assert len(result.losses) == 15
    assert result.best_loss < 0.2 * result.losses[0]
    assert result.best_loss == min(result.losses)
    assert result.losses[result.best_iteration] == result.best_loss
    assert result.wall_time > 0


class _Crash(Exception):
    pass


def test_resume_after_crash_matches_uninterrupted_run(tmp_path):
    iterations = 7
    reference = optimize(_toy_rollout(), _forces(), iterations=iterations, learning_rate=0.3,
                         checkpoint_path=tmp_path / "reference.pt", progress=False)

    path = tmp_path / "crashing.pt"

    def crash_at_4(iteration, loss, parameters):
        if iteration == 4:
            raise _Crash()

    with pytest.raises(_Crash):
        optimize(_toy_rollout(), _forces(), iterations=iterations, learning_rate=0.3, checkpoint_path=path,
                 on_iteration=crash_at_4, progress=False)
    saved = load_checkpoint(path)
    assert saved["iteration"] == 4 and len(saved["losses"]) == 4
    assert list(tmp_path.glob("*.tmp")) == []  # atomic writes leave no temp files

    seen = []
    resumed = optimize(_toy_rollout(), _forces(), iterations=iterations, learning_rate=0.3,
                       checkpoint_path=path, on_iteration=lambda i, loss, p: seen.append(i), progress=False)
    assert resumed.resumed_from == 4
    assert seen == [4, 5, 6]
    assert resumed.losses == reference.losses
    torch.testing.assert_close(resumed.parameters["controls.force"], reference.parameters["controls.force"],
                               rtol=0, atol=0)
    torch.testing.assert_close(resumed.best_parameters["controls.force"],
                               reference.best_parameters["controls.force"], rtol=0, atol=0)

    # A finished checkpoint resumes to an immediate return with the same result.
    again = optimize(_toy_rollout(), _forces(), iterations=iterations, learning_rate=0.3,
                     checkpoint_path=path, progress=False)
    assert again.losses == reference.losses and again.resumed_from == iterations


def test_on_iteration_can_stop_early():
    result = optimize(_toy_rollout(), _forces(), iterations=10, learning_rate=0.3, progress=False,
                      on_iteration=lambda i, loss, p: i == 2)
    assert result.stopped_early and len(result.losses) == 3


def test_bounds_hold_after_every_step():
    seen_norms, seen_max = [], []

    def watch(iteration, loss, parameters):
        force = parameters["controls.force"].detach()
        seen_norms.append(float(force.norm(dim=-1).max()))
        seen_max.append(float(force.max()))

    bounds = {"controls.force": Bounds(lower=-0.25, upper=0.2, max_norm=0.3)}
    result = optimize(_toy_rollout(), _forces(), iterations=6, learning_rate=0.5, bounds=bounds,
                      on_iteration=watch, progress=False)
    final = result.parameters["controls.force"]
    assert float(final.norm(dim=-1).max()) <= 0.3 + 1e-6
    assert float(final.max()) <= 0.2 + 1e-6 and float(final.min()) >= -0.25 - 1e-6
    assert max(seen_norms) <= 0.3 + 1e-6 and max(seen_max) <= 0.2 + 1e-6
    # the bound is active: the unconstrained optimum needs larger forces
    assert math.isclose(float(final.max()), 0.2, rel_tol=1e-5) or float(final.norm(dim=-1).max()) > 0.29


def test_inputs_map_and_regularizer():
    # Optimise one force shared by all frames and particles; the map broadcasts it.
    shared = {"force": torch.zeros(3)}
    result = optimize(
        _toy_rollout(), shared, iterations=8, learning_rate=0.3, progress=False,
        inputs=lambda p: {"controls.force": p["force"].expand(FRAMES, 4, 3)},
        regularizer=lambda p: 1e-3 * (p["force"] ** 2).sum(),
    )
    assert result.best_loss < result.losses[0]
    assert result.parameters["force"].shape == (3,)


def test_mismatched_checkpoint_is_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    optimize(_toy_rollout(), _forces(), iterations=1, learning_rate=0.1, checkpoint_path=path, progress=False)
    with pytest.raises(ConfigError, match="checkpoint"):
        optimize(_toy_rollout(), {"controls.force": torch.zeros(FRAMES, 5, 3)}, iterations=2,
                 learning_rate=0.1, checkpoint_path=path, progress=False)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="delete it"):
        optimize(_toy_rollout(), _forces(), iterations=2, learning_rate=0.1, checkpoint_path=path,
                 progress=False)


def test_bad_arguments_are_refused():
    with pytest.raises(ConfigError):
        optimize(_toy_rollout(), {}, iterations=1, learning_rate=0.1, progress=False)
    with pytest.raises(ConfigError, match="bounds"):
        optimize(_toy_rollout(), _forces(), iterations=1, learning_rate=0.1,
                 bounds={"other": Bounds(upper=1.0)}, progress=False)
    with pytest.raises(ValueError):
        optimize(_toy_rollout(), _forces(), iterations=1, learning_rate=-1.0, progress=False)


def test_loss_decreases_on_tiny_mpm_scene():
    """A real MPM rollout: the initial velocity of a small elastic block is tuned to hit a target."""
    from diffsim.materials import Material, MaterialModel
    from diffsim.mpm import MPMBuilder, MPMSolver
    from diffsim.mpm.losses import CenterOfMassLoss

    builder = MPMBuilder(grid_res=16, domain_size=0.4, gravity=(0.0, 0.0, 0.0))
    block = Material(MaterialModel.FIXED_COROTATED, density=1000.0, young_modulus=2.0e4, poisson_ratio=0.3)
    builder.add_box((0.2, 0.2, 0.2), (0.03, 0.03, 0.03), block)
    model = builder.finalize("cpu")
    solver = MPMSolver(model)
    target = model.initial_x.mean(axis=0) + np.array([0.02, -0.01, 0.0])
    state0 = model.state(requires_grad=True)
    controls = [model.control() for _ in range(3)]
    rollout = Rollout(solver, model, state0, controls, frame_dt=0.02, substeps="auto",
                      final_loss=CenterOfMassLoss(model, target))
    n = model.particle_count
    result = optimize(rollout, {"velocity": torch.zeros(3)}, iterations=5, learning_rate=0.1, progress=False,
                      inputs=lambda p: {"state0.particle_v": p["velocity"].expand(n, 3)})
    assert result.losses[2] < result.losses[1] < result.losses[0]
    assert result.best_loss < 0.2 * result.losses[0]
