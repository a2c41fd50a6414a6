"""Kinematic collider motion shared by every solver: poses advanced by linear and angular velocity,
and the rotation vector that turns a pose trajectory into those velocities.
"""

import numpy as np
import warp as wp


@wp.kernel
def integrate_colliders(
    position_in: wp.array(dtype=wp.vec3),
    rotation_in: wp.array(dtype=wp.quat),
    velocity: wp.array(dtype=wp.vec3),
    angular_velocity: wp.array(dtype=wp.vec3),
    dt: float,
    position_out: wp.array(dtype=wp.vec3),
    rotation_out: wp.array(dtype=wp.quat),
):
    i = wp.tid()
    position_out[i] = position_in[i] + velocity[i] * dt
    # exact rotation by a constant angular velocity: q' = (axis sin(a/2), cos(a/2)) q with
    # a = |w| dt; written in |w|^2 (a Taylor series near 0) so that the gradient stays finite
    # for colliders that do not turn
    w = angular_velocity[i]
    half_sq = 0.25 * dt * dt * wp.dot(w, w)
    c = float(0.0)
    sinc = float(0.0)  # sin(a/2) / (a/2)
    if half_sq < 1.0e-6:
        c = 1.0 - 0.5 * half_sq + half_sq * half_sq / 24.0
        sinc = 1.0 - half_sq / 6.0 + half_sq * half_sq / 120.0
    else:
        half = wp.sqrt(half_sq)
        c = wp.cos(half)
        sinc = wp.sin(half) / half
    v = (0.5 * dt * sinc) * w
    rotation_out[i] = wp.normalize(wp.quat(v[0], v[1], v[2], c) * rotation_in[i])


def rotation_matrix(quaternion: np.ndarray) -> np.ndarray:
    """The 3x3 rotation matrix of a unit quaternion (x, y, z, w)."""
    x, y, z, w = quaternion
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def rotation_vector(q0: np.ndarray, q1: np.ndarray) -> np.ndarray:
    """World-frame rotation vector (axis * angle) taking orientation q0 to q1, per row (x, y, z, w)."""
    x0, y0, z0, w0 = np.moveaxis(q0, -1, 0)
    x1, y1, z1, w1 = np.moveaxis(q1, -1, 0)
    # q1 * conj(q0): the rotation applied in world axes
    w = w1 * w0 + x1 * x0 + y1 * y0 + z1 * z0
    x = -w1 * x0 + x1 * w0 - y1 * z0 + z1 * y0
    y = -w1 * y0 + y1 * w0 - z1 * x0 + x1 * z0
    z = -w1 * z0 + z1 * w0 - x1 * y0 + y1 * x0
    vec = np.stack([x, y, z], axis=-1)
    sign = np.where(w < 0, -1.0, 1.0)[..., None]  # the shorter way round
    vec, w = vec * sign, np.abs(w)
    s = np.linalg.norm(vec, axis=-1)
    angle = 2.0 * np.arctan2(s, w)
    scale = np.where(s > 1e-12, angle / np.maximum(s, 1e-12), 2.0)
    return vec * scale[..., None]
