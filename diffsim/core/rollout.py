"""Checkpointed rollouts: forward simulation and reverse-mode gradients over long horizons.

Forward keeps a State only every ``checkpoint_every`` solver steps; backward re-simulates each
segment from its checkpoint under a local tape (one per segment when the solver's taped steps
own their scratch, else one per step, newest first), so memory is O(T/K + K) states plus K
steps' scratch, whatever the horizon.

Over long horizons of chaotic dynamics (a cable flung about for 499 frames) the adjoint grows
exponentially and overflows float32 (3.4e38). ``rescale_adjoint=True`` keeps it in range. The
backward pass watches the state adjoint handed from one segment to the one before; once an entry
passes 2^100 it carries the adjoint as a float32 mantissa times a power of two per entry (2^0,
2^64, 2^128, ...). The adjoint is linear in its seed, so each segment is then run backward once
per power present (the entries at that level seeded, the others zero; the frame losses seeded in
the 2^0 run), and every gradient is summed on the host in float64 with its run's power: the exact
gradient to float32 rounding, up to float64's range, for one extra backward run of a segment per
extra power. Until an entry passes 2^100 nothing changes, bit for bit. :meth:`Rollout.gradient`
returns the float64 sums (``.grad`` arrays get them rounded to float32, infinite where they do
not fit).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import warp as wp
from tqdm.auto import tqdm

from diffsim.core.protocol import Control, Model, Solver, State, accumulate
from diffsim.core.scene import Scene
from diffsim.errors import ConfigError, InvalidParameter

#: ``frame_loss(model, state, frame, loss)`` launches kernels that add a scalar into ``loss[0]``
#: for the state reached at the end of control interval ``frame``.
FrameLoss = Callable[[Model, State, int, wp.array], None]
#: ``final_loss(model, state, loss)`` does the same for the last state of the rollout.
FinalLoss = Callable[[Model, State, wp.array], None]


@dataclass
class RolloutStats:
    """Bookkeeping of one rollout, for memory tests and benchmarks."""

    solver_steps: int = 0
    checkpoint_every: int = 0
    checkpoints: int = 0
    #: State objects the rollout itself allocated (checkpoints + working pool); state0 excluded.
    states_allocated: int = 0
    forward_steps_run: int = 0
    backward_steps_run: int = 0


class Rollout:
    """A differentiable simulation of ``len(controls)`` control intervals (frames).

    Each frame applies one Control for ``substeps`` solver steps of ``frame_dt / substeps``
    seconds; with ``substeps="auto"`` the :class:`~diffsim.core.scene.Scene` picks each frame's
    count from the state it starts at (stability and advective limits), ``forward()`` records the
    counts in ``schedule`` and ``backward()`` replays them. ``forward()`` returns the loss;
    ``backward()`` then accumulates d(loss)/d(x) into the ``.grad`` of every array that requires
    it: ``state0``'s, the model's and each control's.

    Args:
        solver: the solver that advances a state by one step.
        model: constant data of the scene.
        state0: initial state; never written.
        controls: one Control per frame.
        frame_dt: duration of one frame [s].
        substeps: solver steps per frame, or ``"auto"`` for the fewest the solver accepts in each frame.
        checkpoint_every: keep one state every K solver steps (default: about sqrt(T)).
        frame_loss: optional per-frame loss, see :data:`FrameLoss`.
        final_loss: optional end-of-rollout loss, see :data:`FinalLoss`.
        check_every: test the state for non-finite values every this many steps, and in backward
            the gradients after each checkpoint segment (0: never).
        progress: show a progress bar.
        scene: the Scene to step (default: one made of ``model``, ``solver``, ``frame_dt`` and
            ``substeps``); see :meth:`Scene.rollout`.
        rescale_adjoint: keep the adjoint within float32 by powers of two and sum the gradients
            in float64 (see the module header); :meth:`gradient` reads them.
    """

    def __init__(
        self,
        solver: Solver,
        model: Model,
        state0: State,
        controls: Sequence[Control],
        *,
        frame_dt: float,
        substeps: int | str = 1,
        checkpoint_every: int | None = None,
        frame_loss: FrameLoss | None = None,
        final_loss: FinalLoss | None = None,
        check_every: int = 50,
        progress: bool = False,
        scene: Scene | None = None,
        rescale_adjoint: bool = False,
    ):
        if len(controls) == 0:
            raise ConfigError("a rollout needs at least one control (one per frame); got an empty sequence.")
        # one place decides the substeps of a frame: the scene (see Scene.substeps_for)
        self.scene = scene if scene is not None else Scene(model, solver, frame_dt=frame_dt, substeps=substeps)
        self.solver = solver
        self.model = model
        self.state0 = state0
        self.controls = list(controls)
        self.frame_dt = self.scene.frame_dt
        #: substeps of the first frame (every frame's, unless "auto" meets the advective limit)
        self.substeps = self.scene.substeps_for(state0, self.controls[0])
        self.dt = self.frame_dt / self.substeps
        # Let the solver refuse an unstable dt now, before any work, with its own message.
        validate = getattr(solver, "validate_dt", None)
        if validate is not None:
            validate(model, self.dt)
        #: solver steps of the horizon (an estimate until forward() has fixed every frame's substeps)
        self.num_steps = len(self.controls) * self.substeps
        if checkpoint_every is None:
            checkpoint_every = max(1, round(math.sqrt(self.num_steps)))
        if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise InvalidParameter("checkpoint_every", checkpoint_every, "positive integers (solver steps)")
        self.checkpoint_every = min(checkpoint_every, self.num_steps)
        self.frame_loss = frame_loss
        self.final_loss = final_loss
        self.check_every = check_every
        self.progress = progress
        self.rescale_adjoint = bool(rescale_adjoint)
        self._gradients64: dict[int, tuple[wp.array, np.ndarray]] = {}
        #: (rescale_adjoint) the largest power of two the state adjoint needed, over the last backward()
        self.adjoint_exponent = 0
        self.stats = RolloutStats(solver_steps=self.num_steps, checkpoint_every=self.checkpoint_every)
        #: substeps of each frame, fixed by the last forward()
        self.schedule: list[int] = [self.substeps] * len(self.controls)
        self._set_schedule(self.schedule)

        device = state0.arrays().__next__()[1].device
        self.device = device
        self.loss = wp.zeros(1, dtype=float, device=device, requires_grad=True)
        self._step_loss = wp.zeros(1, dtype=float, device=device, requires_grad=True)
        # the frame losses' seed in a segment's backward run: 1, or 0 in rescaled runs of higher levels
        self._seeds = {True: wp.ones(1, dtype=float, device=device), False: wp.zeros(1, dtype=float, device=device)}
        self._pool: list[State] = []
        self._checkpoints: dict[int, State] = {}
        self._final_state: State | None = None
        self._forward_done = False

    def _set_schedule(self, schedule: list[int]) -> None:
        """Per solver step: its frame, its dt and whether it ends the frame."""
        self.schedule = list(schedule)
        self._step_frame = np.repeat(np.arange(len(schedule)), schedule)
        self._step_dt = np.repeat(self.frame_dt / np.asarray(schedule, dtype=np.float64), schedule)
        self._frame_end = np.cumsum(schedule) - 1
        self._ends_frame = np.zeros(len(self._step_frame), dtype=bool)
        self._ends_frame[self._frame_end] = True
        self.num_steps = len(self._step_frame)
        self.stats.solver_steps = self.num_steps

    # -- storage -----------------------------------------------------------------------------
    def _pool_state(self, i: int) -> State:
        while len(self._pool) <= i:
            self._pool.append(self.solver.new_state(self.model, requires_grad=True))
            self.stats.states_allocated += 1
        return self._pool[i]

    def _checkpoint(self, step: int) -> State:
        if step == 0:
            return self.state0
        if step not in self._checkpoints:
            self._checkpoints[step] = self.solver.new_state(self.model, requires_grad=False)
            self.stats.states_allocated += 1
            self.stats.checkpoints = len(self._checkpoints)
        return self._checkpoints[step]

    def _control(self, step: int) -> Control:
        return self.controls[self._step_frame[step]]

    def _step(self, step: int, state_in: State, state_out: State) -> None:
        self.solver.step(self.model, state_in, state_out, self._control(step), float(self._step_dt[step]))

    @staticmethod
    def _hand_over(carried: State | None, last: State) -> None:
        """Seed the adjoint of a segment's last state with the later segment's first-state adjoint."""
        last.zero_grad()
        if carried is None:
            return
        for name, arr in last.arrays():
            src = carried.array(name)
            if arr.grad is not None and src.grad is not None:
                wp.copy(arr.grad, src.grad)

    def _add_losses(self, step_done: int, state: State, loss: wp.array) -> None:
        """Launch the losses due after ``step_done`` solver steps (1-based) on ``state``."""
        if self.frame_loss is not None and self._ends_frame[step_done - 1]:
            self.frame_loss(self.model, state, int(self._step_frame[step_done - 1]), loss)
        if self.final_loss is not None and step_done == self.num_steps:
            self.final_loss(self.model, state, loss)

    # -- forward -----------------------------------------------------------------------------
    def forward(self, *, on_frame: Callable[[int, State], None] | None = None) -> float:
        """Simulate the whole horizon and return the loss (0 when no loss is given).

        Args:
            on_frame: called as ``on_frame(frame, state)`` after each frame, e.g. to record video.
        """
        self._forward_done = False
        self._final_state = None
        # parameters may have changed since construction (e.g. fitted E): "auto" substeps follow
        # them, a fixed count is checked again
        if self.scene.substeps == "auto":
            self.scene.refresh_limits()
        else:
            validate = getattr(self.solver, "validate_dt", None)
            if validate is not None:
                validate(self.model, self.dt)
        self._check_controls()
        self.loss.zero_()
        state = self.state0
        schedule: list[int] = []
        bar = tqdm(total=self.num_steps, desc="forward", disable=not self.progress, leave=False)
        t = 0
        for frame, control in enumerate(self.controls):
            # the scene fixes this frame's substeps from the state it starts from
            n = self.scene.substeps_for(state, control)
            schedule.append(n)
            dt = self.frame_dt / n
            for i in range(n):
                # Ping-pong between two pool states; state0 is only ever read.
                nxt = self._pool_state((t + 1) % 2)
                self.solver.step(self.model, state, nxt, control, dt)
                t += 1
                last = frame == len(self.controls) - 1 and i == n - 1
                if self.check_every and (t % self.check_every == 0 or last):
                    self.solver.check_finite(self.model, nxt, t - 1)
                if self.frame_loss is not None and i == n - 1:
                    self.frame_loss(self.model, nxt, frame, self.loss)
                if self.final_loss is not None and last:
                    self.final_loss(self.model, nxt, self.loss)
                if t % self.checkpoint_every == 0 and not last:
                    self._checkpoint(t).assign(nxt)
                state = nxt
                bar.update(1)
            if on_frame is not None:
                on_frame(frame, state)
        self._set_schedule(schedule)
        bar.close()
        self.stats.forward_steps_run += self.num_steps
        self._final_state = state
        self._forward_done = True
        return float(self.loss.numpy()[0])

    def _check_controls(self) -> None:
        """Refuse non-finite controls up front: otherwise they surface steps later as a
        'diverged' simulation that points at the wrong culprit."""
        for frame, control in enumerate(self.controls):
            for name, arr in control.arrays():
                values = arr.numpy()
                if values.dtype.kind == "f" and not np.all(np.isfinite(values)):
                    raise InvalidParameter(f"controls[{frame}].{name}", "an array with NaN or inf entries",
                                           "finite values")

    @property
    def final_state(self) -> State:
        """The state after the last step, valid from ``forward()`` until ``backward()``.

        It lives in the rollout's working pool, which the backward pass re-uses; ``clone()`` it
        to keep it longer.
        """
        if self._final_state is None:
            raise ConfigError("final_state is only available between forward() and backward(); "
                              "clone() it after forward() to keep it across backward().")
        return self._final_state

    # -- backward ----------------------------------------------------------------------------
    def backward(self) -> None:
        """Accumulate d(loss)/d(inputs) into the ``.grad`` of state0, model and control arrays.

        Gradients add to whatever the ``.grad`` arrays hold; zero them first to start afresh.
        """
        if not self._forward_done:
            raise ConfigError("Rollout.backward() needs a forward() first, to lay down the checkpoints.")
        self._final_state = None  # the pool is about to be overwritten
        K = self.checkpoint_every
        T = self.num_steps
        num_segments = math.ceil(T / K)
        bar = tqdm(total=T, desc="backward", disable=not self.progress, leave=False)
        carried: State | None = None  # holds the adjoint of the first state of the later segment
        # rescale_adjoint watches the carried adjoint and switches to rescaled runs once an entry
        # passes 2^RESCALE_FROM (until then the arithmetic is the plain pass's, bit for bit)
        rescaling = False
        levels: dict = {}  # (rescaling) each carried entry's power-of-two level, set before it is read
        self._gradients64 = {}
        self.adjoint_exponent = 0
        for segment in reversed(range(num_segments)):
            start, end = segment * K, min(T, (segment + 1) * K)
            states = [self._pool_state(i) for i in range(end - start + 1)]
            frames = range(int(self._step_frame[start]), int(self._step_frame[end - 1]) + 1)
            if not rescaling:
                # First move the later segment's adjoint (held by pool slot 0) into this segment's
                # last state: slot 0 is this segment's first state too.
                self._hand_over(carried, states[end - start])
                self._segment_backward(start, end, states, seeded=True)
                if self.rescale_adjoint:
                    adjoint = _adjoint64(states[0])
                    largest = max((float(np.max(np.abs(a), initial=0.0)) for a in adjoint.values()), default=0.0)
                    if math.isfinite(largest) and largest > 2.0**RESCALE_FROM:
                        rescaling = True
                        self._begin_gradients64()  # what the plain passes summed so far
            else:
                adjoint = self._rescaled_segment_backward(start, end, states, frames, levels, adjoint)
            if rescaling:
                levels = {name: _level(a) for name, a in adjoint.items()}
                self.adjoint_exponent = max([self.adjoint_exponent, *(int(v.max()) for v in levels.values() if v.size)])
                for name, arr in states[0].arrays():  # carried: the mantissas, for the check below
                    if name in adjoint:
                        arr.grad.assign(_mantissa(adjoint[name], levels[name]).reshape(arr.grad.numpy().shape))
            bar.update(end - start)
            carried = states[0]
            if self.check_every:
                # as forward checks states: a NaN adjoint would otherwise reach the user silently
                self.solver.check_finite_adjoint(self.model, carried, start,
                                                 controls={f"controls[{f}]": self.controls[f] for f in frames})
                if rescaling:
                    self._check_gradients64(start)
        bar.close()
        if rescaling:
            for name, arr in self.state0.arrays():
                if arr.requires_grad and arr.grad is not None and name in adjoint:
                    self._add_gradient64(arr, adjoint[name].reshape(arr.grad.numpy().shape))
            self._end_gradients64()
            return
        # carried (== pool[0]) now holds d(loss)/d(state0): add it to state0's gradients.
        for name, arr in self.state0.arrays():
            if arr.requires_grad and arr.grad is not None:
                src = carried.array(name)
                if src.grad is not None:
                    accumulate(arr.grad, src.grad)

    def _segment_backward(self, start: int, end: int, states: list[State], *, seeded: bool) -> None:
        """Backward through solver steps [start, end): the adjoint of ``states[-1]`` as it is
        (the later segment's), the frame losses' seed 1 if ``seeded`` else 0; leaves the adjoint of
        the segment's first state in ``states[0]`` and adds to the model's and controls' gradients."""
        span = getattr(self.solver, "tape_spans_steps", False)
        seed = {self._step_loss: self._seeds[bool(seeded)]}
        for s in states[:-1]:
            s.zero_grad()
        states[0].assign(self._checkpoint(start))
        self._step_loss.zero_()
        self._step_loss.grad.zero_()
        if span:
            # One tape over the segment: possible when each taped step has its own scratch.
            claim = self.solver.begin_step_scratch()
            tape = wp.Tape()
            with tape:
                for t in range(start, end):
                    self._step(t, states[t - start], states[t - start + 1])
                    self._add_losses(t + 1, states[t - start + 1], self._step_loss)
            self.solver.end_step_scratch(claim)
            tape.backward(grads=seed)
            del tape
            self.solver.release_step_scratch(claim)
            self.stats.backward_steps_run += end - start
        else:
            # Scratch is shared between steps: re-simulate without a tape, then re-run each
            # step under its own tape, newest first.
            for t in range(start, end):
                self._step(t, states[t - start], states[t - start + 1])
            for t in reversed(range(start, end)):
                state_in, state_out = states[t - start], states[t - start + 1]
                state_in.zero_grad()
                self.solver.zero_scratch_grad()
                self._step_loss.zero_()
                self._step_loss.grad.zero_()
                tape = wp.Tape()
                with tape:
                    self._step(t, state_in, state_out)
                    self._add_losses(t + 1, state_out, self._step_loss)
                tape.backward(grads=seed)
                del tape
                self.stats.backward_steps_run += 1

    # -- rescaled adjoints (rescale_adjoint=True) --------------------------------------------
    def _rescaled_segment_backward(self, start, end, states, frames, levels, adjoint) -> dict[str, np.ndarray]:
        """One backward run of the segment per power of two present in the carried adjoint (the
        losses seeded in the 2^0 run); returns the segment's first-state adjoint in float64."""
        last = states[-1]
        present = sorted({0, *(int(v) for lv in levels.values() for v in np.unique(lv))})
        first: dict[str, np.ndarray] = {}
        for level in present:
            last.zero_grad()
            for name, arr in last.arrays():
                if arr.grad is not None and name in adjoint:
                    mask = levels[name] == level
                    values = np.where(mask, _mantissa(adjoint[name], levels[name]), 0.0)
                    arr.grad.assign(values.reshape(arr.grad.numpy().shape).astype(np.float32))
            self._segment_backward(start, end, states, seeded=level == 0)
            scale = 2.0 ** level
            for name, values in _adjoint64(states[0]).items():
                first[name] = first.get(name, 0.0) + scale * values
            self._harvest_gradients64(scale, [self.controls[f] for f in frames])
        return first

    def _gradient_arrays(self, controls) -> list[wp.array]:
        arrays, seen = [], set()
        for bundle in (self.model, *controls):
            for _, arr in bundle.arrays():
                if arr.grad is not None and arr.dtype not in _INTEGER and id(arr) not in seen:
                    seen.add(id(arr))
                    arrays.append(arr)
        return arrays

    def _begin_gradients64(self) -> None:
        # the float64 sums start from what the .grad arrays already hold (backward adds to them)
        self._gradients64 = {}
        for arr in self._gradient_arrays(self.controls) + [a for _, a in self.state0.arrays()
                                                           if a.grad is not None and a.dtype not in _INTEGER]:
            self._gradients64[id(arr)] = (arr, arr.grad.numpy().astype(np.float64))
            arr.grad.zero_()

    def _add_gradient64(self, arr: wp.array, values: np.ndarray) -> None:
        entry = self._gradients64.get(id(arr))
        if entry is None:
            entry = self._gradients64[id(arr)] = (arr, np.zeros(arr.grad.numpy().shape))
        entry[1][...] += values

    def _harvest_gradients64(self, scale: float, controls) -> None:
        """Move the model's and these controls' float32 gradients into the float64 sums, times ``scale``."""
        for arr in self._gradient_arrays(controls):
            grad = arr.grad.numpy()
            if np.any(grad):
                self._add_gradient64(arr, scale * grad.astype(np.float64))
                arr.grad.zero_()

    def _check_gradients64(self, step: int) -> None:
        from diffsim.errors import GradientDiverged

        for name, arr in self.model.arrays():
            entry = self._gradients64.get(id(arr))
            if entry is not None and entry[1].size:
                bad = np.flatnonzero(~np.isfinite(entry[1].reshape(arr.shape[0], -1)).all(axis=1))
                if bad.size:
                    raise GradientDiverged(step, f"model.{name}", int(bad[0]))

    def _end_gradients64(self) -> None:
        for arr, values in self._gradients64.values():
            with np.errstate(over="ignore"):
                arr.grad.assign(values.astype(np.float32))

    def gradient(self, array: wp.array) -> np.ndarray:
        """d(loss)/d(``array``) of the last backward() in float64 (shape of ``array.numpy()``):
        the float64 sum where the adjoint was rescaled (finite beyond float32's range), else ``.grad``."""
        entry = self._gradients64.get(id(array))
        if entry is not None:
            return entry[1].copy()
        if array.grad is None:
            raise ConfigError("gradient(): the array has no .grad (it does not require gradients).")
        return array.grad.numpy().astype(np.float64)


_INTEGER = (wp.int32, wp.int64, wp.uint32, wp.uint64, wp.int8, wp.uint8)
#: the state adjoint is carried as float32 mantissas below 2^LEVEL_STEP times 2^(k LEVEL_STEP)
LEVEL_STEP = 64
#: rescaling starts once a carried entry passes 2^RESCALE_FROM, leaving the next segment a factor
#: 2^28 of growth before float32 ends (2^128)
RESCALE_FROM = 100


def _adjoint64(state: State) -> dict[str, np.ndarray]:
    """The adjoint held in ``state``'s .grad arrays, flat float64 per float array."""
    return {name: arr.grad.numpy().astype(np.float64).reshape(-1) for name, arr in state.arrays()
            if arr.grad is not None and arr.dtype not in _INTEGER}


def _level(values: np.ndarray) -> np.ndarray:
    """Per entry, the smallest multiple of LEVEL_STEP whose power of two brings |value| to at most
    2^LEVEL_STEP (0 for non-finite entries, which stay non-finite)."""
    magnitude = np.abs(values)
    finite = np.isfinite(magnitude) & (magnitude > 0)
    exponent = np.zeros(values.shape, dtype=np.int64)
    exponent[finite] = np.ceil(np.log2(magnitude[finite]))
    return LEVEL_STEP * np.maximum(0, -(-(exponent - LEVEL_STEP) // LEVEL_STEP))


def _mantissa(values: np.ndarray, levels: np.ndarray) -> np.ndarray:
    return np.ldexp(values, -levels)
