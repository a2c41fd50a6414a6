"""Skill transfer between task variants (after Diff-Transfer, Yi et al. 2024): adapt the open-loop
plan that solves variant A to variant B along a path of intermediate variants, each stage
warm-started from the last and refined by gradients, and compare with solving B from scratch.

Variants are named by their seeds (``--from A --to B``: the variants episodes seeded A and B
draw); the path is the task's :meth:`~diffsim.tasks.task.Task.interpolate_variant` at
``t = 1/steps, 2/steps, ..., 1``. Every stage is Adam on the whole-horizon loss through the
checkpointed rollout (as ``diffsim optimize``), stopped as soon as the evaluated plan's normalised
score reaches ``score``, or after ``max_iterations``; a stage whose warm start reaches the score as
it is costs no iteration. Iterations count forward+backward passes; each stage's starting plan
and each iteration's plan are also played once forward to read their scores (in the wall times of
both approaches alike). The source plan is solved first the same way; its iterations are reported
separately and not charged to the transfer.

The run folder holds ``checkpoint.pt`` (finished stages and their plans), ``stage.pt`` (the
stage in flight, as :func:`controllers.trajectory.optimize` checkpoints it), ``log.csv`` (one row
per iteration of every stage), ``actions.pt`` (B's plan by transfer) and ``summary.json``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from diffsim.controllers.run import RunDirectory, check_counts
from diffsim.controllers.trajectory import Bounds, load_checkpoint, optimize, save_checkpoint
from diffsim.errors import ConfigError, InvalidParameter

__all__ = ["transfer_task", "variant_of_seed"]


def variant_of_seed(task, seed: int) -> dict:
    """The variant an episode seeded ``seed`` draws (as the envs' resets seed their worlds)."""
    import gymnasium as gym

    return task.sample_variant(gym.utils.seeding.np_random(int(seed))[0])


class _Stage:
    """One optimisation towards one variant, stopped at a score."""

    def __init__(self, env, scorer, variant: dict, *, score: float, learning_rate: float, log, first_row: int):
        self.env, self.scorer, self.variant = env, scorer, variant
        self.score, self.learning_rate, self.log, self.row = score, learning_rate, log, first_row
        low, high = env.action_low.float(), env.action_high.float()
        self.middle, self.half = 0.5 * (low + high), 0.5 * (high - low)
        self.best_score, self.reached = -math.inf, False

    def physical(self, u: torch.Tensor) -> torch.Tensor:
        return self.middle + self.half * u

    def play(self, u: torch.Tensor) -> float:
        """The score of plan ``u`` (normalised units) on this stage's variant, forward only."""
        self.scorer.reset(variants=[self.variant])
        for a in self.physical(u.detach()):
            self.scorer.step(a.numpy())
        value = float(self.scorer.score()[0])
        self.env.reset(variants=[self.variant])  # the rollout starts from this variant again
        return value

    def run(self, start: torch.Tensor, max_iterations: int, checkpoint: Path) -> tuple[torch.Tensor, int, float]:
        """Optimise from ``start``, unless it reaches the score already; returns the first plan
        reaching the score (else the best seen), the iterations used and its score."""
        if not checkpoint.exists():  # a warm start may solve the stage as it is (a resumed stage did not)
            value = self.play(start)  # (which leaves the env reset to this variant)
            if value >= self.score:
                self.reached = True
                return start.clone(), 0, value
        else:
            self.env.reset(variants=[self.variant])
        reaching = {}

        def on_iteration(iteration: int, loss: float, parameters: dict) -> bool:
            value = self.play(parameters["actions"])
            self.log(self.row + iteration, loss, value)
            self.reached = value >= self.score
            if self.reached:
                reaching.update(u=parameters["actions"].detach().clone(), score=value)
            return self.reached

        parameters = {"actions": start.clone()}
        result = optimize(lambda p: self.env.rollout(self.physical(p["actions"])), parameters,
                          iterations=max_iterations, learning_rate=self.learning_rate, betas=(0.5, 0.999),
                          bounds={"actions": Bounds(lower=-1.0, upper=1.0)}, checkpoint_path=checkpoint,
                          on_iteration=on_iteration, progress=False)
        if not reaching:  # the budget ran out: the plan of lowest loss, scored
            best = result.best_parameters["actions"]
            reaching.update(u=best, score=self.play(best))
        checkpoint.unlink(missing_ok=True)
        return reaching["u"], result.iterations, reaching["score"]


def transfer_task(task: str, *, source: int, target: int, out: str | Path, steps: int = 4, score: float = 0.8,
                  max_iterations: int = 30, scratch_iterations: int | None = None, learning_rate: float = 0.05,
                  resume: bool = False, device: str | None = None, options: dict | None = None,
                  progress: bool = True) -> dict:
    """Transfer the plan of variant ``source`` to variant ``target`` of ``task`` in ``steps``
    stages and solve ``target`` from scratch (see the module header); returns the summary.

    ``scratch_iterations`` caps the scratch run (default ``steps * max_iterations``, what the
    transfer may spend at most), so that both approaches get the same budget.
    """
    from tqdm.auto import tqdm

    from diffsim.tasks.env import DiffTaskEnv, task_type
    from diffsim.tasks.task import TaskBatch

    check_counts(steps=steps, max_iterations=max_iterations)
    scratch_iterations = steps * max_iterations if scratch_iterations is None else scratch_iterations
    check_counts(scratch_iterations=scratch_iterations)
    if not 0 < score <= 1:
        raise InvalidParameter("score", score, "(0, 1], the normalised task score a stage must reach")
    if not (learning_rate > 0 and math.isfinite(learning_rate)):
        raise InvalidParameter("learning_rate", learning_rate, "(0, inf)")
    for name, seed in (("source", source), ("target", target)):
        if not isinstance(seed, int) or seed < 0:
            raise InvalidParameter(name, seed, "integers >= 0 (the variant's seed)")
    if source == target:
        raise ConfigError(f"--from and --to are both variant {source}; transfer needs two different variants.")
    kind = task_type(task)
    run = RunDirectory(out, resume=resume, progress_field="score")
    env = DiffTaskEnv(kind, num_envs=1, device=device, **(options or {}))
    scorer = TaskBatch(env.task)
    a, b = variant_of_seed(env.task, source), variant_of_seed(env.task, target)
    path = [("source", a)] + [(f"t={k / steps:.3g}", env.task.interpolate_variant(a, b, k / steps))
                              for k in range(1, steps + 1)] + [("scratch", b)]
    done: list[dict] = []
    plans: list[torch.Tensor] = []
    if run.resuming:
        saved = load_checkpoint(run.checkpoint)
        done, plans = list(saved["stages"]), list(saved["plans"])
    rows = sum(s["iterations"] for s in done)
    in_flight = run.path / "stage.pt"
    run.trim_log(rows + (int(load_checkpoint(in_flight)["iteration"]) if in_flight.exists() else 0))
    zero = torch.zeros(env.task.horizon, 1, env.action_dim)
    bar = tqdm(total=len(path), initial=len(done), desc="transfer", unit="stage", disable=not progress)
    try:
        for index in range(len(done), len(path)):
            name, variant = path[index]
            started, before = time.perf_counter(), sum(s["wall_s"] for s in done)
            stage = _Stage(env, scorer, variant, score=score, learning_rate=learning_rate, first_row=rows,
                           log=lambda i, loss, value, t0=started, base=before: run.log_iteration(
                               i, loss, value, base + time.perf_counter() - t0))
            warm = zero if name in ("source", "scratch") else plans[-1]
            cap = scratch_iterations if name == "scratch" else max_iterations
            u, used, reached_score = stage.run(warm, cap, in_flight)
            done.append({"stage": name, "iterations": used, "score": reached_score, "reached": stage.reached,
                         "wall_s": time.perf_counter() - started})
            plans.append(u)
            rows += used
            save_checkpoint(run.checkpoint, {"format": 1, "stages": done, "plans": plans})
            bar.update(1)
            bar.set_postfix(stage=name, score=f"{reached_score:.3f}")
    finally:
        bar.close()
    transfer_stages = done[1:-1]
    transfer = {"iterations": sum(s["iterations"] for s in transfer_stages),
                "wall_s": sum(s["wall_s"] for s in transfer_stages), "score": transfer_stages[-1]["score"],
                "reached": transfer_stages[-1]["reached"]}
    scratch = {k: done[-1][k] for k in ("iterations", "wall_s", "score", "reached")}
    stage = _Stage(env, scorer, b, score=score, learning_rate=learning_rate, log=None, first_row=0)
    save_checkpoint(run.path / "actions.pt", {"actions": stage.physical(plans[-2]), "seed": torch.tensor(target),
                                              "task": kind.id})
    summary = {
        "task": kind.id, "method": "transfer", "source_seed": source, "target_seed": target, "steps": steps,
        "score_threshold": score, "max_iterations": max_iterations, "scratch_iterations_cap": scratch_iterations,
        "learning_rate": learning_rate, "source": done[0], "stages": transfer_stages, "transfer": transfer,
        "scratch": scratch,
        "iteration_ratio": transfer["iterations"] / max(scratch["iterations"], 1),
        "wall_ratio": transfer["wall_s"] / max(scratch["wall_s"], 1e-9),
    }
    run.write_summary(summary)
    return summary
