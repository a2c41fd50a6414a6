"""Differentiable losses on rod states: a fixed linear functional of vertex positions (gradient
checks) and the distance of chosen vertices to recorded marker trajectories (calibration).
"""

from __future__ import annotations

import numpy as np
import warp as wp

from diffsim.errors import InvalidParameter
from diffsim.rod.model import RodModel, RodState


@wp.kernel
def _linear_positions(x: wp.array(dtype=wp.vec3), reference: wp.array(dtype=wp.vec3),
                      weights: wp.array(dtype=wp.vec3), loss: wp.array(dtype=float)):
    i = wp.tid()
    wp.atomic_add(loss, 0, wp.dot(x[i] - reference[i], weights[i]))


class VertexLinearLoss:
    """loss += sum_i w_i . (x_i - r_i) for fixed weights ``w`` [1/m] and reference positions ``r``
    [m] (default: the model's initial positions; displacements keep float32 sums precise)."""

    def __init__(self, model: RodModel, weights, *, reference=None):
        w = np.asarray(weights, dtype=np.float32)
        if w.shape != (model.vertex_count, 3):
            raise InvalidParameter("weights", f"an array of shape {w.shape}", f"({model.vertex_count}, 3)")
        r = model.initial_x if reference is None else np.asarray(reference, dtype=np.float32)
        if r.shape != w.shape:
            raise InvalidParameter("reference", f"an array of shape {r.shape}", f"({model.vertex_count}, 3)")
        self.weights = wp.array(w, dtype=wp.vec3, device=model.device)
        self.reference = wp.array(r, dtype=wp.vec3, device=model.device)

    def __call__(self, model: RodModel, state: RodState, loss: wp.array) -> None:
        wp.launch(_linear_positions, dim=model.vertex_count, inputs=[state.vertex_x, self.reference, self.weights],
                  outputs=[loss], device=model.device)


@wp.kernel
def _marker_l1(
    x: wp.array(dtype=wp.vec3),
    marker_vertex: wp.array(dtype=int),
    targets: wp.array2d(dtype=wp.vec3),
    frame: int,
    scale: float,
    smoothing: float,
    loss: wp.array(dtype=float),
):
    k = wp.tid()
    d = x[marker_vertex[k]] - targets[frame, k]
    total = float(0.0)
    for c in range(3):
        # sqrt(d^2 + s^2) - s: the absolute error, rounded off below ``smoothing`` [m]
        total += wp.sqrt(d[c] * d[c] + smoothing * smoothing) - smoothing
    wp.atomic_add(loss, 0, scale * total)


class MarkerLoss:
    """Mean absolute coordinate error [m] between rod vertices and recorded marker positions,
    averaged over the frames of a rollout (the ``l1_all`` metric, smoothed below ``smoothing``).

    Args:
        model: the rods.
        marker_vertex: global vertex index of each scored marker, shape (K,).
        targets: recorded positions [m], shape (frames, K, 3); frame f is compared with the state at
            the end of control interval f (so pass recordings from their second frame on).
        smoothing: width [m] below which the absolute value is rounded (keeps gradients smooth).
    """

    def __init__(self, model: RodModel, marker_vertex, targets, *, smoothing: float = 1e-4):
        idx = np.asarray(marker_vertex, dtype=np.int32)
        t = np.asarray(targets, dtype=np.float32)
        if idx.ndim != 1 or np.any(idx < 0) or np.any(idx >= model.vertex_count):
            raise InvalidParameter("marker_vertex", "indices outside the model", f"[0, {model.vertex_count - 1}]")
        if t.ndim != 3 or t.shape[1:] != (len(idx), 3) or not np.all(np.isfinite(t)):
            raise InvalidParameter("targets", f"an array of shape {t.shape}", f"finite (frames, {len(idx)}, 3)")
        self.num_frames = t.shape[0]
        self.marker_vertex = wp.array(idx, dtype=int, device=model.device)
        self.targets = wp.array(t, dtype=wp.vec3, device=model.device)
        self.scale = 1.0 / (3.0 * len(idx) * self.num_frames)
        self.smoothing = float(smoothing)

    def __call__(self, model: RodModel, state: RodState, frame: int, loss: wp.array) -> None:
        wp.launch(_marker_l1, dim=self.marker_vertex.shape[0],
                  inputs=[state.vertex_x, self.marker_vertex, self.targets, frame, self.scale, self.smoothing],
                  outputs=[loss], device=model.device)


@wp.kernel
def _vertex_target_per_world(x: wp.array(dtype=wp.vec3), target: wp.array(dtype=wp.vec3),
                             vertex_world: wp.array(dtype=int), scale: wp.array(dtype=float),
                             loss: wp.array(dtype=float)):
    i = wp.tid()
    w = vertex_world[i]
    d = x[i] - target[i]
    wp.atomic_add(loss, w, wp.dot(d, d) * scale[w])


class VertexTargetLoss:
    """Mean squared distance [m^2] of each world's vertices to their own target positions, per world.

    ``set_world(world, targets)`` sets one world's targets (its vertices in order); calling the loss
    adds each world's value into ``loss[world]``.
    """

    def __init__(self, model: RodModel):
        self.model = model
        self.vertex_world_host = model.world_of("vertex_x")
        counts = np.bincount(self.vertex_world_host, minlength=model.num_worlds)
        self.vertex_world = wp.array(self.vertex_world_host, dtype=int, device=model.device)
        self.scale = wp.array(1.0 / np.maximum(counts, 1).astype(np.float32), dtype=float, device=model.device)
        self._targets = model.initial_x.astype(np.float32).copy()
        self.targets = wp.array(self._targets, dtype=wp.vec3, device=model.device)

    def set_world(self, world: int, targets: np.ndarray) -> None:
        index = np.flatnonzero(self.vertex_world_host == world)
        self._targets[index] = np.asarray(targets, dtype=np.float32).reshape(len(index), 3)
        self.targets.assign(self._targets)

    def world_targets(self, world: int) -> np.ndarray:
        return self._targets[self.vertex_world_host == world]

    def __call__(self, model: RodModel, state: RodState, loss: wp.array) -> None:
        wp.launch(_vertex_target_per_world, dim=model.vertex_count,
                  inputs=[state.vertex_x, self.targets, self.vertex_world, self.scale], outputs=[loss],
                  device=model.device)
