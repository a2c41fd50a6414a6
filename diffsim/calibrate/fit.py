"""Fitting a cable's physical parameters to recordings, on the calibration engine: Adam on
log-stiffness, log-damping, the rest curvature, the shape memory and a bending-stiffness profile,
with gradients through batched, checkpointed rod rollouts; saves and resumes.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffsim.calibrate.cable import CableParameters, cable_scene, measure_marker_gaps, replay_controls
from diffsim.calibrate.engine import Family, FitSettings, Parameter
from diffsim.calibrate.engine import fit as engine_fit
from diffsim.calibrate.recordings import CableRecordings
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
    #: horizon would otherwise set the direction of every step. Recordings whose gradient is not
    #: finite (a diverged rollout, or float32 overflow without ``rescale_adjoint``) are left out.
    recording_clip: float | None = 3.0
    #: carry the rollout's adjoint in powers of two and sum gradients in float64, so that no
    #: recording's gradient overflows float32 (see :class:`~diffsim.core.rollout.Rollout`)
    rescale_adjoint: bool = True
    checkpoint_every: int | None = None  #: solver steps per rollout checkpoint (default sqrt(T))
    seed: int = 0


@dataclass
class FitResult:
    parameters: CableParameters
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    best_iteration: int | None = None  #: the iteration whose parameters these are (None: the last)


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
                 initial_velocity: str = "ends", rescale_adjoint: bool = True):
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
        #: carry the adjoint in powers of two (see :class:`~diffsim.core.rollout.Rollout`); False
        #: keeps plain float32, where a recording whose adjoint overflows is left out of the step
        self.rescale_adjoint = rescale_adjoint
        #: the largest power of two the last call's adjoint needed (0: it fitted float32)
        self.adjoint_exponent = 0
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
        # a stiffer cable needs more substeps: the scene's cached stability limit must follow
        self.scene.refresh_limits()
        # a cable flung about is chaotic: over 499 frames its adjoint outgrows float32, so the
        # rollout carries it in powers of two and sums the gradients in float64
        rollout = self.scene.rollout(self._state0, controls, checkpoint_every=self.checkpoint_every,
                                     frame_loss=lambda m, s, frame, loss: loss_fn(m, s, frame, loss),
                                     rescale_adjoint=self.rescale_adjoint)
        model.zero_grad()
        loss = rollout.forward()
        rollout.backward()
        self.adjoint_exponent = rollout.adjoint_exponent
        self.recording_gradients = self._recording_gradients(vector.size, rollout.gradient)
        return float(loss), self.recording_gradients.sum(axis=0), rollout.substeps

    def _recording_gradients(self, size: int, gradient) -> np.ndarray:
        """Each recording's share of the gradient, shape (recordings, size), from ``gradient(array)``
        (float64): every fitted array is per edge, vertex or rod, and each rod is one recording."""
        model, layout, at = self.model, self.layout, self.slices
        n = self.recordings.num_recordings
        rows = np.zeros((n, size))
        for i, array_name in enumerate(LOG_PARAMETERS.values()):
            arr = model.array(array_name)
            rows[:, i] = (gradient(arr) * arr.numpy()).reshape(n, -1).sum(axis=1)
        # rest curvature of a vertex = shared curvature + memory * its rod's first-frame curvature
        curvature_grad = gradient(model.vertex_rest_curvature).reshape(n, -1)
        rows[:, at["memory"]] = np.sum(curvature_grad * layout.first_frame_curvature.reshape(n, -1), axis=1,
                                       keepdims=True)
        rows[:, at["curvature"]] = curvature_grad
        # the profile multiplies bend_stiffness: d/d(log factor_e) = grad_e * stiffness_e
        bend = model.edge_bend_stiffness
        rows[:, at["profile"]] = (gradient(bend) * bend.numpy()).reshape(n, -1)
        return rows


class CableFamily(Family):
    """The cable fit as a family of :mod:`diffsim.calibrate.engine`: its parameters are the entries
    of :class:`CableObjective`'s vector (the log-fitted scalars, the shape memory, the rest
    curvature per vertex and the bending-stiffness factor per edge), each stage rolls out its own
    number of frames, and Adam's moments carry over from one stage to the next.

    The learning rates of :class:`FitOptions` become the parameters' scales (a linear parameter's
    step is the learning rate times its scale); the clamps of the explicit step (bending stiffness
    at most 0.2 N m^2, shape memory in [0, 1], factors in [e^-2, e^2]) become bounds.
    """

    name = "rod"
    loss_unit = " m"
    fresh_adam_per_stage = False  # one Adam over the whole schedule
    stages_share_loss = False  # a short stage scores fewer frames: the best comes from the last

    def __init__(self, objective: CableObjective, options: FitOptions):
        self.objective, self.options = objective, options
        vector, at = objective.initial_vector(), objective.slices
        base = options.learning_rate
        parameters = []
        for i, name in enumerate(LOG_PARAMETERS):
            upper = 0.2 if name == "bend_stiffness" else 1e6  # the explicit step's affordable stiffness
            parameters.append(Parameter(name, min(math.exp(vector[i]), upper), 1e-12, upper))
        if options.fit_shape_memory:
            parameters.append(Parameter("shape_memory", float(np.clip(vector[at["memory"]][0], 0.0, 1.0)), 0.0, 1.0,
                                        log=False, scale=options.memory_learning_rate / base))
        if options.fit_curvature:
            for k, value in enumerate(vector[at["curvature"]]):
                parameters.append(Parameter(f"curvature_{k // 2}_{'ab'[k % 2]}", float(value), -1e3, 1e3, "rad",
                                            log=False, scale=options.curvature_learning_rate / base))
        if options.fit_bend_profile:
            for e, value in enumerate(vector[at["profile"]]):
                parameters.append(Parameter(f"bend_factor_{e}", float(math.exp(np.clip(value, -2.0, 2.0))),
                                            math.exp(-2.0), math.exp(2.0)))
        self.parameters = parameters
        # recordings are clipped by their gradient's norm in the objective's own coordinates (a
        # linear parameter's fitted coordinate is its value over its scale)
        self.clip_weights = np.array([1.0 if p.log else 1.0 / p.scale for p in parameters])
        self._index = self._vector_index()
        self._frames = objective.recordings.num_frames - 1
        self.calls: list[dict] = []  # per evaluation: frames, substeps, recordings left out

    def _vector_index(self) -> list[tuple[int, bool]]:
        """Per parameter: its entry in the objective's vector and whether the vector holds its log."""
        at, out = self.objective.slices, []
        for p in self.parameters:
            if p.name in LOG_PARAMETERS:
                out.append((list(LOG_PARAMETERS).index(p.name), True))
            elif p.name == "shape_memory":
                out.append((at["memory"].start, False))
            elif p.name.startswith("curvature_"):
                _, vertex, axis = p.name.split("_")
                out.append((at["curvature"].start + 2 * int(vertex) + "ab".index(axis), False))
            else:
                out.append((at["profile"].start + int(p.name.rsplit("_", 1)[1]), True))
        return out

    def vector(self, values: dict) -> np.ndarray:
        vector = self.objective.initial_vector()
        for p, (i, log) in zip(self.parameters, self._index, strict=True):
            vector[i] = math.log(values[p.name]) if log else values[p.name]
        return vector

    def begin_stage(self, options: dict) -> None:
        self._frames = options.get("frames", self.objective.recordings.num_frames - 1)

    def loss_gradients(self, values, recordings):
        vector = self.vector(values)
        loss, _, substeps = self.objective(vector, self._frames)
        rows = self.objective.recording_gradients  # per recording, in the vector's coordinates
        grads = np.empty((rows.shape[0], len(self.parameters)))
        for j, (p, (i, log)) in enumerate(zip(self.parameters, self._index, strict=True)):
            grads[:, j] = rows[:, i] / values[p.name] if log else rows[:, i]  # d/d value
        self.calls.append({"frames": self._frames, "substeps": substeps,
                           "recordings_left_out": int(np.sum(~np.all(np.isfinite(rows), axis=1))),
                           "adjoint_exponent": self.objective.adjoint_exponent})
        # the rollout's loss is the mean marker error over the whole batch; it is not split per
        # recording, so every recording reports that mean (the engine only averages them)
        return np.full(rows.shape[0], loss), grads

    def losses(self, values, recordings) -> np.ndarray:
        return self.loss_gradients(values, recordings)[0]


def fit_cable(recordings: CableRecordings, initial: CableParameters | None = None, *,
              options: FitOptions | None = None, device: str | None = None, state_path: Path | None = None,
              progress: bool = True) -> FitResult:
    """Fit ``initial`` (default :class:`CableParameters`) to ``recordings`` with the calibration
    engine (:class:`CableFamily`: Adam through the adjoint of :class:`CableObjective`); unless
    ``initial`` gives them, the marker gaps are measured on ``recordings``
    (:func:`measure_marker_gaps`) and kept in the result. With ``state_path`` the fit writes its
    state there after each step and resumes from it.
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
    clip = options.recording_clip
    if clip is not None and not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0):
        raise InvalidParameter("recording_clip", clip, "None or (0, inf) times the median recording's gradient")
    if not stages or sum(steps for steps, _ in stages) == 0:
        raise InvalidParameter("schedule", options.schedule, "stages with at least one iteration in all")
    initial = initial or CableParameters()
    if initial.marker_gaps is None:
        initial = CableParameters.from_json({**initial.to_json(), "marker_gaps": measure_marker_gaps(recordings)})
    objective = CableObjective(recordings, initial, subdivisions=options.subdivisions, device=device,
                               checkpoint_every=options.checkpoint_every, initial_velocity=options.initial_velocity,
                               rescale_adjoint=options.rescale_adjoint)
    family = CableFamily(objective, options)
    family.name = f"rod (initial_velocity={options.initial_velocity!r})"
    names = tuple(p.name for p in family.parameters)
    family.warmup = tuple((steps, names, {"frames": frames}) for steps, frames in stages[:-1])
    family.final_stage_options = {"frames": stages[-1][1]}
    if state_path is not None and Path(state_path).exists():
        saved = json.loads(Path(state_path).read_text())
        if saved.get("family") != family.name or saved.get("parameters") != list(names):
            warnings.warn(f"{state_path} holds a {saved.get('family', 'different')} fit, not a {family.name} fit of "
                          f"this cable layout ({len(names)} values); starting afresh and overwriting it.", stacklevel=2)
            Path(state_path).unlink()
    settings = FitSettings(iterations=stages[-1][0], learning_rate=options.learning_rate,
                           clip=clip if clip is not None else 1e300)
    result = engine_fit(family, recordings, settings=settings, state_path=state_path, progress=progress)
    history = []
    for record, call in zip(result.history, [*([{}] * (len(result.history) - len(family.calls))), *family.calls],
                            strict=True):
        values = record["values"]
        history.append({"iteration": record["iteration"], "frames": call.get("frames"), "loss_m": record["loss"],
                        "substeps": call.get("substeps"), "recordings_left_out": call.get("recordings_left_out", 0),
                        "adjoint_exponent": call.get("adjoint_exponent", 0),
                        "recordings_clipped": record["recordings_clipped"] - call.get("recordings_left_out", 0),
                        **{name: values[name] for name in LOG_PARAMETERS},
                        "shape_memory": values.get("shape_memory", initial.shape_memory)})
    best = result.best_iteration if any(h["iteration"] == result.best_iteration for h in history) else None
    return FitResult(objective.parameters(family.vector(result.values)), history, result.seconds, best)


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
