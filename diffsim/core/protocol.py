"""The Model/State/Control/Solver protocol shared by every solver.

A Model holds what is constant during a rollout, a State what changes, a Control the inputs of
one step; ``Solver.step`` maps (model, state_in, control) to state_out and never writes state_in.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import warp as wp

from diffsim.errors import GradientDiverged, InvalidParameter, SimulationDiverged, UnstableTimeStep


class ArrayBundle:
    """A named group of ``wp.array`` fields (the base of Model, State and Control).

    Subclasses are dataclasses whose array-valued fields are discovered generically, so copying,
    zeroing gradients and checkpointing work for every solver without per-solver code.
    """

    def arrays(self) -> Iterator[tuple[str, wp.array]]:
        """Yield ``(name, array)`` for every field that holds a Warp array."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, wp.array):
                yield field.name, value

    def array(self, name: str) -> wp.array:
        value = getattr(self, name, None)
        if not isinstance(value, wp.array):
            names = ", ".join(n for n, _ in self.arrays())
            raise KeyError(f"{type(self).__name__} has no array named {name!r}; it has: {names}.")
        return value

    def clone(self, *, requires_grad: bool | None = None):
        """Return a deep copy: new arrays with the same contents (non-array fields are shared)."""
        changes = {}
        for name, arr in self.arrays():
            grad = arr.requires_grad if requires_grad is None else requires_grad
            changes[name] = wp.clone(arr, requires_grad=grad)
        return dataclasses.replace(self, **changes)

    def with_arrays(self, arrays: dict[str, wp.array]):
        """A shallow copy whose arrays named in ``arrays`` are replaced (the others are shared)."""
        return dataclasses.replace(self, **arrays)

    def assign(self, other) -> None:
        """Copy the values of every array of ``other`` into this bundle's arrays.

        Gradients are left alone (``wp.copy`` would copy them too when both arrays have one).
        """
        for name, arr in self.arrays():
            copy_values(arr, other.array(name))

    def zero_grad(self) -> None:
        for _, arr in self.arrays():
            if arr.requires_grad and arr.grad is not None:
                arr.grad.zero_()

    def set_requires_grad(self, flag: bool = True) -> None:
        for _, arr in self.arrays():
            arr.requires_grad = flag

    def grads(self) -> dict[str, np.ndarray]:
        """Return a numpy copy of every array's gradient (zeros where none is kept)."""
        out = {}
        for name, arr in self.arrays():
            if arr.grad is not None:
                out[name] = arr.grad.numpy().copy()
            else:
                out[name] = np.zeros(arr.shape + (), dtype=np.float32)
        return out

    def nbytes(self) -> int:
        """Bytes held by the arrays (values only, gradients excluded)."""
        return sum(arr.capacity for _, arr in self.arrays())


def values_view(array: wp.array) -> wp.array:
    """A view of ``array``'s values without its gradient (contiguous arrays only)."""
    view = wp.array(ptr=array.ptr, dtype=array.dtype, shape=array.shape, device=array.device)
    view._keepalive = array  # a view does not own its memory
    return view


def copy_values(dest: wp.array, src: wp.array) -> None:
    """Copy values only; ``wp.copy`` alone also overwrites ``dest.grad`` when both have one."""
    if dest.size:
        wp.copy(values_view(dest), values_view(src))


@wp.kernel
def _add_flat(dst: wp.array(dtype=float), src: wp.array(dtype=float)):
    i = wp.tid()
    dst[i] = dst[i] + src[i]


def accumulate(dst: wp.array, src: wp.array) -> None:
    """dst += src, element-wise, for contiguous arrays of any float-based dtype."""
    n = dst.capacity // 4
    if n:
        flat_dst = wp.array(ptr=dst.ptr, dtype=float, shape=(n,), device=dst.device)
        flat_src = wp.array(ptr=src.ptr, dtype=float, shape=(n,), device=src.device)
        wp.launch(_add_flat, dim=n, inputs=[flat_dst, flat_src], device=dst.device, record_tape=False)


class BundleGroup(ArrayBundle):
    """Named bundles seen as one, for scenes of several solvers: array ``"fem.node_x"`` is
    ``group.fem.node_x``. Copying, zeroing gradients and checkpointing then work unchanged."""

    def __init__(self, **parts):
        object.__setattr__(self, "parts", {name: part for name, part in parts.items() if part is not None})

    def __getattr__(self, name):
        parts = self.__dict__.get("parts", {})
        if name in parts:
            return parts[name]
        raise AttributeError(f"{type(self).__name__} has no part or attribute {name!r}; parts: {', '.join(parts)}.")

    def arrays(self):
        for part_name, part in self.parts.items():
            for name, arr in part.arrays():
                yield f"{part_name}.{name}", arr

    def array(self, name: str) -> wp.array:
        part, _, field_name = name.partition(".")
        if part not in self.parts:
            raise KeyError(f"{type(self).__name__} has no part {part!r}; it has: {', '.join(self.parts)}.")
        return self.parts[part].array(field_name)

    def _with_parts(self, parts: dict):
        """A group of this type over ``parts`` (subclasses holding more than parts override it)."""
        return type(self)(**parts)

    def clone(self, *, requires_grad: bool | None = None):
        return self._with_parts({name: part.clone(requires_grad=requires_grad) for name, part in self.parts.items()})

    def with_arrays(self, arrays: dict[str, wp.array]):
        by_part: dict[str, dict] = {}
        for name, arr in arrays.items():
            part, _, field_name = name.partition(".")
            if part not in self.parts:
                raise KeyError(f"{type(self).__name__} has no part {part!r}; it has: {', '.join(self.parts)}.")
            by_part.setdefault(part, {})[field_name] = arr
        return self._with_parts({name: part.with_arrays(by_part[name]) if name in by_part else part
                                 for name, part in self.parts.items()})


_INTEGER_DTYPES = (wp.int32, wp.int64, wp.uint64, wp.uint32, wp.int8, wp.uint8)


def first_non_finite(arrays: Iterable[tuple[str, wp.array]]) -> tuple[str, int] | None:
    """``(name, entry)`` of the first array holding a NaN or inf, and the index of its first such
    entry (per element: a vec3 array's entry 4 is its fifth vector), or None; integer arrays are skipped."""
    for name, arr in arrays:
        if arr is None or arr.dtype in _INTEGER_DTYPES or arr.size == 0:
            continue
        values = arr.numpy().reshape(-1)
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            components = max(1, values.size // max(1, arr.size))
            return name, int(bad[0] // components)
    return None


def _gradients(bundle: ArrayBundle, prefix: str = "") -> Iterator[tuple[str, wp.array]]:
    for name, arr in bundle.arrays():
        if arr.grad is not None:
            yield prefix + name, arr.grad


class Model(ArrayBundle):
    """Everything constant during a rollout: topology, rest shapes, material parameters."""


class State(ArrayBundle):
    """Everything that changes from step to step."""


class Control(ArrayBundle):
    """The inputs of one step."""


class Solver(abc.ABC):
    """Advances a State by one step. Scratch buffers belong to the solver and are reused."""

    #: True when a step recorded on a tape takes its own scratch, so one tape may record many
    #: consecutive steps (the rollout then re-simulates each segment once, under one tape). Such
    #: solvers hand out scratch under claims: ``begin_step_scratch()`` before taping,
    #: ``end_step_scratch(claim)`` after, ``release_step_scratch(claim)`` once the tape is gone.
    #: False when steps share scratch: each step is then re-run under its own tape.
    tape_spans_steps: bool = False

    @abc.abstractmethod
    def step(self, model: Model, state_in: State, state_out: State, control: Control, dt: float) -> None:
        """Write the state after ``dt`` seconds into ``state_out``; never write ``state_in``."""

    @abc.abstractmethod
    def new_state(self, model: Model, *, requires_grad: bool = False) -> State:
        """Allocate a State shaped for ``model`` (contents unspecified)."""

    def max_stable_dt(self, model: Model) -> float:
        """Largest step [s] the solver accepts for ``model`` (infinite when unconstrained)."""
        return float("inf")

    def stability_limit(self, model: Model) -> str:
        """What sets :meth:`max_stable_dt`, in words, for error messages."""
        return "the solver's explicit stability limit"

    def validate_dt(self, model: Model, dt: float) -> None:
        """Raise :class:`InvalidParameter` for a step that is not a positive number and
        :class:`UnstableTimeStep` for one above :meth:`max_stable_dt`."""
        if not (dt > 0 and math.isfinite(dt)):
            raise InvalidParameter("dt", dt, "(0, inf) seconds")
        limit = self.max_stable_dt(model)
        if dt > limit * (1 + 1e-6):
            raise UnstableTimeStep(dt, limit, self.stability_limit(model))

    def begin_step_scratch(self):
        """Start a claim on the scratch of the taped steps that follow; returns its token."""
        return None

    def end_step_scratch(self, claim) -> None:  # noqa: B027 -- optional hook, a no-op by default
        """Stop adding scratch to ``claim``."""

    def release_step_scratch(self, claim) -> None:  # noqa: B027 -- optional hook, a no-op by default
        """The tapes that used ``claim``'s scratch are gone: it may be reused."""

    def scratch_arrays(self) -> list[wp.array]:
        """Arrays reused across steps; their gradients are cleared before each local backward."""
        return []

    def zero_scratch_grad(self) -> None:
        for arr in self.scratch_arrays():
            if arr.grad is not None:
                arr.grad.zero_()

    def max_advective_dt(self, model: Model, state: State, control: Control) -> float:
        """Largest step [s] for which the fastest material point and collider surface of ``state``
        and ``control`` move a safe fraction of the solver's resolution (infinite when unconstrained).

        Unlike :meth:`max_stable_dt` this depends on the motion, so it changes during a rollout."""
        return float("inf")

    def check_finite_adjoint(self, model: Model, state: State, step: int, *,
                             controls: Mapping[str, Control] | None = None) -> None:
        """Raise :class:`GradientDiverged` naming the first non-finite gradient: of ``state`` (the
        adjoint of the state entering solver step ``step``), of the ``controls`` (labelled by their
        keys, e.g. ``"controls[3]"``) or of the model's arrays (``"model.<name>"``).

        Only ``.grad`` arrays are read, so the check is as cheap as copying them once."""
        arrays = [_gradients(state)]
        arrays += [_gradients(control, f"{label}.") for label, control in (controls or {}).items()]
        arrays.append(_gradients(model, "model."))
        for group in arrays:
            found = first_non_finite(group)
            if found is not None:
                raise GradientDiverged(step, *found)

    def check_finite(self, model: Model, state: State, step: int) -> None:
        """Raise :class:`SimulationDiverged` naming the first non-finite array of ``state``."""
        for name, arr in state.arrays():
            if arr.dtype in (wp.int32, wp.int64, wp.uint64, wp.uint32, wp.int8, wp.uint8):
                continue
            values = arr.numpy().reshape(-1)
            bad = np.flatnonzero(~np.isfinite(values))
            if bad.size:
                components = max(1, values.size // max(1, arr.size))
                raise SimulationDiverged(step, name, int(bad[0] // components))


def input_arrays(name: str, *, model: Model, state: State, controls) -> list[wp.array]:
    """The arrays an input name denotes, in the one syntax of the torch bridge and gradient checks:

    * ``"model.<field>"``: a model array;
    * ``"state0.<field>"`` (or ``"state.<field>"``): an array of the initial state;
    * ``"controls.<field>"``: that array of every control, one per frame;
    * ``"controls[k].<field>"``: that array of frame ``k``'s control.

    Fields of grouped bundles keep their part: ``"controls[5].fem.body_velocity"``.
    """
    scope, _, field_name = name.partition(".")
    if not field_name:
        raise InvalidParameter("input name", name, "'model.<field>', 'state0.<field>', 'controls.<field>' or "
                               "'controls[k].<field>'")
    if scope == "model":
        return [model.array(field_name)]
    if scope in ("state0", "state"):
        return [state.array(field_name)]
    if scope in ("controls", "control"):
        return [c.array(field_name) for c in controls]
    if scope.startswith("controls[") and scope.endswith("]"):
        index = scope[len("controls["):-1]
        if not index.isdigit() or int(index) >= len(controls):
            raise InvalidParameter("input name", name, f"frames controls[0] .. controls[{len(controls) - 1}]")
        return [controls[int(index)].array(field_name)]
    raise InvalidParameter("input name", name, "'model.<field>', 'state0.<field>', 'controls.<field>' or "
                           "'controls[k].<field>'")
