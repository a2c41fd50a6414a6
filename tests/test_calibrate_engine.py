"""The calibration engine (diffsim.calibrate.engine) and its rigid family: parameters recovered
from tiny synthetic cube tosses made by the simulator, resume, bad input."""

import json

import numpy as np
import pytest

from diffsim.calibrate.engine import FitSettings, Parameter, calibrate, fit
from diffsim.calibrate.rigid import CubeFamily, CubeTosses, load_tosses, simulate_tosses
from diffsim.cli import main
from diffsim.errors import ConfigError, InvalidParameter

TRUE = {"friction": 0.25, "time_constant": 0.01, "damping_ratio": 1.0, "inertia_fraction": 0.8}


def synthetic_tosses(values=TRUE, tosses=6, frames=80, seed=0) -> CubeTosses:
    """Cubes released 10-20 cm up, sliding and spinning, rolled out by the model itself."""
    rng = np.random.default_rng(seed)
    first = np.zeros((tosses, 13))
    first[:, :2] = rng.uniform(-0.1, 0.1, (tosses, 2))
    first[:, 2] = rng.uniform(0.1, 0.2, tosses)
    q = rng.standard_normal((tosses, 4))
    first[:, 3:7] = q / np.linalg.norm(q, axis=1, keepdims=True)
    first[:, 7:9] = rng.uniform(-1.0, 1.0, (tosses, 2))
    first[:, 10:13] = rng.uniform(-6.0, 6.0, (tosses, 3))
    # a placeholder recording of the right lengths, whose first frames the rollout starts from
    states = np.repeat(first, frames, axis=0)
    offsets = np.arange(tosses + 1) * frames
    shell = CubeTosses(states, offsets, 1.0 / 148.0, 0.0524, 0.37, np.arange(tosses))
    for k, sim in enumerate(simulate_tosses(shell, values)):
        states[offsets[k]:offsets[k + 1], :7] = sim
    return shell


def test_fit_recovers_friction_and_contact_from_synthetic_tosses():
    family = CubeFamily()
    tosses = synthetic_tosses()
    start = {"friction": 0.4, "time_constant": 0.02}
    # measured: friction within 0.2%, time constant 2% after 60 iterations (the damping ratio and
    # the inertia, weakly seen by six tosses, drift by a few percent between 50 and 60)
    result = fit(family, tosses, settings=FitSettings(iterations=60, learning_rate=0.08), initial=start,
                 progress=False)
    losses = [h["loss"] for h in result.history]
    assert losses[result.best_iteration] < 0.05 * losses[0]
    assert result.values["friction"] == pytest.approx(TRUE["friction"], rel=0.05)
    assert result.values["time_constant"] == pytest.approx(TRUE["time_constant"], rel=0.1)
    assert family.metrics(result.values, tosses)["position_error_m"] < 1e-3


def test_a_fit_resumes_where_it_stopped(tmp_path):
    family = CubeFamily()
    tosses = synthetic_tosses(tosses=3, frames=50)
    settings = FitSettings(iterations=4)
    straight = fit(family, tosses, settings=settings, state_path=tmp_path / "a.json", progress=False)
    fit(family, tosses, settings=FitSettings(iterations=2), state_path=tmp_path / "b.json", progress=False)
    resumed = fit(family, tosses, settings=settings, state_path=tmp_path / "b.json", progress=False)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    assert resumed.values == straight.values


def test_calibrate_rigid_command_writes_params_and_metrics_per_split(tmp_path, capsys):
    synthetic_tosses(tosses=4, frames=50).save(tmp_path / "tosses.npz")
    out = tmp_path / "fit"
    status = main(["calibrate", "rigid", "--train", f"{tmp_path / 'tosses.npz'}@0:2",
                   "--eval", f"{tmp_path / 'tosses.npz'}@2:", "--out", str(out), "--iterations", "2", "--no-progress"])
    assert status == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("train", "eval"):
        assert {"position_error_m", "angle_error_deg", "position_error_rel"} <= set(metrics[split])
        assert metrics[split]["tosses"] == 2
    params = json.loads((out / "params.json").read_text())["parameters"]
    assert set(params) == {"friction", "time_constant", "damping_ratio", "inertia_fraction"}
    assert (out / "loss.png").exists() and (out / "overlay_eval.png").exists()


def _write(path, **fields):
    base = synthetic_tosses(tosses=2, frames=10)
    data = {"states": base.states, "offsets": base.offsets, "dt": base.dt, "half_width": base.half_width,
            "mass": base.mass}
    data.update(fields)
    np.savez(path, **{k: v for k, v in data.items() if v is not None})
    return path


@pytest.mark.parametrize(("fields", "words"), [
    ({"states": np.full((20, 13), np.nan)}, "non-finite value at frame 0"),
    ({"states": np.zeros((20, 7))}, "shape (20, 7)"),
    ({"half_width": 52.4}, "expected metres"),
    ({"mass": None}, "field 'mass' is missing"),
    ({"offsets": np.array([0, 15, 12])}, "field 'offsets'"),
])
def test_bad_recordings_are_refused_naming_the_field(tmp_path, fields, words):
    path = _write(tmp_path / "bad.npz", **fields)
    with pytest.raises(ConfigError, match=None) as error:
        load_tosses(path)
    assert words in str(error.value) and "bad.npz" in str(error.value)


def test_bad_selections_and_options_exit_with_one_sentence(tmp_path, capsys):
    path = _write(tmp_path / "t.npz")
    with pytest.raises(ConfigError, match="selection"):
        load_tosses(f"{path}@a:b")
    with pytest.raises(ConfigError, match="picks no toss"):
        load_tosses(f"{path}@5:9")
    status = main(["calibrate", "rigid", "--train", str(path), "--eval", str(path), "--out", str(tmp_path / "o"),
                   "--initial", "friction"])
    assert status == 2
    assert "--initial" in capsys.readouterr().err
    status = main(["calibrate", "rigid", "--train", str(tmp_path / "missing.npz"), "--eval", str(path),
                   "--out", str(tmp_path / "o")])
    assert status == 2
    assert "no such recording file" in capsys.readouterr().err


def test_parameters_validate_their_bounds():
    with pytest.raises(InvalidParameter):
        Parameter("friction", 2.0, 0.1, 1.0)
    with pytest.raises(InvalidParameter):
        Parameter("offset", 0.0, -1.0, 1.0, log=True)
    p = Parameter("offset", 0.0, -1.0, 1.0, log=False)
    assert p.decode(p.encode(0.3)) == pytest.approx(0.3)
    with pytest.raises(InvalidParameter):
        fit(CubeFamily(), synthetic_tosses(tosses=1, frames=5), settings=FitSettings(iterations=1),
            initial={"stiffness": 1.0}, progress=False)
    with pytest.raises(InvalidParameter, match=r"friction = -0.3 is invalid; the valid range is \[0.02, 1.5\]"):
        fit(CubeFamily(), synthetic_tosses(tosses=1, frames=5), settings=FitSettings(iterations=1),
            initial={"friction": -0.3}, progress=False)


def test_calibrate_refuses_a_state_of_another_family(tmp_path):
    (tmp_path / "fit_state.json").write_text(json.dumps({"family": "rod", "parameters": ["bend_stiffness"]}))
    tosses = synthetic_tosses(tosses=1, frames=5)
    with pytest.raises(ConfigError, match="rod fit"):
        calibrate(CubeFamily(), tosses, tosses, tmp_path, settings=FitSettings(iterations=1), progress=False,
                  log=lambda line: None)


def synthetic_presses(values, images=6, seed=0):
    """Tiny tactile images rendered by the optics model itself on a smooth synthetic background."""
    from diffsim.calibrate.optics import TactilePresses, render

    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:40, 0:48]
    background = np.stack([120 + 30 * np.sin(cols / 15.0), 140 + 20 * np.cos(rows / 11.0),
                           100 + 0.5 * cols], axis=-1).astype(np.float64)
    centers = np.stack([rng.uniform(15, 33, images), rng.uniform(13, 27, images)], axis=1)
    radii = rng.uniform(7.0, 10.0, images)
    presses = TactilePresses(np.zeros((images, 40, 48, 3)), background, centers, radii, pixel_size=0.25e-3)
    for k in range(images):
        presses.images[k] = render(presses, k, values)
    return presses


def test_optics_gradient_matches_finite_differences_and_the_fit_recovers_the_lights():
    from diffsim.calibrate.optics import OpticsFamily

    family = OpticsFamily()
    truth = {p.name: p.initial for p in family.parameters}
    truth.update({"azimuth_0": 0.3, "elevation_0": 0.7, "gain_0_r": 80.0, "gain_0_b": -30.0, "gain_1_g": 120.0,
                  "elevation_2": 0.4, "gain_2_b": 60.0, "contact_offset_r": 8.0})
    presses = synthetic_presses(truth)
    start = {p.name: p.initial for p in family.parameters}
    losses, grads = family.loss_gradients(start, presses)
    names = [p.name for p in family.parameters]
    for name, eps in (("azimuth_0", 1e-5), ("elevation_2", 1e-5), ("gain_1_g", 1e-3), ("contact_offset_r", 1e-3)):
        up, down = dict(start), dict(start)
        up[name] += eps
        down[name] -= eps
        fd = (family.losses(up, presses) - family.losses(down, presses)) / (2 * eps)
        np.testing.assert_allclose(grads[:, names.index(name)], fd, rtol=1e-3, atol=1e-6)
    result = fit(family, presses, settings=FitSettings(iterations=400), progress=False)
    metrics = family.metrics(result.values, presses)
    assert metrics["mae_inside_contact"] < 0.05 * family.metrics(start, presses)["mae_inside_contact"]
    assert result.values["gain_1_g"] == pytest.approx(120.0, rel=0.05)


def test_bad_tactile_images_are_refused_naming_the_field(tmp_path):
    from diffsim.calibrate.optics import load_presses

    presses = synthetic_presses({p.name: p.initial for p in __import__(
        "diffsim.calibrate.optics", fromlist=["OpticsFamily"]).OpticsFamily.parameters}, images=2)
    base = {"images": presses.images, "background": presses.background, "touch_center_px": presses.centers,
            "touch_radius_px": presses.radii}
    for change, words in (({"images": presses.images / 255.0}, "0-255 scale"),
                          ({"background": presses.background[:10]}, "field 'background' has shape"),
                          ({"touch_radius_px": np.array([5.0, np.nan])}, "non-finite"),
                          ({"touch_center_px": None}, "field 'touch_center_px' is missing")):
        fields = {**base, **change}
        np.savez(tmp_path / "bad.npz", **{k: v for k, v in fields.items() if v is not None})
        with pytest.raises(ConfigError) as error:
            load_presses(tmp_path / "bad.npz")
        assert words in str(error.value) and "bad.npz" in str(error.value)
