"""Tasks: a Scene with seeded variants, a per-world observation and loss, a score and a horizon;
and ``TaskBatch``, the batched simulation of one task that every face of the task layer steps.

A task's objective has two parts: its *loss*, a function of the current state (the distance to a
goal shape, say), and, for tasks with ``running_cost``, a *cost* paid at every env step (the
error of a tracked velocity or force). The episode's objective after t steps is J_t = L(s_t) +
c_1 + ... + c_t, every face reports J_t as ``loss`` and the reward is its decrease, J_{t-1} - J_t,
so an episode's return is J_0 - J_T: what RL maximises and what gradient methods minimise (the
final J_T) is one quantity.

A task file describes its scene, actuators, observation and loss by subclassing :class:`Task`;
the gymnasium faces (:mod:`diffsim.tasks.env`) and the differentiable face add nothing task-specific.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, ClassVar

import numpy as np
import warp as wp

from diffsim.core.protocol import State
from diffsim.core.scene import Scene, flat_view
from diffsim.errors import ConfigError, InvalidParameter


@dataclasses.dataclass
class TaskConfig:
    """Settings every task shares; task configs subclass it and add their own fields.

    Every length is in metres and every time in seconds.
    """

    horizon: int = 50  #: env steps (frames) per episode
    frame_dt: float = 1.0 / 60.0  #: duration of one env step [s]

    def __post_init__(self):
        if not isinstance(self.horizon, int) or self.horizon < 1:
            raise InvalidParameter("horizon", self.horizon, "integers >= 1 (env steps)")
        if not (self.frame_dt > 0 and math.isfinite(self.frame_dt)):
            raise InvalidParameter("frame_dt", self.frame_dt, "(0, inf) s")


def make_config(config_type: type, config=None, **overrides):
    """``config`` (an instance or None for defaults) with ``overrides`` applied; an unknown name
    raises :class:`ConfigError` listing the valid ones."""
    names = {f.name for f in dataclasses.fields(config_type)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"unknown task option(s) {unknown} for {config_type.__name__}; "
                          f"valid options: {sorted(names)}.")
    base = config if config is not None else config_type()
    if not isinstance(base, config_type):
        raise ConfigError(f"config must be a {config_type.__name__}, got {type(base).__name__}.")
    return dataclasses.replace(base, **overrides)


class Task(abc.ABC):
    """A task description. Subclasses set ``Config`` and implement the five hooks below.

    Args:
        config: the task's settings (``Config`` defaults when None).
        num_worlds: worlds simulated together (one episode each).
        device: Warp device.
        **overrides: fields of ``Config`` to change.
    """

    Config: ClassVar[type] = TaskConfig
    #: the registered id, e.g. ``"diffsim/Pinch-v0"``
    id: ClassVar[str] = ""
    #: options that make a tiny scene of the task (tests, examples)
    tiny: ClassVar[dict] = {}

    def __init__(self, config=None, *, num_worlds: int = 1, device: str | None = None, **overrides):
        if not isinstance(num_worlds, int) or num_worlds < 1:
            raise InvalidParameter("num_worlds", num_worlds, "integers >= 1")
        self.config = make_config(self.Config, config, **overrides)
        self.num_worlds = num_worlds
        self.scene: Scene = self.build_scene(num_worlds, device)
        self.horizon = self.config.horizon

    # -- what a task file describes -----------------------------------------------------------
    @abc.abstractmethod
    def build_scene(self, num_worlds: int, device) -> Scene:
        """The scene with its actuators, for ``num_worlds`` copies."""

    @abc.abstractmethod
    def sample_variant(self, rng: np.random.Generator) -> dict[str, Any]:
        """Draw one episode's variant (initial shape offsets, target ...) from ``rng``."""

    @abc.abstractmethod
    def set_variant(self, state: State, world: int, variant: dict[str, Any]) -> None:
        """Write world ``world``'s initial state into ``state`` and its target into the task's
        per-world target arrays."""

    def interpolate_variant(self, a: dict[str, Any], b: dict[str, Any], t: float) -> dict[str, Any]:
        """The variant a fraction ``t`` in [0, 1] of the way from ``a`` to ``b``, for transfer along a
        path of variants: numbers and arrays linearly, anything else switched at ``t = 0.5``.
        Tasks whose variants do not interpolate linearly (a sign, a choice) override it."""
        out = {}
        for key, start in a.items():
            end = b[key]
            if isinstance(start, (int, float, np.floating, np.ndarray)) and not isinstance(start, bool):
                out[key] = (1.0 - t) * np.asarray(start, np.float64) + t * np.asarray(end, np.float64)
                if np.ndim(start) == 0:
                    out[key] = float(out[key])
            else:
                out[key] = start if t < 0.5 else end
        return out

    #: the task's observation terms; tasks that set it need not override the two methods below
    observation: Observation | None = None

    @property
    def observation_dim(self) -> int:
        """Floats in one world's observation."""
        if self.observation is None:
            raise NotImplementedError(f"{type(self).__name__} sets no observation and defines no observation_dim.")
        return self.observation.dim

    def observe(self, state: State, out: wp.array) -> None:
        """Launch (taped) kernels writing each world's observation into ``out`` (num_worlds, dim)."""
        if self.observation is None:
            raise NotImplementedError(f"{type(self).__name__} sets no observation and defines no observe().")
        self.observation(state, out)

    @abc.abstractmethod
    def loss(self, state: State, out: wp.array) -> None:
        """Launch (taped) kernels adding each world's task loss into ``out`` (num_worlds,)."""

    #: True for tasks that pay :meth:`cost` at every env step (see the module header)
    running_cost: ClassVar[bool] = False

    def cost(self, state: State, out: wp.array) -> None:
        """Launch (taped) kernels adding each world's cost of the env step that ended in ``state``
        into ``out`` (num_worlds,); read only when ``running_cost`` is set. Such a task defines its
        own :meth:`score`, since the default one reads the loss alone."""
        raise NotImplementedError(f"{type(self).__name__} sets running_cost but defines no cost().")

    def score(self, state: State) -> np.ndarray:
        """Normalised score in [0, 1] of each world's current state (1: target reached)."""
        loss = self.evaluate_loss(state)
        start = getattr(self, "_initial_loss", None)
        if start is None:
            return np.zeros(self.num_worlds)
        return np.clip(1.0 - loss / np.maximum(start, 1e-12), 0.0, 1.0)

    def begin_episode(self, state: State, mask: np.ndarray) -> None:
        """Called after the worlds in ``mask`` were reset to ``state``: record what the score
        is measured from (by default the initial loss)."""
        loss = self.evaluate_loss(state)
        if getattr(self, "_initial_loss", None) is None:
            self._initial_loss = loss.copy()
        self._initial_loss[mask] = loss[mask]

    def after_step(self, state: State) -> None:  # noqa: B027 -- optional hook, a no-op by default
        """Called once after every env step with the new state, before its loss, termination and
        score are read: the place for per-episode bookkeeping (peaks, running means)."""

    def terminated(self, state: State) -> np.ndarray:
        """Worlds whose episode ended for a task reason (success or failure); none by default.
        May be called more than once per step: keep it free of side effects."""
        return np.zeros(self.num_worlds, dtype=bool)

    def render_options(self, world: int) -> dict:
        """Extra keyword arguments of :func:`diffsim.render.render_state` for ``world`` (e.g. an inset)."""
        return {}

    def observation_bounds(self) -> tuple[float, float]:
        """Bounds of every observation entry (the observation Box)."""
        return -np.inf, np.inf

    # -- helpers ---------------------------------------------------------------------------
    def evaluate_loss(self, state: State) -> np.ndarray:
        out = wp.zeros(self.num_worlds, dtype=float, device=self.scene.device)
        self.loss(state, out)
        return out.numpy().astype(np.float64)

    def evaluate_cost(self, state: State) -> np.ndarray:
        """Each world's cost of the step that ended in ``state`` (zeros without ``running_cost``)."""
        if not self.running_cost:
            return np.zeros(self.num_worlds)
        out = wp.zeros(self.num_worlds, dtype=float, device=self.scene.device)
        self.cost(state, out)
        return out.numpy().astype(np.float64)

    @property
    def action_dim(self) -> int:
        return self.scene.action_dim


# ------------------------------------------------------------------------------------ gathers
@wp.kernel
def _gather(src: wp.array(dtype=float), index: wp.array2d(dtype=int), comps: int, scale: float,
            offset: int, out: wp.array2d(dtype=float)):
    w, j = wp.tid()
    e = index[w, j / comps]
    out[w, offset + j] = src[e * comps + j % comps] * scale


class Gather:
    """Observation term: components of chosen elements of a state array, per world.

    Args:
        array: the State array, e.g. ``"particle_x"`` or ``"mpm.particle_x"``, or a ``wp.array`` of the
            task's own (e.g. each world's goal), read as it is.
        index: element index per (world, entry), shape (num_worlds, entries).
        comps: floats per element (3 for vec3).
        scale: factor applied (e.g. to bring velocities near unit size).
    """

    def __init__(self, array: str | wp.array, index: np.ndarray, comps: int, *, scale: float = 1.0):
        self.array = array
        self.index_host = np.asarray(index, dtype=np.int32)
        self.comps = int(comps)
        self.scale = float(scale)
        self._index = None

    @property
    def dim(self) -> int:
        return self.index_host.shape[1] * self.comps

    def __call__(self, state: State, out: wp.array, offset: int) -> None:
        arr = self.array if isinstance(self.array, wp.array) else state.array(self.array)
        if self._index is None:
            self._index = wp.array(self.index_host, dtype=int, device=arr.device)
        wp.launch(_gather, dim=(self.index_host.shape[0], self.dim),
                  inputs=[flat_view(arr), self._index, self.comps, self.scale, offset], outputs=[out],
                  device=arr.device)


class Observation:
    """Observation terms laid side by side into one (num_worlds, dim) float array."""

    def __init__(self, *terms: Gather):
        self.terms = list(terms)

    @property
    def dim(self) -> int:
        return sum(t.dim for t in self.terms)

    def __call__(self, state: State, out: wp.array) -> None:
        offset = 0
        for term in self.terms:
            term(state, out, offset)
            offset += term.dim


def subsample(element_world: np.ndarray, num_worlds: int, count: int, *, seed: int = 0) -> np.ndarray:
    """``count`` element indices per world, the same relative choice in every world (sorted)."""
    per_world = [np.flatnonzero(element_world == w) for w in range(num_worlds)]
    n = len(per_world[0])
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(n, size=min(count, n), replace=False))
    return np.stack([p[pick] for p in per_world])


# ------------------------------------------------------------------------------------ batch
class TaskBatch:
    """All worlds of one task, stepped together: reset by mask, step with clipped actions, per-world
    observations, rewards (the decrease of the episode's objective), scores and episode clocks.

    ``loss`` holds each world's objective so far (the task's loss plus the costs paid since its
    episode began, see the module header); ``spent`` the costs alone."""

    def __init__(self, task: Task):
        self.task = task
        scene = task.scene
        self.scene = scene
        self.num_worlds = scene.num_worlds
        self.template = scene.state()
        self.initial = scene.state()
        self.state = scene.state()
        self._next = scene.state()
        self.control = scene.control()
        device = scene.device
        self.low, self.high = scene.action_bounds()
        self._actions = wp.zeros((self.num_worlds, scene.action_dim), dtype=float, device=device)
        self._obs = wp.zeros((self.num_worlds, task.observation_dim), dtype=float, device=device)
        self._loss = wp.zeros(self.num_worlds, dtype=float, device=device)
        self.rngs = [np.random.default_rng() for _ in range(self.num_worlds)]
        self.elapsed = np.zeros(self.num_worlds, dtype=np.int64)
        self.loss = np.zeros(self.num_worlds)
        self.spent = np.zeros(self.num_worlds)
        self.variants: list[dict | None] = [None] * self.num_worlds

    def seed(self, world: int, seed: int | None) -> None:
        self.rngs[world] = np.random.default_rng(seed)

    def reset(self, mask: np.ndarray | None = None, variants: list[dict] | None = None) -> None:
        """Start new episodes in the worlds of ``mask`` (all when None), each drawn from its rng,
        or given: ``variants[w]`` for world ``w`` (one per world)."""
        mask = np.ones(self.num_worlds, bool) if mask is None else np.asarray(mask, bool)
        if variants is not None and len(variants) != self.num_worlds:
            raise InvalidParameter("variants", f"{len(variants)} variants", f"one per world ({self.num_worlds})")
        # each variant is written over the template, never over the last episode's variant
        self.scene.reset_worlds(self.initial, self.template, mask)
        for w in np.flatnonzero(mask):
            self.variants[w] = self.task.sample_variant(self.rngs[w]) if variants is None else variants[w]
            self.task.set_variant(self.initial, int(w), self.variants[w])
        self.scene.reset_worlds(self.state, self.initial, mask)
        self.elapsed[mask] = 0
        self.task.begin_episode(self.state, mask)
        self.spent[mask] = 0.0
        self.loss = np.where(mask, self.task.evaluate_loss(self.state), self.loss)

    def check_actions(self, actions) -> np.ndarray:
        """``actions`` as float32 (num_worlds, dim), clipped to the bounds; refuses a wrong shape or
        non-finite entries with a sentence."""
        dim = self.scene.action_dim
        a = np.asarray(actions)
        expected = (self.num_worlds, dim)
        if a.shape != expected and not (self.num_worlds == 1 and a.shape == (dim,)):
            raise InvalidParameter("action", f"an array of shape {a.shape}",
                                   f"shape {expected if self.num_worlds > 1 else (dim,)} floats")
        if a.dtype.kind not in "fiu":
            raise InvalidParameter("action", f"an array of dtype {a.dtype}",
                                   f"real numbers of shape {expected if self.num_worlds > 1 else (dim,)}")
        a = a.astype(np.float32).reshape(expected)
        if not np.all(np.isfinite(a)):
            raise InvalidParameter("action", "an array with NaN or inf entries",
                                   f"finite floats of shape {expected if self.num_worlds > 1 else (dim,)}")
        return np.clip(a, self.low, self.high)

    def step(self, actions, *, check_finite: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Advance every world one frame; returns (reward, terminated, truncated) per world.

        With ``check_finite=False`` a world whose state turns non-finite is not reported here: its
        loss goes NaN while the other worlds step on (what a population search wants, ranking
        such a candidate last instead of losing the whole population)."""
        a = self.check_actions(actions)
        self._actions.assign(a)
        self.scene.apply_actions(self._actions, self.control)
        self.scene.advance(self.state, self._next, self.control)
        self.state, self._next = self._next, self.state
        if check_finite:
            self.scene.solver.check_finite(self.scene.model, self.state, int(self.elapsed.max()))
        self.task.after_step(self.state)
        self.spent = self.spent + self.task.evaluate_cost(self.state)
        loss = self.task.evaluate_loss(self.state) + self.spent
        reward = self.loss - loss
        self.loss = loss
        self.elapsed += 1
        return reward, self.task.terminated(self.state), self.elapsed >= self.task.horizon

    def observation(self) -> np.ndarray:
        self._obs.zero_()
        self.task.observe(self.state, self._obs)
        return self._obs.numpy().astype(np.float32)

    def score(self) -> np.ndarray:
        return self.task.score(self.state)
