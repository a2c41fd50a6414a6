"""Speed and memory of the MPM solver on a PlasticineLab-like scene: a plasticine block on a rough
floor pressed by a box, N particles on a G^3 grid, gradients over a checkpointed horizon.
"""

from __future__ import annotations

import platform
import resource
import statistics
import time

import numpy as np
import warp as wp

from diffsim.core.device import init_warp
from diffsim.core.scene import Scene
from diffsim.geometry import collider_box, collider_plane
from diffsim.materials import preset
from diffsim.mpm.losses import CenterOfMassLoss
from diffsim.mpm.model import BOUNDARY_CELLS, MPMBuilder
from diffsim.mpm.solver import MPMSolver


def _peak_rss_bytes() -> int:
    # ru_maxrss is in kilobytes on Linux (bytes on macOS)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if platform.system() == "Darwin" else peak * 1024)


def build_scene(particles: int, grid_res: int, *, dt: float = 1e-4, substeps: int = 19,
                device: str | None = None) -> Scene:
    """A cube of plasticine holding about ``particles`` particles (8 per cell) and a box pusher,
    stepped in frames of ``substeps`` steps of ``dt`` [s]."""
    b = MPMBuilder(grid_res=grid_res)
    spacing = 0.5 * b.dx
    side = max(2, round(particles ** (1 / 3)))
    half = 0.5 * side * spacing
    floor = BOUNDARY_CELLS * b.dx + 0.01
    b.add_collider(collider_plane(position=(0, 0, floor), friction=0.8))
    b.add_box((0.5, 0.5, floor + half + 1e-4), (half, half, half), preset("plasticine"), spacing=spacing)
    b.add_collider(collider_box((0.6 * half, 0.6 * half, 0.1), position=(0.5, 0.5, floor + 2 * half + 0.1)))
    model = b.finalize(device, requires_grad=True)
    return Scene(model, MPMSolver(model), frame_dt=dt * substeps, substeps=substeps)


def run_benchmark(*, particles: int = 10_000, grid_res: int = 64, dt: float = 1e-4, substeps: int = 19,
                  frames: int = 50, repeats: int = 3, checkpoint_every: int | None = None,
                  device: str | None = None) -> dict:
    """Time forward and forward+backward of a ``frames`` x ``substeps`` rollout; medians of
    ``repeats`` runs after one warm-up (which compiles the kernels)."""
    scene = build_scene(particles, grid_res, dt=dt, substeps=substeps, device=device)
    model = scene.model
    controls = []
    for _ in range(frames):
        c = model.control(requires_grad=True)
        c.collider_velocity.assign(np.array([[0, 0, 0], [0.05, 0, -0.1]], dtype=np.float32))
        controls.append(c)
    state0 = model.state(requires_grad=True)
    loss = CenterOfMassLoss(model, (0.55, 0.5, 0.1))
    rollout = scene.rollout(state0, controls, checkpoint_every=checkpoint_every, final_loss=loss,
                            check_every=substeps * 10)
    steps = frames * substeps
    forward_times, backward_times = [], []
    for attempt in range(repeats + 1):
        for bundle in (model, state0, *controls):
            bundle.zero_grad()
        wp.synchronize()
        start = time.perf_counter()
        rollout.forward()
        wp.synchronize()
        mid = time.perf_counter()
        rollout.backward()
        wp.synchronize()
        end = time.perf_counter()
        if attempt > 0:  # the first run compiles kernels
            forward_times.append(mid - start)
            backward_times.append(end - mid)
    t_fwd = statistics.median(forward_times)
    t_bwd = statistics.median(backward_times)
    n = model.particle_count
    grad_ok = bool(np.all(np.isfinite(state0.particle_x.grad.numpy())))
    state_bytes = model.state().nbytes()
    return {
        "device": str(model.device),
        "particles": n,
        "grid_res": grid_res,
        "dt": dt,
        "substeps_per_frame": substeps,
        "frames": frames,
        "solver_steps": steps,
        "checkpoint_every": rollout.checkpoint_every,
        "repeats": repeats,
        "forward_seconds": t_fwd,
        "backward_seconds": t_bwd,
        "forward_ms_per_substep": 1e3 * t_fwd / steps,
        "forward_particle_substeps_per_s": n * steps / t_fwd,
        "forward_backward_particle_substeps_per_s": n * steps / (t_fwd + t_bwd),
        "backward_forward_ratio": t_bwd / t_fwd,
        "peak_memory_bytes": _peak_rss_bytes(),
        "rollout_states_allocated": rollout.stats.states_allocated,
        "rollout_state_bytes": rollout.stats.states_allocated * state_bytes,
        "gradient_finite": grad_ok,
        "machine": platform.processor() or platform.machine(),
        "cpu_count": __import__("os").cpu_count(),
    }


def format_report(result: dict) -> str:
    lines = [f"MPM benchmark on {result['device']} ({result['particles']} particles, {result['grid_res']}^3 grid, "
             f"{result['frames']} frames x {result['substeps_per_frame']} substeps, dt {result['dt']:g} s)"]
    lines.append(f"  forward            {result['forward_particle_substeps_per_s'] / 1e6:8.3f} M particle-substeps/s "
                 f"({result['forward_ms_per_substep']:.2f} ms/substep)")
    lines.append(f"  forward+backward   {result['forward_backward_particle_substeps_per_s'] / 1e6:8.3f} M "
                 f"particle-substeps/s (backward/forward {result['backward_forward_ratio']:.2f})")
    lines.append(f"  peak memory (RSS)  {result['peak_memory_bytes'] / 2**20:8.1f} MiB; rollout states "
                 f"{result['rollout_state_bytes'] / 2**20:.1f} MiB in {result['rollout_states_allocated']} states")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    import json
    import sys

    init_warp()
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    print(json.dumps(run_benchmark(particles=n, frames=int(sys.argv[2]) if len(sys.argv) > 2 else 50), indent=2))

