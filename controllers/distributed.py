"""Worlds sharded over processes (and machines) with Ray.

Each :class:`WorldActor` is a Ray actor: its own process with its own Warp runtime and one batch of
a task's worlds, held to ``threads`` CPU threads (Warp's chunked launches through
``DIFFSIM_CPU_THREADS``, torch through ``torch.set_num_threads``). Two faces shard over actors:

- :class:`RayVectorEnv`: a gymnasium ``VectorEnv`` of ``num_envs`` worlds split into contiguous
  slices, one per actor, stepped in parallel; world ``i`` sees exactly what world ``i`` of a
  single-process :class:`~diffsim.tasks.env.TaskVectorEnv` sees (same seeds, same same-step
  autoreset), so SB3 collects its data over it unchanged;
- :class:`RayPlanBatch`: plays open-loop plans of a CEM/CMA-ES population, each actor its slice of
  the candidates, for :func:`controllers.sampling.train_sampling`.

``connect(address)`` joins a cluster (``"auto"`` inside one started with ``ray start``), or starts a
local Ray with ``address="local"``. Ray is the ``distributed`` extra: ``pip install
'diffsim[distributed]'``. On a cluster: ``ray start --head`` on one machine, ``ray start
--address=HEAD:6379`` on the others (each with diffsim installed at the same path), then any
``diffsim train ... --ray auto --actors N`` on the head.
"""

from __future__ import annotations

import os

import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from diffsim.errors import ConfigError, InvalidParameter

try:
    import ray
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ConfigError("diffsim.controllers.distributed needs Ray: pip install 'diffsim[distributed]'.") from exc

__all__ = ["WorldActor", "RayVectorEnv", "RayPlanBatch", "connect", "shards"]


def connect(address: str | None = "local", *, num_cpus: int | None = None) -> None:
    """Start or join Ray once per process: ``"local"`` starts one on this machine (``num_cpus``
    slots), anything else (``"auto"``, ``"HOST:PORT"``) joins that cluster."""
    if ray.is_initialized():
        return
    if address in (None, "local"):
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)


def shards(count: int, actors: int) -> list[slice]:
    """Contiguous slices of ``count`` worlds over ``actors`` (the first ones one longer)."""
    if not isinstance(actors, int) or actors < 1 or actors > count:
        raise InvalidParameter("actors", actors, f"integers in [1, {count}] (at most one actor per world)")
    bounds = [count * i // actors for i in range(actors + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(actors)]


class _Worlds:
    """What runs inside an actor: a task's worlds, as a vector env and as a plan player."""

    def __init__(self, task_id: str, num_worlds: int, options: dict, threads: int):
        os.environ["DIFFSIM_CPU_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)
        from diffsim.tasks.env import TaskVectorEnv, task_type

        self.env = TaskVectorEnv(task_type(task_id), num_envs=num_worlds, **options)
        self.batch = self.env.batch

    def spaces(self):
        return self.env.single_observation_space, self.env.single_action_space, self.env.task.horizon

    def reset(self, seeds, mask):
        options = None if mask is None else {"reset_mask": mask}
        return self.env.reset(seed=seeds, options=options)

    def step(self, actions):
        return self.env.step(actions)

    def play(self, actions: np.ndarray, seeds: list[int]):
        """Play ``actions`` (frames, worlds, dim) in actuator units from the variants of ``seeds``;
        returns each world's final loss and score."""
        import gymnasium as gym

        for w, s in enumerate(seeds):
            self.batch.rngs[w] = gym.utils.seeding.np_random(int(s))[0]
        self.batch.reset()
        for frame in range(actions.shape[0]):
            self.batch.step(actions[frame], check_finite=False)  # as PlanBatch: a diverged world ranks last
        return self.batch.loss.copy(), np.asarray(self.batch.score(), np.float64)


WorldActor = ray.remote(_Worlds)


def _actors(task_id: str, count: int, actors: int, options: dict, threads: int):
    slices = shards(count, actors)
    handles = [WorldActor.options(num_cpus=threads).remote(task_id, s.stop - s.start, options, threads)
               for s in slices]
    return slices, handles


class RayVectorEnv(VectorEnv):
    """``num_envs`` worlds of a task over ``actors`` Ray actors (see the module header)."""

    metadata = {"render_modes": [], "autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(self, task_id: str, *, num_envs: int, actors: int = 2, threads: int = 1, **options):
        from diffsim.tasks.env import task_type

        self.task_id = task_type(task_id).id
        self.num_envs = num_envs
        self.slices, self.actors = _actors(self.task_id, num_envs, actors, options, threads)
        obs_space, action_space, self.horizon = ray.get(self.actors[0].spaces.remote())
        self.single_observation_space, self.single_action_space = obs_space, action_space
        self.observation_space = batch_space(obs_space, num_envs)
        self.action_space = batch_space(action_space, num_envs)

    def reset(self, *, seed: int | list[int] | None = None, options: dict | None = None):
        if seed is not None:
            seeds = [seed + i for i in range(self.num_envs)] if isinstance(seed, int) else list(seed)
            if len(seeds) != self.num_envs:
                raise InvalidParameter("seed", seed, f"an int or a list of {self.num_envs} ints")
        mask = None if not options or "reset_mask" not in options else np.asarray(options["reset_mask"], bool)
        parts = ray.get([a.reset.remote(None if seed is None else seeds[s], None if mask is None else mask[s])
                         for a, s in zip(self.actors, self.slices, strict=True)])
        return np.concatenate([p[0] for p in parts]), _merge([p[1] for p in parts])

    def step(self, actions):
        actions = np.asarray(actions)
        parts = ray.get([a.step.remote(actions[s]) for a, s in zip(self.actors, self.slices, strict=True)])
        obs, reward, terminated, truncated = (np.concatenate([p[k] for p in parts]) for k in range(4))
        return obs, reward, terminated, truncated, _merge([p[4] for p in parts])

    def close(self, **kwargs) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def _merge(infos: list[dict]) -> dict:
    """One info dict of the shards' infos (arrays concatenated, ``final_info`` merged likewise,
    object arrays of ``final_obs`` joined with None where a shard had no finished world)."""
    merged = {}
    sizes = [len(info["loss"]) for info in infos]
    keys = {k for info in infos for k in info}
    for key in keys:
        present = [info.get(key) for info in infos]
        if key == "final_info":
            parts = [p if p is not None else _blank_info(n) for p, n in zip(present, sizes, strict=True)]
            merged[key] = _merge(parts)
        elif key in ("final_obs", "_final_obs", "_final_info"):
            blank = (lambda n: np.empty(n, dtype=object)) if key == "final_obs" else (lambda n: np.zeros(n, bool))
            parts = [p if p is not None else blank(n) for p, n in zip(present, sizes, strict=True)]
            merged[key] = np.concatenate(parts)
        else:
            merged[key] = np.concatenate(present)
    return merged


def _blank_info(n: int) -> dict:
    return {"loss": np.zeros(n), "score": np.zeros(n), "_loss": np.zeros(n, bool), "_score": np.zeros(n, bool)}


class RayPlanBatch:
    """The plan player of :mod:`controllers.sampling` with its worlds over Ray actors: world
    ``v * population + j`` plays variant ``v`` (seeded ``seed + v``), as in one process."""

    def __init__(self, kind, variants: int, population: int, seed: int, options: dict, *, actors: int = 2,
                 threads: int = 1):
        self.variants, self.population, self.seed = variants, population, seed
        count = variants * population
        self.slices, self.actors = _actors(kind.id, count, actors, options, threads)
        _, action_space, self.horizon = ray.get(self.actors[0].spaces.remote())
        low, high = action_space.low.astype(np.float64), action_space.high.astype(np.float64)
        self.middle, self.half = 0.5 * (low + high), 0.5 * (high - low)
        self.action_dim = low.size
        self.seeds = [seed + w // population for w in range(count)]

    def physical(self, normalised: np.ndarray) -> np.ndarray:
        return self.middle + self.half * normalised

    def play(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``actions`` (horizon, worlds, dim) in normalised units -> (final loss, score) per world."""
        physical = self.physical(actions)
        parts = ray.get([a.play.remote(physical[:, s], self.seeds[s])
                         for a, s in zip(self.actors, self.slices, strict=True)])
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
