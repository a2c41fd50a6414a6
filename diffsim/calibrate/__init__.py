"""Calibration against real measurements.

:mod:`diffsim.calibrate.engine` is the family-independent fit (bounded, log-space parameters,
batched recordings, per-recording clipping, best iterate, resume, params.json / metrics.json);
:mod:`diffsim.calibrate.rigid` and :mod:`diffsim.calibrate.optics` are its families (a tossed
cube in MuJoCo, ``diffsim calibrate rigid``; a tactile sensor's shading, ``diffsim calibrate
optics``). Cables still fit through their own gradient-based loop (:mod:`diffsim.calibrate.fit`):
``load_recordings`` reads the DEFORM data set (``.npz``, or its pickles through a restricted
unpickler); ``evaluate`` scores a predicted rollout with the data set's two metrics, ``l1_all``
and ``interior_mean_m``.
"""

from diffsim.calibrate.recordings import (
    DEFAULT_FPS,
    CableRecordings,
    evaluate,
    frozen_interior_prediction,
    interior_mean_m,
    l1_all,
    load_recordings,
    mean_end_displacement_prediction,
    save_recordings,
)

__all__ = [
    "DEFAULT_FPS", "CableRecordings", "evaluate", "frozen_interior_prediction", "interior_mean_m", "l1_all",
    "load_recordings", "mean_end_displacement_prediction", "save_recordings",
]
