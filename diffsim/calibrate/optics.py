"""Tactile optics calibration: the shading model that maps a gel surface's normals to a
GelSight-like RGB image, fitted to real images of a ball pressed into the gel (the Taxim
recordings, or any of the same format).

A recording is one image with its annotated contact circle (centre and radius in pixels) and the
sensor's image without contact, ``background``. Inside the circle the gel takes the ball's
spherical cap (ball radius ``ball_radius`` [m], ``pixel_size`` [m] per pixel; a circle wider
than the ball is clamped to its equator), so each pixel's surface normal is known; outside it
the gel is flat. The rendered image is the background plus what the three lights change:

    I(p) = background(p) + sum_l  g_l  (max(n(p) . d_l, 0) - max(z . d_l, 0))  [+ o inside],

with d_l the unit direction towards light l (azimuth, elevation above the gel) and g_l its RGB
gain in intensity levels: the Lambertian shading of :class:`~diffsim.fem.TactileSensor`, taken
relative to the flat gel so that the background carries the sensor's vignetting and LED
gradients, and a uniform RGB offset o of the contact (the pressed gel's own tint). A gain may
be negative in a channel: it is the camera's response to the light after the background is
taken off, not an emitted colour. The loss is the data set's metric, the mean
absolute error per pixel and channel inside the contact circle (0-255 scale); its gradient is
analytic here (the engine does no finite differences for this family).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffsim.calibrate.engine import Family, Parameter, open_recordings, select_recordings
from diffsim.errors import ConfigError

__all__ = ["OpticsFamily", "TactilePresses", "load_presses"]

#: initial guess: lights 120 degrees apart, 30 degrees up, one channel each
_AZIMUTHS = (0.0, 2.0 * math.pi / 3.0, 4.0 * math.pi / 3.0)


@dataclass
class TactilePresses:
    """Tactile images of presses by a ball, with their contact circles."""

    images: np.ndarray  #: (N, H, W, 3) float, 0-255
    background: np.ndarray  #: (H, W, 3) float, 0-255
    centers: np.ndarray  #: (N, 2) contact-circle centres, (column, row) [px]
    radii: np.ndarray  #: (N,) contact-circle radii [px]
    pixel_size: float = 0.1245e-3  #: [m]
    ball_radius: float = 2.0e-3  #: [m]
    ids: np.ndarray | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(self.images)

    def select(self, index) -> TactilePresses:
        picked = np.arange(len(self))[index]
        ids = self.ids if self.ids is not None else np.arange(len(self))
        return TactilePresses(self.images[picked], self.background, self.centers[picked], self.radii[picked],
                              self.pixel_size, self.ball_radius, ids[picked], self.source)

    def surface(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(mask of the contact pixels (H, W), their unit normals (count, 3); +z out of the gel)."""
        H, W = self.background.shape[:2]
        rows, cols = np.mgrid[0:H, 0:W]
        dx = (cols - self.centers[k, 0]) * self.pixel_size
        dy = (rows - self.centers[k, 1]) * self.pixel_size
        r2 = dx * dx + dy * dy
        mask = r2 <= (self.radii[k] * self.pixel_size) ** 2
        height = np.sqrt(np.clip(self.ball_radius**2 - r2[mask], 1e-4 * self.ball_radius**2, None))
        normal = np.stack([dx[mask], dy[mask], height], axis=-1)
        return mask, normal / np.linalg.norm(normal, axis=-1, keepdims=True)


def load_presses(spec: str | Path) -> TactilePresses:
    """Presses from an ``.npz`` (the format of ``taxim/gelsight_ball_presses.npz``), optionally with
    a selection after ``@`` in Python's slice syntax over images: ``gelsight_ball_presses.npz@0::2``."""
    data, path, selection = open_recordings(
        spec, "tactile images", ("images", "background", "touch_center_px", "touch_radius_px"),
        "images (N, H, W, 3), background (H, W, 3) on a 0-255 scale, touch_center_px (N, 2) [px], "
        "touch_radius_px (N,) [px]")
    images, background = np.asarray(data["images"], dtype=np.float64), np.asarray(data["background"], np.float64)
    centers, radii = np.asarray(data["touch_center_px"], np.float64), np.asarray(data["touch_radius_px"], np.float64)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ConfigError(f"{path}: field 'images' has shape {images.shape}; expected (N, H, W, 3)")
    if background.shape != images.shape[1:]:
        raise ConfigError(f"{path}: field 'background' has shape {background.shape}; expected {images.shape[1:]}")
    if centers.shape != (len(images), 2) or radii.shape != (len(images),):
        raise ConfigError(f"{path}: fields 'touch_center_px' {centers.shape} and 'touch_radius_px' {radii.shape} "
                          f"must be ({len(images)}, 2) and ({len(images)},)")
    for name, values in (("images", images), ("background", background), ("touch_center_px", centers),
                         ("touch_radius_px", radii)):
        if not np.all(np.isfinite(values)):
            raise ConfigError(f"{path}: field '{name}' has non-finite values")
    if images.max() <= 1.0 + 1e-9:
        raise ConfigError(f"{path}: field 'images' peaks at {images.max():.3g}: expected a 0-255 scale, not 0-1")
    if np.any(radii <= 0):
        raise ConfigError(f"{path}: field 'touch_radius_px' must be positive pixels")
    presses = TactilePresses(images, background, centers, radii, ids=np.asarray(data["names"]) if "names" in data
                             else np.arange(len(images)), source=path)
    return select_recordings(presses, spec, selection, "image")


def _lights(values: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """(directions (3, 3), gains (3, 3)) of the three lights."""
    directions, gains = [], []
    for light in range(3):
        azimuth, elevation = values[f"azimuth_{light}"], values[f"elevation_{light}"]
        directions.append((math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth),
                           math.sin(elevation)))
        gains.append([values[f"gain_{light}_{c}"] for c in "rgb"])
    return np.array(directions), np.array(gains)


def render(presses: TactilePresses, k: int, values: dict[str, float]) -> np.ndarray:
    """The rendered image k, (H, W, 3) on the 0-255 scale (not clipped)."""
    mask, normal = presses.surface(k)
    directions, gains = _lights(values)
    change = np.maximum(normal @ directions.T, 0.0) - np.maximum(directions[:, 2], 0.0)  # (count, 3 lights)
    image = presses.background.copy()
    image[mask] += change @ gains + _offset(values)
    return image


def _offset(values: dict[str, float]) -> np.ndarray:
    return np.array([values[f"contact_offset_{c}"] for c in "rgb"])


class OpticsFamily(Family):
    """The ``optics`` family: three-light shading of a ball's cap (see the module header)."""

    name = "optics"
    loss_unit = " levels"
    parameters = tuple(
        [p for light in range(3) for p in (
            Parameter(f"azimuth_{light}", _AZIMUTHS[light], _AZIMUTHS[light] - math.pi, _AZIMUTHS[light] + math.pi,
                      "rad", log=False, scale=0.5, doc=f"light {light}'s direction about the gel's normal"),
            Parameter(f"elevation_{light}", math.radians(30.0), 0.02, math.radians(89.0), "rad", log=False,
                      scale=0.5, doc=f"light {light}'s angle above the gel"))]
        + [Parameter(f"gain_{light}_{c}", 100.0 if light == i else 0.0, -400.0, 400.0, "levels", log=False,
                     scale=50.0, doc=f"the {c} channel's response to light {light}, over the flat gel's")
           for light in range(3) for i, c in enumerate("rgb")]
        + [Parameter(f"contact_offset_{c}", 0.0, -100.0, 100.0, "levels", log=False, scale=10.0,
                     doc=f"a uniform change of the {c} channel inside the contact") for c in "rgb"])

    def losses(self, values, recordings: TactilePresses) -> np.ndarray:
        return self.loss_gradients(values, recordings)[0]

    def loss_gradients(self, values, recordings: TactilePresses):
        """Mean absolute error inside each contact circle, and its gradient (analytic: the
        Lambertian terms are piecewise linear in the gains and smooth in the angles where lit)."""
        directions, gains = _lights(values)
        names = [p.name for p in self.parameters]
        losses = np.zeros(len(recordings))
        grads = np.zeros((len(recordings), len(names)))
        for k in range(len(recordings)):
            mask, normal = recordings.surface(k)
            dots = normal @ directions.T  # (count, 3)
            change = np.maximum(dots, 0.0) - np.maximum(directions[:, 2], 0.0)
            residual = (recordings.background[mask] + change @ gains + _offset(values)
                        - recordings.images[k][mask])  # (count, 3)
            count = residual.size
            losses[k] = np.abs(residual).sum() / count
            sign = np.sign(residual) / count  # d loss / d predicted level
            for c in range(3):
                grads[k, names.index(f"contact_offset_{'rgb'[c]}")] = float(sign[:, c].sum())
            for light in range(3):
                # d predicted / d gain_{light, c} = change[:, light]
                for c in range(3):
                    grads[k, names.index(f"gain_{light}_{'rgb'[c]}")] = float(sign[:, c] @ change[:, light])
                # d predicted / d direction = gains x (n [lit] - z [flat lit])
                lit = (dots[:, light] > 0.0)[:, None] * normal
                flat = np.array([0.0, 0.0, 1.0]) * (directions[light, 2] > 0.0)
                weight = sign @ gains[light]  # (count,): d loss / d change of this light
                d_direction = weight @ lit - weight.sum() * flat  # d loss / d direction (3,)
                az, el = values[f"azimuth_{light}"], values[f"elevation_{light}"]
                d_az = np.array([-math.cos(el) * math.sin(az), math.cos(el) * math.cos(az), 0.0])
                d_el = np.array([-math.sin(el) * math.cos(az), -math.sin(el) * math.sin(az), math.cos(el)])
                grads[k, names.index(f"azimuth_{light}")] = float(d_direction @ d_az)
                grads[k, names.index(f"elevation_{light}")] = float(d_direction @ d_el)
        return losses, grads

    def metrics(self, values, recordings: TactilePresses) -> dict:
        inside, whole = [], []
        for k in range(len(recordings)):
            mask, _ = recordings.surface(k)
            error = np.abs(np.clip(render(recordings, k, values), 0.0, 255.0) - recordings.images[k])
            inside.append(error[mask].mean())
            whole.append(error.mean())
        background = [np.abs(recordings.background - recordings.images[k]) for k in range(len(recordings))]
        return {"mae_inside_contact": float(np.mean(inside)), "mae_whole": float(np.mean(whole)),
                "background_mae_inside_contact": float(np.mean(
                    [b[recordings.surface(k)[0]].mean() for k, b in enumerate(background)])),
                "background_mae_whole": float(np.mean([b.mean() for b in background])), "images": len(recordings)}

    def plot(self, values, recordings: TactilePresses, path: Path, shown: int = 4) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        picked = np.linspace(0, len(recordings) - 1, min(shown, len(recordings))).round().astype(int)
        fig, axes = plt.subplots(3, len(picked), figsize=(2.6 * len(picked), 6.0), squeeze=False)
        for col, k in enumerate(picked):
            rendered = np.clip(render(recordings, k, values), 0, 255)
            real = recordings.images[k]
            for row, (image, title) in enumerate(((real, "real"), (rendered, "rendered"),
                                                  (np.abs(rendered - real) * 4, "|error| x 4"))):
                axes[row, col].imshow(np.clip(image, 0, 255).astype(np.uint8))
                axes[row, col].set_title(f"{title} {recordings.ids[k]}", fontsize=7)
                axes[row, col].axis("off")
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)
        return path
