"""Stable-Baselines3 on diffsim tasks: an SB3 ``VecEnv`` over a task's batched vector env, so that
unmodified SB3 algorithms (PPO, SAC, ...) train on N worlds stepped as one simulation, and
:func:`train_sb3`, the ``diffsim train TASK --algo ppo|sac`` run.

The adapter shows SB3 actions in -1 .. 1 across each actuator's range (SB3's Gaussian policies
start with unit spread, which would pin physical bounds of a few cm/s at their limits) and, when
given, observations shifted and scaled by fixed statistics (those of one episode of uniformly
random actions, kept in the checkpoint and the policy file, so evaluation sees what training saw).
Rewards are divided by the root mean square of that episode's rewards: a task's reward is its
loss decrease per step, whose units make it 1e-5 on Push, and SB3's value losses and defaults
assume rewards near one (PPO on Push at 640 world-episodes, three seeds: score 0.036 +- 0.052
unscaled, 0.583 +- 0.143 scaled).

Needs the ``rl`` extra (``pip install diffsim[rl]``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from gymnasium import spaces

from diffsim.controllers.run import RunDirectory, check_counts
from diffsim.controllers.trajectory import load_checkpoint, save_checkpoint
from diffsim.errors import ConfigError, InvalidParameter
from diffsim.tasks.env import TaskVectorEnv, task_type

try:
    from stable_baselines3 import PPO, SAC
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.vec_env import VecEnv
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ConfigError("diffsim.controllers.sb3 needs stable-baselines3: pip install 'diffsim[rl]'.") from exc


class SB3VecEnv(VecEnv):
    """A diffsim task's vector env seen as an SB3 ``VecEnv``.

    SB3 expects same-step autoreset with the last observation of a finished episode in
    ``info["terminal_observation"]`` and ``info["TimeLimit.truncated"]`` set on time limits: the
    task vector env's SAME_STEP ``final_obs`` maps onto exactly that.

    Args:
        env: a :class:`~diffsim.tasks.env.TaskVectorEnv` (or a
            :class:`~controllers.distributed.RayVectorEnv`), or a task name such as ``"Pinch-v0"``.
        num_envs: worlds, when ``env`` is a name.
        **options: task options, when ``env`` is a name.
    """

    def __init__(self, env: TaskVectorEnv | str, *, num_envs: int = 1, normalize_actions: bool = True,
                 observation_mean: np.ndarray | None = None, observation_scale: np.ndarray | None = None,
                 reward_scale: float = 1.0, **options):
        if isinstance(env, str):
            env = TaskVectorEnv(task_type(env), num_envs=num_envs, **options)
        self.env = env
        low, high = env.single_action_space.low, env.single_action_space.high
        self._middle, self._half = 0.5 * (high + low), 0.5 * (high - low)
        self.normalize_actions = normalize_actions
        action_space = env.single_action_space
        if normalize_actions:
            action_space = spaces.Box(-1.0, 1.0, shape=action_space.shape, dtype=np.float32)
        self.observation_mean = observation_mean
        self.observation_scale = observation_scale
        if not (reward_scale > 0 and math.isfinite(reward_scale)):
            raise InvalidParameter("reward_scale", reward_scale, "(0, inf)")
        self.reward_scale = float(reward_scale)  #: what SB3 sees of a reward is reward / reward_scale
        observation_space = env.single_observation_space
        if observation_mean is not None:
            observation_space = spaces.Box(-np.inf, np.inf, shape=observation_space.shape, dtype=np.float32)
        super().__init__(env.num_envs, observation_space, action_space)
        self._actions: np.ndarray | None = None
        self._seed: int | list[int] | None = None
        #: wall seconds spent stepping the simulation (the rest of a run is SB3's own work)
        self.simulation_seconds = 0.0

    def normalise_observation(self, obs: np.ndarray) -> np.ndarray:
        """What SB3 sees of task observations ``obs``: shifted, scaled and clipped at 10 spreads."""
        if self.observation_mean is None:
            return obs
        return np.clip((obs - self.observation_mean) / self.observation_scale, -10.0, 10.0).astype(np.float32)

    def reset(self) -> np.ndarray:
        obs, _ = self.env.reset(seed=self._seed)
        self._seed = None  # SB3 seeds once; later resets continue the worlds' generators
        return self.normalise_observation(obs)

    def seed(self, seed: int | None = None):
        self._seed = seed
        return [None if seed is None else seed + i for i in range(self.num_envs)]

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = self.physical_action(np.asarray(actions, dtype=np.float32))

    def physical_action(self, actions: np.ndarray) -> np.ndarray:
        """SB3's actions in the actuators' units."""
        if not self.normalize_actions:
            return actions
        return (self._middle + self._half * np.clip(actions, -1.0, 1.0)).astype(np.float32)

    def step_wait(self):
        started = time.perf_counter()
        obs, reward, terminated, truncated, info = self.env.step(self._actions)
        self.simulation_seconds += time.perf_counter() - started
        done = terminated | truncated
        infos = [{"loss": float(info["loss"][i]), "score": float(info["score"][i])} for i in range(self.num_envs)]
        if done.any():
            for i in np.flatnonzero(done):
                infos[i]["terminal_observation"] = self.normalise_observation(info["final_obs"][i])
                infos[i]["loss"] = float(info["final_info"]["loss"][i])
                infos[i]["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
                infos[i]["score"] = float(info["final_info"]["score"][i])
        return self.normalise_observation(obs), (reward / self.reward_scale).astype(np.float32), done, infos

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


# -- diffsim train TASK --algo ppo|sac ---------------------------------------------------------

ALGORITHMS = {"ppo": PPO, "sac": SAC}
POLICY_FORMAT = 1


def episode_statistics(kind, *, worlds: int, seed: int, device=None, options: dict | None = None):
    """Mean and spread (floored like :class:`~controllers.bptt.ClockPolicy`'s) of the observations
    of one episode of uniformly random actions in ``worlds`` worlds, on seeds training never uses,
    and the root mean square of its rewards (1 where they are all zero)."""
    from diffsim.controllers.evaluate import EVALUATION_SEED

    env = TaskVectorEnv(kind, num_envs=worlds, device=device, **(options or {}))
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed + EVALUATION_SEED // 2)
    seen, rewards = [obs], []
    low, high = env.single_action_space.low, env.single_action_space.high
    for _ in range(env.task.horizon - 1):
        obs, reward = env.step(rng.uniform(low, high, size=(worlds, low.size)).astype(np.float32))[:2]
        seen.append(obs)
        rewards.append(reward)
    env.close()
    rms = float(np.sqrt(np.mean(np.square(np.asarray(rewards, dtype=np.float64))))) if rewards else 0.0
    samples = np.concatenate(seen).astype(np.float64)
    mean, spread = samples.mean(0), samples.std(0)
    floor = np.maximum(0.1 * np.abs(mean), 1e-6 * np.abs(samples).max() + 1e-12)
    return mean.astype(np.float32), np.maximum(spread, floor).astype(np.float32), (rms if rms > 0 else 1.0)


def _make(algo: str, env: SB3VecEnv, *, seed: int, horizon: int, worlds: int, buffer_size: int,
          learning_rate: float):
    if algo == "ppo":
        steps = horizon * worlds
        return PPO("MlpPolicy", env, n_steps=horizon, batch_size=max(1, steps // 4), n_epochs=10,
                   learning_rate=learning_rate, seed=seed, device="cpu")
    return SAC("MlpPolicy", env, buffer_size=buffer_size, learning_starts=horizon * worlds, batch_size=256,
               learning_rate=learning_rate, seed=seed, device="cpu")


class _EpisodeEnds(BaseCallback):
    """Collects the final task loss of every episode that ends while SB3 learns."""

    def __init__(self):
        super().__init__()
        self.losses: list[float] = []

    def _on_step(self) -> bool:
        for done, info in zip(self.locals["dones"], self.locals["infos"], strict=True):
            if done:
                self.losses.append(info["loss"])
        return True


def play_model(env: SB3VecEnv, model, seed: int) -> list[float]:
    """Each world's normalised score at the end of one episode, the model acting deterministically
    (world i seeded seed + i)."""
    env.seed(seed)
    obs = env.reset()
    scores: list[float | None] = [None] * env.num_envs
    for _ in range(env.env.horizon):
        action, _ = model.predict(obs, deterministic=True)
        obs, _, done, infos = env.step(action)
        for i in np.flatnonzero(done):
            if scores[i] is None:
                scores[i] = infos[i]["score"]
        if all(s is not None for s in scores):
            break
    return [float(s) for s in scores]


def save_policy(path: Path, model, algo: str, task_id: str, mean: np.ndarray, scale: np.ndarray) -> None:
    save_checkpoint(path, {"format": POLICY_FORMAT, "task": task_id, "algo": algo,
                           "sb3_policy": model.policy.state_dict(),
                           "observation_mean": torch.from_numpy(mean), "observation_scale": torch.from_numpy(scale)})


def load_model(payload: dict, path, kind, *, worlds: int, device=None, options: dict | None = None):
    """The SB3 model a policy file describes, on an evaluation env of ``worlds`` worlds."""
    algo = payload.get("algo")
    if algo not in ALGORITHMS:
        raise ConfigError(f"{str(path)!r} names the algorithm {algo!r}, which is not one of {sorted(ALGORITHMS)}.")
    mean, scale = payload["observation_mean"].numpy(), payload["observation_scale"].numpy()
    env = SB3VecEnv(TaskVectorEnv(kind, num_envs=worlds, device=device, **(options or {})),
                    observation_mean=mean, observation_scale=scale)
    if env.observation_space.shape != mean.shape:
        raise ConfigError(f"{str(path)!r} was trained on {mean.shape[0]} observations, but {kind.id} here has "
                          f"{env.observation_space.shape[0]}.")
    model = _make(algo, env, seed=0, horizon=env.env.horizon, worlds=worlds, buffer_size=1, learning_rate=1e-3)
    try:
        model.policy.load_state_dict(payload["sb3_policy"])
    except RuntimeError as exc:
        raise ConfigError(f"{str(path)!r} does not fit {kind.id}'s {algo} policy here ({exc}).") from exc
    return env, model


def train_sb3(task: str, algo: str = "ppo", *, iterations: int, out: str | Path, seed: int = 0, worlds: int = 4,
              evaluation_worlds: int = 4, learning_rate: float = 3e-4, resume: bool = False,
              device: str | None = None, options: dict | None = None, progress: bool = True,
              ray: str | None = None, actors: int = 2) -> dict:
    """Train ``task`` with unmodified SB3 PPO or SAC on ``worlds`` batched worlds.

    One iteration is one episode per world (horizon x worlds env steps; PPO's rollout is exactly
    that, SAC takes one gradient step per vector step after a first iteration of random actions).
    After every iteration the SB3 model (and SAC's replay buffer) and ``checkpoint.pt`` are
    written atomically, so a killed run resumes losing at most that iteration; ``policy.pt``
    holds the policy's state dict and the observation statistics. Returns the summary, scored
    on ``evaluation_worlds`` held-out variants. With ``ray`` (an address, ``"auto"`` or
    ``"local"``) the training worlds are stepped over ``actors`` Ray actors
    (:class:`~controllers.distributed.RayVectorEnv`); evaluation stays in this process.
    """
    from tqdm.auto import tqdm

    from diffsim.controllers.evaluate import EVALUATION_SEED
    from diffsim.controllers.run import atomic_file

    if algo not in ALGORITHMS:
        raise ConfigError(f"unknown SB3 algorithm {algo!r}; choose one of {', '.join(ALGORITHMS)}.")
    check_counts(iterations=iterations, worlds=worlds, evaluation_worlds=evaluation_worlds)
    if not (learning_rate > 0 and math.isfinite(learning_rate)):
        raise InvalidParameter("learning_rate", learning_rate, "(0, inf)")
    kind = task_type(task)
    run = RunDirectory(out, resume=resume, progress_field="episodes")
    options = dict(options or {})
    if run.resuming:
        saved = load_checkpoint(run.checkpoint)
        if saved.get("algo") != algo:
            raise ConfigError(f"{str(run.path)!r} holds a {saved.get('algo')} run, not {algo}; "
                              "resume it with its own --algo or pass another --out.")
        mean, scale = saved["observation_mean"].numpy(), saved["observation_scale"].numpy()
        reward_scale = float(saved.get("reward_scale", 1.0))  # (runs begun before rewards were scaled)
    else:
        mean, scale, reward_scale = episode_statistics(kind, worlds=worlds, seed=seed, device=device,
                                                       options=options)
    if ray is None:
        vector = TaskVectorEnv(kind, num_envs=worlds, device=device, **options)
    else:
        from diffsim.controllers.distributed import RayVectorEnv, connect

        connect(ray)
        vector = RayVectorEnv(kind.id, num_envs=worlds, actors=actors, **options)
    env = SB3VecEnv(vector, observation_mean=mean, observation_scale=scale, reward_scale=reward_scale)
    horizon = env.env.horizon
    chunk = horizon * worlds
    eval_env = SB3VecEnv(TaskVectorEnv(kind, num_envs=evaluation_worlds, device=device, **options),
                         observation_mean=mean, observation_scale=scale)
    if run.resuming:
        start, losses, wall = int(saved["iteration"]), list(saved["losses"]), float(saved["wall_time"])
        initial = list(saved["initial_scores"])
        env.simulation_seconds = float(saved.get("simulation_seconds", 0.0))
        model = ALGORITHMS[algo].load(run.path / str(saved["model_file"]), env=env, device="cpu")
        if algo == "sac":
            model.load_replay_buffer(run.path / str(saved["buffer_file"]))
        run.trim_log(start)
    else:
        model = _make(algo, env, seed=seed, horizon=horizon, worlds=worlds, buffer_size=iterations * chunk,
                      learning_rate=learning_rate)
        start, losses, wall = 0, [], 0.0
        initial = play_model(eval_env, model, EVALUATION_SEED)
        env.seed(seed)
    started = time.perf_counter()
    bar = tqdm(total=iterations, initial=start, desc=algo, unit="it", disable=not progress)
    try:
        for iteration in range(start, iterations):
            ends = _EpisodeEnds()
            model.learn(total_timesteps=chunk, reset_num_timesteps=iteration == 0 and not run.resuming,
                        callback=ends, progress_bar=False)
            loss = float(np.mean(ends.losses)) if ends.losses else math.nan
            losses.append(loss)
            elapsed = wall + time.perf_counter() - started
            run.log_iteration(iteration, loss, len(ends.losses), elapsed)
            names = {"model_file": f"sb3_model_{iteration + 1}.zip", "buffer_file": f"sb3_buffer_{iteration + 1}.pkl"}
            with atomic_file(run.path / names["model_file"], "wb") as handle:
                model.save(handle)
            if algo == "sac":
                with atomic_file(run.path / names["buffer_file"], "wb") as handle:
                    model.save_replay_buffer(handle)
            save_policy(run.path / "policy.pt", model, algo, kind.id, mean, scale)
            save_checkpoint(run.checkpoint, {"format": 1, "algo": algo, "iteration": iteration + 1, "losses": losses,
                                             "wall_time": elapsed, "initial_scores": initial, **names,
                                             "simulation_seconds": env.simulation_seconds,
                                             "observation_mean": torch.from_numpy(mean),
                                             "observation_scale": torch.from_numpy(scale),
                                             "reward_scale": reward_scale})
            for stale in run.path.glob("sb3_*"):  # the files the checkpoint no longer names
                if stale.name not in names.values():
                    stale.unlink()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4g}")
    finally:
        bar.close()
    wall_s = wall + time.perf_counter() - started
    final = play_model(eval_env, model, EVALUATION_SEED)
    summary = {
        "task": kind.id, "method": algo, "seed": seed, "worlds": worlds, "horizon": horizon,
        "learning_rate": learning_rate, "reward_scale": reward_scale,
        "evaluation_seeds": [EVALUATION_SEED + i for i in range(evaluation_worlds)],
        "initial_score": sum(initial) / evaluation_worlds, "final_score": sum(final) / evaluation_worlds,
        "initial_scores": initial, "final_scores": final, "final_loss": losses[-1] if losses else None,
        "iterations": len(losses), "env_steps": len(losses) * chunk,
        "evaluation_env_steps": 2 * horizon * evaluation_worlds, "wall_s": wall_s,
        "time_split_s": {"simulation_forward": env.simulation_seconds,
                         "sb3_and_checkpoints": wall_s - env.simulation_seconds},
    }
    run.write_summary(summary)
    return summary
