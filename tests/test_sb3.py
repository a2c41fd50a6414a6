"""Stable-Baselines3 trains, unmodified, on a task's batched vector env through the adapter."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("stable_baselines3")

from stable_baselines3 import PPO  # noqa: E402

import diffsim.tasks  # noqa: E402,F401
from diffsim.controllers.sb3 import SB3VecEnv  # noqa: E402
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
