"""MPM material calibration (diffsim.calibrate.mpm) on tiny synthetic recordings: the tape's
gradient of the tracking loss against central differences for each material, short fits (Levenberg-
Marquardt and Adam) that recover a known Young's modulus, and one-sentence errors for bad recordings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffsim.calibrate.engine import FitSettings, calibrate
from diffsim.calibrate.mpm import MPMFamily, load_material_recordings, synthesize
from diffsim.errors import ConfigError

_TINY = dict(specimens=1, tracked=20, grid_res=16, frames=10)


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mpm_recordings")
    return {name: synthesize(name, folder / f"{name}.npz", seed=1, **_TINY)
            for name in ("elastic", "von_mises", "drucker_prager")}


@pytest.mark.parametrize("name, value", [("elastic", 6e4), ("von_mises", 600.0),
                                         ("drucker_prager", math.radians(35.0))])
def test_tracking_loss_gradient_matches_finite_differences(recordings, name, value):
    rec = load_material_recordings(recordings[name].source)
    family = MPMFamily.for_recordings(rec)
    param = family.fit[0]
    family._simulation(rec).fixed_substeps = family._simulation(rec).substeps()  # one count for every probe
    losses, grads = family.loss_gradients({param: value}, rec)
    eps = value * 0.01
    fd = (family.losses({param: value + eps}, rec) - family.losses({param: value - eps}, rec)) / (2 * eps)
    assert losses[0] > 0 and abs(fd[0]) > 0
    assert abs(grads[0, 0] - fd[0]) <= 0.02 * abs(fd[0]), (grads[0, 0], fd[0])


@pytest.mark.parametrize("method", ["lm", "adam"])
def test_a_short_fit_recovers_a_known_young_modulus(recordings, tmp_path, method):
    rec = load_material_recordings(recordings["elastic"].source)
    assert rec.truth["young_modulus"] == pytest.approx(3e4)
    family = MPMFamily.for_recordings(rec)
    assert family.parameters[0].initial == pytest.approx(1e5)  # the file holds a guess 3.3x off
    settings = (FitSettings(iterations=8, method="lm") if method == "lm"
                else FitSettings(iterations=20, learning_rate=0.2, decay_to=0.05))
    metrics = calibrate(family, rec, rec, tmp_path / "fit", settings=settings, progress=False, log=lambda line: None)
    assert metrics["train"]["young_modulus_relative_error"] < 0.05, metrics["train"]
    assert metrics["train"]["position_rmse_m"] < 0.5 * metrics["train"]["initial"]["position_rmse_m"]
    assert (tmp_path / "fit" / "params.json").exists() and (tmp_path / "fit" / "overlay_train.png").exists()


def test_bad_recordings_get_a_sentence(recordings, tmp_path):
    source = dict(np.load(recordings["elastic"].source))

    def write(**changes):
        path = tmp_path / "bad.npz"
        np.savez(path, **{**source, **changes})
        return str(path)

    positions = source["positions"].copy()
    positions[0, 3, 2, 1] = np.nan
    with pytest.raises(ConfigError, match="NaN or inf at specimen 0, frame 3"):
        load_material_recordings(write(positions=positions))
    with pytest.raises(ConfigError, match="millimetres"):
        load_material_recordings(write(positions=source["positions"] * 1000))
    with pytest.raises(ConfigError, match="'material' is 'jelly'"):
        load_material_recordings(write(material="jelly"))
    with pytest.raises(ConfigError, match="'fit' names \\['stiffness'\\]"):
        load_material_recordings(write(fit=np.array(["stiffness"])))
    with pytest.raises(ConfigError, match="'positions' has shape"):
        load_material_recordings(write(positions=source["positions"][0]))
    with pytest.raises(ConfigError, match="'tracked' names particles"):
        family = MPMFamily.for_recordings(rec := load_material_recordings(write(tracked=source["tracked"] + 10**6)))
        family.losses({"young_modulus": 3e4}, rec)
    with pytest.raises(ConfigError, match="no such recording file"):
        load_material_recordings(tmp_path / "missing.npz")
