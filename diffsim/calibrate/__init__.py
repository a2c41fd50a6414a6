"""Calibration against real measurements: motion-capture recordings of cables, their metrics and baselines.

``load_recordings`` reads the DEFORM data set (``.npz``, or its pickles through a restricted unpickler);
``evaluate`` scores a predicted rollout with the data set's two metrics, ``l1_all`` and ``interior_mean_m``.
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
