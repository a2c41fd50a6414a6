"""SurfaceFollow under each FEM integrator: how close the pad's normal force is to references
refined in time, and what an env step costs.

Accuracy: one episode (seed 0) pressing the pad down at 3 mm/s with random sideways (+-2 cm/s)
and tilt (+-1 rad/s) commands, the same under every integrator; the normal force after every
frame is compared with the explicit integrator at half and a quarter of its step and with the
implicit one at an eighth of the frame (0.25 ms). Speed: random actions over the middle half of
every range, 150 frames, three episodes three times each, every integrator in the same process,
interleaved; medians of the per-episode ms per env step.

    python benchmarks/surface_follow_integrators.py

writes ``benchmarks/results/surface_follow_integrators.json``.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
#: (name, integrator, substeps as a multiple of the integrator's own)
RUNS = [("explicit", "explicit", 1), ("explicit/2", "explicit", 2), ("explicit/4", "explicit", 4),
        ("implicit", "implicit", 1), ("implicit/8", "implicit", 8), ("quasistatic", "quasistatic", 1)]


def _batch(integrator: str, refine: int = 1):
    from diffsim.tasks.env import task_type
    from diffsim.tasks.task import TaskBatch

    task = task_type("SurfaceFollow-v0")(num_worlds=1, integrator=integrator)
    scene = task.scene
    if refine != 1:
        own = max(1, math.ceil(scene.frame_dt / min(scene.solver.max_stable_dt(scene.model), scene.frame_dt) - 1e-9))
        scene.substeps = own * refine
    return TaskBatch(task)


def _pressing_forces(batch, seed: int = 0, frames: int = 150) -> np.ndarray:
    rng = np.random.default_rng(seed)
    batch.reset(variants=[batch.task.sample_variant(np.random.default_rng(seed))])
    forces = []
    for _ in range(frames):
        action = np.array([*rng.uniform(-0.02, 0.02, 2), -0.003, *rng.uniform(-1.0, 1.0, 2)], dtype=np.float32)
        batch.step(action[None])
        forces.append(float(batch.task._terms(batch.state).numpy()[0, 0]))
    return np.array(forces)


def _ms_per_step(batch, seed: int, frames: int = 150) -> float:
    rng = np.random.default_rng(seed)
    batch.reset(variants=[batch.task.sample_variant(np.random.default_rng(seed))])
    low, high = batch.low, batch.high
    start = time.perf_counter()
    for _ in range(frames):
        batch.step((low + (high - low) * rng.uniform(0.25, 0.75, size=low.shape))[None])
    return (time.perf_counter() - start) / frames * 1e3


def main() -> None:
    forces = {name: _pressing_forces(_batch(integrator, refine)) for name, integrator, refine in RUNS}
    scale = float(np.abs(forces["implicit/8"]).max())
    touching = forces["implicit/8"] > 0.05 * scale
    accuracy = {name: {"max_force_N": float(f.max()), "mean_force_touching_N": float(f[touching].mean()),
                       **{f"max_difference_to_{ref}": float(np.abs(f - forces[ref]).max() / scale)
                          for ref in ("explicit/4", "implicit/8")}}
                for name, f in forces.items()}
    batches = {i: _batch(i) for i in ("explicit", "implicit", "quasistatic")}
    for batch in batches.values():
        _ms_per_step(batch, 99)  # compiles and warms up
    times = {i: [] for i in batches}
    for _ in range(3):
        for seed in range(3):
            for i, batch in batches.items():
                times[i].append(_ms_per_step(batch, seed))
    speed = {i: {"ms_per_env_step_median": statistics.median(v), "range": [min(v), max(v)]} for i, v in times.items()}
    result = {"accuracy": accuracy, "force_scale_N": scale, "speed": speed}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "surface_follow_integrators.json").write_text(json.dumps(result, indent=2))
    for name, row in accuracy.items():
        print(f"{name:12s} max {row['max_force_N']:.3f} N, mean {row['mean_force_touching_N']:.3f} N, "
              f"off explicit/4 {row['max_difference_to_explicit/4']:.4f}, off implicit/8 "
              f"{row['max_difference_to_implicit/8']:.4f} (of the largest force)")
    for i, row in speed.items():
        low, high = row["range"]
        print(f"{i:12s} {row['ms_per_env_step_median']:.1f} ms per env step ({low:.1f}-{high:.1f})")


if __name__ == "__main__":
    main()
