"""Checkpointed rollouts: forward simulation and reverse-mode gradients over long horizons.

Forward keeps a State only every ``checkpoint_every`` solver steps; backward re-simulates each
segment from its checkpoint under a local tape (one per segment when the solver's taped steps
own their scratch, else one per step, newest first), so memory is O(T/K + K) states plus K
steps' scratch, whatever the horizon.
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
        self.stats = RolloutStats(solver_steps=self.num_steps, checkpoint_every=self.checkpoint_every)
        #: substeps of each frame, fixed by the last forward()
        self.schedule: list[int] = [self.substeps] * len(self.controls)
        self._set_schedule(self.schedule)

        device = state0.arrays().__next__()[1].device
        self.device = device
        self.loss = wp.zeros(1, dtype=float, device=device, requires_grad=True)
        self._step_loss = wp.zeros(1, dtype=float, device=device, requires_grad=True)
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
        span = getattr(self.solver, "tape_spans_steps", False)
        for segment in reversed(range(num_segments)):
            start, end = segment * K, min(T, (segment + 1) * K)
            states = [self._pool_state(i) for i in range(end - start + 1)]
            # First move the later segment's adjoint (held by pool slot 0) into this segment's last
            # state, then clear the rest: slot 0 is this segment's first state too.
            self._hand_over(carried, states[end - start])
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
                tape.backward(loss=self._step_loss)
                del tape
                self.solver.release_step_scratch(claim)
                self.stats.backward_steps_run += end - start
                bar.update(end - start)
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
                    tape.backward(loss=self._step_loss)
                    del tape
                    self.stats.backward_steps_run += 1
                    bar.update(1)
            carried = states[0]
            if self.check_every:
                # as forward checks states: a NaN adjoint would otherwise reach the user silently
                frames = range(int(self._step_frame[start]), int(self._step_frame[end - 1]) + 1)
                self.solver.check_finite_adjoint(self.model, carried, start,
                                                 controls={f"controls[{f}]": self.controls[f] for f in frames})
        bar.close()
        # carried (== pool[0]) now holds d(loss)/d(state0): add it to state0's gradients.
        for name, arr in self.state0.arrays():
            if arr.requires_grad and arr.grad is not None:
                src = carried.array(name)
                if src.grad is not None:
                    accumulate(arr.grad, src.grad)
