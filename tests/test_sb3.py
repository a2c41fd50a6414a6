"""Stable-Baselines3 trains, unmodified, on a task's batched vector env through the adapter."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("stable_baselines3")

from stable_baselines3 import PPO  # noqa: E402

import diffsim.tasks  # noqa: E402,F401
from diffsim.controllers.sb3 import SB3VecEnv  # noqa: E402
from diffsim.errors import InvalidParameter  # noqa: E402
from diffsim.tasks.env import TASKS  # noqa: E402


def test_adapter_hands_sb3_the_terminal_observation():
    env = SB3VecEnv("Pinch-v0", num_envs=2, **TASKS["diffsim/Pinch-v0"].tiny)
    env.seed(0)
    obs = env.reset()
    assert obs.shape == (2, env.observation_space.shape[0])
    for _ in range(4):  # the tiny horizon is 4
        env.step_async(np.zeros((2, 3), np.float32))
        obs, reward, done, infos = env.step_wait()
    assert done.all() and all(info["TimeLimit.truncated"] for info in infos)
    assert all(info["terminal_observation"].shape == obs.shape[1:] for info in infos)


def test_short_ppo_run_learns_without_error():
    env = SB3VecEnv("Pinch-v0", num_envs=2, **TASKS["diffsim/Pinch-v0"].tiny)
    model = PPO("MlpPolicy", env, n_steps=8, batch_size=8, n_epochs=2, seed=0, device="cpu")
    model.learn(total_timesteps=32)
    assert model.num_timesteps >= 32
    action, _ = model.predict(env.reset(), deterministic=True)
    assert action.shape == (2, 3) and np.all(np.isfinite(action))


def test_rewards_reach_sb3_divided_by_the_random_episodes_scale():
    # a task's reward is its loss decrease (1e-5 per step on Push); SB3 sees it near unit size
    from diffsim.controllers.sb3 import episode_statistics
    from diffsim.tasks.env import TaskVectorEnv, task_type

    tiny = TASKS["diffsim/Push-v0"].tiny
    mean, spread, reward_scale = episode_statistics(task_type("Push-v0"), worlds=2, seed=0, options=tiny)
    assert 0 < reward_scale < 1e-2 and mean.shape == spread.shape
    envs = [SB3VecEnv(TaskVectorEnv(task_type("Push-v0"), num_envs=2, **tiny), reward_scale=s)
            for s in (1.0, reward_scale)]
    rewards = []
    for env in envs:
        env.seed(3)
        env.reset()
        env.step_async(np.full((2, 2), 0.5, np.float32))
        rewards.append(env.step_wait()[1])
    assert np.any(rewards[0] != 0)
    np.testing.assert_allclose(rewards[1], rewards[0] / reward_scale, rtol=1e-5)
    with pytest.raises(InvalidParameter, match="reward_scale"):
        SB3VecEnv(envs[0].env, reward_scale=0.0)
