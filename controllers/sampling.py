"""Sampling baselines: the cross-entropy method (CEM) and CMA-ES (the ``cma`` package) on open-loop
plans, the population stepped as worlds of one batched, forward-only simulation.

A plan is a piecewise-linear action sequence through ``knots`` control points per actuator, in
normalised units (-1 .. 1 across each actuator's range, 0 its middle): ``knots`` x action_dim
numbers instead of horizon x action_dim, which keeps the search space small enough for a
population of tens. Each iteration plays every candidate once, from the same variant of the task
(``variants`` variants are searched at once, each with its own population and its own
distribution), and ranks the candidates by the task's loss at the episode's end, the quantity the
gradient methods minimise. No gradient is taken: the simulation runs without tapes.

- CEM keeps a diagonal Gaussian; the next mean and spread are those of the ``elite_fraction``
  best candidates, the spread floored at ``min_std`` so the search never freezes. The current
  mean is always one of the candidates, so every iteration also scores the plan CEM would return.
- CMA-ES adapts a full covariance (Hansen's CMA-ES as ``cma`` implements it, bounds by its
  transformation to [-1, 1]), each variant's strategy drawing from its own generator; their
  state is stored in the checkpoint as pickles inside uint8 tensors.

The run folder is :class:`~controllers.run.RunDirectory`'s; the plan with the lowest loss seen
goes to ``actions.pt`` (in actuator units), which ``diffsim evaluate`` scores on its variants.
"""

from __future__ import annotations

import math
import pickle
import time
from pathlib import Path

import numpy as np
import torch

from diffsim.controllers.run import RunDirectory, check_counts
from diffsim.controllers.trajectory import load_checkpoint, save_checkpoint
from diffsim.errors import ConfigError, InvalidParameter, SimulationDiverged

__all__ = ["PlanBatch", "SAMPLERS", "interpolation_matrix", "train_sampling"]

SAMPLERS = ("cem", "cmaes")
#: control points per actuator unless told (or the horizon, if shorter)
DEFAULT_KNOTS = 8


def interpolation_matrix(horizon: int, knots: int) -> np.ndarray:
    """(horizon, knots) weights of the piecewise-linear plan: actions = M @ knot values; with
    ``knots == horizon`` it is the identity (one free action per step)."""
    if knots == 1:
        return np.ones((horizon, 1))
    position = np.linspace(0.0, knots - 1.0, horizon)
    left = np.minimum(np.floor(position).astype(int), knots - 2)
    frac = position - left
    m = np.zeros((horizon, knots))
    m[np.arange(horizon), left] = 1.0 - frac
    m[np.arange(horizon), left + 1] = frac
    return m


class PlanBatch:
    """``variants`` x ``population`` worlds of a task in this process; plays plans and returns each
    world's final loss, forward only. World ``v * population + j`` plays variant ``v`` (seeded
    seed + v). :class:`~controllers.distributed.RayPlanBatch` is the same over Ray actors."""

    def __init__(self, kind, variants: int, population: int, seed: int, device, options: dict):
        import gymnasium as gym

        from diffsim.tasks.task import TaskBatch

        self.task = kind(num_worlds=variants * population, device=device, **options)
        self.batch = TaskBatch(self.task)
        self.horizon, self.action_dim = self.task.horizon, self.task.action_dim
        self.variants, self.population, self.seed = variants, population, seed
        self._gym_rng = gym.utils.seeding.np_random
        low, high = (np.asarray(b, np.float64) for b in self.task.scene.action_bounds())
        self.middle, self.half = 0.5 * (low + high), 0.5 * (high - low)

    def physical(self, normalised: np.ndarray) -> np.ndarray:
        return self.middle + self.half * normalised

    def play(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``actions`` (horizon, worlds, dim) in normalised units -> (final loss, score) per world."""
        for w in range(self.batch.num_worlds):
            self.batch.rngs[w] = self._gym_rng(self.seed + w // self.population)[0]
        self.batch.reset()
        for frame in range(actions.shape[0]):
            self.batch.step(self.physical(actions[frame]), check_finite=False)  # a diverged world ranks last
        return self.batch.loss.copy(), np.asarray(self.batch.score(), np.float64)


def _check_sampler(population: int, elite_fraction: float, init_std: float, min_std: float, knots: int,
                   horizon: int) -> None:
    if population < 2:
        raise InvalidParameter("population", population, "integers >= 2 (candidates per variant)")
    if not 0 < elite_fraction <= 1:
        raise InvalidParameter("elite_fraction", elite_fraction, "(0, 1] (at least one elite is kept)")
    for label, value in (("init_std", init_std), ("min_std", min_std)):
        if not (value >= 0 and math.isfinite(value)):
            raise InvalidParameter(label, value, "[0, inf) in normalised action units")
    if not 1 <= knots <= horizon:
        raise InvalidParameter("knots", knots, f"integers in [1, {horizon}] (the horizon)")


def train_sampling(task: str, method: str = "cem", *, iterations: int, out: str | Path, seed: int = 0,
                   population: int = 16, variants: int = 1, knots: int | None = None, elite_fraction: float = 0.2,
                   init_std: float = 0.5, min_std: float = 0.05, resume: bool = False, device: str | None = None,
                   options: dict | None = None, progress: bool = True, ray: str | None = None,
                   actors: int = 2) -> dict:
    """Search open-loop plans of ``task`` by ``method`` ("cem" or "cmaes"; see the module header).

    ``knots`` defaults to 8, or the horizon if shorter. One iteration plays ``population``
    candidates on each of ``variants`` variants (seeded ``seed`` .. ``seed + variants - 1``);
    ``env_steps`` counts those frames. Writes the run folder and ``actions.pt``; returns the
    summary, whose scores are of the best plan on its variant. With ``ray`` (an address,
    ``"auto"`` or ``"local"``) the population plays over ``actors`` Ray actors
    (:mod:`controllers.distributed`), with results equal to one process's.
    """
    from tqdm.auto import tqdm

    from diffsim.tasks.env import task_type

    check_counts(iterations=iterations, population=population, variants=variants)
    if method not in SAMPLERS:  # before any scene is built
        raise ConfigError(f"unknown sampling method {method!r}; choose one of {', '.join(SAMPLERS)}.")
    if not isinstance(seed, int) or seed < 0:
        raise InvalidParameter("seed", seed, "integers >= 0")
    kind = task_type(task)
    if ray is None:
        worlds = PlanBatch(kind, variants, population, seed, device, options or {})
    else:
        from diffsim.controllers.distributed import RayPlanBatch, connect

        connect(ray)
        worlds = RayPlanBatch(kind, variants, population, seed, options or {}, actors=actors)
    horizon = worlds.horizon
    knots = min(DEFAULT_KNOTS, horizon) if knots is None else knots
    check_counts(knots=knots)
    _check_sampler(population, elite_fraction, init_std, min_std, knots, horizon)
    run = RunDirectory(out, resume=resume, progress_field="search_std")
    dim = worlds.action_dim
    basis = interpolation_matrix(horizon, knots)
    rng = np.random.default_rng(seed)
    elites = max(1, round(elite_fraction * population))
    size = knots * dim

    def plans_to_actions(plans: np.ndarray) -> np.ndarray:  # (variants, population, size) -> (T, W, dim)
        knots_values = plans.reshape(variants * population, knots, dim)
        return np.einsum("tk,wkd->twd", basis, knots_values)

    state: dict
    if run.resuming:
        saved = load_checkpoint(run.checkpoint)
        shape = (variants, population, knots, dim)
        if saved.get("method") != method or tuple(saved["shape"].tolist()) != shape:
            raise ConfigError(f"{str(run.checkpoint)!r} holds a {saved.get('method')} run of (variants, population, "
                              f"knots, actions) {tuple(saved['shape'].tolist())}, not a {method} run of {shape}; "
                              "resume it with its own settings or pass another --out.")
        state = {k: v for k, v in saved.items()}
        rng.bit_generator.state = _unpack(saved["rng"])
        run.trim_log(int(saved["iteration"]))
    else:
        state = {"iteration": 0, "losses": [], "wall_time": 0.0,
                 "mean": torch.zeros(variants, size, dtype=torch.float64),
                 "std": torch.full((variants, size), float(init_std), dtype=torch.float64),
                 "best": torch.zeros(variants, size, dtype=torch.float64),
                 "best_loss": torch.full((variants,), math.inf, dtype=torch.float64)}
        zero_loss, zero_score = worlds.play(plans_to_actions(np.zeros((variants, population, size))))
        state["initial_scores"] = zero_score.reshape(variants, population)[:, 0].tolist()
    strategies = None
    if method == "cmaes":
        strategies = _cma_strategies(state, variants, size, population, init_std, seed)
    started = time.perf_counter()
    bar = tqdm(total=iterations, initial=int(state["iteration"]), desc=method, unit="it", disable=not progress)
    try:
        for iteration in range(int(state["iteration"]), iterations):
            if strategies is None:
                mean, std = state["mean"].numpy(), state["std"].numpy()
                noise = rng.standard_normal((variants, population, size))
                noise[:, 0] = 0.0  # the mean itself is a candidate
                plans = np.clip(mean[:, None] + std[:, None] * noise, -1.0, 1.0)
            else:
                plans = np.stack([np.asarray(es.ask(), np.float64) for es in strategies])
            playing = time.perf_counter()
            loss, _ = worlds.play(plans_to_actions(plans))
            state["simulation_seconds"] = float(state.get("simulation_seconds", 0.0)) + time.perf_counter() - playing
            loss = loss.reshape(variants, population)
            if not np.any(np.isfinite(loss)):
                raise SimulationDiverged(iteration, "every candidate's loss",
                                         hint="Every plan of the population diverged; lower init_std.")
            loss = np.where(np.isfinite(loss), loss, np.inf)  # a diverged candidate ranks last
            order = np.argsort(loss, axis=1, kind="stable")
            for v in range(variants):
                j = order[v, 0]
                if loss[v, j] < float(state["best_loss"][v]):
                    state["best_loss"][v] = float(loss[v, j])
                    state["best"][v] = torch.from_numpy(plans[v, j].copy())
                if strategies is None:
                    chosen = plans[v, order[v, :elites]]
                    state["mean"][v] = torch.from_numpy(chosen.mean(0))
                    state["std"][v] = torch.from_numpy(np.maximum(chosen.std(0), min_std))
                else:
                    fitness = [float(x) if math.isfinite(x) else 1e30 for x in loss[v]]
                    strategies[v].tell(list(plans[v]), fitness)
            total = float(np.sum(state["best_loss"].numpy()))
            state["losses"].append(total)
            state["iteration"] = iteration + 1
            state["wall_time"] = float(state["wall_time"]) + time.perf_counter() - started
            started = time.perf_counter()
            spread = float(np.mean([es.sigma for es in strategies])) if strategies else float(state["std"].mean())
            run.log_iteration(iteration, total, spread, state["wall_time"])
            payload = dict(state, format=1, method=method, shape=torch.tensor([variants, population, knots, dim]),
                           rng=_pack(rng.bit_generator.state))
            if strategies is not None:
                payload["cma"] = [_pack(es) for es in strategies]
            save_checkpoint(run.checkpoint, payload)
            bar.update(1)
            bar.set_postfix(best=f"{total:.4g}")
    finally:
        bar.close()
    best_actions = np.einsum("tk,vkd->tvd", basis, state["best"].numpy().reshape(variants, knots, dim))
    from diffsim.controllers.trajectory import score_actions
    from diffsim.tasks.env import DiffTaskEnv

    scorer = DiffTaskEnv(kind, num_envs=variants, device=device, **(options or {}))
    physical = torch.as_tensor(worlds.physical(best_actions), dtype=torch.float32)
    final = score_actions(scorer, physical, seed)
    save_checkpoint(run.path / "actions.pt", {"actions": physical, "seed": torch.tensor(seed), "task": kind.id})
    initial = list(state["initial_scores"])
    iterations_done = int(state["iteration"])
    simulated = float(state.get("simulation_seconds", 0.0))
    summary = {
        "task": kind.id, "method": method, "seed": seed, "variants": variants, "population": population,
        "knots": knots, "horizon": horizon, "elite_fraction": elite_fraction if method == "cem" else None,
        "init_std": init_std, "min_std": min_std if method == "cem" else None,
        "initial_score": sum(initial) / variants, "final_score": sum(final) / variants,
        "initial_scores": initial, "final_scores": final, "best_loss": float(state["best_loss"].sum()),
        "iterations": iterations_done, "env_steps": iterations_done * horizon * variants * population,
        "evaluation_env_steps": 2 * horizon * variants, "wall_s": float(state["wall_time"]),
        "time_split_s": {"simulation_forward": simulated,
                         "sampler_and_checkpoints": float(state["wall_time"]) - simulated},
    }
    run.write_summary(summary)
    return summary


def _pack(value) -> torch.Tensor:
    """A Python object as a uint8 tensor, so that checkpoints stay loadable with weights_only=True."""
    return torch.frombuffer(bytearray(pickle.dumps(value)), dtype=torch.uint8).clone()


def _unpack(blob: torch.Tensor):
    return pickle.loads(blob.numpy().tobytes())


def _cma_strategies(state: dict, variants: int, size: int, population: int, init_std: float, seed: int) -> list:
    try:
        import cma
    except ImportError as exc:  # pragma: no cover - cma is a dependency of the rl extra
        raise ConfigError("--algo cmaes needs the cma package: pip install 'diffsim[rl]'.") from exc
    if "cma" in state:
        return [_unpack(blob) for blob in state["cma"]]
    # Each strategy samples from its own generator (cma's default is numpy's global one): pickled
    # with the strategy, it makes a resumed run draw exactly what an uninterrupted one would.
    return [cma.CMAEvolutionStrategy(np.zeros(size), max(init_std, 1e-3),
                                     {"popsize": population, "bounds": [-1.0, 1.0], "verbose": -9,
                                      "randn": np.random.RandomState(seed + 1 + v).randn})
            for v in range(variants)]
