"""Scoring what a run saved: ``diffsim evaluate TASK --policy FILE``.

Three kinds of file come out of the run folders: ``actions.pt`` (an open-loop plan per variant,
from ``optimize``, ``cem`` and ``cmaes``), a clock-input MLP ``policy.pt`` (``bptt``, ``shac``) and
an SB3 ``policy.pt`` (``ppo``, ``sac``). A plan is scored on the variants it was made for; a policy
on held-out variants seeded from :data:`EVALUATION_SEED`, which no training run draws from.
Every file is read with ``weights_only=True``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffsim.errors import ConfigError, InvalidParameter

__all__ = ["EVALUATION_SEED", "evaluate_file", "read_run_file"]

#: seeds of the evaluation variants: far from the training seeds (seed + iteration * worlds + i)
EVALUATION_SEED = 1_000_000


def read_run_file(path: str | Path) -> dict:
    """A run's torch file as a dict, read with ``weights_only=True``; a sentence when unreadable."""
    try:
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"cannot read {str(path)!r} ({exc}).") from exc
    if not isinstance(payload, dict):
        raise ConfigError(f"{str(path)!r} is not a file a diffsim run writes (no dict inside).")
    return payload


def evaluate_file(task: str, path: str | Path, *, worlds: int = 8, video: str | Path | None = None,
                  device: str | None = None, options: dict | None = None) -> dict:
    """Score ``path`` on ``task`` (see the module header): the mean and spread of the normalised
    score, the per-world scores and seeds and, with ``video``, the path of a GIF/MP4 of the first
    world's episode."""
    from diffsim.controllers.bptt import evaluate_policy, load_policy
    from diffsim.controllers.trajectory import score_actions
    from diffsim.tasks.env import DiffTaskEnv, record_episode, task_type

    if not isinstance(worlds, int) or isinstance(worlds, bool) or worlds < 1:
        raise InvalidParameter("worlds", worlds, "positive integers")
    kind = task_type(task)
    options = dict(options or {})
    payload = read_run_file(path)
    if "task" in payload and payload["task"] != kind.id:
        raise ConfigError(f"{str(path)!r} was made for {payload['task']}, not for {kind.id}.")
    if "actions" in payload:
        actions = payload["actions"]
        seed = int(payload.get("seed", torch.tensor(0)))
        env = DiffTaskEnv(kind, num_envs=int(actions.shape[1]), device=device, **options)
        if tuple(actions.shape[1:]) != (env.num_envs, env.action_dim) or actions.shape[0] > env.task.horizon:
            raise ConfigError(f"{str(path)!r} holds actions of shape {tuple(actions.shape)}, which do not fit "
                              f"{kind.id} (at most {env.task.horizon} frames of {env.action_dim} actions).")
        scores = score_actions(env, actions, seed)
        seeds = [seed + i for i in range(env.num_envs)]
        play = {"actions": actions[:, 0].numpy(), "seed": seed}
    elif "sb3_policy" in payload:
        from diffsim.controllers.sb3 import load_model, play_model

        env, model = load_model(payload, path, kind, worlds=worlds, device=device, options=options)
        scores = play_model(env, model, EVALUATION_SEED)
        seeds = [EVALUATION_SEED + i for i in range(worlds)]

        def act(observation):
            action = model.predict(env.normalise_observation(observation[None]), deterministic=True)[0]
            return env.physical_action(action)[0]

        play = {"policy": act, "seed": EVALUATION_SEED}
    else:
        env = DiffTaskEnv(kind, num_envs=worlds, device=device, **options)
        policy = load_policy(path, env, kind.id)
        scores = evaluate_policy(env, policy)
        seeds = [EVALUATION_SEED + i for i in range(worlds)]
        clock = {"step": 0}

        def act(observation):
            with torch.no_grad():
                action = policy(torch.as_tensor(observation, dtype=torch.float32)[None], clock["step"])[0]
            clock["step"] += 1
            return action.numpy()

        play = {"policy": act, "seed": EVALUATION_SEED}
    result = {"task": kind.id, "file": str(path), "seeds": seeds, "scores": scores,
              "score_mean": float(np.mean(scores)), "score_std": float(np.std(scores))}
    if video is not None:
        result["video"] = record_episode(kind, video, **play, **options)["path"]
    return result
