"""Speed of the rod solver on cable replays: milliseconds per 100 Hz frame at batch 1 and at batch
56, forward and forward+backward (checkpointed), and the batch's per-rod throughput gain.

It lives here, not in ``rod/``, because the replays are built by ``calibrate.cable`` (above the solvers).
"""

from __future__ import annotations

import statistics
import time


def _time_rollouts(recordings, *, repeats: int, backward: bool, device) -> tuple[float, int]:
    from diffsim.calibrate.cable import CableParameters, cable_scene, replay_controls
    from diffsim.rod.losses import MarkerLoss

    scene, layout = cable_scene(recordings, CableParameters(), device=device, requires_grad=backward)
    model = scene.model
    controls = replay_controls(model, layout, recordings)
    frames = len(controls)
    loss = None
    if backward:
        targets = recordings.positions[:, 1:].transpose(1, 0, 2, 3).reshape(frames, -1, 3)
        marker_loss = MarkerLoss(model, layout.marker_vertex.reshape(-1), targets)

        def loss(m, s, frame, out):
            marker_loss(m, s, frame, out)

    state0 = model.state(requires_grad=backward)
    times = []
    substeps = 0
    for _ in range(repeats + 1):  # the first run compiles and warms up
        rollout = scene.rollout(state0, controls, checkpoint_every=None if backward else 10**9, frame_loss=loss,
                                check_every=0)
        start = time.perf_counter()
        rollout.forward()
        if backward:
            rollout.backward()
        times.append((time.perf_counter() - start) / frames * 1e3)
        substeps = rollout.substeps
    return statistics.median(times[1:]), substeps


def run_benchmark(*, frames: int = 100, batch: int = 56, repeats: int = 5, markers: int = 13,
                  device: str | None = None) -> dict:
    """Time replays of synthetic ``markers``-marker cables (one rod vertex per marker)."""
    from diffsim.calibrate.cable import synthetic_recordings
    from diffsim.core.device import resolve_device

    device = resolve_device(device)
    recordings = synthetic_recordings(batch, frames=frames, markers=markers, device=device)
    single = recordings.subset([0])
    fwd1, substeps = _time_rollouts(single, repeats=repeats, backward=False, device=device)
    both1, _ = _time_rollouts(single, repeats=repeats, backward=True, device=device)
    fwdN, _ = _time_rollouts(recordings, repeats=repeats, backward=False, device=device)
    bothN, _ = _time_rollouts(recordings, repeats=repeats, backward=True, device=device)
    return {
        "device": device,
        "markers": markers,
        "frames": frames,
        "substeps_per_frame": substeps,
        "batch": batch,
        "frame_ms_batch1": fwd1,
        "frame_ms_batch1_forward_backward": both1,
        f"frame_ms_batch{batch}": fwdN,
        f"frame_ms_batch{batch}_forward_backward": bothN,
        f"batch{batch}_speedup": batch * fwd1 / fwdN,
        f"batch{batch}_speedup_forward_backward": batch * both1 / bothN,
    }


def format_report(result: dict) -> str:
    b = result["batch"]
    lines = [
        f"rod replay, {result['markers']} markers, {result['substeps_per_frame']} substeps per 10 ms frame, "
        f"{result['frames']} frames, device {result['device']}",
        f"  batch 1:  forward {result['frame_ms_batch1']:.3f} ms/frame, "
        f"forward+backward {result['frame_ms_batch1_forward_backward']:.3f} ms/frame",
        f"  batch {b}: forward {result[f'frame_ms_batch{b}']:.3f} ms/frame, "
        f"forward+backward {result[f'frame_ms_batch{b}_forward_backward']:.3f} ms/frame",
        f"  per-rod throughput gain at batch {b}: forward {result[f'batch{b}_speedup']:.1f}x, "
        f"forward+backward {result[f'batch{b}_speedup_forward_backward']:.1f}x",
    ]
    return "\n".join(lines)


__all__ = ["format_report", "run_benchmark"]
