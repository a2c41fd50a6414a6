"""Pictures a person would rather look at than read: particle renders, GIFs and loss curves.

Rendering is a small orthographic point splatter in numpy, so it runs headless everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

#: Camera directions: (right, up) axes of the image plane, and the axis pointing at the viewer.
VIEWS = {
    "side": (np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0]), np.array([0.0, -1.0, 0.0])),
    "front": (np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0]), np.array([1.0, 0.0, 0.0])),
    "top": (np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0])),
}


def _iso_view():
    toward = np.array([1.0, -1.2, 0.9])
    toward /= np.linalg.norm(toward)
    right = np.cross(np.array([0.0, 0.0, 1.0]), toward)
    right /= np.linalg.norm(right)
    up = np.cross(toward, right)
    return right, up, toward


VIEWS["iso"] = _iso_view()


def render_points(
    groups: Sequence[tuple[np.ndarray, Sequence[float]]],
    *,
    bounds: tuple[Sequence[float], Sequence[float]],
    view: str = "iso",
    size: tuple[int, int] = (320, 240),
    point_radius: int = 1,
    background: Sequence[float] = (1.0, 1.0, 1.0),
) -> np.ndarray:
    """Render groups of points to an RGB image.

    Args:
        groups: ``(positions (N, 3) [m], rgb in [0, 1])`` per group of points.
        bounds: lower and upper corner of the region to frame [m].
        view: ``"iso"``, ``"side"``, ``"front"`` or ``"top"``.
        size: image (width, height) in pixels.
        point_radius: half-size of each splat in pixels.
        background: RGB in [0, 1].

    Returns:
        uint8 array of shape (height, width, 3).
    """
    right, up, toward = VIEWS[view]
    width, height = size
    lo, hi = np.asarray(bounds[0], float), np.asarray(bounds[1], float)
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    u_range = corners @ right
    v_range = corners @ up
    scale = 0.95 * min(width / np.ptp(u_range), height / np.ptp(v_range))
    u0 = 0.5 * (u_range.min() + u_range.max())
    v0 = 0.5 * (v_range.min() + v_range.max())

    image = np.empty((height, width, 3), dtype=np.float32)
    image[:] = background
    all_pos, all_rgb = [], []
    for positions, rgb in groups:
        pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
        if pos.size == 0:
            continue
        all_pos.append(pos)
        all_rgb.append(np.broadcast_to(np.asarray(rgb, dtype=np.float32), (pos.shape[0], 3)))
    if not all_pos:
        return (image * 255).astype(np.uint8)
    pos = np.concatenate(all_pos)
    rgb = np.concatenate(all_rgb)
    depth = pos @ toward
    # shade by depth so that shapes read as 3-D: nearer points are brighter
    span = max(np.ptp(depth), 1e-9)
    shade = 0.55 + 0.45 * (depth - depth.min()) / span
    colors = rgb * shade[:, None]
    px = np.round(width / 2 + (pos @ right - u0) * scale).astype(int)
    py = np.round(height / 2 - (pos @ up - v0) * scale).astype(int)
    order = np.argsort(depth)  # far to near: nearer splats overwrite farther ones
    px, py, colors = px[order], py[order], colors[order]
    for dy in range(-point_radius, point_radius + 1):
        for dx in range(-point_radius, point_radius + 1):
            x, y = px + dx, py + dy
            ok = (x >= 0) & (x < width) & (y >= 0) & (y < height)
            image[y[ok], x[ok]] = colors[ok]
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def box_outline_points(center, half_extents, rotation=(0.0, 0.0, 0.0, 1.0), *, per_edge: int = 24) -> np.ndarray:
    """Points along the 12 edges of a box (rotation as x, y, z, w), for drawing colliders."""
    h = np.asarray(half_extents, float)
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], float)
    points = []
    t = np.linspace(-1, 1, per_edge)
    for a in range(3):
        for s in signs[signs[:, a] == -1]:
            edge = np.repeat(s[None, :], per_edge, axis=0)
            edge[:, a] = t
            points.append(edge * h)
    local = np.concatenate(points)
    return _rotate(np.asarray(rotation, float), local) + np.asarray(center, float)


def _rotate(q: np.ndarray, v: np.ndarray) -> np.ndarray:
    x, y, z, w = q / np.linalg.norm(q)
    u = np.array([x, y, z])
    return v * (w * w - u @ u) + 2 * np.outer(v @ u, u) + 2 * w * np.cross(u, v)


def save_gif(frames: Sequence[np.ndarray], path: str | Path, *, fps: int = 20) -> Path:
    """Write frames (H, W, 3 uint8) as a looping GIF."""
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.mimsave(path, list(frames), duration=1.0 / fps, loop=0)
    return path


def plot_curve(values: Sequence[float], path: str | Path, *, title: str, ylabel: str, xlabel: str = "iteration",
               log: bool = True) -> Path:
    """Save a line plot (e.g. a loss curve) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(np.arange(len(values)), values, marker="o", markersize=3)
    if log and np.all(np.asarray(values) > 0):
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
