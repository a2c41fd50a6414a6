"""Tactile mechanics calibration (diffsim.calibrate.tactile) on tiny synthetic presses: the
implicit-differentiation gradient of the marker-and-force loss against central differences for
E, nu and friction, a Levenberg-Marquardt fit that recovers all three, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from diffsim.calibrate.engine import FitSettings, calibrate
from diffsim.calibrate.tactile import TactileMechanicsFamily, load_tactile_presses, synthesize
from diffsim.errors import ConfigError


@pytest.fixture(scope="module")
def presses(tmp_path_factory):
    path = tmp_path_factory.mktemp("tactile_presses") / "presses.npz"
    synthesize(path, presses=2, press_frames=3, slide_frames=3, seed=2)
    return str(path)


def test_loss_gradient_matches_finite_differences(presses):
    rec = load_tactile_presses(f"{presses}@0:1")
    family = TactileMechanicsFamily.for_recordings(rec)
    values = {"young_modulus": 1.5e5, "poisson_ratio": 0.4, "friction": 0.5}
    losses, grads = family.loss_gradients(values, rec)
    for j, name in enumerate(family.fit):
        eps = 0.01 * values[name]
        up, down = dict(values), dict(values)
        up[name] += eps
        down[name] -= eps
        fd = (family.losses(up, rec)[0] - family.losses(down, rec)[0]) / (2 * eps)
        assert abs(grads[0, j] - fd) <= 0.02 * abs(fd), (name, grads[0, j], fd)


def test_levenberg_marquardt_recovers_modulus_poisson_ratio_and_friction(presses, tmp_path):
    rec = load_tactile_presses(presses)
    assert rec.truth == pytest.approx({"young_modulus": 2e5, "poisson_ratio": 0.45, "friction": 0.6})
    family = TactileMechanicsFamily.for_recordings(rec)  # starts at E 100 kPa, nu 0.3, friction 0.3
    metrics = calibrate(family, rec, rec, tmp_path / "fit", settings=FitSettings(iterations=12, method="lm"),
                        progress=False, log=lambda line: None)
    for name in family.fit:
        assert metrics["train"][f"{name}_relative_error"] < 0.05, metrics["train"]
    assert metrics["train"]["force_rmse_n"] < 0.2 * metrics["train"]["initial"]["force_rmse_n"]


def test_bad_presses_get_a_sentence(presses, tmp_path):
    source = dict(np.load(presses))

    def write(**changes):
        path = tmp_path / "bad.npz"
        np.savez(path, **{**source, **changes})
        return str(path)

    force = source["force"].copy()
    force[1, 2, 0] = np.nan
    with pytest.raises(ConfigError, match="'force' has NaN or inf in press 1"):
        load_tactile_presses(write(force=force))
    with pytest.raises(ConfigError, match="millimetres"):
        load_tactile_presses(write(markers=source["markers"] * 1000))
    with pytest.raises(ConfigError, match="'markers' has shape"):
        load_tactile_presses(write(markers=source["markers"][:, :, :3]))
    with pytest.raises(ConfigError, match="'fit' names \\['hardness'\\]"):
        load_tactile_presses(write(fit=np.array(["hardness"])))
    with pytest.raises(ConfigError, match="picks no presses"):
        load_tactile_presses(f"{presses}@5:6")
