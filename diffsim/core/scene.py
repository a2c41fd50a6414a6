"""The Scene: one solver (or coupled group) with its model, frame timing, initial state and named
actuators; ``advance`` runs one frame of substeps, and is the one place that decides them.

Rollouts, the task layer and calibration all step a Scene. Everything here is per world: actions
are ``(num_worlds, dim)`` arrays, reset takes a world mask, and observations and losses are
``(num_worlds, ...)`` arrays.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import warp as wp

from diffsim.core.protocol import Control, Model, Solver, State
from diffsim.errors import ConfigError, InvalidParameter


def taping() -> bool:
    """True while a ``wp.Tape`` records launches."""
    from warp._src.context import runtime

    return runtime.tape is not None


def flat_view(array: wp.array) -> wp.array:
    """A float view of a contiguous float-based array (vec3 -> 3 floats each), sharing its
    values and, when it has one, its gradient."""
    n = array.capacity // 4
    view = wp.array(ptr=array.ptr, dtype=float, shape=(n,), device=array.device)
    view._keepalive = array  # a view does not own its memory
    if array.grad is not None:
        view.grad = wp.array(ptr=array.grad.ptr, dtype=float, shape=(n,), device=array.device)
        view.grad._keepalive = array.grad
    return view


#: dtypes made of float32s: the State arrays that carry gradients and that reset copies
FLOAT_TYPES = (float, wp.float32, wp.vec3, wp.vec2, wp.vec4, wp.quat, wp.mat33)


def components(array: wp.array) -> int:
    """Floats per element of ``array`` (3 for vec3, 9 for mat33, 1 for float)."""
    return max(1, int(np.prod(getattr(array.dtype, "_shape_", ()) or (1,))))


# ------------------------------------------------------------------------------------ actuators
@wp.kernel
def _actuate(actions: wp.array2d(dtype=float), target: wp.array2d(dtype=int), action_index: wp.array(dtype=int),
             coefficient: wp.array(dtype=float), out: wp.array(dtype=float)):
    w, e = wp.tid()
    wp.atomic_add(out, target[w, e], coefficient[e] * actions[w, action_index[e]])


@wp.kernel
def _actuate_adjoint(out_grad: wp.array(dtype=float), target: wp.array2d(dtype=int),
                     action_index: wp.array(dtype=int), coefficient: wp.array(dtype=float),
                     actions_grad: wp.array2d(dtype=float)):
    w, e = wp.tid()
    wp.atomic_add(actions_grad, w, action_index[e], coefficient[e] * out_grad[target[w, e]])


@dataclass
class Actuator:
    """A named, low-dimensional input: a linear map from an action of shape ``(num_worlds, dim)``
    to the float components of one Control array.

    Entry ``e`` adds ``coefficient[e] * action[w, action_index[e]]`` to float ``target[w, e]``
    of the flattened array ``control.<array>`` (for vec3 arrays, element ``i``'s component ``k`` is
    float ``3 i + k``). Linearity keeps the map differentiable by its transpose, and lets several
    actuators drive the same array (a gripper's translation and its opening add up).

    Args:
        name: what the input is called, e.g. ``"pusher"``.
        array: the Control array it writes, e.g. ``"collider_velocity"`` (``"mpm.collider_velocity"``
            in a coupled scene).
        target: float index per (world, entry), shape ``(num_worlds, entries)``.
        action_index: action component of each entry, shape ``(entries,)``.
        coefficient: gain of each entry (the control unit per action unit).
        low, high: bounds of each action component (a gymnasium Box), in ``unit``.
        unit: the action's unit, e.g. ``"m/s"``.
        labels: a name per action component, e.g. ``("vx", "vy", "vz")``.
    """

    name: str
    array: str
    target: np.ndarray
    action_index: np.ndarray
    coefficient: np.ndarray
    low: np.ndarray
    high: np.ndarray
    unit: str
    labels: tuple[str, ...] = ()
    _device_arrays: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.target = np.asarray(self.target, dtype=np.int32)
        self.action_index = np.asarray(self.action_index, dtype=np.int32).reshape(-1)
        self.coefficient = np.asarray(self.coefficient, dtype=np.float32).reshape(-1)
        self.low = np.asarray(self.low, dtype=np.float32).reshape(-1)
        self.high = np.asarray(self.high, dtype=np.float32).reshape(-1)
        if self.target.ndim != 2 or self.target.shape[1] != self.action_index.size:
            raise ConfigError(f"actuator {self.name!r}: target must be (num_worlds, {self.action_index.size}), "
                              f"got {self.target.shape}.")
        if self.coefficient.size != self.action_index.size:
            raise ConfigError(f"actuator {self.name!r}: one coefficient per entry is needed.")
        if self.low.shape != self.high.shape or not np.all(self.low <= self.high):
            raise ConfigError(f"actuator {self.name!r}: low and high must have one entry per action "
                              "component and low <= high.")
        if self.action_index.size and not (0 <= self.action_index.min() and self.action_index.max() < self.dim):
            raise ConfigError(f"actuator {self.name!r}: action_index must lie in [0, {self.dim - 1}].")

    @property
    def dim(self) -> int:
        return int(self.low.size)

    def _arrays(self, device):
        key = str(device)
        if key not in self._device_arrays:
            self._device_arrays[key] = (wp.array(self.target, dtype=int, device=device),
                                        wp.array(self.action_index, dtype=int, device=device),
                                        wp.array(self.coefficient, dtype=float, device=device))
        return self._device_arrays[key]

    def apply(self, actions: wp.array, control: Control) -> None:
        """Add this actuator's share to ``control.<array>``; ``actions`` is (num_worlds, dim) floats."""
        out = flat_view(control.array(self.array))
        target, index, coefficient = self._arrays(out.device)
        if self.target.size:
            wp.launch(_actuate, dim=self.target.shape, inputs=[actions, target, index, coefficient], outputs=[out],
                      device=out.device, record_tape=False)

    def apply_adjoint(self, control_grad: wp.array, actions_grad: wp.array) -> None:
        """Add d(loss)/d(actions) to ``actions_grad`` given d(loss)/d(control.<array>)."""
        grad = flat_view(control_grad)
        target, index, coefficient = self._arrays(grad.device)
        if self.target.size:
            wp.launch(_actuate_adjoint, dim=self.target.shape, inputs=[grad, target, index, coefficient],
                      outputs=[actions_grad], device=grad.device, record_tape=False)


def _bounds(limit, dim: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    hi = np.broadcast_to(np.asarray(limit, dtype=np.float64), (dim,))
    if not np.all(np.isfinite(hi)) or np.any(hi <= 0):
        raise InvalidParameter(f"{name} limit", limit, "(0, inf)")
    return -hi, hi


def _axes_entries(slots: np.ndarray, directions: np.ndarray, comps: int = 3):
    """Entries that move each slot (per world, per slot) along ``directions`` (one row per action
    component, in the slot's comps-vector)."""
    worlds = slots.shape[0]
    target, index, coefficient = [], [], []
    for j, direction in enumerate(directions):
        for s in range(slots.shape[1]):
            for k in range(comps):
                if direction[k] != 0.0:
                    target.append(slots[:, s] * comps + k)
                    index.append(j)
                    coefficient.append(direction[k])
    target = np.stack(target, axis=1) if target else np.zeros((worlds, 0), np.int32)
    return target, np.array(index, np.int32), np.array(coefficient, np.float32)


def velocity_actuator(name: str, array: str, slots: np.ndarray, *, limit, axes: Sequence[int] = (0, 1, 2),
                      unit: str = "m/s", directions: np.ndarray | None = None,
                      labels: Sequence[str] | None = None) -> Actuator:
    """Velocity of one or several vec3 slots per world, moved together (a rigid translation).

    Args:
        array: the Control vec3 array, e.g. ``"collider_velocity"``, ``"vertex_velocity"``.
        slots: element index per (world, slot), shape (num_worlds, slots): each slot of a world
            gets the same velocity.
        limit: largest speed per action component [unit].
        axes: which world axes the action drives (ignored when ``directions`` is given).
        directions: one unit direction per action component, shape (dim, 3).
    """
    slots = np.asarray(slots, dtype=np.int64).reshape(np.shape(slots)[0], -1)
    dirs = np.eye(3)[list(axes)] if directions is None else np.asarray(directions, dtype=np.float64).reshape(-1, 3)
    low, high = _bounds(limit, len(dirs), name)
    target, index, coefficient = _axes_entries(slots, dirs)
    axis_names = "xyz"
    default = [f"v{axis_names[a]}" for a in axes] if directions is None else [f"{name}{j}" for j in range(len(dirs))]
    return Actuator(name, array, target, index, coefficient, low, high, unit, tuple(labels or default))


def opening_actuator(name: str, array: str, left: np.ndarray, right: np.ndarray, direction, *, limit,
                     unit: str = "m/s") -> Actuator:
    """Opening rate of a pair of fingers: ``left`` moves along -direction and ``right`` along
    +direction, each at half the action [unit] (so the action is the rate the gap widens)."""
    d = np.asarray(direction, dtype=np.float64)
    d = d / np.linalg.norm(d)
    lt, li, lc = _axes_entries(np.asarray(left).reshape(len(left), -1), (-0.5 * d)[None])
    rt, ri, rc = _axes_entries(np.asarray(right).reshape(len(right), -1), (0.5 * d)[None])
    low, high = _bounds(limit, 1, name)
    return Actuator(name, array, np.concatenate([lt, rt], axis=1), np.concatenate([li, ri]),
                    np.concatenate([lc, rc]), low, high, unit, ("opening",))


def group_actuator(name: str, array: str, element_group: np.ndarray, element_world: np.ndarray, groups: int, *,
                   limit, gain: float = 1.0, unit: str = "-") -> Actuator:
    """One action component per group of scalar elements (e.g. the actuation of each particle
    group of a soft robot): element ``i`` of world ``w`` gets ``gain * action[w, group[i]]``;
    elements of group -1 are not driven."""
    element_group = np.asarray(element_group, dtype=np.int64)
    element_world = np.asarray(element_world, dtype=np.int64)
    worlds = int(element_world.max()) + 1 if element_world.size else 1
    per_world = [np.flatnonzero((element_world == w) & (element_group >= 0)) for w in range(worlds)]
    count = len(per_world[0])
    if any(len(p) != count for p in per_world):
        raise ConfigError(f"actuator {name!r}: every world must have the same number of driven elements.")
    target = np.stack(per_world).astype(np.int32)
    index = element_group[per_world[0]].astype(np.int32)
    low, high = _bounds(limit, groups, name)
    return Actuator(name, array, target, index, np.full(count, gain, np.float32), low, high, unit,
                    tuple(f"group{g}" for g in range(groups)))


# ------------------------------------------------------------------------------------ worlds
@wp.kernel
def _copy_masked(dst: wp.array(dtype=float), src: wp.array(dtype=float), element_world: wp.array(dtype=int),
                 comps: int, mask: wp.array(dtype=int)):
    i = wp.tid()
    if mask[element_world[i / comps]] != 0:
        dst[i] = src[i]


def element_worlds(model: Model, name: str, length: int) -> np.ndarray:
    """World of each element of array ``name`` (a State or Control field) of ``model``'s scene."""
    world_of = getattr(model, "world_of", None)
    if world_of is None:
        raise ConfigError(f"{type(model).__name__} does not say which world its arrays belong to (world_of).")
    worlds = np.asarray(world_of(name), dtype=np.int32)
    if worlds.shape != (length,):
        raise ConfigError(f"{type(model).__name__}.world_of({name!r}) gave {worlds.shape}, expected ({length},).")
    return worlds


# ------------------------------------------------------------------------------------ scene
class Scene:
    """A model, its solver and how frames are stepped: the object tasks, rollouts and calibration
    share.

    Args:
        model: the scene's constant data (any solver's Model, or a coupled group).
        solver: advances a state by one step.
        frame_dt: duration of one frame (one control interval) [s].
        substeps: solver steps per frame, or ``"auto"``: per frame, the fewest that respect both
            the solver's stability limit and its advective limit (material and tools move well
            under a grid cell per step) for the frame's state and control.
        initial_state: a factory ``initial_state(requires_grad) -> State`` (default:
            ``model.state``).
        actuators: the named inputs, in the order their components appear in an action.
    """

    def __init__(self, model: Model, solver: Solver, *, frame_dt: float, substeps: int | str = "auto",
                 initial_state: Callable[..., State] | None = None, actuators: Sequence[Actuator] = ()):
        if not (frame_dt > 0 and math.isfinite(frame_dt)):
            raise InvalidParameter("frame_dt", frame_dt, "(0, inf) s")
        if substeps != "auto" and not (isinstance(substeps, int) and substeps >= 1):
            raise InvalidParameter("substeps", substeps, "positive integers or 'auto'")
        self.model = model
        self.solver = solver
        self.frame_dt = float(frame_dt)
        self.substeps = substeps
        self._initial_state = initial_state
        self.actuators: dict[str, Actuator] = {}
        for actuator in actuators:
            self.add_actuator(actuator)
        self._scratch: list[State] = []
        self._world_cache: dict[str, wp.array] = {}
        self.refresh_limits()

    # -- basics ----------------------------------------------------------------------------
    @property
    def num_worlds(self) -> int:
        return int(getattr(self.model, "num_worlds", 1))

    @property
    def device(self):
        return getattr(self.model, "device", None) or next(iter(self.model.arrays()))[1].device

    def state(self, *, requires_grad: bool = False) -> State:
        """A new initial state (from the factory, else ``model.state``)."""
        if self._initial_state is not None:
            return self._initial_state(requires_grad=requires_grad)
        return self.model.state(requires_grad=requires_grad)

    def control(self, *, requires_grad: bool = False) -> Control:
        """A new Control with every input at rest."""
        return self.model.control(requires_grad=requires_grad)

    def add_actuator(self, actuator: Actuator) -> Actuator:
        if actuator.name in self.actuators:
            raise ConfigError(f"the scene already has an actuator named {actuator.name!r}.")
        if actuator.target.shape[0] != self.num_worlds:
            raise ConfigError(f"actuator {actuator.name!r} has {actuator.target.shape[0]} worlds; the scene has "
                              f"{self.num_worlds}.")
        self.actuators[actuator.name] = actuator
        return actuator

    # -- timing ----------------------------------------------------------------------------
    def refresh_limits(self) -> None:
        """Re-read the solver's stability limit (after changing material parameters)."""
        self._max_stable_dt = self.solver.max_stable_dt(self.model)

    @property
    def max_stable_dt(self) -> float:
        return self._max_stable_dt

    def substeps_for(self, state: State | None = None, control: Control | None = None) -> int:
        """Solver steps for the frame that starts at ``state`` under ``control``."""
        if self.substeps != "auto":
            return int(self.substeps)
        limit = self._max_stable_dt
        advective = getattr(self.solver, "max_advective_dt", None)
        if advective is not None and state is not None:
            limit = min(limit, advective(self.model, state, control if control is not None else self.control()))
        if not math.isfinite(limit):
            return 1
        # (1 - 1e-9): a frame exactly N stable steps long needs N substeps, not N + 1
        return max(1, math.ceil(self.frame_dt / limit * (1 - 1e-9)))

    def _scratch_state(self, i: int) -> State:
        while len(self._scratch) <= i:
            self._scratch.append(self.solver.new_state(self.model, requires_grad=False))
        return self._scratch[i]

    def advance(self, state_in: State, state_out: State, control: Control, *, substeps: int | None = None) -> int:
        """Run one frame from ``state_in`` into ``state_out`` under ``control``; returns the substeps.

        ``state_in`` is never written. Under a ``wp.Tape`` every intermediate state is new (a tape
        must not see an array it read overwritten); otherwise two scratch states are reused.
        """
        n = self.substeps_for(state_in, control) if substeps is None else int(substeps)
        dt = self.frame_dt / n
        recording = taping()
        a = state_in
        for i in range(n):
            if i == n - 1:
                b = state_out
            elif recording:
                b = self.solver.new_state(self.model, requires_grad=True)
            else:
                b = self._scratch_state(i % 2)
            self.solver.step(self.model, a, b, control, dt)
            a = b
        return n

    def rollout(self, state0: State, controls: Sequence[Control], **options):
        """A checkpointed :class:`~diffsim.core.rollout.Rollout` of this scene from ``state0``
        (options: ``frame_loss``, ``final_loss``, ``checkpoint_every``, ``check_every``, ``progress``,
        ``rescale_adjoint``)."""
        from diffsim.core.rollout import Rollout

        return Rollout(self.solver, self.model, state0, controls, frame_dt=self.frame_dt, substeps=self.substeps,
                       scene=self, **options)

    # -- actions ---------------------------------------------------------------------------
    @property
    def action_dim(self) -> int:
        return sum(a.dim for a in self.actuators.values())

    def action_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bound of each action component, concatenated over actuators."""
        if not self.actuators:
            return np.zeros(0, np.float32), np.zeros(0, np.float32)
        return (np.concatenate([a.low for a in self.actuators.values()]),
                np.concatenate([a.high for a in self.actuators.values()]))

    def actuated_arrays(self) -> list[str]:
        return sorted({a.array for a in self.actuators.values()})

    def apply_actions(self, actions: wp.array, control: Control) -> None:
        """Write ``actions`` (num_worlds, action_dim) floats into ``control``: every actuated array
        is cleared first, then each actuator adds its share."""
        for name in self.actuated_arrays():
            control.array(name).zero_()
        offset = 0
        for actuator in self.actuators.values():
            part = actions if len(self.actuators) == 1 else _columns(actions, offset, actuator.dim)
            actuator.apply(part, control)
            offset += actuator.dim

    def actions_adjoint(self, control: Control, actions_grad: wp.array) -> None:
        """Add d(loss)/d(actions) into ``actions_grad`` (num_worlds, action_dim) from the gradients
        held by ``control``'s actuated arrays."""
        offset = 0
        for actuator in self.actuators.values():
            grad = control.array(actuator.array).grad
            if grad is not None:
                if len(self.actuators) == 1:
                    actuator.apply_adjoint(grad, actions_grad)
                else:
                    part = wp.zeros((self.num_worlds, actuator.dim), dtype=float, device=actions_grad.device)
                    actuator.apply_adjoint(grad, part)
                    _add_columns(actions_grad, part, offset)
            offset += actuator.dim

    # -- worlds ----------------------------------------------------------------------------
    def _worlds_of(self, name: str, array: wp.array) -> wp.array:
        if name not in self._world_cache:
            worlds = element_worlds(self.model, name, array.shape[0])
            self._world_cache[name] = wp.array(worlds, dtype=int, device=array.device)
        return self._world_cache[name]

    def reset_worlds(self, state: State, source: State, mask: np.ndarray) -> None:
        """Copy ``source`` into ``state`` for the worlds where ``mask`` is true; others untouched."""
        mask = np.asarray(mask, dtype=bool).reshape(-1)
        if mask.shape != (self.num_worlds,):
            raise InvalidParameter("mask", f"an array of shape {mask.shape}", f"shape ({self.num_worlds},) booleans")
        if not mask.any():
            return
        if mask.all():
            state.assign(source)
            return
        device_mask = wp.array(mask.astype(np.int32), dtype=int, device=self.device)
        for name, arr in state.arrays():
            if arr.size == 0 or arr.dtype not in FLOAT_TYPES:
                continue
            src = source.array(name)
            wp.launch(_copy_masked, dim=arr.capacity // 4,
                      inputs=[_values(arr), _values(src), self._worlds_of(name, arr), components(arr), device_mask],
                      device=arr.device, record_tape=False)



def _values(array: wp.array) -> wp.array:
    view = wp.array(ptr=array.ptr, dtype=float, shape=(array.capacity // 4,), device=array.device)
    view._keepalive = array
    return view


@wp.kernel
def _gather_columns(src: wp.array2d(dtype=float), offset: int, dst: wp.array2d(dtype=float)):
    w, j = wp.tid()
    dst[w, j] = src[w, offset + j]


@wp.kernel
def _scatter_add_columns(dst: wp.array2d(dtype=float), src: wp.array2d(dtype=float), offset: int):
    w, j = wp.tid()
    dst[w, offset + j] = dst[w, offset + j] + src[w, j]


def _columns(actions: wp.array, offset: int, dim: int) -> wp.array:
    out = wp.empty((actions.shape[0], dim), dtype=float, device=actions.device)
    wp.launch(_gather_columns, dim=out.shape, inputs=[actions, offset], outputs=[out], device=actions.device,
              record_tape=False)
    return out


def _add_columns(dst: wp.array, src: wp.array, offset: int) -> None:
    wp.launch(_scatter_add_columns, dim=src.shape, inputs=[dst, src, offset], device=dst.device, record_tape=False)
