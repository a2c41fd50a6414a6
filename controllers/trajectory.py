"""Open-loop trajectory optimisation: Adam on named control or parameter tensors of a Rollout,
with gradients from the checkpointed backward, optional bounds, and crash-safe resumable checkpoints.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffsim.core.rollout import Rollout
from diffsim.core.torch import rollout_loss
from diffsim.errors import ConfigError, InvalidParameter, SimulationDiverged

#: Maps the optimised tensors to the rollout's named inputs (``"controls.<field>"``, ...).
InputMap = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
#: ``on_iteration(iteration, loss, parameters)``; return True to stop after this iteration.
IterationCallback = Callable[[int, float, dict[str, torch.Tensor]], "bool | None"]

#: Version of the checkpoint layout; a file of another version is refused, not misread.
CHECKPOINT_FORMAT = 1


@dataclass
class Bounds:
    """Box and norm limits applied to one parameter after every Adam step (a projection).

    Args:
        lower: element-wise lower limit (a number or a tensor broadcastable to the parameter),
            in the parameter's unit (e.g. [m/s] for velocities); None for no limit.
        upper: element-wise upper limit, likewise.
        max_norm: largest Euclidean norm along the last axis, e.g. the maximum speed [m/s] of a
            velocity trajectory shaped (frames, 3); rows longer than this are scaled down.
    """

    lower: float | torch.Tensor | None = None
    upper: float | torch.Tensor | None = None
    max_norm: float | None = None

    def __post_init__(self):
        if self.max_norm is not None and not (self.max_norm >= 0 and math.isfinite(self.max_norm)):
            raise InvalidParameter("max_norm", self.max_norm, "[0, inf)")

    def project(self, value: torch.Tensor) -> None:
        """Move ``value`` (in place) to the nearest point inside the bounds."""
        if self.lower is not None or self.upper is not None:
            lower = None if self.lower is None else torch.as_tensor(self.lower, dtype=value.dtype)
            upper = None if self.upper is None else torch.as_tensor(self.upper, dtype=value.dtype)
            value.copy_(torch.clamp(value, min=lower, max=upper))
        if self.max_norm is not None:
            norm = value.norm(dim=-1, keepdim=True)
            # clamp_min keeps zero rows finite: they are inside the ball anyway
            value.mul_(torch.clamp(self.max_norm / norm.clamp_min(1e-30), max=1.0))


@dataclass
class OptimizationResult:
    """What :func:`optimize` found.

    Attributes:
        losses: the loss at every iteration, before that iteration's update (resumed runs
            include the iterations done before the restart).
        best_parameters: detached copies of the parameters with the lowest loss seen.
        best_loss: that loss.
        best_iteration: the iteration at which it was seen.
        parameters: detached copies of the parameters after the last update.
        wall_time: seconds spent optimising, summed over every run that shared the checkpoint [s].
        resumed_from: the iteration a checkpoint resumed at, or None for a fresh start.
        stopped_early: True when ``on_iteration`` asked to stop.
    """

    losses: list[float]
    best_parameters: dict[str, torch.Tensor]
    best_loss: float
    best_iteration: int
    parameters: dict[str, torch.Tensor]
    wall_time: float
    resumed_from: int | None = None
    stopped_early: bool = False
    grad_norms: list[float] = field(default_factory=list)

    @property
    def iterations(self) -> int:
        return len(self.losses)


def _detached(parameters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in parameters.items()}


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Write ``payload`` with torch.save atomically: a crash mid-write leaves the old file intact."""
    from diffsim.controllers.run import atomic_file

    with atomic_file(Path(path), "wb") as handle:
        torch.save(payload, handle)


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by :func:`optimize`."""
    try:
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(
            f"cannot read the optimisation checkpoint {str(path)!r} ({exc}); delete it to start afresh."
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(
            f"{str(path)!r} is not a diffsim trajectory checkpoint of format {CHECKPOINT_FORMAT}; "
            "delete it or pass another checkpoint_path."
        )
    return payload


def _check_compatible(path, saved: dict[str, torch.Tensor], parameters: dict[str, torch.Tensor]) -> None:
    expected = {name: tuple(p.shape) for name, p in parameters.items()}
    found = {name: tuple(p.shape) for name, p in saved.items()}
    if expected != found:
        raise ConfigError(
            f"the checkpoint {str(path)!r} holds parameters {found}, but this run optimises {expected}; "
            "delete the checkpoint or pass another checkpoint_path."
        )


def optimize(
    rollout: Rollout | Callable[[dict[str, torch.Tensor]], torch.Tensor],
    parameters: dict[str, torch.Tensor],
    *,
    iterations: int,
    learning_rate: float,
    learning_rate_decay: float = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    inputs: InputMap | None = None,
    bounds: dict[str, Bounds] | None = None,
    regularizer: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None,
    checkpoint_path: str | Path | None = None,
    on_iteration: IterationCallback | None = None,
    progress: bool = True,
) -> OptimizationResult:
    """Minimise the rollout's loss over ``parameters`` with Adam.

    Each iteration runs the rollout forward, back-propagates through the checkpointed backward
    and takes one Adam step, then projects each bounded parameter back inside its bounds.

    Args:
        rollout: the differentiable simulation; its loss is what is minimised. Or any function
            of the (mapped) parameters returning a differentiable torch scalar, e.g. a task's
            whole-horizon loss ``lambda p: env.rollout(p["actions"])``
            (:meth:`diffsim.tasks.env.DiffTaskEnv.rollout`).
        parameters: the tensors to optimise, updated in place (``requires_grad`` is set here).
            Without ``inputs`` the names must be rollout input names, e.g.
            ``"controls.collider_velocity"`` shaped (frames, worlds * colliders, 3) or
            ``"model.particle_young_modulus"``; see :func:`diffsim.core.torch.rollout_loss`.
        iterations: total number of iterations (a resumed run stops at the same total).
        learning_rate: Adam's step size, in the parameters' units (e.g. [m/s] for velocities).
        learning_rate_decay: factor in (0, 1] applied to the step size every iteration, so that
            iteration i steps with ``learning_rate * learning_rate_decay**i``; below 1 it damps
            the overshoot Adam's momentum causes near a minimum.
        betas: Adam's decay rates of the gradient mean and square; a first one of about 0.5
            overshoots far less than torch's 0.9 on the nearly quadratic losses of reaching tasks.
        inputs: maps the parameters to the rollout's named inputs, for when only part of an
            input is optimised (e.g. one collider's velocity, the others kept still).
        bounds: per parameter name, limits kept after every step (e.g. a maximum speed).
        regularizer: an extra differentiable torch loss of the parameters, added to the rollout's.
        checkpoint_path: file holding the iteration, parameters, optimizer state and losses,
            rewritten atomically after every iteration; when it exists the run resumes from it.
        on_iteration: called as ``on_iteration(iteration, loss, parameters)`` after each
            iteration's loss is known (before its update); returning True stops the run.
        progress: show a progress bar over iterations.

    Returns:
        An :class:`OptimizationResult`. The best parameters are those with the lowest loss
        evaluated; the parameters after the last update were not evaluated.

    Raises:
        SimulationDiverged: the loss or a gradient became non-finite.
        ConfigError: a parameter name, bound or checkpoint does not fit this run.
    """
    if not isinstance(iterations, int) or iterations < 0:
        raise InvalidParameter("iterations", iterations, "integers >= 0")
    if not (learning_rate > 0 and math.isfinite(learning_rate)):
        raise InvalidParameter("learning_rate", learning_rate, "(0, inf)")
    if not 0 < learning_rate_decay <= 1:
        raise InvalidParameter("learning_rate_decay", learning_rate_decay, "(0, 1]")
    if not parameters:
        raise ConfigError("optimize needs at least one parameter tensor to optimise; got an empty dict.")
    bounds = dict(bounds or {})
    unknown = sorted(set(bounds) - set(parameters))
    if unknown:
        raise ConfigError(f"bounds name {unknown}, which are not parameters; "
                          f"the parameters are {sorted(parameters)}.")
    for name, p in parameters.items():
        if not isinstance(p, torch.Tensor) or not p.is_floating_point():
            raise ConfigError(f"parameter {name!r} must be a floating-point torch.Tensor, "
                              f"got {type(p).__name__}.")
        if not p.is_leaf:
            raise ConfigError(f"parameter {name!r} must be a leaf tensor; "
                              "pass a detached copy (tensor.detach()).")
        p.requires_grad_(True)
    map_inputs = inputs if inputs is not None else dict

    if not all(0 <= b < 1 for b in betas) or len(betas) != 2:
        raise InvalidParameter("betas", tuple(betas), "two numbers in [0, 1)")
    optimizer = torch.optim.Adam(list(parameters.values()), lr=learning_rate, betas=tuple(betas))
    losses: list[float] = []
    grad_norms: list[float] = []
    best_loss, best_iteration = math.inf, -1
    best = _detached(parameters)
    previous_time = 0.0
    start_iteration = 0
    resumed_from = None
    if checkpoint_path is not None and Path(checkpoint_path).exists():
        saved = load_checkpoint(checkpoint_path)
        _check_compatible(checkpoint_path, saved["parameters"], parameters)
        with torch.no_grad():
            for name, p in parameters.items():
                p.copy_(saved["parameters"][name])
        # The caller's learning rate replaces the saved one (set every iteration below).
        optimizer.load_state_dict(saved["optimizer"])
        losses = list(saved["losses"])
        grad_norms = list(saved.get("grad_norms", []))
        best = {name: t.clone() for name, t in saved["best_parameters"].items()}
        best_loss, best_iteration = float(saved["best_loss"]), int(saved["best_iteration"])
        previous_time = float(saved["wall_time"])
        start_iteration = resumed_from = int(saved["iteration"])

    if start_iteration == 0:
        # A fresh start begins inside the bounds, like every later iterate.
        with torch.no_grad():
            for name, limit in bounds.items():
                limit.project(parameters[name])
    started = time.perf_counter()
    stopped_early = False
    warned_zero = False
    bar = tqdm(total=iterations, initial=min(start_iteration, iterations), desc="optimise", unit="it",
               disable=not progress)
    try:
        for iteration in range(start_iteration, iterations):
            optimizer.zero_grad(set_to_none=True)
            mapped = map_inputs(parameters)
            loss = rollout_loss(rollout, mapped) if isinstance(rollout, Rollout) else rollout(mapped)
            if regularizer is not None:
                loss = loss + regularizer(parameters)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise SimulationDiverged(
                    iteration, "loss",
                    hint="The optimisation loss is not finite at this iteration; lower the learning rate "
                         "or tighten the bounds.")
            loss.backward()
            norm_sq = 0.0
            for name, p in parameters.items():
                if p.grad is None:
                    raise ConfigError(f"the loss does not depend on parameter {name!r}; "
                                      "check the inputs map.")
                if not torch.isfinite(p.grad).all():
                    raise SimulationDiverged(
                        iteration, f"gradient of {name}",
                        hint="Lower the learning rate, tighten the bounds or shorten the horizon.")
                norm_sq += float((p.grad.double() ** 2).sum())
            grad_norms.append(math.sqrt(norm_sq))
            if norm_sq == 0.0 and not warned_zero:
                warned_zero = True
                warnings.warn(
                    f"the gradient of the loss is exactly zero at iteration {iteration}, so Adam cannot "
                    "move; the controls may not touch the material (e.g. a pusher that never reaches it).",
                    RuntimeWarning, stacklevel=2,
                )
            losses.append(value)
            if value < best_loss:
                best_loss, best_iteration, best = value, iteration, _detached(parameters)
            stop = bool(on_iteration(iteration, value, parameters)) if on_iteration is not None else False
            for group in optimizer.param_groups:
                group["lr"] = learning_rate * learning_rate_decay**iteration
            optimizer.step()
            with torch.no_grad():
                for name, limit in bounds.items():
                    limit.project(parameters[name])
            if checkpoint_path is not None:
                save_checkpoint(checkpoint_path, {
                    "format": CHECKPOINT_FORMAT,
                    "iteration": iteration + 1,
                    "parameters": _detached(parameters),
                    "optimizer": optimizer.state_dict(),
                    "losses": losses,
                    "grad_norms": grad_norms,
                    "best_parameters": best,
                    "best_loss": best_loss,
                    "best_iteration": best_iteration,
                    "wall_time": previous_time + time.perf_counter() - started,
                })
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4g}", best=f"{best_loss:.4g}")
            if stop:
                stopped_early = True
                break
    finally:
        bar.close()
    for p in parameters.values():
        p.grad = None
    return OptimizationResult(
        losses=losses,
        best_parameters=best,
        best_loss=best_loss,
        best_iteration=best_iteration,
        parameters=_detached(parameters),
        wall_time=previous_time + time.perf_counter() - started,
        resumed_from=resumed_from,
        stopped_early=stopped_early,
        grad_norms=grad_norms,
    )


# -- a task's open-loop plan, as a run with an output folder ---------------------------------------

def score_actions(env, actions: torch.Tensor, seed: int) -> list[float]:
    """Each world's normalised task score [0, 1] after playing ``actions`` (frames, worlds,
    action_dim) open loop from the episodes of ``seed`` (world i seeded with seed + i)."""
    with torch.no_grad():
        env.reset(seed=seed)
        for frame in range(actions.shape[0]):
            env.step(actions[frame])
        return [float(s) for s in env.score()]


def optimize_task(task: str, *, iterations: int, out: str | Path, seed: int = 0, worlds: int = 1,
                  learning_rate: float = 0.05, resume: bool = False, device: str | None = None,
                  options: dict | None = None, progress: bool = True) -> dict:
    """Open-loop trajectory optimisation of a task: one action sequence per world (``worlds``
    variants of the task at once, seeded ``seed`` .. ``seed + worlds - 1``), optimised by Adam on
    the task's whole-horizon loss through the checkpointed rollout
    (:meth:`~diffsim.tasks.env.DiffTaskEnv.rollout`), inside the actuators' bounds.

    The sequences are optimised in normalised units (-1 .. 1 across each actuator's range, from 0,
    the range's middle); ``learning_rate`` is in those units. The run writes ``out`` as
    :class:`~controllers.run.RunDirectory` describes, plus ``actions.pt`` (the best sequences in
    the actuators' units, a dict of tensors). The evaluation seeds are the optimised variants
    themselves (an open-loop plan belongs to its variant). Returns the summary.

    ``env_steps`` counts the frames simulated by the optimisation (iterations x horizon x worlds,
    each forward and backward once); the two scoring episodes are ``evaluation_env_steps``.
    """
    from diffsim.controllers.run import RunDirectory, check_counts
    from diffsim.tasks.env import DiffTaskEnv, task_type

    check_counts(iterations=iterations, worlds=worlds)
    if not isinstance(seed, int) or seed < 0:
        raise InvalidParameter("seed", seed, "integers >= 0")
    kind = task_type(task)  # an unknown task fails before the folder is touched
    run = RunDirectory(out, resume=resume)
    torch.manual_seed(seed)
    env = DiffTaskEnv(kind, num_envs=worlds, device=device, **(options or {}))
    horizon = env.task.horizon
    low, high = env.action_low.float(), env.action_high.float()
    middle, half = 0.5 * (low + high), 0.5 * (high - low)

    def physical(u: torch.Tensor) -> torch.Tensor:
        return middle + half * u

    start_actions = torch.zeros(horizon, worlds, env.action_dim)
    initial = score_actions(env, physical(start_actions), seed)
    previous_wall = 0.0
    if run.resuming:
        saved = load_checkpoint(run.checkpoint)
        run.trim_log(int(saved["iteration"]))
        previous_wall = float(saved["wall_time"])
    env.reset(seed=seed)
    started = time.perf_counter()

    def log(iteration: int, loss: float, parameters: dict[str, torch.Tensor]) -> None:
        grad = parameters["actions"].grad
        norm = float(grad.double().norm()) if grad is not None else 0.0
        run.log_iteration(iteration, loss, norm, previous_wall + time.perf_counter() - started)

    parameters = {"actions": start_actions.clone()}
    result = optimize(lambda p: env.rollout(physical(p["actions"])), parameters, iterations=iterations,
                      learning_rate=learning_rate, betas=(0.5, 0.999),
                      bounds={"actions": Bounds(lower=-1.0, upper=1.0)}, checkpoint_path=run.checkpoint,
                      on_iteration=log, progress=progress)
    wall_s = previous_wall + time.perf_counter() - started  # this run's part, and the runs before it
    best = physical(result.best_parameters["actions"])
    final = score_actions(env, best, seed)
    save_checkpoint(run.path / "actions.pt", {"actions": best, "seed": torch.tensor(seed), "task": kind.id})
    summary = {
        "task": kind.id,
        "method": "optimize",
        "seed": seed,
        "worlds": worlds,
        "horizon": horizon,
        "learning_rate": learning_rate,
        "initial_score": sum(initial) / worlds,
        "final_score": sum(final) / worlds,
        "initial_scores": initial,
        "final_scores": final,
        "best_loss": result.best_loss,
        "best_iteration": result.best_iteration,
        "iterations": result.iterations,
        "env_steps": result.iterations * horizon * worlds,
        "evaluation_env_steps": 2 * horizon * worlds,
        "wall_s": wall_s,
        "resumed_from": result.resumed_from,
    }
    run.write_summary(summary)
    return summary
