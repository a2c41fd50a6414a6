"""Cable recordings: validation, .npz round trip, the restricted pickle loader, metrics and baselines.
Synthetic arrays only, so the tests run without the DEFORM data in ../shared.
"""

import pickle
import struct

import numpy as np
import pytest

from diffsim.calibrate import (
    CableRecordings,
    evaluate,
    frozen_interior_prediction,
    interior_mean_m,
    l1_all,
    load_recordings,
    mean_end_displacement_prediction,
    save_recordings,
)
from diffsim.errors import ConfigError, InvalidParameter


def straight_cable_recording(num_recordings=2, num_frames=4, num_markers=6, seed=0):
    """Markers 0.1 m apart along x, the whole cable drifting along z by 0.01 m per frame, plus small noise."""
    rng = np.random.default_rng(seed)
    positions = np.zeros((num_recordings, num_frames, num_markers, 3))
    positions[..., 0] = 0.1 * np.arange(num_markers)
    positions[..., 2] = 0.01 * np.arange(num_frames)[None, :, None]
    positions += 1e-3 * rng.standard_normal(positions.shape)
    return CableRecordings(positions, fps=50.0, ids=np.arange(num_recordings) + 10, name="synthetic")


def deform_layout(frames):
    """One recording (T, M, 3) as DEFORM's pickles lay it out: a list of frames, each (3 coordinates, M markers)."""
    return np.asarray(frames).transpose(0, 2, 1).tolist()


# --- CableRecordings -------------------------------------------------------------------------------------------------


def test_recordings_shape_properties_and_cuts():
    rec = straight_cable_recording(num_recordings=3, num_frames=5, num_markers=7)
    assert (len(rec), rec.num_recordings, rec.num_frames, rec.num_markers) == (3, 3, 5, 7)
    assert rec.positions.dtype == np.float32
    assert rec.end_markers == (0, 1, 5, 6)
    np.testing.assert_array_equal(rec.interior_markers, [2, 3, 4])
    assert rec.duration == pytest.approx(4 / 50.0)

    picked = rec.subset([2, 0])
    np.testing.assert_array_equal(picked.ids, [12, 10])
    np.testing.assert_array_equal(picked.positions[0], rec.positions[2])
    np.testing.assert_array_equal(rec.subset(np.array([False, True, False])).ids, [11])

    cut = rec.frames(1, 4)
    assert cut.num_frames == 3 and cut.fps == rec.fps
    np.testing.assert_array_equal(cut.positions, rec.positions[:, 1:4])
    cut.positions[:] = 0.0  # a copy: the original is untouched
    assert np.abs(rec.positions[:, 1:4]).max() > 0
    with pytest.raises(InvalidParameter, match="frames"):
        rec.frames(4)  # one frame left
    with pytest.raises(InvalidParameter, match="indices"):
        rec.subset([3])


@pytest.mark.parametrize(
    ("positions", "match"),
    [
        (np.zeros((4, 6, 3)), "positions.shape"),  # a single recording without its batch axis
        (np.zeros((1, 4, 6, 2)), "positions.shape"),
        (np.zeros((1, 4, 4, 3)), "number of markers"),
        (np.zeros((1, 1, 6, 3)), "number of frames"),
    ],
)
def test_recordings_refuse_bad_shapes(positions, match):
    with pytest.raises(InvalidParameter, match=match):
        CableRecordings(positions)


def test_recordings_refuse_nan_bad_fps_and_ids():
    positions = np.zeros((2, 3, 5, 3))
    positions[1, 2, 4, 0] = np.nan
    with pytest.raises(InvalidParameter, match="recording 1, frame 2, marker 4"):
        CableRecordings(positions)
    with pytest.raises(InvalidParameter, match="fps"):
        CableRecordings(np.zeros((1, 3, 5, 3)), fps=0.0)
    with pytest.raises(InvalidParameter, match="ids"):
        CableRecordings(np.zeros((2, 3, 5, 3)), ids=[1, 2, 3])
    with pytest.raises(TypeError):
        CableRecordings(np.zeros((1, 3, 5, 3)), 100.0)  # optional fields are keyword-only


# --- .npz ------------------------------------------------------------------------------------------------------------


def test_npz_round_trip(tmp_path):
    rec = straight_cable_recording()
    written = save_recordings(tmp_path / "sub" / "cable", rec)
    assert written.name == "cable.npz"
    back = load_recordings(written)
    np.testing.assert_array_equal(back.positions, rec.positions)
    np.testing.assert_array_equal(back.ids, rec.ids)
    assert (back.fps, back.name) == (50.0, "synthetic")
    with pytest.raises(ConfigError, match="stores fps = 50.0 Hz"):
        load_recordings(written, fps=100.0)


def test_npz_defaults_and_missing_paths(tmp_path):
    np.savez(tmp_path / "bare.npz", positions=np.zeros((3, 2, 5, 3), np.float32))
    bare = load_recordings(tmp_path / "bare.npz")
    assert (bare.fps, bare.name) == (100.0, "bare")
    np.testing.assert_array_equal(bare.ids, [0, 1, 2])

    np.savez(tmp_path / "other.npz", markers=np.zeros(3))
    with pytest.raises(ConfigError, match="no 'positions'"):
        load_recordings(tmp_path / "other.npz")
    with pytest.raises(ConfigError, match="does not exist"):
        load_recordings(tmp_path / "nowhere.npz")
    with pytest.raises(ConfigError, match="no .pkl"):
        load_recordings(tmp_path)  # a folder without pickles


# --- DEFORM pickles --------------------------------------------------------------------------------------------------


def test_pickle_file_in_deform_layout(tmp_path):
    rec = straight_cable_recording(num_recordings=1, num_markers=7)
    (tmp_path / "42.pkl").write_bytes(pickle.dumps(deform_layout(rec.positions[0])))
    (tmp_path / "43.pkl").write_bytes(pickle.dumps({"positions": rec.positions[0].tolist()}))  # (T, M, 3) in a dict
    for file, expected_id in (("42.pkl", 42), ("43.pkl", 43)):
        loaded = load_recordings(tmp_path / file)
        assert loaded.positions.shape == (1, 4, 7, 3) and loaded.fps == 100.0
        np.testing.assert_array_equal(loaded.positions, rec.positions)
        np.testing.assert_array_equal(loaded.ids, [expected_id])


def test_pickle_folder_sorted_by_file_number(tmp_path):
    rec = straight_cable_recording(num_recordings=3, seed=1)
    folder = tmp_path / "DLO9" / "eval"
    folder.mkdir(parents=True)
    for file_number, frames in zip((100, 9, 54), rec.positions, strict=True):
        (folder / f"{file_number}.pkl").write_bytes(pickle.dumps(deform_layout(frames)))
    loaded = load_recordings(folder, fps=50.0)
    np.testing.assert_array_equal(loaded.ids, [9, 54, 100])  # numeric, not "100" < "54" < "9"
    np.testing.assert_array_equal(loaded.positions, rec.positions[[1, 2, 0]])
    assert (loaded.name, loaded.fps) == ("DLO9/eval", 50.0)


def test_pickle_folder_of_unequal_lengths_needs_truncate(tmp_path):
    rec = straight_cable_recording(num_recordings=2, num_frames=5)
    (tmp_path / "1.pkl").write_bytes(pickle.dumps(deform_layout(rec.positions[0])))
    (tmp_path / "2.pkl").write_bytes(pickle.dumps(deform_layout(rec.positions[1, :3])))
    with pytest.raises(ConfigError, match=r"1.pkl: 5, 2.pkl: 3"):
        load_recordings(tmp_path)
    truncated = load_recordings(tmp_path, truncate=True)
    assert truncated.positions.shape == (2, 3, 6, 3)
    np.testing.assert_array_equal(truncated.positions[0], rec.positions[0, :3])


class _PrintsWhenUnpickled:
    def __reduce__(self):
        return (print, ("unpickled: code ran",))


class _CustomRecording:
    def __init__(self):
        self.frames = [[0.0] * 3] * 5


@pytest.mark.parametrize(
    "payload",
    [_PrintsWhenUnpickled(), [[1.0, 2.0], _PrintsWhenUnpickled()], _CustomRecording(), np.zeros((2, 3, 5))],
    ids=["reduce-to-print", "nested-reduce", "custom-class", "numpy-array"],
)
def test_restricted_unpickler_refuses_globals(tmp_path, capsys, payload):
    path = tmp_path / "7.pkl"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(ConfigError, match="refused for safety") as caught:
        load_recordings(path)
    assert str(path) in str(caught.value)
    assert capsys.readouterr().out == ""  # nothing from the file ran


def test_os_system_reference_is_refused_without_running(tmp_path, capsys):
    # Protocol 0 text: GLOBAL os.system, then REDUCE with ("echo unsafe",): what a hostile pickle would hold.
    path = tmp_path / "1.pkl"
    path.write_bytes(b"cos\nsystem\n(S'echo unsafe'\ntR.")
    with pytest.raises(ConfigError, match=r"os\.system"):
        load_recordings(path)
    assert "unsafe" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ([[[0.0] * 5] * 3, "text"], "str value"),
        ({1: [[[0.0] * 5] * 3] * 2}, "dict key"),
        ([[[0.0] * 5] * 3, [[0.0] * 4] * 3], "rectangular"),
        ([[0.0, 1.0]] * 4, "shape"),
        ({"a": [], "b": []}, "keys"),
    ],
)
def test_pickles_of_plain_data_in_the_wrong_form_are_refused(tmp_path, payload, match):
    path = tmp_path / "3.pkl"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(ConfigError, match=match):
        load_recordings(path)


def test_self_referencing_pickle_is_refused(tmp_path):
    frames = [[[0.0] * 5] * 3]
    frames.append(frames)
    path = tmp_path / "4.pkl"
    path.write_bytes(pickle.dumps(frames))
    with pytest.raises(ConfigError, match="holds itself"):
        load_recordings(path)


def test_deeply_nested_pickle_is_checked_without_recursion(tmp_path):
    # Hand-written opcodes (pickle.dumps itself would hit the recursion limit): 5000 EMPTY_LISTs, a float, then
    # 5000 APPENDs nest them, [[[...[0.0]...]]].
    depth = 5000
    path = tmp_path / "5.pkl"
    path.write_bytes(b"\x80\x02" + b"]" * depth + b"G" + struct.pack(">d", 0.0) + b"a" * depth + b".")
    with pytest.raises(ConfigError, match="rectangular|shape"):  # refused for its form, not by a RecursionError
        load_recordings(path)


# --- metrics and baselines -------------------------------------------------------------------------------------------


def test_metrics_on_hand_computed_arrays():
    recorded = np.zeros((3, 5, 3))  # T = 3 frames, M = 5 markers; interior marker is 2 only
    predicted = recorded.copy()
    predicted[0] = 7.0  # frame 0 is never scored
    predicted[1, 2] = (3.0, 4.0, 0.0)  # interior marker: distance 5, absolute error 7
    predicted[2, 0] = (1.0, 0.0, 0.0)  # end marker: counts in l1_all only
    # l1_all: (7 + 1) over 2 frames x 5 markers x 3 coordinates = 30 entries.
    assert l1_all(predicted, recorded) == pytest.approx(8 / 30)
    # interior_mean_m: marker 2 at frames 1 and 2: (5 + 0) / 2.
    assert interior_mean_m(predicted, recorded) == pytest.approx(2.5)
    assert interior_mean_m(predicted, recorded, [0, 2]) == pytest.approx((5 + 0 + 0 + 1) / 4)
    assert l1_all(predicted[None], recorded[None]) == pytest.approx(8 / 30)  # batched form agrees
    with pytest.raises(InvalidParameter, match="predicted.shape"):
        l1_all(predicted[:2], recorded)


def test_evaluate_reports_per_recording_values():
    rec = straight_cable_recording(num_recordings=2, num_frames=3, num_markers=5)
    predicted = rec.positions.astype(np.float64)
    predicted[1, 1:, 2, 2] += 0.3  # recording 1, interior marker 2, frames 1 and 2, 0.3 m along z
    report = evaluate(predicted, rec)
    np.testing.assert_allclose(report["interior_mean_m_per_recording"], [0.0, 0.3], atol=1e-6)
    np.testing.assert_allclose(report["l1_all_per_recording"], [0.0, 0.6 / 30], atol=1e-7)
    assert report["interior_mean_m"] == pytest.approx(0.15, abs=1e-6)
    assert report["l1_all"] == pytest.approx(l1_all(predicted, rec), abs=1e-9)
    assert report["num_frames_scored"] == 2
    np.testing.assert_array_equal(report["ids"], rec.ids)
    # a prediction given two frames is scored on the frames after them only
    predicted[1, 1] = rec.positions[1, 1] + 5.0
    two = evaluate(predicted, rec, given_frames=2)
    np.testing.assert_allclose(two["interior_mean_m_per_recording"], [0.0, 0.3], atol=1e-6)
    np.testing.assert_allclose(two["l1_all_per_recording"], [0.0, 0.3 / 15], atol=1e-7)
    assert two["num_frames_scored"] == 1
    for bad in (0, 3, 1.5):
        with pytest.raises(InvalidParameter, match="given_frames"):
            evaluate(predicted, rec, given_frames=bad)


def test_frozen_interior_baseline():
    rec = straight_cable_recording(num_recordings=1, num_frames=4, num_markers=6)
    frozen = frozen_interior_prediction(rec)
    np.testing.assert_array_equal(frozen[:, :, [0, 1, 4, 5]], rec.positions[:, :, [0, 1, 4, 5]])
    for frame in range(4):
        np.testing.assert_array_equal(frozen[:, frame, 2:4], rec.positions[:, 0, 2:4])
    # The cable drifts 0.01 m per frame along z: the frozen interior lags by 0.01 t (up to the 1e-3 m noise).
    expected_lag = np.mean([0.01, 0.02, 0.03])
    assert interior_mean_m(frozen, rec) == pytest.approx(expected_lag, abs=3e-3)


def test_mean_end_displacement_baseline_is_exact_for_a_rigid_translation():
    positions = np.zeros((1, 4, 6, 3))
    positions[..., 0] = 0.1 * np.arange(6)
    positions[..., 1] = 0.05 * np.arange(4)[None, :, None]  # the whole cable slides along y
    rec = CableRecordings(positions)
    translated = mean_end_displacement_prediction(rec)
    np.testing.assert_allclose(translated, rec.positions, atol=1e-7)
    assert l1_all(translated, rec) < 1e-7
    assert interior_mean_m(frozen_interior_prediction(rec), rec) == pytest.approx(0.05 * 2, abs=1e-6)
