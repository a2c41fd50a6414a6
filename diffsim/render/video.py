"""Episode files from rendered frames: looping GIFs (imageio + Pillow) and MP4s (imageio-ffmpeg, the
``video`` extra), written atomically so a reader never sees half a file.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from diffsim.errors import ConfigError, InvalidParameter

#: File extensions :func:`write_video` knows.
VIDEO_EXTENSIONS = (".gif", ".mp4")


def _frames(frames: Iterable) -> list[np.ndarray]:
    out = []
    for k, frame in enumerate(frames):
        f = np.asarray(frame)
        if f.ndim != 3 or f.shape[2] not in (3, 4) or f.shape[0] < 1 or f.shape[1] < 1:
            raise InvalidParameter(f"frames[{k}]", f"array of shape {f.shape}",
                                   "images of shape (H, W, 3) or (H, W, 4)")
        if f.dtype != np.uint8:
            if not np.issubdtype(f.dtype, np.floating) or not np.all(np.isfinite(f)):
                raise InvalidParameter(f"frames[{k}]", f"array of dtype {f.dtype}", "uint8 or float RGB in [0, 1]")
            f = (np.clip(f, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        f = np.ascontiguousarray(f[:, :, :3])
        if out and f.shape != out[0].shape:
            raise InvalidParameter(f"frames[{k}]", f"an image of shape {f.shape}",
                                   f"images of the first frame's shape {out[0].shape}")
        out.append(f)
    if not out:
        raise InvalidParameter("frames", "an empty sequence", "one or more images")
    return out


def write_video(frames: Iterable, path: str | os.PathLike, *, fps: float = 30.0) -> Path:
    """Write frames (H, W, 3) uint8 (or float in [0, 1]) to ``path``; returns the path.

    The extension picks the format: ``.gif`` (looping, frame time rounded to 10 ms by the GIF
    format) or ``.mp4`` (H.264, yuv420p; odd sizes are padded by one edge row/column; needs
    ``imageio-ffmpeg``: ``pip install 'diffsim[video]'``). The file is written next to ``path``
    under a temporary name and moved into place, so an existing file is replaced whole or not at all.

    Args:
        frames: the images, all of one shape.
        path: the file to write; its folder is created.
        fps: frames per second, in (0, 100] for GIFs and (0, 1000] for MP4s.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in VIDEO_EXTENSIONS:
        raise InvalidParameter("path", str(path), "file names ending in " + " or ".join(VIDEO_EXTENSIONS),
                               hint="Pick the format by the extension, e.g. 'episode.gif' or 'episode.mp4'.")
    limit = 100.0 if ext == ".gif" else 1000.0
    try:
        fps = float(fps)
    except (TypeError, ValueError) as exc:
        raise InvalidParameter("fps", fps, f"(0, {limit:g}] frames per second") from exc
    if not (0.0 < fps <= limit):
        raise InvalidParameter("fps", fps, f"(0, {limit:g}] frames per second")
    images = _frames(frames)
    if ext == ".mp4":
        try:
            import imageio_ffmpeg  # noqa: F401
        except ImportError as exc:
            raise ConfigError("Writing .mp4 needs the imageio-ffmpeg package: pip install 'diffsim[video]' "
                              "(or imageio-ffmpeg), or write a .gif instead.") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    # a fresh name beside the target (not mkstemp, whose 0600 mode would survive the rename)
    tmp = str(path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{ext}"))
    try:
        if ext == ".gif":
            _write_gif(images, tmp, fps)
        else:
            _write_mp4(images, tmp, fps)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _write_gif(images: list[np.ndarray], path: str, fps: float) -> None:
    import imageio.v3 as iio

    # the Pillow plugin takes the frame time in milliseconds; loop=0 loops forever
    iio.imwrite(path, np.stack(images), extension=".gif", plugin="pillow", duration=1000.0 / fps, loop=0)


def _write_mp4(images: list[np.ndarray], path: str, fps: float) -> None:
    import imageio.v2 as imageio

    h, w = images[0].shape[:2]
    pad = ((0, h % 2), (0, w % 2), (0, 0))  # yuv420p needs even sizes
    writer = imageio.get_writer(path, format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat="yuv420p",
                                macro_block_size=1, quality=8)
    try:
        for image in images:
            writer.append_data(np.pad(image, pad, mode="edge") if (h % 2 or w % 2) else image)
    finally:
        writer.close()
