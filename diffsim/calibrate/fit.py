"""Fitting a cable's physical parameters to recordings: Adam on log-stiffness, log-damping and the
rest curvature, with gradients through batched, checkpointed rod rollouts; saves and resumes.
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

from diffsim.calibrate.cable import CableParameters, build_cable_batch, replay_controls
from diffsim.calibrate.recordings import CableRecordings
from diffsim.core.rollout import Rollout
from diffsim.errors import InvalidParameter
from diffsim.rod import RodSolver
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
    fit_curvature: bool = True  #: also fit the rest curvature, vertex by vertex
    fit_bend_profile: bool = True  #: also fit a bending-stiffness factor per edge
    subdivisions: int = 1  #: rod edges per marker gap
    checkpoint_every: int | None = None  #: solver steps per rollout checkpoint (default sqrt(T))
    seed: int = 0


@dataclass
class FitResult:
    parameters: CableParameters
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


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


# The fitted vector: log-parameters, then the rest curvature (vertices x 2), then the log of the
# bending-stiffness factor per edge.
def _pack(params: CableParameters, vertices: int) -> np.ndarray:
    logs = [math.log(max(getattr(params, name), 1e-9)) for name in LOG_PARAMETERS]
    curvature = np.zeros((vertices, 2)) if params.rest_curvature is None else np.asarray(params.rest_curvature)
    profile = np.ones(vertices - 1) if params.bend_profile is None else np.asarray(params.bend_profile)
    return np.concatenate([logs, curvature.reshape(-1), np.log(profile)])


def _unpack(vector: np.ndarray, base: CableParameters, vertices: int) -> CableParameters:
    n_log = len(LOG_PARAMETERS)
    values = {name: float(math.exp(vector[i])) for i, name in enumerate(LOG_PARAMETERS)}
    data = base.to_json()
    data.update(values)
    data["rest_curvature"] = vector[n_log:n_log + 2 * vertices].reshape(vertices, 2).tolist()
    data["bend_profile"] = np.exp(vector[n_log + 2 * vertices:]).tolist()
    return CableParameters.from_json(data)


def fit_cable(recordings: CableRecordings, initial: CableParameters | None = None, *,
              options: FitOptions | None = None, device: str | None = None, state_path: Path | None = None,
              progress: bool = True) -> FitResult:
    """Fit ``initial`` (default :class:`CableParameters`) to ``recordings`` by gradient descent.

    The loss is the mean absolute error of the interior markers over the training frames, every
    recording rolled out in one batch from its first frame with its ends replayed. With
    ``state_path`` the fit writes its state there after each step and resumes from it.
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
    params = initial or CableParameters()
    model, layout = build_cable_batch(recordings, params, subdivisions=options.subdivisions, device=device,
                                      requires_grad=True)
    vertices = int(model.rod_vertex_count.numpy()[0])
    solver = RodSolver(model)
    interior = recordings.interior_markers
    stage_data: dict[int, tuple] = {}

    def stage_for(frames: int):
        """Controls and loss of a rollout over the first ``frames`` frames (built once per stage)."""
        if frames not in stage_data:
            controls = replay_controls(model, layout, recordings, frames=frames)
            targets = recordings.positions[:, 1:frames + 1][:, :, interior]  # (N, F, K, 3)
            loss_fn = MarkerLoss(model, layout.marker_vertex[:, interior].reshape(-1),
                                 targets.transpose(1, 0, 2, 3).reshape(frames, -1, 3))
            stage_data.clear()  # one stage's controls at a time
            stage_data[frames] = (controls, loss_fn)
        return stage_data[frames]

    vector = _pack(params, vertices)
    n_log = len(LOG_PARAMETERS)
    rates = np.full(vector.size, options.learning_rate)
    rates[n_log:n_log + 2 * vertices] = options.curvature_learning_rate if options.fit_curvature else 0.0
    rates[n_log + 2 * vertices:] = options.learning_rate if options.fit_bend_profile else 0.0
    adam = _Adam(vector.size, rates)
    history: list[dict] = []
    if state_path is not None and Path(state_path).exists():
        saved = json.loads(Path(state_path).read_text())
        if len(saved["vector"]) == vector.size:
            vector = np.array(saved["vector"])
            adam.load(saved["adam"])
            history = saved["history"]
        else:
            warnings.warn(f"{state_path} holds a fit of a different cable layout ({len(saved['vector'])} values, "
                          f"not {vector.size}); starting afresh and overwriting it.", stacklevel=2)
    state0 = model.state(requires_grad=True)
    start = time.perf_counter()
    bar = tqdm(total=total, initial=len(history), desc="fit", disable=not progress)
    rod_of_vertex = model.vertex_rod.numpy()
    local_vertex = np.arange(model.vertex_count) - model.rod_vertex_start.numpy()[rod_of_vertex]
    frames_of = [frames for steps, frames in stages for _ in range(steps)]
    for iteration in range(len(history), total):
        controls, loss_fn = stage_for(frames_of[iteration])
        current = _unpack(vector, params, vertices)
        _assign(model, current, recordings.num_recordings)
        rollout = Rollout(solver, model, state0, controls, frame_dt=1.0 / recordings.fps, substeps="auto",
                          checkpoint_every=options.checkpoint_every,
                          frame_loss=lambda m, s, frame, loss, fn=loss_fn: fn(m, s, frame, loss))
        model.zero_grad()
        loss = rollout.forward()
        rollout.backward()
        grad = np.zeros_like(vector)
        for i, array_name in enumerate(LOG_PARAMETERS.values()):
            arr = model.array(array_name)
            grad[i] = float(np.sum(arr.grad.numpy().astype(np.float64) * arr.numpy()))
        curvature_grad = np.zeros((vertices, 2))
        np.add.at(curvature_grad, local_vertex, model.vertex_rest_curvature.grad.numpy().astype(np.float64))
        grad[n_log:n_log + 2 * vertices] = curvature_grad.reshape(-1)
        # the profile multiplies bend_stiffness: d/d(log factor_e) = sum over rods of grad_e * stiffness_e
        bend = model.edge_bend_stiffness
        per_edge = (bend.grad.numpy().astype(np.float64) * bend.numpy()).reshape(recordings.num_recordings, -1)
        grad[n_log + 2 * vertices:] = per_edge.sum(axis=0)
        if not np.all(np.isfinite(grad)):
            raise InvalidParameter("gradient", "non-finite", "finite values; lower the learning rate")
        history.append({"iteration": iteration, "frames": frames_of[iteration], "loss_m": loss,
                        "substeps": rollout.substeps,
                        **{name: float(math.exp(vector[i])) for i, name in enumerate(LOG_PARAMETERS)}})
        vector = adam.step(vector, grad)
        # keep the explicit step affordable and the damping physical
        vector[0] = min(vector[0], math.log(0.2))
        profile = slice(n_log + 2 * vertices, None)
        vector[profile] = np.clip(vector[profile], -2.0, 2.0)
        if state_path is not None:
            Path(state_path).write_text(json.dumps({"vector": vector.tolist(), "adam": adam.state(),
                                                    "history": history}))
        bar.set_postfix(loss=f"{loss:.4f}", frames=frames_of[iteration], substeps=rollout.substeps)
        bar.update(1)
    bar.close()
    return FitResult(_unpack(vector, params, vertices), history, time.perf_counter() - start)


def _assign(model, params: CableParameters, num_rods: int) -> None:
    """Write fitted values into a model built by :func:`build_cable_batch`."""
    profile = np.ones(model.edge_count // num_rods) if params.bend_profile is None else np.asarray(params.bend_profile)
    model.edge_bend_stiffness.assign(np.tile(params.bend_stiffness * profile, num_rods).astype(np.float32))
    model.edge_twist_stiffness.fill_(params.twist_stiffness)
    model.edge_bend_damping.fill_(params.bend_damping)
    model.rod_linear_damping.fill_(params.linear_damping)
    model.rod_air_drag.fill_(params.air_drag)
    if params.rest_curvature is not None:
        model.vertex_rest_curvature.assign(np.tile(np.asarray(params.rest_curvature, dtype=np.float32),
                                                   (num_rods, 1)))
