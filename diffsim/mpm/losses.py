"""Differentiable losses on MPM states, in the callable form Rollout expects.

Each loss launches a kernel that adds its value into ``loss[0]``; instances are reusable
across forward and backward passes.
"""

from __future__ import annotations

import numpy as np
import warp as wp

from diffsim.errors import InvalidParameter
from diffsim.mpm.kernels import particle_stencil, stencil_weight
from diffsim.mpm.model import MPMModel, MPMState


@wp.kernel
def _mass_weighted_position(
    particle_x: wp.array(dtype=wp.vec3),
    particle_mass: wp.array(dtype=float),
    particle_world: wp.array(dtype=int),
    world_mass: wp.array(dtype=float),
    sums: wp.array(dtype=wp.vec3),
):
    p = wp.tid()
    w = particle_world[p]
    wp.atomic_add(sums, w, particle_x[p] * (particle_mass[p] / world_mass[w]))


@wp.kernel
def _squared_distance(
    centers: wp.array(dtype=wp.vec3),
    targets: wp.array(dtype=wp.vec3),
    weight: float,
    loss: wp.array(dtype=float),
):
    w = wp.tid()
    d = centers[w] - targets[w]
    wp.atomic_add(loss, 0, weight * wp.dot(d, d))


class CenterOfMassLoss:
    """weight * sum over worlds of |centre of mass - target|^2 [m^2].

    Args:
        model: the scene (for masses and world indices).
        targets: target centre of mass per world [m], shape (num_worlds, 3) or (3,).
        weight: multiplier of the loss.
    """

    def __init__(self, model: MPMModel, targets, *, weight: float = 1.0):
        t = np.broadcast_to(np.asarray(targets, dtype=np.float32), (model.num_worlds, 3))
        self.targets = wp.array(t, dtype=wp.vec3, device=model.device)
        self.weight = float(weight)
        mass = model.particle_mass.numpy()
        world = model.particle_world.numpy()
        self.world_mass = wp.array(
            np.bincount(world, weights=mass, minlength=model.num_worlds).astype(np.float32),
            dtype=float, device=model.device,
        )
        # One scratch buffer per call site would alias on the tape; allocate per evaluation.
        self._device = model.device

    def centers(self, model: MPMModel, state: MPMState) -> np.ndarray:
        """Centre of mass of each world [m], shape (num_worlds, 3)."""
        return self._centers(model, state).numpy()

    def set_world(self, world: int, target) -> None:
        """World ``world``'s target centre of mass [m]."""
        t = self.targets.numpy()
        t[world] = np.asarray(target, dtype=np.float32)
        self.targets.assign(t)

    def _centers(self, model: MPMModel, state: MPMState) -> wp.array:
        sums = wp.zeros(model.num_worlds, dtype=wp.vec3, device=self._device, requires_grad=True)
        wp.launch(_mass_weighted_position, dim=model.particle_count,
                  inputs=[state.particle_x, model.particle_mass, model.particle_world, self.world_mass],
                  outputs=[sums], device=self._device)
        return sums

    def __call__(self, model: MPMModel, state: MPMState, loss: wp.array) -> None:
        wp.launch(_squared_distance, dim=model.num_worlds,
                  inputs=[self._centers(model, state), self.targets, self.weight], outputs=[loss], device=self._device)

    def per_world(self, model: MPMModel, state: MPMState, out: wp.array) -> None:
        """Add each world's term into ``out[world]`` (shape (num_worlds,)) instead of one sum."""
        wp.launch(_squared_distance_per_world, dim=model.num_worlds,
                  inputs=[self._centers(model, state), self.targets, self.weight], outputs=[out], device=self._device)


@wp.kernel
def _squared_distance_per_world(centers: wp.array(dtype=wp.vec3), targets: wp.array(dtype=wp.vec3),
                                weight: float, loss: wp.array(dtype=float)):
    w = wp.tid()
    d = centers[w] - targets[w]
    wp.atomic_add(loss, w, weight * wp.dot(d, d))


@wp.kernel
def _weighted_sum_vec3(values: wp.array(dtype=wp.vec3), reference: wp.array(dtype=wp.vec3),
                       weights: wp.array(dtype=wp.vec3), loss: wp.array(dtype=float)):
    i = wp.tid()
    wp.atomic_add(loss, 0, wp.dot(values[i] - reference[i], weights[i]))


@wp.kernel
def _weighted_sum_mat33(values: wp.array(dtype=wp.mat33), reference: wp.array(dtype=wp.mat33),
                        weights: wp.array(dtype=wp.mat33), loss: wp.array(dtype=float)):
    i = wp.tid()
    a = values[i] - reference[i]
    b = weights[i]
    s = float(0.0)
    for r in range(3):
        for c in range(3):
            s += a[r, c] * b[r, c]
    wp.atomic_add(loss, 0, s)


class LinearStateLoss:
    """sum_p <weights_p, state.<field>_p - reference_p> for a vec3 or mat33 particle field.

    A linear functional with random weights probes every component of the final state at once,
    which makes it the loss of choice for finite-difference gradient tests. The reference (the
    model's initial state by default) keeps the summed terms small, so float32 accumulation
    does not bury the finite-difference signal under rounding of a large constant.
    """

    def __init__(self, model: MPMModel, field: str, weights: np.ndarray, *, reference: np.ndarray | None = None):
        self.field = field
        sample = getattr(model.state(), field)
        self.weights = wp.array(np.asarray(weights, dtype=np.float32), dtype=sample.dtype, device=model.device)
        ref = sample.numpy() if reference is None else np.asarray(reference, dtype=np.float32)
        self.reference = wp.array(ref, dtype=sample.dtype, device=model.device)
        self.kernel = _weighted_sum_mat33 if sample.dtype == wp.mat33 else _weighted_sum_vec3

    def __call__(self, model: MPMModel, state: MPMState, loss: wp.array) -> None:
        values = state.array(self.field)
        wp.launch(self.kernel, dim=values.shape[0], inputs=[values, self.reference, self.weights], outputs=[loss],
                  device=model.device)


@wp.kernel
def _target_positions(particle_x: wp.array(dtype=wp.vec3), targets: wp.array(dtype=wp.vec3), scale: float,
                      loss: wp.array(dtype=float)):
    p = wp.tid()
    d = particle_x[p] - targets[p]
    wp.atomic_add(loss, 0, scale * wp.dot(d, d))


class ParticleTargetLoss:
    """Mean squared distance of each particle to its own target position [m^2]."""

    def __init__(self, model: MPMModel, targets: np.ndarray, *, weight: float = 1.0):
        self.targets = wp.array(np.asarray(targets, dtype=np.float32), dtype=wp.vec3, device=model.device)
        self.scale = float(weight) / max(1, model.particle_count)

    def __call__(self, model: MPMModel, state: MPMState, loss: wp.array) -> None:
        wp.launch(_target_positions, dim=model.particle_count,
                  inputs=[state.particle_x, self.targets, self.scale], outputs=[loss], device=model.device)


# ---------------------------------------------------------------------------- per-world shape losses
@wp.kernel
def grid_mass_kernel(particle_x: wp.array(dtype=wp.vec3), particle_mass: wp.array(dtype=float),
                     particle_world: wp.array(dtype=int), origin: wp.vec3, inv_dx: float, res: int,
                     grid: wp.array4d(dtype=float)):
    p = wp.tid()
    w = particle_world[p]
    st = particle_stencil(particle_x[p], origin, inv_dx, res, wp.vec3i(0, 0, 0))
    for i in range(3):
        for j in range(3):
            for k in range(3):
                wp.atomic_add(grid, w, st.local[0] + i, st.local[1] + j, st.local[2] + k,
                              particle_mass[p] * stencil_weight(st, i, j, k))


class GridMass:
    """Mass of each world's material splatted onto a coarse grid over a box (quadratic B-splines,
    like the solver's particle-to-grid transfer), shape (num_worlds, res, res, res) [kg].

    The grid is what PlasticineLab-style shape losses and IoU scores compare. Particles outside
    the box are clamped onto its border cells.

    Args:
        origin: lower corner of the box [m].
        size: edge of the cubic box [m].
        res: cells per axis.
        num_worlds: worlds of the scene.
    """

    def __init__(self, origin, size: float, res: int, num_worlds: int, device):
        if not isinstance(res, int) or res < 4:
            raise InvalidParameter("res", res, "integers >= 4")
        self.origin = wp.vec3(*[float(c) for c in origin])
        self.size = float(size)
        self.res = res
        self.inv_dx = res / self.size
        self.num_worlds = num_worlds
        self.device = device

    def __call__(self, particle_x: wp.array, particle_mass: wp.array, particle_world: wp.array) -> wp.array:
        grid = wp.zeros((self.num_worlds, self.res, self.res, self.res), dtype=float, device=self.device,
                        requires_grad=particle_x.requires_grad)
        wp.launch(grid_mass_kernel, dim=particle_x.shape[0],
                  inputs=[particle_x, particle_mass, particle_world, self.origin, self.inv_dx, self.res],
                  outputs=[grid], device=self.device)
        return grid


@wp.kernel
def _l1_per_world(grid: wp.array4d(dtype=float), target: wp.array4d(dtype=float),
                  inv_target_mass: wp.array(dtype=float), loss: wp.array(dtype=float)):
    w, i, j, k = wp.tid()
    wp.atomic_add(loss, w, wp.abs(grid[w, i, j, k] - target[w, i, j, k]) * inv_target_mass[w])


def grid_l1(grid: wp.array, target: wp.array, inv_target_mass: wp.array, loss: wp.array) -> None:
    """Add sum |grid - target| / target mass per world into ``loss`` (num_worlds,) [-]."""
    wp.launch(_l1_per_world, dim=grid.shape, inputs=[grid, target, inv_target_mass], outputs=[loss],
              device=grid.device)


def grid_iou(mass: np.ndarray, target: np.ndarray) -> np.ndarray:
    """PlasticineLab's soft IoU per world: I / (U - I) with I = sum m t / (max m max t) and
    U = sum m / max m + sum t / max t; inputs (num_worlds, ...) grid masses."""
    m = mass.reshape(mass.shape[0], -1).astype(np.float64)
    t = target.reshape(target.shape[0], -1).astype(np.float64)
    m_max = np.maximum(m.max(axis=1, keepdims=True), 1e-30)
    t_max = np.maximum(t.max(axis=1, keepdims=True), 1e-30)
    inter = (m * t).sum(axis=1) / (m_max * t_max)[:, 0]
    union = (m / m_max).sum(axis=1) + (t / t_max).sum(axis=1)
    return inter / np.maximum(union - inter, 1e-30)


# ---------------------------------------------------------------------------- per-world region losses
@wp.kernel
def _box_outside_sq(particle_x: wp.array(dtype=wp.vec3), particle_mass: wp.array(dtype=float),
                    particle_world: wp.array(dtype=int), center: wp.array(dtype=wp.vec3),
                    half_extents: wp.array(dtype=wp.vec3), inv_world_mass: wp.array(dtype=float),
                    loss: wp.array(dtype=float)):
    p = wp.tid()
    w = particle_world[p]
    q = particle_x[p] - center[w]
    h = half_extents[w]
    # the squared length of the outside part, without a square root (whose adjoint is 0/0 at 0)
    o = wp.vec3(wp.max(wp.abs(q[0]) - h[0], 0.0), wp.max(wp.abs(q[1]) - h[1], 0.0),
                wp.max(wp.abs(q[2]) - h[2], 0.0))
    wp.atomic_add(loss, w, particle_mass[p] * inv_world_mass[w] * wp.dot(o, o))


@wp.kernel
def _disc_outside_sq(particle_x: wp.array(dtype=wp.vec3), particle_mass: wp.array(dtype=float),
                     particle_world: wp.array(dtype=int), center: wp.array(dtype=wp.vec3),
                     radius: wp.array(dtype=float), inv_world_mass: wp.array(dtype=float),
                     loss: wp.array(dtype=float)):
    p = wp.tid()
    w = particle_world[p]
    dx = particle_x[p][0] - center[w][0]
    dy = particle_x[p][1] - center[w][1]
    r = radius[w]
    rr = dx * dx + dy * dy
    if rr > r * r:
        d = wp.sqrt(rr) - r
        wp.atomic_add(loss, w, particle_mass[p] * inv_world_mass[w] * d * d)


@wp.kernel(enable_backward=False)
def _box_inside_mass(particle_x: wp.array(dtype=wp.vec3), particle_mass: wp.array(dtype=float),
                     particle_world: wp.array(dtype=int), center: wp.array(dtype=wp.vec3),
                     half_extents: wp.array(dtype=wp.vec3), inv_world_mass: wp.array(dtype=float),
                     fraction: wp.array(dtype=float)):
    p = wp.tid()
    w = particle_world[p]
    q = particle_x[p] - center[w]
    h = half_extents[w]
    if wp.abs(q[0]) <= h[0] and wp.abs(q[1]) <= h[1] and wp.abs(q[2]) <= h[2]:
        wp.atomic_add(fraction, w, particle_mass[p] * inv_world_mass[w])


@wp.kernel(enable_backward=False)
def _disc_inside_mass(particle_x: wp.array(dtype=wp.vec3), particle_mass: wp.array(dtype=float),
                      particle_world: wp.array(dtype=int), center: wp.array(dtype=wp.vec3),
                      radius: wp.array(dtype=float), inv_world_mass: wp.array(dtype=float),
                      fraction: wp.array(dtype=float)):
    p = wp.tid()
    w = particle_world[p]
    dx = particle_x[p][0] - center[w][0]
    dy = particle_x[p][1] - center[w][1]
    if dx * dx + dy * dy <= radius[w] * radius[w]:
        wp.atomic_add(fraction, w, particle_mass[p] * inv_world_mass[w])


def box_outside_distance(particle_x: wp.array, particle_mass: wp.array, particle_world: wp.array,
                         center: wp.array, half_extents: wp.array, inv_world_mass: wp.array,
                         loss: wp.array) -> None:
    """Add each world's mass-weighted mean squared distance of its particles to an axis-aligned box
    (0 inside) into ``loss`` (num_worlds,) [m^2].

    ``center`` and ``half_extents`` [m] are vec3 per world; ``inv_world_mass`` is 1 / (the world's
    material mass) [1/kg].
    """
    wp.launch(_box_outside_sq, dim=particle_x.shape[0],
              inputs=[particle_x, particle_mass, particle_world, center, half_extents, inv_world_mass],
              outputs=[loss], device=particle_x.device)


def disc_outside_distance(particle_x: wp.array, particle_mass: wp.array, particle_world: wp.array,
                          center: wp.array, radius: wp.array, inv_world_mass: wp.array,
                          loss: wp.array) -> None:
    """Add each world's mass-weighted mean squared horizontal distance of its particles to a disc
    (a vertical cylinder of unbounded height: 0 inside) into ``loss`` (num_worlds,) [m^2].

    ``center`` [m] is a vec3 per world (its z is ignored), ``radius`` [m] a float per world.
    """
    wp.launch(_disc_outside_sq, dim=particle_x.shape[0],
              inputs=[particle_x, particle_mass, particle_world, center, radius, inv_world_mass],
              outputs=[loss], device=particle_x.device)


def box_mass_fraction(particle_x: wp.array, particle_mass: wp.array, particle_world: wp.array,
                      center: wp.array, half_extents: wp.array, inv_world_mass: wp.array) -> np.ndarray:
    """Share of each world's material mass inside its box [-], shape (num_worlds,) (not differentiable)."""
    out = wp.zeros(center.shape[0], dtype=float, device=particle_x.device)
    wp.launch(_box_inside_mass, dim=particle_x.shape[0],
              inputs=[particle_x, particle_mass, particle_world, center, half_extents, inv_world_mass],
              outputs=[out], device=particle_x.device, record_tape=False)
    return out.numpy().astype(np.float64)


def disc_mass_fraction(particle_x: wp.array, particle_mass: wp.array, particle_world: wp.array,
                       center: wp.array, radius: wp.array, inv_world_mass: wp.array) -> np.ndarray:
    """Share of each world's material mass above its disc [-], shape (num_worlds,) (not differentiable)."""
    out = wp.zeros(center.shape[0], dtype=float, device=particle_x.device)
    wp.launch(_disc_inside_mass, dim=particle_x.shape[0],
              inputs=[particle_x, particle_mass, particle_world, center, radius, inv_world_mass],
              outputs=[out], device=particle_x.device, record_tape=False)
    return out.numpy().astype(np.float64)
