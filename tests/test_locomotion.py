"""SoftWalker: the scene's muscles, loss and score definitions, the differentiable face against
finite differences, and an open-loop gait that walks (the gymnasium checks run in test_tasks)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import warp as wp

from diffsim.errors import InvalidParameter
from diffsim.tasks.env import DiffTaskEnv
from diffsim.tasks.locomotion import SoftWalker
from diffsim.tasks.task import TaskBatch


def test_scene_loss_and_score_at_rest():
    task = SoftWalker(num_worlds=2, **SoftWalker.tiny)
    model = task.scene.model
    group, world = model.particle_actuation_group.numpy(), model.particle_world.numpy()
    assert model.actuation_groups == 8 and task.action_dim == 8
    for w in range(2):
        assert set(np.unique(group[world == w])) == set(range(-1, 8))
    batch = TaskBatch(task)
    for w in range(2):
        batch.seed(w, w)
    batch.reset()
    assert batch.observation().shape == (2, task.observation_dim)
    # at rest the velocity error is the whole command (walk error 1), nothing was covered (score 0)
    # and nothing paid yet (objective 0)
    error = wp.zeros(2, dtype=float, device=model.device)
    task.walk_error(batch.state, error)
    np.testing.assert_allclose(error.numpy(), 1.0, atol=1e-5)
    np.testing.assert_array_equal(batch.loss, 0.0)
    np.testing.assert_array_equal(batch.score(), 0.0)
    # a step standing still costs a horizon's share of that error: the reward is minus it
    reward, _, _ = batch.step(np.zeros((2, 8), np.float32))
    np.testing.assert_allclose(reward, -1.0 / task.config.horizon, rtol=1e-3)
    np.testing.assert_allclose(batch.loss, -reward)
    np.testing.assert_allclose(batch.state.world_time.numpy(), task.config.frame_dt, rtol=1e-5)
    speeds = np.linalg.norm(task._command_host[:, :2], axis=1)
    assert np.all((speeds >= task.config.min_speed) & (speeds <= task.config.max_speed))


def test_config_is_validated():
    with pytest.raises(InvalidParameter, match="max_speed"):
        SoftWalker(max_speed=1.0)  # 2 m in a 1 m domain
    with pytest.raises(InvalidParameter, match="actuation_strength"):
        SoftWalker(actuation_strength=1e5)
    with pytest.raises(InvalidParameter, match="grid_res"):
        SoftWalker(grid_res=16)


def _summed_reward(denv: DiffTaskEnv, actions: torch.Tensor) -> torch.Tensor:
    denv.reset(seed=0)
    total = torch.zeros(())
    for a in actions:
        _, reward, *_ = denv.step(a)
        total = total + reward.sum()
    return total


def test_differentiable_face_matches_finite_differences():
    """Summed reward of 3 steps of 2 worlds (standing on the floor) w.r.t. the muscle activations.

    FD settles at eps 1e-4 .. 3e-4 (0.1% / 0.002% from the tape); from 1e-3 up the floor's
    friction kinks bend it by 0.4-1.5%."""
    denv = DiffTaskEnv(SoftWalker, num_envs=2, **SoftWalker.tiny)
    rng = np.random.default_rng(1)
    base = torch.tensor(rng.uniform(-0.6, 0.6, (3, 2, denv.action_dim)), dtype=torch.float32)
    actions = base.clone().requires_grad_(True)
    _summed_reward(denv, actions).backward()
    direction = torch.tensor(rng.normal(size=base.shape), dtype=torch.float32)
    tape = float((actions.grad * direction).sum())
    eps = 3e-4
    fd = (float(_summed_reward(denv, base + eps * direction))
          - float(_summed_reward(denv, base - eps * direction))) / (2 * eps)
    assert abs(tape - fd) <= 0.02 * abs(fd), (tape, fd)


def test_open_loop_gait_walks_forward():
    """A sinusoidal gait (1 s period; the rear half of each leg a quarter period behind its front
    half, the rear legs a quarter period ahead of the front ones) carries the default robot
    forward at ~0.07 m/s over the 2 s episode."""
    task = SoftWalker()
    batch = TaskBatch(task)
    batch.seed(0, 0)
    batch.reset()
    start = task.center_of_mass(batch.state)[0].numpy()[0]
    leg_phase = [0.0, 0.0, 0.25, 0.25]
    for k in range(task.horizon):
        t = k * task.config.frame_dt
        a = [math.sin(2 * math.pi * (t + leg_phase[leg] - half * 0.25)) for leg in range(4) for half in (0, 1)]
        batch.step(np.array([a], np.float32))
    moved = task.center_of_mass(batch.state)[0].numpy()[0] - start
    seconds = task.horizon * task.config.frame_dt
    assert moved[0] / seconds > 0.035, moved  # measured 0.071 m/s
    assert abs(moved[1]) < 0.3 * moved[0], moved
    assert 0.0 < batch.score()[0] <= 1.0
