"""Argument checks shared by the geometry modules, raising InvalidParameter that names the argument.

Non-numeric input is reported the same way as out-of-range numbers rather than as a bare TypeError.
"""

from __future__ import annotations

import math

import numpy as np

from diffsim.errors import InvalidParameter


def finite_number(name: str, value, valid: str) -> float:
    """``value`` as a finite float, else InvalidParameter(name, value, valid)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidParameter(name, value, valid) from None
    if not math.isfinite(number):
        raise InvalidParameter(name, value, valid)
    return number


def positive_number(name: str, value, unit: str = "m") -> float:
    """``value`` as a finite float > 0, else InvalidParameter."""
    valid = f"finite numbers > 0 {unit}".rstrip()
    number = finite_number(name, value, valid)
    if number <= 0.0:
        raise InvalidParameter(name, value, valid)
    return number


def finite_vector(name: str, value, length: int, valid: str, *, positive: bool = False) -> np.ndarray:
    """``value`` as a float64 array of ``length`` finite (and, if asked, positive) entries."""
    try:
        array = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InvalidParameter(name, value, valid) from None
    if array.shape != (length,) or not np.all(np.isfinite(array)) or (positive and np.any(array <= 0.0)):
        raise InvalidParameter(name, value, valid)
    return array


def unit_quaternion(name: str, value) -> np.ndarray:
    """``value`` (x, y, z, w) normalised to unit length; zero or non-finite input is rejected."""
    valid = "non-zero quaternions (x, y, z, w) of finite numbers"
    quat = finite_vector(name, value, 4, valid)
    norm = float(np.linalg.norm(quat))
    if norm < 1.0e-12:
        raise InvalidParameter(name, value, valid, hint="Use (0, 0, 0, 1) for no rotation.")
    return quat / norm
