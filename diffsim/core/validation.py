"""Validation results shared by every solver's physics checks and the ``diffsim validate`` command.

A check compares one measured quantity with a closed-form value under a stated tolerance.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from diffsim.errors import InvalidParameter


@dataclass
class CheckResult:
    """One physics check: what was measured, what theory says, and whether they agree."""

    name: str
    measured: float
    expected: float
    error: float  #: the error measure the tolerance applies to (see ``error_kind``)
    tolerance: float
    error_kind: str  #: e.g. "relative", "absolute [deg]"
    unit: str = ""
    details: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.error <= self.tolerance)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return d


def format_table(results: list[CheckResult]) -> str:
    """A fixed-width table of results for terminals."""
    header = f"{'check':38s} {'measured':>12s} {'expected':>12s} {'error':>10s} {'tolerance':>10s}  result"
    lines = [header, "-" * len(header)]
    for r in results:
        pct = "relative" in r.error_kind
        err = f"{r.error:.2%}" if pct else f"{r.error:.3g}"
        tol = f"{r.tolerance:.2%}" if pct else f"{r.tolerance:.3g}"
        lines.append(
            f"{r.name:38s} {r.measured:12.5g} {r.expected:12.5g} {err:>10s} {tol:>10s}  "
            f"{'PASS' if r.passed else 'FAIL'}"
        )
    return "\n".join(lines)


def to_json(results: list[CheckResult]) -> str:
    return json.dumps({"checks": [r.to_dict() for r in results],
                       "passed": all(r.passed for r in results)}, indent=2)


def simulate(model, solver, state, steps: int, dt: float, *, control=None,
             on_step: Callable | None = None):
    """Advance ``state`` by ``steps`` solver steps of ``dt`` under one Control (default
    ``model.control()``: everything kinematic held still); returns the final state. ``state``
    itself is not written. Each step is one frame of a :class:`~diffsim.core.scene.Scene` with one
    substep, so checks step exactly as rollouts and tasks do."""
    from diffsim.core.scene import Scene

    scene = Scene(model, solver, frame_dt=dt, substeps=1)
    buffers = [model.state()] + ([model.state()] if steps > 1 else [])
    a = state
    control = control if control is not None else model.control()
    for i in range(steps):
        b = buffers[i % 2]  # ping-pong between two new states: the caller's is never written
        scene.advance(a, b, control)
        a = b
        if on_step is not None:
            on_step(i, a)
    solver.check_finite(model, a, steps)
    return a


def timed(fn):
    """Decorate a check so that its result(s) record the seconds it took."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        for r in result if isinstance(result, list) else [result]:
            r.seconds = time.perf_counter() - start
        return result

    return wrapper


def rollout_input(model, state0, controls, target: str):
    """The one array a target name denotes, in the torch bridge's syntax
    (:func:`diffsim.core.protocol.input_arrays`): ``model.<field>``, ``state0.<field>`` or
    ``controls[k].<field>``."""
    from diffsim.core.protocol import input_arrays

    arrays = input_arrays(target, model=model, state=state0, controls=controls)
    if len(arrays) != 1:
        raise InvalidParameter("target", target, "names of one array (controls[k].<field>, not controls.<field>)")
    return arrays[0]


def rollout_gradient_check(name: str, rollout, array, bundles, *, eps: float, relative: bool = False,
                           directions: int = 2, explicit=None, mask=None, tolerance: float = 0.02,
                           details: dict | None = None) -> CheckResult:
    """Tape gradient of ``rollout``'s loss w.r.t. ``array`` against central finite differences.

    ``bundles`` (model, state0, controls) get their gradients cleared first. ``explicit``
    directions, when given, replace ``directions`` random ones; the reported error is the largest
    relative error over the probed directions, infinite when the tape's gradient is not finite.
    """
    from diffsim.core.gradcheck import check_grad

    start = time.perf_counter()
    for bundle in bundles:
        bundle.zero_grad()
    rollout.forward()
    rollout.backward()
    analytic = array.grad.numpy().copy()
    result = check_grad(rollout.forward, array, analytic, name=name, eps=eps, relative_eps=relative,
                        num_directions=0 if explicit else directions, directions=explicit, mask=mask, seed=3)
    finite = bool(np.all(np.isfinite(analytic)))
    worst = int(np.argmax(result.relative_errors))  # report the direction that decides pass/fail
    return CheckResult(f"gradient: {name}", float(result.analytic[worst]), float(result.finite_difference[worst]),
                       result.max_relative_error if finite else float("inf"), tolerance, "relative",
                       details={"fd": result.finite_difference.tolist(), "tape": result.analytic.tolist(),
                                **(details or {})},
                       seconds=time.perf_counter() - start)


def run_checks(checks: dict[str, Callable], *, device: str | None, only: list[str] | None,
               known: list[str], gradients: bool = False) -> list[CheckResult]:
    """Run the checks of ``checks`` (all, or those named in ``only``) and gather their results.

    ``known`` are every name the solver's validation offers: a name outside it raises
    :class:`~diffsim.errors.ConfigError` listing them. Physics checks take ``device=`` and may
    return several results; gradient checks take the device positionally.
    """
    from diffsim.errors import ConfigError

    unknown = sorted(set(only or []) - set(known))
    if unknown:
        raise ConfigError(f"unknown check name(s) {', '.join(unknown)}; valid: {', '.join(known)}.")
    results: list[CheckResult] = []
    for name, fn in checks.items():
        if not only or name in only:
            out = fn(device) if gradients else fn(device=device)
            results += out if isinstance(out, list) else [out]
    return results
