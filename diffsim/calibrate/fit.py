"""Fitting a cable's physical parameters to recordings: Adam on log-stiffness, log-damping, the
rest curvature, the shape memory and a bending-stiffness profile, with gradients through batched,
checkpointed rod rollouts; saves and resumes.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from diffsim.calibrate.cable import CableParameters, cable_scene, measure_marker_gaps, replay_controls
from diffsim.calibrate.recordings import CableRecordings
from diffsim.core.files import write_json_atomic
from diffsim.errors import InvalidParameter
from diffsim.rod.losses import MarkerLoss

#: Fitted scalars, each through its logarithm (they are positive and span decades).
LOG_PARAMETERS = {
    "bend_stiffness": "edge_bend_stiffness",
    "twist_stiffness": "edge_twist_stiffness",
    "bend_damping": "edge_bend_damping",
    "linear_damping": "rod_linear_damping",
    "air_drag": "rod_air_drag",
}


@dataclass
class FitOptions:
    """Settings of :func:`fit_cable`."""

    #: (Adam steps, frames of each recording rolled out) per stage, in order; None: all frames.
    #: Short rollouts first find the neighbourhood cheaply, full ones then fit what is scored.
    schedule: tuple = ((20, 150), (25, None))
    learning_rate: float = 0.08  #: Adam step on the log-parameters
    curvature_learning_rate: float = 0.01  #: Adam step on the rest curvature [rad per vertex]
    memory_learning_rate: float = 0.03  #: Adam step on the shape memory [-]
    fit_curvature: bool = True  #: also fit the rest curvature, vertex by vertex
    fit_shape_memory: bool = True  #: also fit the share of the first frame's bends kept as rest shape
    fit_bend_profile: bool = True  #: also fit a bending-stiffness factor per edge
    subdivisions: int = 1  #: rod edges per marker gap
    #: how each rollout's interior starts moving (:func:`build_cable_batch`): "ends" follows the
    #: data set's one-frame protocol; "recorded" fits for the two-frame start of DEFORM's evaluation
    initial_velocity: str = "ends"
    #: each recording's gradient is clipped to this multiple of the median recording's norm (None:
    #: no clipping). A cable flung about is chaotic: the few recordings whose adjoints grow over the
    #: horizon would otherwise set the direction of every step. Recordings whose adjoint overflows
    #: (non-finite) are left out of the step.
    recording_clip: float | None = 3.0
    checkpoint_every: int | None = None  #: solver steps per rollout checkpoint (default sqrt(T))
    seed: int = 0


@dataclass
class FitResult:
    parameters: CableParameters
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    best_iteration: int | None = None  #: the iteration whose parameters these are (None: the last)


class _Adam:
    def __init__(self, size: int, rates: np.ndarray):
        self.m = np.zeros(size)
        self.v = np.zeros(size)
        self.t = 0
        self.rates = rates

    def step(self, params: np.ndarray, grad: np.ndarray) -> np.ndarray:
        self.t += 1
        self.m = 0.9 * self.m + 0.1 * grad
        self.v = 0.999 * self.v + 0.001 * grad * grad
        m_hat = self.m / (1 - 0.9**self.t)
        v_hat = self.v / (1 - 0.999**self.t)
        return params - self.rates * m_hat / (np.sqrt(v_hat) + 1e-12)

    def state(self) -> dict:
        return {"m": self.m.tolist(), "v": self.v.tolist(), "t": self.t}

    def load(self, data: dict) -> None:
        self.m, self.v, self.t = np.array(data["m"]), np.array(data["v"]), int(data["t"])


def _slices(vertices: int) -> dict[str, slice]:
    """Where each fitted quantity sits in the fitted vector: the log-parameters, the shape memory,
    the rest curvature (vertices x 2) and the log of the bending-stiffness factor per edge."""
    n_log = len(LOG_PARAMETERS)
    return {"log": slice(0, n_log), "memory": slice(n_log, n_log + 1),
            "curvature": slice(n_log + 1, n_log + 1 + 2 * vertices), "profile": slice(n_log + 1 + 2 * vertices, None)}


def _pack(params: CableParameters, vertices: int) -> np.ndarray:
    logs = [math.log(max(getattr(params, name), 1e-9)) for name in LOG_PARAMETERS]
    curvature = np.zeros((vertices, 2)) if params.rest_curvature is None else np.asarray(params.rest_curvature)
    profile = np.ones(vertices - 1) if params.bend_profile is None else np.asarray(params.bend_profile)
    return np.concatenate([logs, [params.shape_memory], curvature.reshape(-1), np.log(profile)])


def _unpack(vector: np.ndarray, base: CableParameters, vertices: int) -> CableParameters:
    at = _slices(vertices)
    data = base.to_json()
    data.update({name: float(math.exp(value)) for name, value in zip(LOG_PARAMETERS, vector[at["log"]], strict=True)})
    data["shape_memory"] = float(vector[at["memory"]][0])
    data["rest_curvature"] = vector[at["curvature"]].reshape(vertices, 2).tolist()
    data["bend_profile"] = np.exp(vector[at["profile"]]).tolist()
    return CableParameters.from_json(data)


class CableObjective:
    """The fitted loss as a function of the fitted vector: mean absolute error of the interior
    markers [m] over the first ``frames`` frames of every recording, rolled out in one batch from
    its first frame with its ends replayed (the interior starting to move as ``initial_velocity``
    says, see :func:`build_cable_batch`), and its gradient by the adjoint of the rollout; each
    recording's share of that gradient is kept in :attr:`recording_gradients`.

    The vector holds the log-parameters, the shape memory, the shared rest curvature and the log
    of the bending-stiffness factor per edge (see :attr:`slices`).
    """

    def __init__(self, recordings: CableRecordings, params: CableParameters, *, subdivisions: int = 1,
                 device: str | None = None, checkpoint_every: int | None = None, substeps: int | str = "auto",
                 initial_velocity: str = "ends"):
        self.recordings = recordings
        self.base = params
        #: solver steps per frame; "auto" (the fewest stable ones) changes with the stiffness, so the
        #: loss jumps where it does: fix it to compare with finite differences
        self.scene, self.layout = cable_scene(recordings, params, substeps=substeps, subdivisions=subdivisions,
                                              device=device, requires_grad=True, initial_velocity=initial_velocity)
        self.model, self.solver = self.scene.model, self.scene.solver
        self.vertices = int(self.model.rod_vertex_count.numpy()[0])
        self.slices = _slices(self.vertices)
        self.checkpoint_every = checkpoint_every
        self._state0 = self.model.state(requires_grad=True)
        #: each recording's share of the last call's gradient, shape (recordings, vector size)
        self.recording_gradients: np.ndarray | None = None
        self._stage: tuple | None = None

    def initial_vector(self) -> np.ndarray:
        return _pack(self.base, self.vertices)

    def parameters(self, vector: np.ndarray) -> CableParameters:
        return _unpack(vector, self.base, self.vertices)

    def _controls_and_loss(self, frames: int):
        """Controls and loss of a rollout over the first ``frames`` frames (kept for the next call)."""
        if self._stage is None or self._stage[0] != frames:
            rec, layout = self.recordings, self.layout
            self._stage = None  # one stage's controls at a time
            controls = replay_controls(self.model, layout, rec, frames=frames)
            targets = rec.positions[:, 1:frames + 1][:, :, rec.interior_markers]  # (N, F, K, 3)
            loss_fn = MarkerLoss(self.model, layout.marker_vertex[:, rec.interior_markers].reshape(-1),
                                 targets.transpose(1, 0, 2, 3).reshape(frames, -1, 3))
            self._stage = (frames, controls, loss_fn)
        return self._stage[1:]

    def __call__(self, vector: np.ndarray, frames: int) -> tuple[float, np.ndarray, int]:
        """Loss [m], its gradient with respect to ``vector`` and the solver steps per frame."""
        model, layout = self.model, self.layout
        controls, loss_fn = self._controls_and_loss(frames)
        _assign(model, layout, self.parameters(vector), self.recordings.num_recordings)
        rollout = self.scene.rollout(self._state0, controls, checkpoint_every=self.checkpoint_every,
                                     frame_loss=lambda m, s, frame, loss: loss_fn(m, s, frame, loss))
        model.zero_grad()
        loss = rollout.forward()
        rollout.backward()
        self.recording_gradients = self._recording_gradients(vector.size)
        return float(loss), self.recording_gradients.sum(axis=0), rollout.substeps

    def _recording_gradients(self, size: int) -> np.ndarray:
        """Each recording's share of the gradient, shape (recordings, size): every fitted array is
        per edge, vertex or rod, and each rod is one recording."""
        model, layout, at = self.model, self.layout, self.slices
        n = self.recordings.num_recordings
        rows = np.zeros((n, size))
        for i, array_name in enumerate(LOG_PARAMETERS.values()):
            arr = model.array(array_name)
            rows[:, i] = (arr.grad.numpy().astype(np.float64) * arr.numpy()).reshape(n, -1).sum(axis=1)
        # rest curvature of a vertex = shared curvature + memory * its rod's first-frame curvature
        curvature_grad = model.vertex_rest_curvature.grad.numpy().astype(np.float64).reshape(n, -1)
        rows[:, at["memory"]] = np.sum(curvature_grad * layout.first_frame_curvature.reshape(n, -1), axis=1,
                                       keepdims=True)
        rows[:, at["curvature"]] = curvature_grad
        # the profile multiplies bend_stiffness: d/d(log factor_e) = grad_e * stiffness_e
        bend = model.edge_bend_stiffness
        rows[:, at["profile"]] = (bend.grad.numpy().astype(np.float64) * bend.numpy()).reshape(n, -1)
        return rows


def robust_gradient(rows: np.ndarray, clip: float | None) -> tuple[np.ndarray, int, int]:
    """Sum of per-recording gradients ``rows`` (recordings, size), each clipped to ``clip`` times
    the median norm, with non-finite rows left out and the sum scaled back to all recordings.
    Returns the gradient and how many recordings were left out and clipped."""
    finite = np.all(np.isfinite(rows), axis=1)
    if not finite.any():
        raise InvalidParameter("gradient", "non-finite for every recording", "finite values; lower the learning rate")
    kept = rows[finite]
    clipped = 0
    if clip is not None:
        norms = np.linalg.norm(kept, axis=1)
        cap = clip * float(np.median(norms))
        scale = np.where(norms > cap, cap / np.maximum(norms, 1e-300), 1.0)
        clipped = int(np.sum(scale < 1.0))
        kept = kept * scale[:, None]
    return kept.sum(axis=0) * (len(rows) / len(kept)), int(np.sum(~finite)), clipped


def fit_cable(recordings: CableRecordings, initial: CableParameters | None = None, *,
              options: FitOptions | None = None, device: str | None = None, state_path: Path | None = None,
              progress: bool = True) -> FitResult:
    """Fit ``initial`` (default :class:`CableParameters`) to ``recordings`` by gradient descent on
    :class:`CableObjective`; unless ``initial`` gives them, the marker gaps are measured on
    ``recordings`` (:func:`measure_marker_gaps`) and kept in the result. With ``state_path`` the
    fit writes its state there after each step and resumes from it.
    """
    options = options or FitOptions()
    stages = []
    for stage in options.schedule:
        steps, frames = stage
        if not isinstance(steps, int) or steps < 0:
            raise InvalidParameter("schedule iterations", steps, "non-negative integers")
        if frames is not None and (not isinstance(frames, int) or frames < 1):
            raise InvalidParameter("schedule frames", frames, f"None or [1, {recordings.num_frames - 1}]")
        stages.append((steps, recordings.num_frames - 1 if frames is None else min(frames, recordings.num_frames - 1)))
    total = sum(steps for steps, _ in stages)
    clip = options.recording_clip
    if clip is not None and not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0):
        raise InvalidParameter("recording_clip", clip, "None or (0, inf) times the median recording's gradient")
    initial = initial or CableParameters()
    if initial.marker_gaps is None:
        initial = CableParameters.from_json({**initial.to_json(), "marker_gaps": measure_marker_gaps(recordings)})
    objective = CableObjective(recordings, initial, subdivisions=options.subdivisions, device=device,
                               checkpoint_every=options.checkpoint_every, initial_velocity=options.initial_velocity)
    vector = objective.initial_vector()
    at = objective.slices
    rates = np.full(vector.size, options.learning_rate)
    rates[at["memory"]] = options.memory_learning_rate if options.fit_shape_memory else 0.0
    rates[at["curvature"]] = options.curvature_learning_rate if options.fit_curvature else 0.0
    rates[at["profile"]] = options.learning_rate if options.fit_bend_profile else 0.0
    adam = _Adam(vector.size, rates)
    history: list[dict] = []
    # The result is the best iterate of the last stage, not the last one: over the full horizon the
    # gradient of a swinging cable stops being a descent direction once the fit is close (Adam then
    # drifts uphill), so more steps must never make the result worse.
    best: dict = {"loss_m": math.inf, "iteration": None, "vector": None}
    if state_path is not None and Path(state_path).exists():
        saved = json.loads(Path(state_path).read_text())
        saved_start = saved.get("initial_velocity", "ends")
        if len(saved["vector"]) != vector.size:
            warnings.warn(f"{state_path} holds a fit of a different cable layout ({len(saved['vector'])} values, "
                          f"not {vector.size}); starting afresh and overwriting it.", stacklevel=2)
        elif saved_start != options.initial_velocity:
            warnings.warn(f"{state_path} holds a fit with initial_velocity={saved_start!r}, not "
                          f"{options.initial_velocity!r}; starting afresh and overwriting it.", stacklevel=2)
        else:
            vector = np.array(saved["vector"])
            adam.load(saved["adam"])
            history = saved["history"]
            best = saved.get("best", best)
    start = time.perf_counter()
    bar = tqdm(total=total, initial=len(history), desc="fit", disable=not progress)
    frames_of = [frames for steps, frames in stages for _ in range(steps)]
    for iteration in range(len(history), total):
        loss, _, substeps = objective(vector, frames_of[iteration])
        grad, left_out, clipped = robust_gradient(objective.recording_gradients, options.recording_clip)
        if frames_of[iteration] == frames_of[-1] and loss < best["loss_m"]:
            best = {"loss_m": loss, "iteration": iteration, "vector": vector.tolist()}
        history.append({"iteration": iteration, "frames": frames_of[iteration], "loss_m": loss, "substeps": substeps,
                        "recordings_left_out": left_out, "recordings_clipped": clipped,
                        **{name: float(math.exp(vector[i])) for i, name in enumerate(LOG_PARAMETERS)},
                        "shape_memory": float(vector[at["memory"]][0])})
        vector = adam.step(vector, grad)
        # keep the explicit step affordable
        vector[0] = min(vector[0], math.log(0.2))
        vector[at["memory"]] = np.clip(vector[at["memory"]], 0.0, 1.0)
        vector[at["profile"]] = np.clip(vector[at["profile"]], -2.0, 2.0)
        if state_path is not None:  # atomically: a kill mid-write must not lose the fit
            write_json_atomic(Path(state_path), {"vector": vector.tolist(), "adam": adam.state(),
                                                 "history": history, "best": best,
                                                 "initial_velocity": options.initial_velocity})
        bar.set_postfix(loss=f"{loss:.4f}", frames=frames_of[iteration], substeps=substeps)
        bar.update(1)
    bar.close()
    if best["vector"] is not None:
        vector = np.array(best["vector"])
    return FitResult(objective.parameters(vector), history, time.perf_counter() - start, best["iteration"])


def _assign(model, layout, params: CableParameters, num_rods: int) -> None:
    """Write fitted values into a model built by :func:`build_cable_batch` with ``layout``."""
    profile = np.ones(model.edge_count // num_rods) if params.bend_profile is None else np.asarray(params.bend_profile)
    model.edge_bend_stiffness.assign(np.tile(params.bend_stiffness * profile, num_rods).astype(np.float32))
    model.edge_twist_stiffness.fill_(params.twist_stiffness)
    model.edge_bend_damping.fill_(params.bend_damping)
    model.rod_linear_damping.fill_(params.linear_damping)
    model.rod_air_drag.fill_(params.air_drag)
    shared = 0.0 if params.rest_curvature is None else np.tile(np.asarray(params.rest_curvature), (num_rods, 1))
    curvature = shared + params.shape_memory * layout.first_frame_curvature
    model.vertex_rest_curvature.assign(curvature.astype(np.float32))
