"""The three faces of every task: a ``gymnasium.Env`` (one world), a ``gymnasium.vector.VectorEnv``
(many worlds in one simulation) and a differentiable torch face for controllers.

All three step a :class:`~diffsim.tasks.task.TaskBatch`; none holds task-specific code.
Out-of-bound actions are clipped to the action space; an action of the wrong shape, dtype or with
NaN/inf raises :class:`~diffsim.errors.InvalidParameter`.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable

import gymnasium as gym
import numpy as np
import torch
import warp as wp
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from diffsim.core.rollout import Rollout
from diffsim.core.scene import FLOAT_TYPES
from diffsim.errors import ConfigError, InvalidParameter
from diffsim.tasks.task import Task, TaskBatch


def _spaces(task: Task) -> tuple[spaces.Box, spaces.Box]:
    low, high = task.scene.action_bounds()
    lo, hi = task.observation_bounds()
    obs = spaces.Box(lo, hi, shape=(task.observation_dim,), dtype=np.float32)
    return spaces.Box(low, high, dtype=np.float32), obs


def _render(task: Task, state, world: int, width: int, height: int) -> np.ndarray:
    from diffsim.render import render_state

    return render_state(task.scene.model, state, world=world, width=width, height=height,
                        **task.render_options(world))


class TaskEnv(gym.Env):
    """One world of a task as a ``gymnasium.Env``.

    ``terminated`` is true only when the task ends for a task reason; ``truncated`` when the
    horizon is reached. ``info`` holds ``loss`` and ``score`` (the normalised score in [0, 1]).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 30}

    def __init__(self, task_type: type[Task], *, render_mode: str | None = None, device: str | None = None,
                 render_size: tuple[int, int] = (256, 256), **options):
        if render_mode not in (None, "rgb_array"):
            raise InvalidParameter("render_mode", render_mode, "None or 'rgb_array'")
        self.task = task_type(num_worlds=1, device=device, **options)
        self.batch = TaskBatch(self.task)
        self.action_space, self.observation_space = _spaces(self.task)
        self.render_mode = render_mode
        self.render_size = render_size
        self.metadata = {**self.metadata, "render_fps": round(1.0 / self.task.config.frame_dt)}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None or self.batch.variants[0] is None:
            self.batch.rngs[0] = self.np_random
        self.batch.reset()
        return self.batch.observation()[0], self._info()

    def step(self, action):
        reward, terminated, truncated = self.batch.step(action)
        return (self.batch.observation()[0], float(reward[0]), bool(terminated[0]), bool(truncated[0]),
                self._info())

    def _info(self) -> dict:
        return {"loss": float(self.batch.loss[0]), "score": float(self.batch.score()[0])}

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        return _render(self.task, self.batch.state, 0, *self.render_size)


class TaskVectorEnv(VectorEnv):
    """``num_envs`` worlds of a task in one batched simulation, with same-step autoreset.

    When a world's episode ends, ``step`` returns its new episode's first observation and puts
    the last one in ``info["final_obs"]`` (and its info in ``info["final_info"]``), as gymnasium's
    SAME_STEP mode does. ``reset(seed=s)`` seeds world ``i`` with ``s + i``, so world ``i`` follows
    the single env reset with seed ``s + i``. ``reset(options={"reset_mask": m})`` resets only the
    worlds where ``m`` is true.
    """

    metadata = {"render_modes": ["rgb_array"], "autoreset_mode": AutoresetMode.SAME_STEP, "render_fps": 30}

    def __init__(self, task_type: type[Task], *, num_envs: int = 1, render_mode: str | None = None,
                 device: str | None = None, render_size: tuple[int, int] = (256, 256), **options):
        if render_mode not in (None, "rgb_array"):
            raise InvalidParameter("render_mode", render_mode, "None or 'rgb_array'")
        self.task = task_type(num_worlds=num_envs, device=device, **options)
        self.batch = TaskBatch(self.task)
        self.num_envs = num_envs
        self.single_action_space, self.single_observation_space = _spaces(self.task)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.render_mode = render_mode
        self.render_size = render_size
        self.metadata = {**self.metadata, "render_fps": round(1.0 / self.task.config.frame_dt)}
        self._seeded = False

    @property
    def horizon(self) -> int:
        """Env steps per episode."""
        return self.task.horizon

    def reset(self, *, seed: int | list[int] | None = None, options: dict | None = None):
        super().reset(seed=seed if seed is None or isinstance(seed, int) else int(seed[0]))
        mask = None
        if options and "reset_mask" in options:
            mask = np.asarray(options["reset_mask"], dtype=bool)
            if mask.shape != (self.num_envs,):
                raise InvalidParameter("reset_mask", f"an array of shape {mask.shape}", f"shape ({self.num_envs},)")
        if seed is not None:
            seeds = [seed + i for i in range(self.num_envs)] if isinstance(seed, int) else list(seed)
            if len(seeds) != self.num_envs:
                raise InvalidParameter("seed", seed, f"an int or a list of {self.num_envs} ints")
            for i, s in enumerate(seeds):
                if mask is None or mask[i]:
                    # the generator the single env's np_random gets from the same seed
                    self.batch.rngs[i] = gym.utils.seeding.np_random(s)[0]
        self.batch.reset(mask)
        return self.batch.observation(), self._info()

    def step(self, actions):
        reward, terminated, truncated = self.batch.step(actions)
        info = self._info()
        done = terminated | truncated
        obs = self.batch.observation()
        if done.any():
            final_obs = np.empty(self.num_envs, dtype=object)  # one entry per world, None where running
            for i in np.flatnonzero(done):
                final_obs[i] = obs[i]
            info["final_obs"], info["_final_obs"] = final_obs, done.copy()
            info["final_info"] = {k: v.copy() for k, v in info.items() if not k.startswith("final")}
            info["final_info"]["_loss"] = info["final_info"]["_score"] = done.copy()
            info["_final_info"] = done.copy()
            self.batch.reset(done)
            obs = self.batch.observation()
        return obs, reward.astype(np.float64), terminated, truncated, info

    def _info(self) -> dict:
        return {"loss": self.batch.loss.copy(), "score": self.batch.score(),
                "_loss": np.ones(self.num_envs, bool), "_score": np.ones(self.num_envs, bool)}

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        return tuple(_render(self.task, self.batch.state, w, *self.render_size) for w in range(self.num_envs))


# ------------------------------------------------------------------------------------ differentiable
def _float_arrays(state) -> list[tuple[str, wp.array]]:
    return [(n, a) for n, a in state.arrays() if a.dtype in FLOAT_TYPES]


def _inner(arr: wp.array) -> tuple[int, ...]:
    return tuple(getattr(arr.dtype, "_shape_", ()))


def _to_torch(arr: wp.array) -> torch.Tensor:
    return wp.to_torch(arr, requires_grad=False).clone()


class _StepFunction(torch.autograd.Function):
    """One differentiable env step: (actions, state tensors) -> (observation, loss, cost, next state tensors)."""

    @staticmethod
    def forward(ctx, denv: DiffTaskEnv, actions: torch.Tensor, *state_tensors: torch.Tensor):
        started = time.perf_counter()
        scene, task = denv.task.scene, denv.task
        names = denv.state_names
        state_in = denv.template.with_arrays({
            n: wp.from_torch(t.detach().contiguous(), dtype=denv.template.array(n).dtype, requires_grad=True)
            for n, t in zip(names, state_tensors, strict=True)})
        state_out = scene.solver.new_state(scene.model, requires_grad=True)
        control = scene.control(requires_grad=True)
        device = scene.device
        wp_actions = wp.from_torch(actions.detach().to(torch.float32).contiguous(), dtype=wp.float32)
        scene.apply_actions(wp_actions, control)
        obs = wp.zeros((denv.num_envs, task.observation_dim), dtype=float, device=device, requires_grad=True)
        loss = wp.zeros(denv.num_envs, dtype=float, device=device, requires_grad=True)
        cost = wp.zeros(denv.num_envs, dtype=float, device=device, requires_grad=True)
        claim = scene.solver.begin_step_scratch()
        tape = wp.Tape()
        with tape:
            scene.advance(state_in, state_out, control)
            task.loss(state_out, loss)
            if task.running_cost:
                task.cost(state_out, cost)
            task.observe(state_out, obs)
        scene.solver.end_step_scratch(claim)
        weakref.finalize(tape, scene.solver.release_step_scratch, claim)
        scene.solver.check_finite(scene.model, state_out, 0)
        ctx.tape, ctx.state_in, ctx.state_out, ctx.control = tape, state_in, state_out, control
        ctx.obs, ctx.loss, ctx.cost, ctx.denv = obs, loss, cost, denv
        denv._last_state = state_out
        out = (_to_torch(obs), _to_torch(loss), _to_torch(cost), *(_to_torch(state_out.array(n)) for n in names))
        denv.simulation_seconds["forward"] += time.perf_counter() - started
        return out

    @staticmethod
    def backward(ctx, grad_obs, grad_loss, grad_cost, *grad_state):
        started = time.perf_counter()
        denv = ctx.denv
        names = denv.state_names

        def seed(arr: wp.array, grad: torch.Tensor | None):
            arr.grad.zero_()
            if grad is not None:
                wp.copy(arr.grad, wp.from_torch(grad.detach().to(torch.float32).contiguous(), dtype=arr.dtype))

        seed(ctx.obs, grad_obs)
        seed(ctx.loss, grad_loss)
        seed(ctx.cost, grad_cost)
        for n, g in zip(names, grad_state, strict=True):
            seed(ctx.state_out.array(n), g)
        for _, arr in ctx.state_in.arrays():
            if arr.grad is not None:
                arr.grad.zero_()
        ctx.control.zero_grad()
        denv.task.scene.solver.zero_scratch_grad()
        ctx.tape.backward()
        actions_grad = wp.zeros((denv.num_envs, denv.task.action_dim), dtype=float, device=denv.task.scene.device)
        denv.task.scene.actions_adjoint(ctx.control, actions_grad)
        grads = [wp.to_torch(ctx.state_in.array(n).grad).clone() for n in names]
        ctx.tape.reset()
        ctx.tape = None  # its finalizer hands the steps' scratch back
        denv.simulation_seconds["backward"] += time.perf_counter() - started
        return (None, wp.to_torch(actions_grad).clone(), *grads)


class _RolloutFunction(torch.autograd.Function):
    """A whole horizon through the checkpointed Rollout: actions (T, W, D) -> summed final objective."""

    @staticmethod
    def forward(ctx, rollout: Rollout, denv: DiffTaskEnv, actions: torch.Tensor):
        scene = denv.task.scene
        a = actions.detach().to(torch.float32).contiguous()
        for k, control in enumerate(rollout.controls):
            scene.apply_actions(wp.from_torch(a[k], dtype=wp.float32), control)
        value = rollout.forward()
        ctx.rollout, ctx.denv = rollout, denv
        return torch.tensor(value, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_output):
        rollout, denv = ctx.rollout, ctx.denv
        scene = denv.task.scene
        for control in rollout.controls:
            control.zero_grad()
        rollout.backward()
        grads = []
        for control in rollout.controls:
            g = wp.zeros((denv.num_envs, denv.task.action_dim), dtype=float, device=scene.device)
            scene.actions_adjoint(control, g)
            grads.append(wp.to_torch(g).clone())
        return None, None, torch.stack(grads) * grad_output


class DiffTaskEnv:
    """The differentiable face of a task: torch tensors of shape ``(num_envs, ...)`` in and out.

    ``step(actions)`` returns observations and rewards that carry gradients back to the actions
    and to earlier states (and so to earlier actions), until :meth:`detach` cuts the graph (for
    short windows, SHAC-style). ``rollout(actions)`` runs a whole horizon through the
    checkpointed :class:`~diffsim.core.Rollout` and returns the summed final objective (the
    task's loss plus its running costs, :mod:`diffsim.tasks.task`). Actions
    are not clipped here: a controller that needs bounds applies them itself (e.g. ``tanh``).
    """

    def __init__(self, task_type: type[Task], *, num_envs: int = 1, device: str | None = None, **options):
        self.task = task_type(num_worlds=num_envs, device=device, **options)
        self.num_envs = num_envs
        self.batch = TaskBatch(self.task)
        self.template = self.batch.template
        self.state_names = [n for n, _ in _float_arrays(self.template)]
        self.action_low, self.action_high = (torch.as_tensor(b) for b in self.task.scene.action_bounds())
        self._state: list[torch.Tensor] = []
        self._loss: torch.Tensor | None = None  # the objective so far
        self._spent: torch.Tensor | None = None  # the running costs paid so far
        self._last_state = None
        self._rollouts: dict[int, Rollout] = {}
        #: wall seconds spent simulating steps forward and backward (controllers report the split)
        self.simulation_seconds = {"forward": 0.0, "backward": 0.0}

    @property
    def observation_dim(self) -> int:
        return self.task.observation_dim

    @property
    def action_dim(self) -> int:
        return self.task.action_dim

    def reset(self, seed: int | None = None, *, variants: list[dict] | None = None) -> torch.Tensor:
        """New episodes in every world (world ``i`` seeded with ``seed + i``, or given its variant
        ``variants[i]``); returns observations."""
        if seed is not None:
            for i in range(self.num_envs):
                self.batch.rngs[i] = gym.utils.seeding.np_random(seed + i)[0]
        self.batch.reset(variants=variants)
        self._state = [_to_torch(self.batch.state.array(n)) for n in self.state_names]
        self._loss = torch.as_tensor(self.batch.loss, dtype=torch.float32)
        self._spent = torch.zeros(self.num_envs)
        self._last_state = self.batch.state
        self.elapsed = 0
        return torch.as_tensor(self.batch.observation())

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The current state as named tensors (they carry the graph of the steps since the last cut)."""
        return dict(zip(self.state_names, self._state, strict=True))

    def set_state_grad(self, flag: bool = True) -> None:
        """Make the current state a leaf that requires gradients (to differentiate w.r.t. it)."""
        self._state = [t.detach().requires_grad_(flag) for t in self._state]

    def step(self, actions: torch.Tensor):
        """Returns (observation, reward, terminated, truncated, info); ``info["loss"]`` is the
        episode's objective so far (loss plus costs paid), the reward its decrease."""
        if self._loss is None:
            raise ConfigError("DiffTaskEnv.step() needs a reset() first.")
        self._check(actions)
        out = _StepFunction.apply(self, actions, *self._state)
        obs, self._state = out[0], list(out[3:])
        self._spent = self._spent + out[2]
        loss = out[1] + self._spent
        reward = self._loss - loss
        self._loss = loss
        self.elapsed += 1
        self.task.after_step(self._last_state)
        terminated = torch.as_tensor(self.task.terminated(self._last_state))
        truncated = torch.full((self.num_envs,), self.elapsed >= self.task.horizon)
        return obs, reward, terminated, truncated, {"loss": loss}

    def score(self) -> np.ndarray:
        """Each world's normalised task score [0, 1] in the current state (not differentiable)."""
        if self._last_state is None:
            raise ConfigError("DiffTaskEnv.score() needs a reset() first.")
        return np.asarray(self.task.score(self._last_state), dtype=np.float64)

    def detach(self) -> None:
        """Cut the graph: later gradients stop at the current state."""
        self._state = [t.detach() for t in self._state]
        if self._loss is not None:
            self._loss = self._loss.detach()
            self._spent = self._spent.detach()

    def _check(self, actions) -> None:
        expected = (self.num_envs, self.action_dim)
        if not isinstance(actions, torch.Tensor):
            raise InvalidParameter("action", type(actions).__name__, f"a torch.Tensor of shape {expected}")
        if tuple(actions.shape) != expected:
            raise InvalidParameter("action", f"a tensor of shape {tuple(actions.shape)}", f"shape {expected}")
        if not actions.is_floating_point():
            raise InvalidParameter("action", f"a tensor of dtype {actions.dtype}", f"floats of shape {expected}")
        if not bool(torch.isfinite(actions).all()):
            raise InvalidParameter("action", "a tensor with NaN or inf entries", f"finite floats of shape {expected}")

    def rollout(self, actions: torch.Tensor, *, checkpoint_every: int | None = None) -> torch.Tensor:
        """The summed final objective of a whole horizon from the last reset's initial states.

        ``actions`` has shape (frames, num_envs, action_dim); the backward runs the checkpointed
        rollout, so memory stays O(sqrt(T)) states whatever the horizon.
        """
        if actions.ndim != 3 or tuple(actions.shape[1:]) != (self.num_envs, self.action_dim):
            raise InvalidParameter("actions", f"a tensor of shape {tuple(actions.shape)}",
                                   f"shape (frames, {self.num_envs}, {self.action_dim})")
        if not bool(torch.isfinite(actions).all()):
            raise InvalidParameter("actions", "a tensor with NaN or inf entries", "finite values")
        frames = int(actions.shape[0])
        rollout = self._rollouts.get(frames)
        scene = self.task.scene
        if rollout is None:
            controls = [scene.control(requires_grad=True) for _ in range(frames)]
            rollout = scene.rollout(self.batch.initial.clone(requires_grad=True), controls,
                                    checkpoint_every=checkpoint_every, final_loss=self._final_loss(),
                                    frame_loss=self._frame_cost() if self.task.running_cost else None)
            self._rollouts[frames] = rollout
        else:
            rollout.state0.assign(self.batch.initial)
        return _RolloutFunction.apply(rollout, self, actions)

    def _final_loss(self) -> Callable:
        task = self.task

        def final_loss(model, state, loss: wp.array) -> None:
            per_world = wp.zeros(task.num_worlds, dtype=float, device=loss.device, requires_grad=True)
            task.loss(state, per_world)
            wp.launch(_sum_into, dim=task.num_worlds, inputs=[per_world], outputs=[loss], device=loss.device)

        return final_loss

    def _frame_cost(self) -> Callable:
        task = self.task

        def frame_cost(model, state, frame: int, loss: wp.array) -> None:
            per_world = wp.zeros(task.num_worlds, dtype=float, device=loss.device, requires_grad=True)
            task.cost(state, per_world)
            wp.launch(_sum_into, dim=task.num_worlds, inputs=[per_world], outputs=[loss], device=loss.device)

        return frame_cost


@wp.kernel
def _sum_into(values: wp.array(dtype=float), total: wp.array(dtype=float)):
    i = wp.tid()
    wp.atomic_add(total, 0, values[i])


def record_episode(task: str | type[Task], path, *, policy: Callable[[np.ndarray], np.ndarray] | None = None,
                   actions: np.ndarray | None = None, seed: int = 0, fps: int | None = None,
                   render_size: tuple[int, int] = (256, 256), **options) -> dict:
    """Run one episode of ``task`` in one world and write it as a GIF or MP4 (by ``path``'s suffix).

    Actions come from ``policy(observation)`` or from ``actions`` (steps, action_dim); with neither,
    the episode holds every actuator at zero. Returns the episode's ``return``, final ``score``,
    ``steps`` and the ``path`` written.
    """
    from diffsim.render import write_video

    task_cls = task_type(task) if isinstance(task, str) else task
    env = TaskEnv(task_cls, render_mode="rgb_array", render_size=render_size, **options)
    obs, info = env.reset(seed=seed)
    frames = [env.render()]
    total, steps = 0.0, 0
    for k in range(env.task.horizon):
        if actions is not None and k >= len(actions):
            break
        if policy is not None:
            action = policy(obs)
        elif actions is not None:
            action = actions[k]
        else:
            action = np.zeros(env.action_space.shape, np.float32)
        obs, reward, terminated, truncated, info = env.step(action)
        frames.append(env.render())
        total += reward
        steps += 1
        if terminated or truncated:
            break
    written = write_video(frames, path, fps=fps or env.metadata["render_fps"])
    return {"return": total, "score": info["score"], "steps": steps, "path": str(written)}


# ------------------------------------------------------------------------------------ registry
def register_task(task_type: type[Task]) -> type[Task]:
    """Register ``task_type`` with gymnasium under ``task_type.id`` (single and vector entry points)."""
    if not task_type.id.startswith("diffsim/"):
        raise ConfigError(f"task id {task_type.id!r} must look like 'diffsim/<Name>-v0'.")
    if task_type.id in gym.registry:
        return task_type

    def make_single(**kwargs):
        return TaskEnv(task_type, **kwargs)

    def make_vector(num_envs: int = 1, **kwargs):
        return TaskVectorEnv(task_type, num_envs=num_envs, **kwargs)

    gym.register(id=task_type.id, entry_point=make_single, vector_entry_point=make_vector,
                 disable_env_checker=False)
    TASKS[task_type.id] = task_type
    return task_type


#: Every registered task type by id.
TASKS: dict[str, type[Task]] = {}


def task_type(name: str) -> type[Task]:
    """The task registered as ``name`` (``"Pinch-v0"`` or ``"diffsim/Pinch-v0"``)."""
    key = name if name.startswith("diffsim/") else f"diffsim/{name}"
    if key not in TASKS:
        raise ConfigError(f"unknown task {name!r}; the tasks are: {', '.join(sorted(TASKS))}.")
    return TASKS[key]
