"""Device selection: Warp's CPU backend by default, a CUDA device when asked and present.

The choice comes from an explicit argument, else the ``DIFFSIM_DEVICE`` environment variable,
else ``cuda:0`` when a GPU exists and ``cpu`` otherwise.
"""

from __future__ import annotations

import os

import warp as wp

from diffsim.errors import ConfigError

_initialised = False


def init_warp(*, quiet: bool = True) -> None:
    """Initialise Warp once, quietly unless asked otherwise."""
    global _initialised
    if not _initialised:
        if quiet:
            # keep Warp's banner and per-module load lines off stdout (they would corrupt --json)
            wp.config.log_level = wp.LOG_WARNING
        wp.init()
        _initialised = True


def resolve_device(device: str | None = None) -> str:
    """Return the Warp device name to run on.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or None (then ``DIFFSIM_DEVICE``, then auto).

    Raises:
        ConfigError: a CUDA device was asked for but none is available.
    """
    init_warp()
    name = device or os.environ.get("DIFFSIM_DEVICE") or ""
    if not name:
        return "cuda:0" if wp.is_cuda_available() else "cpu"
    if name == "cuda":
        name = "cuda:0"
    if name.startswith("cuda") and not wp.is_cuda_available():
        raise ConfigError(
            f"device {name!r} was requested but Warp finds no CUDA device here; use --device cpu "
            "or unset DIFFSIM_DEVICE."
        )
    try:
        wp.get_device(name)
    except Exception as exc:  # Warp raises a bare RuntimeError for unknown names
        valid = ", ".join(str(d) for d in wp.get_devices())
        raise ConfigError(f"device {name!r} is not available; choose one of: {valid}.") from exc
    return name
