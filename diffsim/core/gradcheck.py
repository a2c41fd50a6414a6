"""Finite-difference checks of tape gradients, used by every solver's tests and validators.

Central differences of a scalar loss along chosen entries or random directions of one array are
compared with the analytic gradient that the tape produced.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import warp as wp


@dataclass
class GradCheckResult:
    """Outcome of :func:`check_grad`: finite-difference and analytic directional derivatives."""

    name: str
    finite_difference: np.ndarray
    analytic: np.ndarray
    relative_errors: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def max_relative_error(self) -> float:
        return float(np.max(self.relative_errors)) if self.relative_errors.size else 0.0

    def passed(self, tolerance: float) -> bool:
        return self.max_relative_error <= tolerance

    def __str__(self) -> str:
        rows = ", ".join(
            f"fd={f:.6g} tape={a:.6g}" for f, a in zip(self.finite_difference, self.analytic, strict=True)
        )
        return f"{self.name}: max relative error {self.max_relative_error:.3%} ({rows})"


def _flat_values(array: wp.array) -> np.ndarray:
    return np.array(array.numpy(), dtype=np.float64).reshape(-1)


def _set_flat(array: wp.array, flat: np.ndarray) -> None:
    host = array.numpy()
    array.assign(flat.reshape(host.shape).astype(host.dtype))


def check_grad(
    loss: Callable[[], float],
    array: wp.array,
    analytic_grad: np.ndarray,
    *,
    name: str = "",
    eps: float = 1e-3,
    relative_eps: bool = False,
    indices: list[int] | None = None,
    num_directions: int = 0,
    mask: np.ndarray | None = None,
    directions: list[np.ndarray] | None = None,
    seed: int = 0,
    floor: float = 1e-8,
) -> GradCheckResult:
    """Compare the tape gradient of ``loss`` w.r.t. ``array`` with central finite differences.

    Each probe perturbs ``array`` by ``+-eps`` along one direction, re-evaluates ``loss()`` (which
    must re-run the whole simulation from ``array``'s current contents) and compares
    ``(L(x + eps d) - L(x - eps d)) / (2 eps)`` with ``grad . d``.

    Args:
        loss: re-runs the forward computation and returns the scalar loss.
        array: the input whose gradient is checked; restored afterwards.
        analytic_grad: the tape's gradient, same shape as ``array.numpy()``.
        name: label for reports.
        eps: step size; with ``relative_eps`` it is relative to the RMS of the probed entries.
        indices: flat entries to probe one at a time (components of vector dtypes count apart).
        num_directions: random unit directions to probe (restricted to ``mask`` if given).
        mask: flat boolean mask of entries a random direction may move.
        directions: explicit directions to probe, used as given (not normalised): entry i moves
            by ``eps * d[i]``, e.g. ``d = values`` for a uniform relative change of a per-particle
            material parameter. ``relative_eps`` does not apply to them.
        seed: seed of the random directions.
        floor: absolute magnitude below which relative errors are not amplified.

    Returns:
        A :class:`GradCheckResult` with one row per probe.
    """
    x0 = _flat_values(array)
    grad = np.asarray(analytic_grad, dtype=np.float64).reshape(-1)
    if grad.shape != x0.shape:
        raise ValueError(f"analytic_grad has {grad.size} entries but the array has {x0.size}.")
    explicit = [np.asarray(d, dtype=np.float64).reshape(-1) for d in (directions or [])]
    directions = list(explicit)
    for i in indices or []:
        d = np.zeros_like(x0)
        d[i] = 1.0
        directions.append(d)
    rng = np.random.default_rng(seed)
    for _ in range(num_directions):
        d = rng.standard_normal(x0.shape)
        if mask is not None:
            d = d * np.asarray(mask, dtype=np.float64).reshape(-1)
        d /= np.linalg.norm(d) + 1e-30
        directions.append(d)
    if not directions:
        raise ValueError("check_grad needs directions, indices or num_directions > 0.")

    fds, ans = [], []
    try:
        for n, d in enumerate(directions):
            step = eps
            if relative_eps and n >= len(explicit):
                scale = np.sqrt(np.mean(x0[d != 0] ** 2)) if np.any(d != 0) else 1.0
                step = eps * max(scale, 1e-12)
            _set_flat(array, x0 + step * d)
            plus = loss()
            _set_flat(array, x0 - step * d)
            minus = loss()
            fds.append((plus - minus) / (2.0 * step))
            ans.append(float(grad @ d))
    finally:
        _set_flat(array, x0)
    fd = np.array(fds)
    an = np.array(ans)
    rel = np.abs(fd - an) / np.maximum(np.maximum(np.abs(fd), np.abs(an)), floor)
    return GradCheckResult(name or "array", fd, an, rel)
