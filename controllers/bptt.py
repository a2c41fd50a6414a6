"""Policies trained by backpropagation through the simulator (BPTT) on a task's differentiable face.

The recipe follows differentiable-physics locomotion work (Hu et al., DiffTaichi / Complex
Locomotion): a small MLP with sin activations, clock inputs (sin and cos of the episode's phase at a
few periods) so open-loop rhythms are easy to represent, Adam, and a batch of task variants as
worlds. Each iteration plays one episode in every world from fresh training variants, sums the
task's loss at the end of each window (``window`` env steps, default the whole horizon) and
back-propagates it through the simulator to the policy's weights, cutting the graph between
windows (truncated BPTT, one Adam step per window). The gradient norm is clipped at ``clip``; a
window whose gradient is not finite (an exploded gradient through chaotic contact) is skipped
and counted (``skipped_updates``), and training stops after five iterations in a row with nothing
but such windows.

Observations are standardised by the mean and spread of one episode of the untrained policy
(kept in the policy's state dict) and clipped at 10 spreads; actions are ``tanh`` outputs scaled
to the actuators' bounds. Scores are the task's normalised score at the episode's end, on held-out
evaluation seeds that training never sees.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from diffsim.controllers.evaluate import EVALUATION_SEED, read_run_file
from diffsim.controllers.run import RunDirectory, check_counts
from diffsim.controllers.trajectory import load_checkpoint, save_checkpoint
from diffsim.errors import ConfigError, InvalidParameter, SimulationDiverged

__all__ = ["ClockPolicy", "train_bptt", "evaluate_policy", "load_policy"]

POLICY_FORMAT = 1
#: iterations in a row whose every window's gradient was non-finite before training stops
MAX_EXPLODED_ITERATIONS = 5


class ClockPolicy(torch.nn.Module):
    """MLP policy: standardised observation and clock features -> actions in the actuators' bounds.

    Args:
        observation_dim, action_dim: the task's sizes.
        horizon: the episode length, for the clock's phase.
        hidden: width of the two hidden layers (sin activations).
        periods: clock periods as fractions of the horizon.
        action_low, action_high: the actuators' bounds (tensors of ``action_dim``).
    """

    def __init__(self, observation_dim: int, action_dim: int, horizon: int, action_low: torch.Tensor,
                 action_high: torch.Tensor, *, hidden: int = 64, periods: tuple[float, ...] = (1.0, 0.5, 0.25)):
        super().__init__()
        self.horizon = int(horizon)
        self.register_buffer("periods", torch.tensor(periods, dtype=torch.float32))
        self.register_buffer("obs_mean", torch.zeros(observation_dim))
        self.register_buffer("obs_scale", torch.ones(observation_dim))
        self.register_buffer("action_middle", 0.5 * (action_high + action_low).float())
        self.register_buffer("action_half", 0.5 * (action_high - action_low).float())
        features = observation_dim + 2 * len(periods)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(features, hidden), torch.nn.Linear(hidden, hidden)])
        self.out = torch.nn.Linear(hidden, action_dim)
        with torch.no_grad():  # start near the actuators' middle: small first actions
            self.out.weight.mul_(0.1)
            self.out.bias.zero_()

    def standardise_from(self, observations: torch.Tensor) -> None:
        """Fix the observation standardisation from samples (n, observation_dim): their mean, and
        their spread floored at a tenth of the mean's size (an entry that barely varies in the
        samples must not be amplified a thousandfold once it does)."""
        with torch.no_grad():
            mean = observations.mean(0)
            spread = observations.std(0, unbiased=False)
            floor = torch.clamp(0.1 * mean.abs(), min=1e-6 * float(observations.abs().max()) + 1e-12)
            self.obs_mean.copy_(mean)
            self.obs_scale.copy_(torch.maximum(spread, floor))

    def forward(self, observation: torch.Tensor, step: int) -> torch.Tensor:
        phase = 2.0 * math.pi * step / (self.horizon * self.periods)
        clock = torch.cat([torch.sin(phase), torch.cos(phase)]).expand(observation.shape[0], -1)
        # clipped like VecNormalize's: what the samples never showed stays within 10 spreads
        z = torch.clamp((observation - self.obs_mean) / self.obs_scale, -10.0, 10.0)
        h = torch.cat([z, clock], dim=1)
        for layer in self.layers:
            h = torch.sin(layer(h))
        return self.action_middle + self.action_half * torch.tanh(self.out(h))


class GradientBook:
    """What the gradient-trained policies (BPTT, SHAC) count across iterations: windows skipped
    for a non-finite gradient, iterations in a row with nothing else (training stops after
    :data:`MAX_EXPLODED_ITERATIONS`), and the simulation's share of the wall time."""

    def __init__(self, env, saved: dict | None = None):
        self.env = env
        saved = saved or {}
        self.skipped = int(saved.get("skipped_updates", 0))
        self.split = {k: float(v) for k, v in saved.get("time_split", {"simulation_forward": 0.0,
                                                                       "simulation_backward": 0.0}).items()}
        self.exploded_in_a_row = 0
        self._seen = dict(env.simulation_seconds)

    def end_iteration(self, iteration: int, norms: list[float]) -> float:
        """Count one iteration's windows; returns its largest finite gradient norm (inf if none)."""
        finite = [n for n in norms if math.isfinite(n)]
        self.skipped += len(norms) - len(finite)
        self.exploded_in_a_row = 0 if finite else self.exploded_in_a_row + 1
        if self.exploded_in_a_row >= MAX_EXPLODED_ITERATIONS:
            raise SimulationDiverged(iteration, "policy gradient",
                                     hint=f"every window of the last {MAX_EXPLODED_ITERATIONS} iterations had a "
                                          "non-finite gradient; shorten --window or lower --lr.")
        for key, name in (("simulation_forward", "forward"), ("simulation_backward", "backward")):
            self.split[key] += self.env.simulation_seconds[name] - self._seen[name]
        self._seen = dict(self.env.simulation_seconds)
        return max(finite) if finite else math.inf

    def state(self) -> dict:
        """Its part of a checkpoint."""
        return {"skipped_updates": self.skipped, "time_split": dict(self.split)}

    def time_split(self, wall_s: float) -> dict:
        """Wall seconds by part: the simulation's steps forward and backward (inside the
        differentiable step), any part a method timed itself (SHAC's critic), and ``other``: the
        policy network, Adam, torch's autograd bookkeeping of the state tensors, checkpoints."""
        return dict(self.split, other=wall_s - sum(self.split.values()))


def _episode(env, policy: ClockPolicy, seed: int, *, window: int | None = None, optimizer=None,
             clip: float = 1.0) -> tuple[list[float], float, list[float]]:
    """Play one episode in every world (world i seeded seed + i). With an optimizer, take an Adam
    step at the end of every window on the summed task loss there, unless its gradient is not
    finite. Returns the final scores, the episode's final summed loss and the gradient norms
    before clipping (inf or nan for the skipped windows)."""
    observation = env.reset(seed=seed)
    horizon = env.task.horizon
    window = window or horizon
    norms = []
    loss = None
    for step in range(horizon):
        observation, _, _, _, info = env.step(policy(observation, step))
        loss = info["loss"]
        if optimizer is not None and ((step + 1) % window == 0 or step + 1 == horizon):
            total = loss.sum()
            if not torch.isfinite(total):
                raise SimulationDiverged(step, "task loss", hint="Lower the learning rate or shorten the window.")
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            norm = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), clip))
            norms.append(norm)
            if math.isfinite(norm):  # an exploded window (inf or nan) is skipped, not clipped
                optimizer.step()
            env.detach()
            observation = observation.detach()
    return [float(s) for s in env.score()], float(loss.sum().detach()), norms


def _observations(env, policy: ClockPolicy, seed: int) -> torch.Tensor:
    """Every observation of one episode of the untrained policy in every world (the samples the
    standardisation is fixed from; the seed is one training never uses)."""
    seen = []
    with torch.no_grad():
        observation = env.reset(seed=seed + EVALUATION_SEED // 2)
        for step in range(env.task.horizon):
            seen.append(observation)
            observation = env.step(policy(observation, step))[0]
    return torch.cat(seen)


def evaluate_policy(env, policy: ClockPolicy, *, seed: int = EVALUATION_SEED) -> list[float]:
    """Each world's final normalised score, the policy acting deterministically, no gradients."""
    with torch.no_grad():
        scores, _, _ = _episode(env, policy, seed)
    return scores


def save_policy(path: Path, policy: ClockPolicy, task_id: str) -> None:
    save_checkpoint(path, {"format": POLICY_FORMAT, "task": task_id, "state_dict": policy.state_dict(),
                           "shape": torch.tensor([policy.layers[0].in_features, policy.layers[0].out_features,
                                                  policy.out.out_features, policy.horizon])})


def load_policy(path: str | Path, env, task_id: str) -> ClockPolicy:
    """A policy saved by :func:`train_bptt` for ``task_id``, checked against the env's sizes."""
    payload = read_run_file(path)
    if payload.get("format") != POLICY_FORMAT or "state_dict" not in payload:
        raise ConfigError(f"{str(path)!r} is not a diffsim policy file; pass the policy.pt a training run wrote.")
    if payload["task"] != task_id:
        raise ConfigError(f"{str(path)!r} is a policy for {payload['task']}, not for {task_id}.")
    features, hidden, actions, horizon = (int(v) for v in payload["shape"])
    policy = ClockPolicy(env.observation_dim, env.action_dim, env.task.horizon, env.action_low, env.action_high,
                         hidden=hidden)
    if (features, actions) != (policy.layers[0].in_features, policy.out.out_features):
        raise ConfigError(f"{str(path)!r} maps {features} inputs to {actions} actions, but {task_id} here has "
                          f"{policy.layers[0].in_features} inputs and {policy.out.out_features} actions.")
    policy.load_state_dict(payload["state_dict"])
    return policy


def train_bptt(task: str, *, iterations: int, out: str | Path, seed: int = 0, worlds: int = 4,
               learning_rate: float = 3e-3, window: int | None = None, hidden: int = 64, clip: float = 1.0,
               evaluation_worlds: int = 4, resume: bool = False, device: str | None = None,
               options: dict | None = None, progress: bool = True) -> dict:
    """Train a :class:`ClockPolicy` on ``task`` by BPTT (see the module header); one iteration is
    one episode in each of ``worlds`` fresh training variants. Writes ``out`` as
    :class:`~controllers.run.RunDirectory` describes, plus ``policy.pt`` (the policy after the
    last iteration, loaded with ``weights_only=True``); returns the summary, whose scores are on
    ``evaluation_worlds`` held-out variants."""
    from tqdm.auto import tqdm

    from diffsim.tasks.env import DiffTaskEnv, task_type

    check_counts(iterations=iterations, worlds=worlds, evaluation_worlds=evaluation_worlds, hidden=hidden)
    if window is not None and (not isinstance(window, int) or window < 1):
        raise InvalidParameter("window", window, "positive integers (env steps)")
    if not (learning_rate > 0 and math.isfinite(learning_rate)):
        raise InvalidParameter("learning_rate", learning_rate, "(0, inf)")
    kind = task_type(task)
    run = RunDirectory(out, resume=resume)
    torch.manual_seed(seed)
    env = DiffTaskEnv(kind, num_envs=worlds, device=device, **(options or {}))
    evaluation = DiffTaskEnv(kind, num_envs=evaluation_worlds, device=device, **(options or {}))
    horizon = env.task.horizon
    policy = ClockPolicy(env.observation_dim, env.action_dim, horizon, env.action_low, env.action_high,
                         hidden=hidden)
    policy.standardise_from(_observations(env, policy, seed))
    optimizer = torch.optim.Adam(policy.parameters(), lr=learning_rate)
    start, losses, wall, saved = 0, [], 0.0, None
    if run.resuming:
        saved = load_checkpoint(run.checkpoint)
        policy.load_state_dict(saved["policy"])
        optimizer.load_state_dict(saved["optimizer"])
        start, losses, wall = int(saved["iteration"]), list(saved["losses"]), float(saved["wall_time"])
        initial = list(saved["initial_scores"])
        run.trim_log(start)
    else:
        initial = evaluate_policy(evaluation, policy)
    book = GradientBook(env, saved)
    started = time.perf_counter()
    bar = tqdm(total=iterations, initial=start, desc="bptt", unit="it", disable=not progress)
    try:
        for iteration in range(start, iterations):
            _, loss, norms = _episode(env, policy, seed + iteration * worlds, window=window, optimizer=optimizer,
                                      clip=clip)
            largest = book.end_iteration(iteration, norms)
            losses.append(loss)
            elapsed = wall + time.perf_counter() - started
            run.log_iteration(iteration, loss, largest, elapsed)
            save_policy(run.path / "policy.pt", policy, kind.id)
            save_checkpoint(run.checkpoint, {"format": 1, "iteration": iteration + 1, "policy": policy.state_dict(),
                                             "optimizer": optimizer.state_dict(), "losses": losses,
                                             "wall_time": elapsed, "initial_scores": initial, **book.state()})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4g}")
    finally:
        bar.close()
    wall_s = wall + time.perf_counter() - started
    final = evaluate_policy(evaluation, load_policy(run.path / "policy.pt", env, kind.id))
    summary = {
        "task": kind.id, "method": "bptt", "seed": seed, "worlds": worlds, "horizon": horizon,
        "window": window or horizon, "learning_rate": learning_rate, "hidden": hidden, "clip": clip,
        "evaluation_seeds": [EVALUATION_SEED + i for i in range(evaluation_worlds)],
        "initial_score": sum(initial) / evaluation_worlds, "final_score": sum(final) / evaluation_worlds,
        "initial_scores": initial, "final_scores": final, "final_loss": losses[-1] if losses else None,
        "iterations": len(losses), "env_steps": len(losses) * horizon * worlds,
        "evaluation_env_steps": 2 * horizon * evaluation_worlds, "wall_s": wall_s,
        "skipped_updates": book.skipped, "windows_per_episode": math.ceil(horizon / (window or horizon)),
        "time_split_s": book.time_split(wall_s),
    }
    run.write_summary(summary)
    return summary
