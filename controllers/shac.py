"""Short-Horizon Actor-Critic (SHAC; Xu et al., "Accelerated Policy Learning with Parallel
Differentiable Simulation", ICLR 2022) on a task's differentiable face.

The actor is the clock-input MLP of :mod:`controllers.bptt` (so ``diffsim evaluate`` reads its
``policy.pt`` the same way). Each iteration plays one episode in every world from fresh training
variants, cut into windows of ``window`` env steps. In a window the actor's objective is the
discounted sum of the task's rewards (previous loss minus loss, through the simulator's
gradients) plus the discounted value of the window's last state from a *target* critic; its
gradient, clipped at ``clip``, takes one Adam step, and the graph is cut. The critic ``V(obs,
phase)`` (the episode's phase in [0, 1] is an input, since returns of a finite horizon depend on
the time left) then regresses TD(lambda) targets of that window for ``critic_epochs`` passes over
``critic_batches`` minibatches, and the target critic follows it by Polyak averaging
(``target = target_alpha * target + (1 - target_alpha) * critic``). At the episode's end the
value is zero: the task ends there.

Remedies for long-horizon gradients it uses: the window (32 steps by default), the critic's
bootstrap instead of the tail's gradient, gradient-norm clipping, and skipping a window whose
gradient is not finite (counted in ``skipped_updates``).
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch

from diffsim.controllers.bptt import (
    ClockPolicy,
    GradientBook,
    _observations,
    evaluate_policy,
    load_policy,
    save_policy,
)
from diffsim.controllers.evaluate import EVALUATION_SEED
from diffsim.controllers.run import RunDirectory, check_counts
from diffsim.controllers.trajectory import load_checkpoint, save_checkpoint
from diffsim.errors import InvalidParameter, SimulationDiverged

__all__ = ["Critic", "train_shac", "td_lambda_targets"]


class Critic(torch.nn.Module):
    """V(observation, phase): an MLP (ELU) on the actor's standardised observation and the phase."""

    def __init__(self, actor: ClockPolicy, hidden: int = 64):
        super().__init__()
        self.actor = [actor]  # a list, so the actor's weights are not part of the critic's state
        inputs = actor.obs_mean.shape[0] + 1
        self.net = torch.nn.Sequential(torch.nn.Linear(inputs, hidden), torch.nn.ELU(),
                                       torch.nn.Linear(hidden, hidden), torch.nn.ELU(), torch.nn.Linear(hidden, 1))

    def forward(self, observation: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        """Values (n,) of observations (n, dim) at phases (n, 1) or one phase (1, 1)."""
        actor = self.actor[0]
        z = torch.clamp((observation - actor.obs_mean) / actor.obs_scale, -10.0, 10.0)
        return self.net(torch.cat([z, phase.expand(observation.shape[0], 1)], dim=1)).squeeze(1)


def td_lambda_targets(rewards: torch.Tensor, next_values: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """TD(lambda) returns of one window: ``rewards`` and ``next_values`` (steps, worlds), where
    ``next_values[t]`` is the target critic's value of the state after step t (zero past the
    episode's end). G_t = r_t + gamma ((1 - lambda) V_{t+1} + lambda G_{t+1}), G_last = r + gamma V."""
    targets = torch.empty_like(rewards)
    following = next_values[-1]
    for t in range(rewards.shape[0] - 1, -1, -1):
        if t == rewards.shape[0] - 1:
            following = rewards[t] + gamma * next_values[t]
        else:
            following = rewards[t] + gamma * ((1.0 - lam) * next_values[t] + lam * following)
        targets[t] = following
    return targets


def train_shac(task: str, *, iterations: int, out: str | Path, seed: int = 0, worlds: int = 4, window: int = 32,
               actor_lr: float = 2e-3, critic_lr: float = 2e-3, gamma: float = 0.99, lam: float = 0.95,
               critic_epochs: int = 16, critic_batches: int = 4, target_alpha: float = 0.2, clip: float = 1.0,
               hidden: int = 64, evaluation_worlds: int = 4, resume: bool = False, device: str | None = None,
               options: dict | None = None, progress: bool = True) -> dict:
    """Train a :class:`~controllers.bptt.ClockPolicy` on ``task`` by SHAC (see the module header).
    One iteration is one episode in each of ``worlds`` fresh training variants. Writes the run
    folder and ``policy.pt``; returns the summary, scored on ``evaluation_worlds`` held-out variants,
    with the wall time split into simulation forward, simulation backward and the rest (networks
    and optimisers)."""
    from tqdm.auto import tqdm

    from diffsim.tasks.env import DiffTaskEnv, task_type

    check_counts(iterations=iterations, worlds=worlds, window=window, critic_epochs=critic_epochs,
                 critic_batches=critic_batches, hidden=hidden, evaluation_worlds=evaluation_worlds)
    for name, value, valid in (("actor_lr", actor_lr, "(0, inf)"), ("critic_lr", critic_lr, "(0, inf)")):
        if not (value > 0 and math.isfinite(value)):
            raise InvalidParameter(name, value, valid)
    for name, value in (("gamma", gamma), ("lam", lam), ("target_alpha", target_alpha)):
        if not 0 <= value <= 1:
            raise InvalidParameter(name, value, "[0, 1]")
    kind = task_type(task)
    run = RunDirectory(out, resume=resume)
    torch.manual_seed(seed)
    env = DiffTaskEnv(kind, num_envs=worlds, device=device, **(options or {}))
    evaluation = DiffTaskEnv(kind, num_envs=evaluation_worlds, device=device, **(options or {}))
    horizon = env.task.horizon
    actor = ClockPolicy(env.observation_dim, env.action_dim, horizon, env.action_low, env.action_high, hidden=hidden)
    actor.standardise_from(_observations(env, actor, seed))
    critic = Critic(actor, hidden)
    target = copy.deepcopy(critic)
    target.actor = critic.actor
    actor_opt = torch.optim.Adam(actor.parameters(), lr=actor_lr, betas=(0.7, 0.95))
    critic_opt = torch.optim.Adam(critic.parameters(), lr=critic_lr, betas=(0.7, 0.95))
    start, losses, wall, saved = 0, [], 0.0, None
    generator = torch.Generator().manual_seed(seed)  # the critic's minibatches
    if run.resuming:
        saved = load_checkpoint(run.checkpoint)
        actor.load_state_dict(saved["policy"])
        critic.load_state_dict(saved["critic"])
        target.load_state_dict(saved["target_critic"])
        actor_opt.load_state_dict(saved["actor_optimizer"])
        critic_opt.load_state_dict(saved["critic_optimizer"])
        start, losses, wall = int(saved["iteration"]), list(saved["losses"]), float(saved["wall_time"])
        initial = list(saved["initial_scores"])
        generator.set_state(saved["critic_rng"])
        run.trim_log(start)
    else:
        initial = evaluate_policy(evaluation, actor)
    book = GradientBook(env, saved)
    started = time.perf_counter()
    bar = tqdm(total=iterations, initial=start, desc="shac", unit="it", disable=not progress)
    try:
        for iteration in range(start, iterations):
            observation = env.reset(seed=seed + iteration * worlds)
            norms, loss = [], None
            for first in range(0, horizon, window):
                steps = range(first, min(first + window, horizon))
                states, rewards = [observation.detach()], []
                objective = torch.zeros(worlds)
                for k, step in enumerate(steps):
                    observation, reward, _, _, info = env.step(actor(observation, step))
                    objective = objective + gamma**k * reward
                    rewards.append(reward.detach())
                    states.append(observation.detach())
                    loss = info["loss"]
                end = steps[-1] + 1
                phase = torch.tensor([[end / horizon]])
                if end < horizon:
                    objective = objective + gamma ** len(steps) * target(observation, phase)
                total = -objective.mean() / len(steps)
                if not torch.isfinite(total):
                    raise SimulationDiverged(end, "SHAC objective", hint="Lower --lr or shorten the window.")
                actor_opt.zero_grad(set_to_none=True)
                total.backward()
                norm = float(torch.nn.utils.clip_grad_norm_(actor.parameters(), clip))
                norms.append(norm)
                if math.isfinite(norm):
                    actor_opt.step()
                env.detach()
                observation = observation.detach()
                fitting = time.perf_counter()
                _fit_critic(critic, target, critic_opt, states, torch.stack(rewards), list(steps), horizon, gamma,
                            lam, critic_epochs, critic_batches, generator)
                with torch.no_grad():
                    for p_target, p in zip(target.parameters(), critic.parameters(), strict=True):
                        p_target.mul_(target_alpha).add_((1.0 - target_alpha) * p)
                book.split["critic"] = book.split.get("critic", 0.0) + time.perf_counter() - fitting
            largest = book.end_iteration(iteration, norms)
            value = float(loss.detach().sum())
            losses.append(value)
            elapsed = wall + time.perf_counter() - started
            run.log_iteration(iteration, value, largest, elapsed)
            save_policy(run.path / "policy.pt", actor, kind.id)
            save_checkpoint(run.checkpoint, {
                "format": 1, "iteration": iteration + 1, "policy": actor.state_dict(), "critic": critic.state_dict(),
                "target_critic": target.state_dict(), "actor_optimizer": actor_opt.state_dict(),
                "critic_optimizer": critic_opt.state_dict(), "losses": losses, "wall_time": elapsed,
                "initial_scores": initial, **book.state(), "critic_rng": generator.get_state()})
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4g}")
    finally:
        bar.close()
    wall_s = wall + time.perf_counter() - started
    final = evaluate_policy(evaluation, load_policy(run.path / "policy.pt", env, kind.id))
    summary = {
        "task": kind.id, "method": "shac", "seed": seed, "worlds": worlds, "horizon": horizon, "window": window,
        "actor_lr": actor_lr, "critic_lr": critic_lr, "gamma": gamma, "lambda": lam, "target_alpha": target_alpha,
        "clip": clip, "hidden": hidden,
        "evaluation_seeds": [EVALUATION_SEED + i for i in range(evaluation_worlds)],
        "initial_score": sum(initial) / evaluation_worlds, "final_score": sum(final) / evaluation_worlds,
        "initial_scores": initial, "final_scores": final, "final_loss": losses[-1] if losses else None,
        "iterations": len(losses), "env_steps": len(losses) * horizon * worlds,
        "evaluation_env_steps": 2 * horizon * evaluation_worlds, "wall_s": wall_s,
        "skipped_updates": book.skipped, "time_split_s": book.time_split(wall_s),
    }
    run.write_summary(summary)
    return summary


def _fit_critic(critic: Critic, target: Critic, optimizer, states: list[torch.Tensor], rewards: torch.Tensor,
                steps: list[int], horizon: int, gamma: float, lam: float, epochs: int, batches: int,
                generator: torch.Generator) -> None:
    """Regress the critic on one window's TD(lambda) targets (the target critic's values)."""
    with torch.no_grad():
        next_values = torch.stack([
            target(states[k + 1], torch.tensor([[(step + 1) / horizon]])) if step + 1 < horizon
            else torch.zeros(states[0].shape[0]) for k, step in enumerate(steps)])
        returns = td_lambda_targets(rewards, next_values, gamma, lam)
    inputs = torch.cat(states[:-1])
    phases = torch.cat([torch.full((states[0].shape[0], 1), step / horizon) for step in steps])
    returns = returns.reshape(-1)
    size = max(1, inputs.shape[0] // batches)
    for _ in range(epochs):
        order = torch.randperm(inputs.shape[0], generator=generator)
        for first in range(0, inputs.shape[0], size):
            pick = order[first:first + size]
            value = critic(inputs[pick], phases[pick])
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(value, returns[pick]).backward()
            torch.nn.utils.clip_grad_norm_(critic.parameters(), 1.0)
            optimizer.step()
