"""Motion-capture recordings of real cables: load, validate, save, cut, and score predictions against them.
Pure NumPy; the DEFORM data set (roahmlab/DEFORM, folder data_set/) is read as .npz or through a restricted unpickler.

A recording is an array ``positions[t, m]`` of marker positions [m] at frame ``t`` (``fps`` frames per second).
Markers ``0, 1, M-2, M-1`` sit on the two gripper-held ends and are the inputs a model is given; the interior
markers ``2 .. M-3`` are what it must predict. The two metrics follow the data set's README: a model is rolled
out from frame 0 with the end markers prescribed, and is scored on frames ``1 .. T-1`` (frame 0 is given).
"""

from __future__ import annotations

import io
import math
import pickle
import re
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass
from pathlib import Path

import numpy as np

from diffsim.errors import ConfigError, InvalidParameter

__all__ = [
    "DEFAULT_FPS",
    "CableRecordings",
    "evaluate",
    "frozen_interior_prediction",
    "interior_mean_m",
    "l1_all",
    "load_recordings",
    "mean_end_displacement_prediction",
    "save_recordings",
]

DEFAULT_FPS = 100.0
"""Frame rate [Hz] assumed where a file stores none: DEFORM's recordings and its simulator use dt = 0.01 s."""

MIN_MARKERS = 5  # four end markers plus at least one interior marker to predict
PICKLE_SUFFIXES = (".pkl", ".pickle")


@dataclass
class CableRecordings:
    """A batch of equally long motion-capture recordings of one cable.

    Args:
        positions: marker positions [m], shape (N recordings, T frames, M markers, 3), stored as float32.
        fps: frame rate [Hz], > 0.
        ids: one integer per recording (the original file numbers), shape (N,); default ``arange(N)``.
        name: a label for reports, e.g. ``"DLO1_eval"``.
    """

    positions: np.ndarray
    _: KW_ONLY
    fps: float = DEFAULT_FPS
    ids: np.ndarray | None = None
    name: str = ""

    def __post_init__(self):
        try:
            positions = np.asarray(self.positions, dtype=np.float32)
        except (TypeError, ValueError) as error:
            raise InvalidParameter(
                "positions", f"an object of type {type(self.positions).__name__}",
                "a numeric array of shape (N, T, M, 3)", hint=f"NumPy could not convert it: {error}.",
            ) from None
        shape = positions.shape
        if positions.ndim != 4 or shape[-1] != 3:
            raise InvalidParameter(
                "positions.shape", shape, "(N recordings, T frames, M markers, 3)",
                hint="Add a leading axis for a single recording of shape (T, M, 3).",
            )
        if shape[0] < 1:
            raise InvalidParameter("number of recordings", shape[0], ">= 1")
        if shape[1] < 2:
            raise InvalidParameter("number of frames", shape[1], ">= 2 (frame 0 is given, later frames are scored)")
        if shape[2] < MIN_MARKERS:
            raise InvalidParameter(
                "number of markers", shape[2], f">= {MIN_MARKERS}",
                hint="Markers 0, 1, M-2 and M-1 are the gripper-held ends; at least one interior marker is needed.",
            )
        finite = np.isfinite(positions)
        if not finite.all():
            recording, frame, marker, _axis = (int(i) for i in np.argwhere(~finite)[0])
            raise InvalidParameter(
                "positions", f"a non-finite value at recording {recording}, frame {frame}, marker {marker}",
                "finite coordinates [m]",
                hint="Fill or drop the frames where the motion capture lost the marker.",
            )
        fps = float(self.fps)
        if not (math.isfinite(fps) and fps > 0):
            raise InvalidParameter("fps", fps, "(0, inf) Hz")
        if self.ids is None:
            ids = np.arange(shape[0], dtype=np.int64)
        else:
            ids = np.asarray(self.ids)
            if ids.shape != (shape[0],) or not np.issubdtype(ids.dtype, np.integer):
                raise InvalidParameter(
                    "ids", f"an array of dtype {ids.dtype} and shape {ids.shape}",
                    f"integers of shape ({shape[0]},), one per recording",
                )
            ids = ids.astype(np.int64)
        # Own the data: a caller mutating its array afterwards must not change a validated recording.
        self.positions = positions.copy() if positions is self.positions else positions
        self.fps = fps
        self.ids = ids
        self.name = str(self.name)

    @property
    def num_recordings(self) -> int:
        return self.positions.shape[0]

    @property
    def num_frames(self) -> int:
        return self.positions.shape[1]

    @property
    def num_markers(self) -> int:
        return self.positions.shape[2]

    @property
    def duration(self) -> float:
        """Time from the first to the last frame [s]."""
        return (self.num_frames - 1) / self.fps

    @property
    def end_markers(self) -> tuple[int, int, int, int]:
        """Indices of the four gripper-held markers (the prescribed inputs): 0, 1, M-2, M-1."""
        m = self.num_markers
        return (0, 1, m - 2, m - 1)

    @property
    def interior_markers(self) -> np.ndarray:
        """Indices of the markers a model must predict: 2 .. M-3."""
        return np.arange(2, self.num_markers - 2)

    def __len__(self) -> int:
        return self.num_recordings

    def subset(self, indices) -> CableRecordings:
        """A copy holding the recordings at ``indices`` (positions in this batch, not ids; or a boolean mask)."""
        selection = np.asarray(indices)
        if selection.dtype == bool:
            if selection.shape != (self.num_recordings,):
                raise InvalidParameter(
                    "indices", f"a boolean mask of shape {selection.shape}", f"a mask of shape ({self.num_recordings},)"
                )
            selection = np.flatnonzero(selection)
        selection = np.atleast_1d(selection)
        if selection.size == 0 or not np.issubdtype(selection.dtype, np.integer) or selection.ndim != 1:
            raise InvalidParameter("indices", indices, "a non-empty sequence of integer positions or a boolean mask")
        out_of_range = (selection < -self.num_recordings) | (selection >= self.num_recordings)
        if out_of_range.any():
            raise InvalidParameter(
                "indices", int(selection[out_of_range][0]), f"[-{self.num_recordings}, {self.num_recordings})"
            )
        return CableRecordings(self.positions[selection], fps=self.fps, ids=self.ids[selection], name=self.name)

    def frames(self, start: int = 0, stop: int | None = None) -> CableRecordings:
        """A copy cut in time to frames ``start .. stop-1`` (Python slice rules; the new frame 0 is ``start``)."""
        kept = range(self.num_frames)[slice(start, stop)]
        if len(kept) < 2:
            raise InvalidParameter(
                "frames(start, stop)", (start, stop), f"a range holding >= 2 of the {self.num_frames} frames"
            )
        # __post_init__ copies the view, so the result shares no memory with this batch.
        positions = self.positions[:, kept.start : kept.stop]
        return CableRecordings(positions, fps=self.fps, ids=self.ids.copy(), name=self.name)


# ---------------------------------------------------------------------------------------------------------------------
# Loading and saving


def load_recordings(
    path, *, fps: float | None = None, truncate: bool = False, name: str | None = None
) -> CableRecordings:
    """Load cable recordings from an ``.npz`` file, a folder of DEFORM pickles, or one DEFORM pickle.

    Formats:

    - ``.npz`` (as written by :func:`save_recordings`): ``positions`` (N, T, M, 3) [m]; optional ``fps`` [Hz]
      (default 100), ``ids`` (default ``arange(N)``) and ``name``. Read without pickle.
    - one DEFORM pickle (``.pkl`` / ``.pickle``, e.g. ``data_set/DLO1/eval/100.pkl``): one recording. DEFORM's
      training code (``train_DEFORM.py``) indexes the unpickled object by frame and transposes each frame from
      (3, M) to (M, 3), so a payload convertible to a float array of shape (T, 3, M) is read that way; a payload of
      shape (T, M, 3) is accepted too (unambiguous, since M >= 5). The payload may be a nested list/tuple of numbers
      or a dict holding it under ``"positions"`` or as its only value.
    - a folder of such pickles: one recording per file, ordered by the last integer in each file name (the id);
      names without an integer sort by name and get ids ``0 .. N-1``.

    Pickles are read with a restricted unpickler that refuses every Python global, so a file can hold only
    lists, tuples, dicts with string keys, ints and floats. That excludes NumPy arrays and pandas objects (their
    unpickling imports NumPy/pandas functions). To read such a file you trust, convert it once outside diffsim::

        import pickle, numpy as np
        from diffsim.calibrate import CableRecordings, save_recordings
        frames = np.asarray(pickle.load(open("100.pkl", "rb")), dtype=np.float32)  # (T, 3, M): trusted files only
        save_recordings("100.npz", CableRecordings(frames.transpose(0, 2, 1)[None], ids=[100]))

    Args:
        path: an ``.npz`` file, a pickle file, or a folder of pickle files.
        fps: frame rate [Hz] for files that store none (pickles; ``.npz`` without ``fps``); default 100 Hz.
            An ``.npz`` that stores a different rate is refused rather than silently overridden.
        truncate: in a folder of recordings of different lengths, cut all to the shortest instead of raising.
        name: label of the result; default the file stem, or ``parent/folder`` for a folder.

    Raises:
        ConfigError: the path does not exist, holds no recordings, the files disagree in marker count (or in length
            without ``truncate``), or a pickle holds anything but nested lists/dicts of numbers.
        InvalidParameter: the positions fail :class:`CableRecordings` validation (shape, NaN, fps).
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(
            f"No cable recordings at {path}: the path does not exist. Pass an .npz file, a DEFORM .pkl file, "
            "or a folder of .pkl files (e.g. DEFORM's data_set/DLO1/eval)."
        )
    if path.is_dir():
        return _load_pickle_folder(path, fps=fps, truncate=truncate, name=name)
    if path.suffix == ".npz":
        return _load_npz(path, fps=fps, name=name)
    if path.suffix in PICKLE_SUFFIXES:
        frames = _read_pickle_frames(path)
        return CableRecordings(
            frames[None],
            fps=DEFAULT_FPS if fps is None else fps,
            ids=[_file_number(path) or 0],
            name=path.stem if name is None else name,
        )
    raise ConfigError(
        f"Cannot read cable recordings from {path}: the suffix {path.suffix!r} is neither .npz nor one of "
        f"{', '.join(PICKLE_SUFFIXES)}. Convert the file with save_recordings, or pass its folder."
    )


def save_recordings(path, recordings: CableRecordings) -> Path:
    """Write ``recordings`` to an ``.npz`` file (``positions`` float32 [m], ``fps`` [Hz], ``ids``, ``name``).

    The file reads back with :func:`load_recordings`, or with ``np.load`` (no pickle needed). Parent folders are
    created. Returns the path written (``.npz`` is appended when missing, as ``np.savez`` does).
    """
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        positions=recordings.positions.astype(np.float32),
        fps=np.float64(recordings.fps),
        ids=recordings.ids.astype(np.int64),
        name=np.str_(recordings.name),
    )
    return path


def _load_npz(path: Path, *, fps: float | None, name: str | None) -> CableRecordings:
    try:
        with np.load(path, allow_pickle=False) as archive:
            contents = {key: archive[key] for key in archive.files}
    except ValueError as error:
        # allow_pickle=False makes NumPy refuse object arrays: such an .npz is not in this format.
        raise ConfigError(f"Cannot read {path} as cable recordings without pickle: {error}.") from None
    if "positions" not in contents:
        raise ConfigError(
            f"{path} holds no 'positions' array (it has {sorted(contents) or 'nothing'}); cable recordings store "
            "marker positions [m] of shape (N, T, M, 3) under 'positions'."
        )
    stored_fps = float(contents["fps"]) if "fps" in contents else None
    if stored_fps is not None and fps is not None and not math.isclose(stored_fps, fps, rel_tol=1e-6):
        raise ConfigError(
            f"{path} stores fps = {stored_fps} Hz but fps = {fps} Hz was passed; drop the argument to use the "
            "file's rate, or rewrite the file with save_recordings."
        )
    resolved_fps = stored_fps if stored_fps is not None else (DEFAULT_FPS if fps is None else fps)
    if name is None:
        name = str(contents["name"]) if "name" in contents else path.stem
    return CableRecordings(contents["positions"], fps=resolved_fps, ids=contents.get("ids"), name=name)


def _load_pickle_folder(folder: Path, *, fps: float | None, truncate: bool, name: str | None) -> CableRecordings:
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES]
    if not files:
        raise ConfigError(
            f"The folder {folder} holds no {' or '.join(PICKLE_SUFFIXES)} files; point load_recordings at a folder "
            "of DEFORM recordings such as data_set/DLO1/eval, or at an .npz file."
        )
    numbers = [_file_number(p) for p in files]
    if all(number is not None for number in numbers):
        order = sorted(range(len(files)), key=lambda i: (numbers[i], files[i].name))
        ids = [numbers[i] for i in order]
    else:
        order = sorted(range(len(files)), key=lambda i: files[i].name)
        ids = list(range(len(files)))
    files = [files[i] for i in order]
    recordings = [_read_pickle_frames(p) for p in files]

    marker_counts = {r.shape[1] for r in recordings}
    if len(marker_counts) > 1:
        listing = ", ".join(f"{p.name}: {r.shape[1]}" for p, r in zip(files, recordings, strict=True))
        raise ConfigError(
            f"The recordings in {folder} have different marker counts ({listing}); keep one cable per folder."
        )
    frame_counts = [r.shape[0] for r in recordings]
    shortest = min(frame_counts)
    if max(frame_counts) != shortest:
        if not truncate:
            listing = ", ".join(f"{p.name}: {n}" for p, n in zip(files, frame_counts, strict=True))
            raise ConfigError(
                f"The recordings in {folder} have different lengths in frames ({listing}). Pass truncate=True "
                f"to cut all to the shortest ({shortest} frames), or remove the odd files."
            )
        recordings = [r[:shortest] for r in recordings]
    if name is None:
        name = f"{folder.parent.name}/{folder.name}" if folder.parent.name else folder.name
    return CableRecordings(
        np.stack(recordings), fps=DEFAULT_FPS if fps is None else fps, ids=np.asarray(ids, dtype=np.int64), name=name
    )


def _file_number(path: Path) -> int | None:
    """The last integer in the file's stem (``DLO1_100.pkl`` -> 100), or None."""
    found = re.findall(r"\d+", path.stem)
    return int(found[-1]) if found else None


# ---------------------------------------------------------------------------------------------------------------------
# Restricted unpickling


class _NumbersOnlyUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global, so loading runs no code from the file.

    Every way a pickle can call something (REDUCE, BUILD, NEWOBJ, INST, OBJ, the copyreg extension codes) first
    obtains the callable through ``find_class``; refusing it here leaves only the built-in containers and scalars.
    """

    def __init__(self, file, path: Path):
        super().__init__(file)
        self._path = path

    def find_class(self, module, name):
        hint = ""
        if module.split(".")[0] in ("numpy", "pandas", "torch"):
            hint = (
                f" It stores a {module.split('.')[0]} object; only nested lists/dicts of numbers are read here. "
                "If you trust the file, convert it once to .npz as shown in load_recordings' docstring."
            )
        raise ConfigError(
            f"{self._path} contains a Python object other than nested lists/dicts of numbers (a reference to "
            f"{module}.{name}), so it is refused for safety: unpickling it could run arbitrary code.{hint}"
        )

    def persistent_load(self, pid):
        raise ConfigError(
            f"{self._path} contains a persistent object reference, so it is refused for safety; cable recordings "
            "must be nested lists/dicts of numbers."
        )


def _read_pickle_frames(path: Path) -> np.ndarray:
    """Unpickle one DEFORM recording safely and return its positions as float32 (T, M, 3) [m]."""
    try:
        payload = _NumbersOnlyUnpickler(io.BytesIO(path.read_bytes()), path).load()
    except ConfigError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError) as error:
        raise ConfigError(f"{path} is not a readable pickle ({type(error).__name__}: {error}).") from None
    _check_numbers_only(payload, path)

    if isinstance(payload, dict):
        if "positions" in payload:
            payload = payload["positions"]
        elif len(payload) == 1:
            payload = next(iter(payload.values()))
        else:
            raise ConfigError(
                f"{path} holds a dict with keys {sorted(payload)}; put the marker positions under 'positions' "
                "or store the nested list alone."
            )
    try:
        frames = np.asarray(payload, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{path} does not hold a rectangular nested list of numbers (frames of equal size); expected shape "
            "(T frames, 3, M markers) as in DEFORM's data_set, or (T, M, 3)."
        ) from None
    if frames.ndim == 3 and frames.shape[1] == 3 and frames.shape[2] != 3:
        frames = frames.transpose(0, 2, 1)  # DEFORM stores each frame as (xyz, marker)
    elif not (frames.ndim == 3 and frames.shape[2] == 3):
        raise ConfigError(
            f"{path} holds positions of shape {frames.shape}; expected (T frames, 3, M markers) as in DEFORM's "
            "data_set, or (T, M, 3)."
        )
    return frames.astype(np.float32)


def _check_numbers_only(payload, path: Path) -> None:
    """Refuse anything but lists, tuples, str-keyed dicts, ints and floats, and reference cycles.

    Iterative (deeply nested lists must not hit the recursion limit) and visits each container once, so shared
    sub-lists cost nothing extra; a container reached again while still open is a cycle.
    """
    open_containers: set[int] = set()
    finished: set[int] = set()
    stack: list[tuple[object, bool]] = [(payload, False)]
    while stack:
        item, leaving = stack.pop()
        if leaving:
            open_containers.discard(id(item))
            finished.add(id(item))
            continue
        kind = type(item)
        if kind is int or kind is float:
            continue
        if kind not in (list, tuple, dict):
            raise ConfigError(
                f"{path} contains a {kind.__name__} value; cable recordings must hold only nested lists, tuples "
                "and string-keyed dicts of ints and floats, so the file is refused."
            )
        if id(item) in finished:
            continue
        if id(item) in open_containers:
            raise ConfigError(f"{path} contains a list or dict that holds itself; the file is refused.")
        open_containers.add(id(item))
        stack.append((item, True))
        if kind is dict:
            for key, value in item.items():
                if type(key) is not str:
                    raise ConfigError(
                        f"{path} contains a dict key of type {type(key).__name__}; only string keys are accepted."
                    )
                stack.append((value, False))
        else:
            stack.extend((element, False) for element in item)


# ---------------------------------------------------------------------------------------------------------------------
# Metrics and baselines


def _batched_pair(predicted, recorded) -> tuple[np.ndarray, np.ndarray]:
    """Both as float64 (N, T, M, 3), checked to match; accepts (T, M, 3) arrays and CableRecordings."""
    arrays = []
    for label, value in (("predicted", predicted), ("recorded", recorded)):
        array = np.asarray(value.positions if isinstance(value, CableRecordings) else value, dtype=np.float64)
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[-1] != 3 or array.shape[1] < 2:
            raise InvalidParameter(
                f"{label}.shape", array.shape, "(N, T, M, 3) or (T, M, 3) with T >= 2 frames"
            )
        arrays.append(array)
    if arrays[0].shape != arrays[1].shape:
        raise InvalidParameter(
            "predicted.shape", arrays[0].shape, f"the recorded shape {arrays[1].shape}",
            hint="Predict every frame of every recording, frame 0 included.",
        )
    return arrays[0], arrays[1]


def _interior_indices(interior, num_markers: int) -> np.ndarray:
    if interior is None:
        return np.arange(2, num_markers - 2)
    indices = np.atleast_1d(np.asarray(interior))
    if indices.size == 0 or not np.issubdtype(indices.dtype, np.integer):
        raise InvalidParameter("interior", interior, "a non-empty sequence of marker indices")
    if ((indices < -num_markers) | (indices >= num_markers)).any():
        raise InvalidParameter("interior", interior, f"marker indices in [-{num_markers}, {num_markers})")
    return indices


def _l1_per_recording(predicted: np.ndarray, recorded: np.ndarray, first: int = 1) -> np.ndarray:
    return np.abs(predicted[:, first:] - recorded[:, first:]).mean(axis=(1, 2, 3))


def _interior_distance_per_recording(predicted: np.ndarray, recorded: np.ndarray, interior: np.ndarray,
                                     first: int = 1) -> np.ndarray:
    distance = np.linalg.norm(predicted[:, first:, interior] - recorded[:, first:, interior], axis=-1)
    return distance.mean(axis=(1, 2))


def l1_all(predicted, recorded) -> float:
    """Mean absolute coordinate error [m] over all markers (ends included) and frames 1..T-1.

    The metric of DEFORM's released evaluation curves. Frame 0 is excluded because a rollout starts from it.

    Args:
        predicted: positions [m], (N, T, M, 3) or (T, M, 3), or CableRecordings.
        recorded: the recording, same shape, or CableRecordings.
    """
    predicted, recorded = _batched_pair(predicted, recorded)
    return float(_l1_per_recording(predicted, recorded).mean())


def interior_mean_m(predicted, recorded, interior: Sequence[int] | None = None) -> float:
    """Mean Euclidean distance [m] between predicted and recorded interior markers over frames 1..T-1.

    Args:
        predicted: positions [m], (N, T, M, 3) or (T, M, 3), or CableRecordings.
        recorded: the recording, same shape, or CableRecordings.
        interior: marker indices to score; default 2 .. M-3 (all but the four gripper-held markers).
    """
    predicted, recorded = _batched_pair(predicted, recorded)
    indices = _interior_indices(interior, recorded.shape[2])
    # Every recording scores the same number of distances, so the mean of per-recording means is the overall mean.
    return float(_interior_distance_per_recording(predicted, recorded, indices).mean())


def evaluate(predicted, recordings: CableRecordings, *, given_frames: int = 1) -> dict:
    """Both metrics of a prediction of ``recordings``, overall and per recording.

    Args:
        predicted: positions [m] of shape (N, T, M, 3) matching ``recordings.positions``.
        recordings: the recorded cable motion.
        given_frames: leading frames of every marker the prediction was given, which are not
            scored: 1 (the data set's protocol: frame 0) or more (2 for a start from two frames,
            as DEFORM's own evaluation starts).

    Returns:
        ``{"l1_all": float [m], "interior_mean_m": float [m], "l1_all_per_recording": (N,) [m],
        "interior_mean_m_per_recording": (N,) [m], "ids": (N,), "num_recordings": N,
        "num_frames_scored": T - given_frames}``. The overall values are the means of the
        per-recording ones (all recordings have the same length).
    """
    predicted, recorded = _batched_pair(predicted, recordings)
    if not isinstance(given_frames, int) or not 1 <= given_frames < recorded.shape[1]:
        raise InvalidParameter("given_frames", given_frames, f"integers in [1, {recorded.shape[1] - 1}]")
    interior = recordings.interior_markers
    l1_per_recording = _l1_per_recording(predicted, recorded, given_frames)
    interior_per_recording = _interior_distance_per_recording(predicted, recorded, interior, given_frames)
    return {
        "l1_all": float(l1_per_recording.mean()),
        "interior_mean_m": float(interior_per_recording.mean()),
        "l1_all_per_recording": l1_per_recording,
        "interior_mean_m_per_recording": interior_per_recording,
        "ids": recordings.ids.copy(),
        "num_recordings": recordings.num_recordings,
        "num_frames_scored": recordings.num_frames - given_frames,
    }


def frozen_interior_prediction(recordings: CableRecordings) -> np.ndarray:
    """Baseline: interior markers stay where they are at frame 0; end markers follow the recording.

    Returns positions [m], float32 (N, T, M, 3).
    """
    predicted = recordings.positions.copy()
    interior = recordings.interior_markers
    predicted[:, :, interior] = recordings.positions[:, :1, interior]
    return predicted


def mean_end_displacement_prediction(recordings: CableRecordings) -> np.ndarray:
    """Baseline: interior markers translate rigidly with the mean displacement of the four end markers from frame 0.

    Returns positions [m], float32 (N, T, M, 3); end markers are as recorded.
    """
    positions = recordings.positions.astype(np.float64)
    ends = list(recordings.end_markers)
    interior = recordings.interior_markers
    end_displacement = (positions[:, :, ends] - positions[:, :1, ends]).mean(axis=2)  # (N, T, 3)
    predicted = positions.copy()
    predicted[:, :, interior] = positions[:, :1, interior] + end_displacement[:, :, None, :]
    return predicted.astype(np.float32)
