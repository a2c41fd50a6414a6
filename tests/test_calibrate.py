"""Cable calibration on recordings made by the simulator: rod initialisation and replay, recovery of
a known bending stiffness, and the ``diffsim calibrate rod`` command end to end (with resume)."""

import json

import numpy as np
import pytest

from diffsim.calibrate import evaluate, save_recordings
from diffsim.calibrate.cable import (
    GIVEN_FRAMES,
    CableParameters,
    build_cable_batch,
    measure_marker_gaps,
    simulate_recordings,
    synthetic_recordings,
)
from diffsim.calibrate.engine import _clipped_mean
from diffsim.calibrate.fit import LOG_PARAMETERS, CableFamily, CableObjective, FitOptions, fit_cable
from diffsim.calibrate.recordings import CableRecordings
from diffsim.cli import main
from diffsim.errors import InvalidParameter

TRUTH = CableParameters(bend_stiffness=4e-3, linear_damping=0.5, air_drag=0.05, bend_damping=1e-5)


@pytest.fixture(scope="module")
def recordings():
    return synthetic_recordings(4, frames=60, params=TRUTH, seed=1)


def test_rod_starts_on_the_first_frame_with_ends_driven(recordings):
    model, layout = build_cable_batch(recordings, TRUTH, subdivisions=2)
    x = model.initial_x
    np.testing.assert_allclose(x[layout.marker_vertex], recordings.positions[:, 0], atol=1e-6)
    driven = model.vertex_driven.numpy().astype(bool)
    # per rod: the vertices from marker 0 to marker 1 and from marker M-2 to M-1
    assert driven.sum() == recordings.num_recordings * 2 * (2 + 1)
    with pytest.raises(InvalidParameter, match="subdivisions"):
        build_cable_batch(recordings, TRUTH, subdivisions=0)
    with pytest.raises(InvalidParameter, match="initial_velocity"):
        build_cable_batch(recordings, TRUTH, initial_velocity="guess")
    # "recorded" starts every marker with its velocity over the first frame
    model, layout = build_cable_batch(recordings, TRUTH, subdivisions=2, initial_velocity="recorded")
    step = (recordings.positions[:, 1] - recordings.positions[:, 0]) * recordings.fps
    np.testing.assert_allclose(model.initial_v[layout.marker_vertex], step, atol=1e-4)


@pytest.mark.parametrize("initial_velocity", ["ends", "recorded"])
def test_prediction_reads_only_its_given_frames_and_the_ends(recordings, initial_velocity):
    # the data set's metrics give a model the first frame and the end markers of every frame;
    # the two-frame start of DEFORM's evaluation also gives it frame 1
    given = GIVEN_FRAMES[initial_velocity]
    scrambled = recordings.positions.copy()
    interior = recordings.interior_markers
    hidden = scrambled[:, given:, interior]
    scrambled[:, given:, interior] += np.random.default_rng(0).normal(0.0, 0.05, hidden.shape)
    # rest lengths given (as a fit gives them) or taken from the recording itself
    for params in (CableParameters(marker_gaps=measure_marker_gaps(recordings)), CableParameters()):
        expected = simulate_recordings(recordings, params, initial_velocity=initial_velocity)
        got = simulate_recordings(CableRecordings(scrambled, fps=recordings.fps), params,
                                  initial_velocity=initial_velocity)
        np.testing.assert_array_equal(got, expected)


def test_replay_with_the_true_parameters_reproduces_the_recording(recordings):
    # the recordings come from a cable that does not stretch (16 length sweeps): replay it alike
    predicted = simulate_recordings(recordings, TRUTH, solver_options={"projection_iterations": 16})
    scores = evaluate(predicted, recordings)
    assert scores["interior_mean_m"] < 2e-3
    # the ends are inputs: replayed exactly
    ends = list(recordings.end_markers)
    np.testing.assert_allclose(predicted[:, :, ends], recordings.positions[:, :, ends], atol=2e-5)


def test_fit_recovers_the_bending_stiffness(recordings):
    start = CableParameters(bend_stiffness=3 * TRUTH.bend_stiffness, linear_damping=0.5, air_drag=0.05,
                            bend_damping=1e-5)
    options = FitOptions(schedule=((25, None),), learning_rate=0.1, fit_curvature=False, fit_bend_profile=False)
    result = fit_cable(recordings, start, options=options, progress=False)
    assert result.history[-1]["loss_m"] < 0.5 * result.history[0]["loss_m"]
    assert abs(np.log(result.parameters.bend_stiffness / TRUTH.bend_stiffness)) < np.log(1.3)
    # the result is the iterate with the lowest loss, not merely the last one
    losses = [h["loss_m"] for h in result.history]
    assert result.best_iteration == int(np.argmin(losses))
    best = result.history[result.best_iteration]
    assert result.parameters.bend_stiffness == pytest.approx(best["bend_stiffness"], rel=1e-9)


def test_recordings_are_clipped_in_the_objectives_coordinates(recordings):
    """The engine clips each recording's gradient by its norm; the cable family weighs the norm so
    that it is taken in the objective's own coordinates (a linear parameter's value, not its value
    over its scale), and an overflowed recording is left out."""
    rows = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [300.0, -400.0], [np.nan, 1.0]])
    grad, clipped = _clipped_mean(rows, 3.0)
    # the median norm of the four finite rows is (1 + sqrt 2) / 2; the 500-long one is cut to 3 times it
    cap = 3.0 * (1.0 + np.sqrt(2.0)) / 2.0
    np.testing.assert_allclose(grad, (np.array([2.0, 2.0]) + cap * np.array([0.6, -0.8])) / 4)
    assert clipped == 2  # one clipped, one left out
    options = FitOptions(schedule=((1, 10),))
    family = CableFamily(CableObjective(recordings, CableParameters(), substeps=8), options)
    weights = dict(zip((p.name for p in family.parameters), family.clip_weights, strict=True))
    assert weights["bend_stiffness"] == 1.0 and weights["bend_factor_0"] == 1.0
    assert weights["shape_memory"] == pytest.approx(options.learning_rate / options.memory_learning_rate)
    assert weights["curvature_0_a"] == pytest.approx(options.learning_rate / options.curvature_learning_rate)
    with pytest.raises(InvalidParameter, match="recording_clip"):
        fit_cable(recordings, options=FitOptions(recording_clip=0.0), progress=False)


def test_objective_splits_its_gradient_by_recording(recordings):
    params = CableParameters(shape_memory=0.2, bend_profile=np.linspace(1.2, 1.0, recordings.num_markers - 1).tolist())
    both = CableObjective(recordings.subset([0, 1]), params, substeps=8)
    vector = both.initial_vector()
    loss, grad, _ = both(vector, 20)
    assert both.recording_gradients.shape == (2, vector.size)
    np.testing.assert_allclose(both.recording_gradients.sum(axis=0), grad)
    # each row is that recording's own gradient, scaled by its share of the mean loss
    for r in (0, 1):
        alone = CableObjective(recordings.subset([r]), params, substeps=8)
        _, own, _ = alone(vector, 20)
        np.testing.assert_allclose(both.recording_gradients[r], own / 2, rtol=2e-3, atol=1e-9)


def test_calibrate_command_writes_results_and_resumes(recordings, tmp_path, capsys):
    train = save_recordings(tmp_path / "train.npz", recordings.subset([0, 1, 2]))
    held_out = save_recordings(tmp_path / "eval.npz", recordings.subset([3]))
    out = tmp_path / "fit"
    args = ["calibrate", "rod", "--train", str(train), "--eval", str(held_out), "--out", str(out),
            "--iterations", "2", "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("train", "eval"):
        assert {"l1_all", "interior_mean_m"} <= set(metrics[split])
        assert metrics[split]["l1_all"] < metrics[split]["frozen_interior_l1_all"]
    params = CableParameters.load(out / "params.json")
    assert params.bend_stiffness > 0
    for name in ("overlay_eval.png", "overlay_train.png", "error_per_frame.png", "loss.png"):
        assert (out / name).stat().st_size > 1000
    assert "eval: l1_all" in capsys.readouterr().out
    # a second run finds the finished fit state and does not iterate again
    state = json.loads((out / "fit_state.json").read_text())
    assert len(state["history"]) == 2
    assert main(args) == 0
    assert len(json.loads((out / "fit_state.json").read_text())["history"]) == 2


def test_calibrate_command_with_a_two_frame_start(recordings, tmp_path, capsys):
    train = save_recordings(tmp_path / "train.npz", recordings.subset([0, 1]))
    held_out = save_recordings(tmp_path / "eval.npz", recordings.subset([3]))
    out = tmp_path / "fit"
    args = ["calibrate", "rod", "--train", str(train), "--eval", str(held_out), "--out", str(out),
            "--iterations", "1", "--train-frames", "10", "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    assert json.loads((out / "metrics.json").read_text())["given_frames"] == 1
    # a fit state of the other protocol is not resumed: the fit starts afresh
    with pytest.warns(UserWarning, match="initial_velocity='ends'"):
        assert main([*args, "--initial-velocity", "recorded"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["initial_velocity"], metrics["given_frames"]) == ("recorded", 2)
    # frame 1 is an input now: scored from frame 2, the baseline too
    params = CableParameters.load(out / "params.json")
    predicted = simulate_recordings(recordings.subset([3]), params, initial_velocity="recorded")
    expected = evaluate(predicted, recordings.subset([3]), given_frames=2)
    assert metrics["eval"]["l1_all"] == pytest.approx(expected["l1_all"], rel=1e-6)
    assert "scoring starts at frame 2" in capsys.readouterr().out
    # both of the data set's protocols are scored, whichever the fit used
    starts = metrics["eval"]["starts"]
    assert starts["two_frames"]["l1_all"] == pytest.approx(expected["l1_all"], rel=1e-6)
    one_frame = evaluate(simulate_recordings(recordings.subset([3]), params, initial_velocity="ends"),
                         recordings.subset([3]), given_frames=1)
    assert starts["one_frame"]["l1_all"] == pytest.approx(one_frame["l1_all"], rel=1e-6)
    assert starts["one_frame"]["given_frames"] == 1


def test_calibrate_command_names_a_missing_file(tmp_path, capsys):
    code = main(["calibrate", "rod", "--train", str(tmp_path / "none.npz"), "--eval", str(tmp_path / "none.npz"),
                 "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 2
    assert "none.npz" in capsys.readouterr().err


def test_fit_gradient_matches_finite_differences(recordings):
    # The fit's own chain rule: log-parameters, shape memory, the shared rest curvature summed over
    # recordings and the per-edge stiffness factor, on a curved cable with a stiffer end.
    vertices = recordings.num_markers
    params = CableParameters(bend_stiffness=4e-3, linear_damping=0.5, air_drag=0.2, bend_damping=1e-4,
                             shape_memory=0.3, rest_curvature=(0.05 * np.ones((vertices, 2))).tolist(),
                             bend_profile=np.linspace(1.5, 1.0, vertices - 1).tolist())
    # fixed sub-steps: "auto" changes them with the stiffness, and the loss jumps where it does
    objective = CableObjective(recordings.subset([0, 1]), params, substeps=8)
    vector = objective.initial_vector()
    at = objective.slices
    _, grad, _ = objective(vector, 40)
    # (index, step): steps where the finite difference has settled (a sweep from 0.1 to 0.002 gave
    # the same value at the neighbouring step); the rest curvature acts sharply non-linearly, so
    # its step is small. Bending stiffness, drag, linear damping and twist move this loss too little
    # for float32 differences to settle at any step: the rod's own gradient checks cover them, and
    # bending damping covers the fit's log-parameter chain rule they share.
    log = {name: i for i, name in enumerate(LOG_PARAMETERS)}
    checks = {"bend damping": (log["bend_damping"], 0.1), "shape memory": (at["memory"].start, 0.05),
              "rest curvature": (at["curvature"].start + 2 * 5, 0.002), "bend profile": (at["profile"].start + 3, 0.1)}
    for name, (i, eps) in checks.items():
        plus, minus = vector.copy(), vector.copy()
        plus[i] += eps
        minus[i] -= eps
        fd = (objective(plus, 40)[0] - objective(minus, 40)[0]) / (2 * eps)
        assert abs(grad[i] - fd) <= 0.02 * abs(fd), (name, grad[i], fd)
