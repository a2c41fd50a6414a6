"""Speed of the headless renderer: frames per second of a whole MPM scene frame (particles, a box
tool, the ground, uint8 output) at a given particle count and image size.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from diffsim.errors import InvalidParameter


def bench_scene(particles: int = 10000, *, seed: int = 0):
    """A plasticine block of ``particles`` particles (jittered lattice, 2.5 mm apart) on a plane
    collider with a box tool beside it, in a 0.32 m domain. Returns (model, state)."""
    from diffsim.geometry import collider_box, collider_plane
    from diffsim.materials import preset
    from diffsim.mpm import MPMBuilder

    if isinstance(particles, bool) or not isinstance(particles, int) or not 1 <= particles <= 10_000_000:
        raise InvalidParameter("particles", particles, "integers in [1, 1e7]")
    spacing = 0.0025
    side = int(np.ceil(particles ** (1.0 / 3.0)))
    rng = np.random.default_rng(seed)
    ijk = np.stack(np.unravel_index(np.arange(particles), (side, side, side)), axis=1).astype(np.float64)
    x = (ijk - 0.5 * (side - 1)) * spacing + rng.uniform(-0.1, 0.1, ijk.shape) * spacing
    x += np.array([0.16, 0.16, 0.045 + 0.5 * side * spacing])
    builder = MPMBuilder(grid_res=32, domain_size=0.32)
    builder.add_collider(collider_plane(position=(0.0, 0.0, 0.04)))
    half = 0.5 * side * spacing
    tool = collider_box(half_extents=(0.01, half, half), position=(0.16 - half - 0.012, 0.16, 0.04 + half))
    builder.add_collider(tool)
    builder.add_particles(x, preset("plasticine"), volume=spacing**3)
    model = builder.finalize("cpu")
    return model, model.state()


def bench_render(particles: int = 10000, width: int = 256, height: int = 256, frames: int = 50, *,
                 repeats: int = 5, threads: int | None = None) -> dict:
    """Frames per second of :class:`~diffsim.render.scene.SceneRenderer` on :func:`bench_scene`.

    Each repeat times ``frames`` whole frames (clear, ground, particles, tool, uint8 copy) after one
    warm-up frame; the reported rate is the median over ``repeats``.

    Returns:
        dict with ``frames_per_second`` (median), ``ms_per_frame`` (median), ``per_repeat_fps``,
        ``particles``, ``width``, ``height``, ``frames``, ``repeats``, ``threads``.
    """
    from diffsim.render.scene import SceneRenderer

    for name, value in (("frames", frames), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidParameter(name, value, "integers >= 1")
    model, state = bench_scene(particles)
    scene = SceneRenderer(model, width=width, height=height, threads=threads)
    scene.render(state)  # compiles or loads the kernels
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(frames):
            scene.render(state)
        rates.append(frames / (time.perf_counter() - start))
    fps = statistics.median(rates)
    result = {
        "frames_per_second": fps,
        "ms_per_frame": 1000.0 / fps,
        "per_repeat_fps": rates,
        "particles": particles,
        "width": width,
        "height": height,
        "frames": frames,
        "repeats": repeats,
        "threads": scene.renderer.threads,
    }
    scene.renderer.close()
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(bench_render(), indent=2))
