"""Errors raised by diffsim, each a sentence that says what was wrong and what to do.

All are subclasses of ``ValueError`` or ``RuntimeError`` so callers that catch the builtin
families keep working.
"""

from __future__ import annotations

import math


class DiffsimError(Exception):
    """Base class of every error diffsim raises on purpose."""


class ConfigError(DiffsimError, ValueError):
    """A scene, task or command configuration is inconsistent or incomplete."""


class InvalidParameter(DiffsimError, ValueError):
    """A physical or numerical parameter lies outside its valid range.

    Args:
        name: the parameter's name as the user wrote it, e.g. ``"poisson_ratio"``.
        value: the offending value (a number, or a short description for arrays).
        valid: the valid range in words or interval notation, e.g. ``"[0, 0.5)"``.
        hint: an optional sentence on what to do instead.
    """

    def __init__(self, name: str, value, valid: str, hint: str = ""):
        self.name = name
        self.value = value
        self.valid = valid
        message = f"{name} = {value!r} is invalid; the valid range is {valid}."
        if hint:
            message += " " + hint
        super().__init__(message)


class UnstableTimeStep(InvalidParameter):
    """The time step exceeds the solver's stability (CFL or elastic wave) limit."""

    def __init__(self, dt: float, max_stable_dt: float, reason: str):
        self.max_stable_dt = max_stable_dt
        super().__init__(
            "dt",
            dt,
            f"(0, {max_stable_dt:.3e}] s ({reason})",
            hint="Use a smaller dt, or let the rollout sub-step with substeps='auto'.",
        )


class SimulationDiverged(DiffsimError, RuntimeError):
    """A simulation produced non-finite values.

    Args:
        step: index of the solver step after which the non-finite value was found.
        array: name of the first array holding a non-finite value, e.g. ``"particle_x"``.
        index: flat index of the first non-finite entry, when known.
    """

    def __init__(self, step: int, array: str, index: int | None = None, hint: str = ""):
        self.step = step
        self.array = array
        self.index = index
        where = f" at entry {index}" if index is not None else ""
        message = f"The simulation diverged: {array} holds a non-finite value{where} after step {step}."
        message += " " + (hint or "Reduce dt, soften the stiffest material, or check the initial state and controls.")
        super().__init__(message)


class GradientDiverged(DiffsimError, RuntimeError):
    """A backward pass produced a non-finite gradient (the forward pass may have stayed finite).

    Args:
        step: the solver step back to which adjoints had been computed: the gradient is that of the
            state entering this step, or of a model or control array summed over this and later steps.
        array: name of the array whose gradient holds the non-finite value, e.g. ``"particle_v"``.
        index: index of the first element (e.g. the particle) whose gradient is not finite, when known.
    """

    def __init__(self, step: int, array: str, index: int | None = None, hint: str = ""):
        self.step = step
        self.array = array
        self.index = index
        where = f" at entry {index}" if index is not None else ""
        message = f"The backward pass diverged: d(loss)/d({array}) holds a non-finite value{where} at step {step}."
        message += " " + (hint or "A kernel's adjoint overflowed or divided by zero at a degenerate point (a bug "
                                  "worth reporting with the scene); a smaller dt or gentler motion may avoid it.")
        super().__init__(message)


def require_finite(name: str, value: float) -> float:
    """Return ``value`` as float, raising :class:`InvalidParameter` if it is NaN or infinite."""
    value = float(value)
    if not math.isfinite(value):
        raise InvalidParameter(name, value, "finite real numbers")
    return value
