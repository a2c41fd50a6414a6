"""The pinhole camera of the headless renderer: where it stands, what it looks at, its field of view
and image size, and a helper that frames an axis-aligned box of the scene.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import warp as wp

from diffsim.errors import InvalidParameter

#: Largest image edge the renderer accepts [px]; larger buffers are almost certainly a unit mistake.
MAX_IMAGE_SIZE = 8192

#: Default viewing direction (from the target towards the eye) of :meth:`Camera.looking_at_box`:
#: in front (-y), to the right (+x) and above (+z) the scene.
DEFAULT_VIEW_DIRECTION = (1.0, -1.6, 1.1)


@wp.struct
class CameraData:
    """The camera as the kernels see it: an orthonormal frame, the focal length and the image."""

    eye: wp.vec3  #: camera centre [m]
    right: wp.vec3  #: image +x axis in world coordinates (unit)
    up: wp.vec3  #: image up axis in world coordinates (unit; image rows grow downwards)
    forward: wp.vec3  #: viewing direction (unit); camera depth is measured along it
    focal: float  #: focal length [px]
    cx: float  #: principal point, column [px]
    cy: float  #: principal point, row [px]
    near: float  #: nearest depth drawn [m]
    width: int  #: image width [px]
    height: int  #: image height [px]


def _vector(name: str, value, valid: str) -> np.ndarray:
    try:
        v = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise InvalidParameter(name, value, valid) from exc
    if v.shape != (3,) or not np.all(np.isfinite(v)):
        raise InvalidParameter(name, value, valid)
    return v


def _image_size(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= MAX_IMAGE_SIZE:
        raise InvalidParameter(name, value, f"integers in [1, {MAX_IMAGE_SIZE}] px")
    return int(value)


@dataclass
class Camera:
    """A pinhole camera (no lens distortion), square pixels, principal point at the image centre.

    Args:
        eye: camera centre [m].
        target: the point the optical axis passes through [m]; must differ from ``eye``.
        up: world direction that appears upwards in the image; must not be parallel to the
            viewing direction. Default +z.
        fov_deg: vertical field of view [deg], in (0, 179).
        width: image width [px], in [1, 8192].
        height: image height [px], in [1, 8192].
        near: nearest depth drawn [m], > 0; triangles reaching nearer are skipped.
    """

    eye: Sequence[float]
    target: Sequence[float]
    up: Sequence[float] = (0.0, 0.0, 1.0)
    fov_deg: float = 40.0
    width: int = 256
    height: int = 256
    near: float = 1.0e-4

    def __post_init__(self):
        self.eye = tuple(_vector("eye", self.eye, "three finite numbers [m]"))
        self.target = tuple(_vector("target", self.target, "three finite numbers [m]"))
        self.up = tuple(_vector("up", self.up, "three finite numbers, not parallel to target - eye"))
        fov = float(self.fov_deg)
        if not (0.0 < fov < 179.0):
            raise InvalidParameter("fov_deg", self.fov_deg, "(0, 179) degrees")
        self.fov_deg = fov
        self.width = _image_size("width", self.width)
        self.height = _image_size("height", self.height)
        near = float(self.near)
        if not (near > 0.0 and math.isfinite(near)):
            raise InvalidParameter("near", self.near, "(0, inf) m")
        self.near = near
        forward = np.subtract(self.target, self.eye)
        distance = float(np.linalg.norm(forward))
        if distance < 1.0e-9:
            raise InvalidParameter("target", self.target, "points at least 1e-9 m away from eye")
        forward /= distance
        right = np.cross(forward, self.up)
        if np.linalg.norm(right) < 1.0e-6 * np.linalg.norm(self.up):
            raise InvalidParameter("up", self.up, "directions not parallel to the viewing direction target - eye")
        right /= np.linalg.norm(right)
        self._frame = (right, np.cross(right, forward), forward)

    @property
    def forward(self) -> np.ndarray:
        """Unit viewing direction."""
        return self._frame[2]

    @property
    def right(self) -> np.ndarray:
        """Unit image +x axis in world coordinates."""
        return self._frame[0]

    @property
    def image_up(self) -> np.ndarray:
        """Unit image up axis in world coordinates (``up`` made orthogonal to the view)."""
        return self._frame[1]

    @property
    def focal_length(self) -> float:
        """Focal length [px] from the vertical field of view."""
        return 0.5 * self.height / math.tan(math.radians(0.5 * self.fov_deg))

    def data(self) -> CameraData:
        """The Warp struct passed to the raster kernels."""
        right, up, forward = self._frame
        c = CameraData()
        c.eye = wp.vec3(*self.eye)
        c.right = wp.vec3(*right)
        c.up = wp.vec3(*up)
        c.forward = wp.vec3(*forward)
        c.focal = self.focal_length
        c.cx = 0.5 * self.width
        c.cy = 0.5 * self.height
        c.near = self.near
        c.width = self.width
        c.height = self.height
        return c

    def project(self, points) -> np.ndarray:
        """Pixel coordinates (column, row) and depth [m] of world points (N, 3), as an (N, 3) array.

        Column 0 is the left edge of the image and row 0 its top; pixel (i, j) covers
        [i, i + 1) x [j, j + 1). Points behind the camera get a negative depth.
        """
        p = np.asarray(points, dtype=np.float64).reshape(-1, 3) - np.asarray(self.eye)
        right, up, forward = self._frame
        z = p @ forward
        safe = np.where(np.abs(z) > 1e-12, z, 1e-12)
        f = self.focal_length
        return np.stack([0.5 * self.width + f * (p @ right) / safe, 0.5 * self.height - f * (p @ up) / safe, z], 1)

    @classmethod
    def looking_at_box(
        cls,
        lo: Sequence[float],
        hi: Sequence[float],
        *,
        direction: Sequence[float] = DEFAULT_VIEW_DIRECTION,
        up: Sequence[float] = (0.0, 0.0, 1.0),
        fov_deg: float = 40.0,
        width: int = 256,
        height: int = 256,
        margin: float = 1.1,
    ) -> Camera:
        """A camera that sees the whole box [lo, hi] [m], looking at its centre.

        Args:
            lo, hi: opposite corners of the box [m]; a flat or point box is padded to 1 mm.
            direction: from the box centre towards the eye (any length, not parallel to ``up``).
            up: world direction shown upwards.
            fov_deg, width, height: as for :class:`Camera`.
            margin: >= 1; the corner of the box farthest out in the image lands at 1 / margin of
                the way from the image centre to the border.
        """
        lo = _vector("lo", lo, "three finite numbers [m]")
        hi = _vector("hi", hi, "three finite numbers [m]")
        if np.any(hi < lo):
            raise InvalidParameter("hi", tuple(hi), f"points with every coordinate >= lo = {tuple(lo)}")
        d = _vector("direction", direction, "three finite numbers, not all zero")
        if np.linalg.norm(d) < 1e-12:
            raise InvalidParameter("direction", tuple(d), "non-zero directions")
        if not (float(margin) >= 1.0):
            raise InvalidParameter("margin", margin, "[1, inf)")
        if not (0.0 < float(fov_deg) < 179.0):
            raise InvalidParameter("fov_deg", fov_deg, "(0, 179) degrees")
        width, height = _image_size("width", width), _image_size("height", height)
        centre = 0.5 * (lo + hi)
        half = np.maximum(0.5 * (hi - lo), 5e-4)
        forward = -d / np.linalg.norm(d)
        right = np.cross(forward, _vector("up", up, "three finite numbers"))
        if np.linalg.norm(right) < 1e-6:
            raise InvalidParameter("direction", tuple(d), "directions not parallel to up")
        right /= np.linalg.norm(right)
        image_up = np.cross(right, forward)
        tan_v = math.tan(math.radians(0.5 * float(fov_deg)))
        tan_h = tan_v * width / height
        # the nearest distance at which every corner projects inside the image: a corner at offset o
        # from the centre has depth D + o.forward and must satisfy |o.right| <= tan_h * depth (and so on)
        corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]) * half
        along = corners @ forward
        # (the margin shrinks the usable image: the outermost corner lands at 1 / margin of the way
        # from the image centre to its border)
        m = float(margin)
        distance = float(np.max(np.maximum(m * np.abs(corners @ right) / tan_h, m * np.abs(corners @ image_up) / tan_v)
                                - along))
        distance = max(distance, float(np.max(-along)) + 1e-3)
        eye = centre - forward * distance
        return cls(eye=eye, target=centre, up=up, fov_deg=fov_deg, width=width, height=height,
                   near=max(1e-4 * distance, 1e-6))
