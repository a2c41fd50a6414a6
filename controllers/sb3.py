"""Stable-Baselines3 on diffsim tasks: an SB3 ``VecEnv`` over a task's batched vector env, so that
unmodified SB3 algorithms (PPO, SAC, ...) train on N worlds stepped as one simulation.

Needs the ``rl`` extra (``pip install diffsim[rl]``).
"""

from __future__ import annotations

import numpy as np

from diffsim.errors import ConfigError
from diffsim.tasks.env import TaskVectorEnv, task_type

try:
    from stable_baselines3.common.vec_env import VecEnv
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ConfigError("diffsim.controllers.sb3 needs stable-baselines3: pip install 'diffsim[rl]'.") from exc


class SB3VecEnv(VecEnv):
    """A diffsim task's vector env seen as an SB3 ``VecEnv``.

    SB3 expects same-step autoreset with the last observation of a finished episode in
    ``info["terminal_observation"]`` and ``info["TimeLimit.truncated"]`` set on time limits: the
    task vector env's SAME_STEP ``final_obs`` maps onto exactly that.

    Args:
        env: a :class:`~diffsim.tasks.env.TaskVectorEnv`, or a task name such as ``"Pinch-v0"``.
        num_envs: worlds, when ``env`` is a name.
        **options: task options, when ``env`` is a name.
    """

    def __init__(self, env: TaskVectorEnv | str, *, num_envs: int = 1, **options):
        if isinstance(env, str):
            env = TaskVectorEnv(task_type(env), num_envs=num_envs, **options)
        self.env = env
        super().__init__(env.num_envs, env.single_observation_space, env.single_action_space)
        self._actions: np.ndarray | None = None
        self._seed: int | None = None

    def reset(self) -> np.ndarray:
        obs, _ = self.env.reset(seed=self._seed)
        self._seed = None  # SB3 seeds once; later resets continue the worlds' generators
        return obs

    def seed(self, seed: int | None = None):
        self._seed = seed
        return [None if seed is None else seed + i for i in range(self.num_envs)]

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions, dtype=np.float32)

    def step_wait(self):
        obs, reward, terminated, truncated, info = self.env.step(self._actions)
        done = terminated | truncated
        infos = [{"loss": float(info["loss"][i]), "score": float(info["score"][i])} for i in range(self.num_envs)]
        if done.any():
            for i in np.flatnonzero(done):
                infos[i]["terminal_observation"] = info["final_obs"][i]
                infos[i]["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
                infos[i]["score"] = float(info["final_info"]["score"][i])
        return obs, reward.astype(np.float32), done, infos

    def close(self) -> None:
        self.env.close()

    def get_attr(self, attr_name, indices=None):
        return [getattr(self.env, attr_name) for _ in self._indices(indices)]

    def set_attr(self, attr_name, value, indices=None) -> None:
        setattr(self.env, attr_name, value)

    def env_method(self, method_name, *args, indices=None, **kwargs):
        return [getattr(self.env, method_name)(*args, **kwargs) for _ in self._indices(indices)]

    def env_is_wrapped(self, wrapper_class, indices=None):
        return [False for _ in self._indices(indices)]

    def get_images(self):
        return list(self.env.render() or [])

    def _indices(self, indices):
        if indices is None:
            return range(self.num_envs)
        return [indices] if isinstance(indices, int) else indices
