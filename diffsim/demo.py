"""The quick-start demo: gradients through the MPM solver teach a box pusher how to shove a block of
plasticine across a rough floor so that its centre of mass lands on a target; writes plots and a GIF.

The scene is the task ``diffsim/Push-v0``; the optimiser is :func:`diffsim.controllers.trajectory.optimize`
on the task's whole-horizon differentiable rollout.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffsim import visualize
from diffsim.controllers.trajectory import Bounds, optimize
from diffsim.core.device import resolve_device
from diffsim.errors import InvalidParameter
from diffsim.tasks.env import DiffTaskEnv
from diffsim.tasks.plasticine import Push, PushConfig

PLASTICINE_RGB = (0.95, 0.55, 0.2)
PUSHER_RGB = (0.2, 0.25, 0.35)
TARGET_RGB = (0.85, 0.05, 0.1)
FLOOR_RGB = (0.75, 0.75, 0.75)
CHECKPOINT_NAME = "optimizer_checkpoint.pt"


@dataclass
class PushDemoConfig(PushConfig):
    """The demo's task (:class:`diffsim.tasks.plasticine.PushConfig`: scene, target, horizon) and
    its optimiser; every length in metres, every time in seconds.

    The defaults make a ~1k-particle scene whose optimisation takes about two minutes on a
    2-core CPU; the tests shrink ``horizon`` and ``iterations`` further. The target is fixed
    (no variant jitter), so every run optimises the same problem.
    """

    target_jitter: float = 0.0
    initial_speed: float = 0.05  #: pusher speed along +x of the initial guess [m/s]
    learning_rate: float = 0.05  #: Adam step size [m/s]
    learning_rate_decay: float = 0.9  #: factor on the step size per iteration [-]
    adam_betas: tuple[float, float] = (0.5, 0.999)  #: little momentum: the loss is nearly quadratic

    def __post_init__(self):
        super().__post_init__()
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise InvalidParameter("learning_rate", self.learning_rate, "(0, inf)")


@dataclass
class DemoResult:
    """Numbers and files the demo produced (also written to ``summary.json``)."""

    output_dir: str
    initial_loss: float  #: squared distance of the centre of mass to the target, initial guess [m^2]
    final_loss: float  #: the same with the optimised pusher velocities [m^2]
    initial_distance: float  #: [m]
    final_distance: float  #: [m]
    losses: list[float]
    iterations: int
    optimisation_seconds: float
    total_seconds: float
    files: dict[str, str] = field(default_factory=dict)


@dataclass
class _Recording:
    particles: list[np.ndarray] = field(default_factory=list)
    pusher: list[np.ndarray] = field(default_factory=list)
    loss: float = float("nan")
    com: np.ndarray | None = None


def _record(env: DiffTaskEnv, velocities: torch.Tensor) -> _Recording:
    """Step the task with ``velocities`` (frames, 2) (no gradients) and keep every frame."""
    batch, task = env.batch, env.task
    batch.reset()  # the fixed target: the same episode as the optimised one
    recording = _Recording()
    slot = task.pusher  # world 0

    def keep() -> None:
        recording.particles.append(batch.state.particle_x.numpy().copy())
        recording.pusher.append(batch.state.collider_position.numpy()[slot].copy())

    keep()
    for action in velocities.detach().numpy():
        batch.step(action[None])
        keep()
    recording.loss = float(batch.loss[0])
    recording.com = task.com.centers(task.scene.model, batch.state)[0]
    return recording


def _target_marker(target: np.ndarray, size: float) -> np.ndarray:
    t = np.linspace(-size, size, 15)
    lines = [np.outer(t, axis) for axis in np.eye(3)]
    return np.concatenate(lines) + target


def _floor_points(config: PushDemoConfig, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    step = 2.0 * config.domain_size / config.grid_res
    xs = np.arange(lo[0], hi[0] + 1e-9, step)
    ys = np.arange(lo[1], hi[1] + 1e-9, step)
    gx, gy = np.meshgrid(xs, ys, indexing="ij")
    return np.stack([gx.ravel(), gy.ravel(), np.full(gx.size, config.floor_height)], axis=1)


def _caption(image: np.ndarray, text: str) -> np.ndarray:
    from PIL import Image, ImageDraw

    picture = Image.fromarray(image)
    ImageDraw.Draw(picture).text((8, 6), text, fill=(20, 20, 20))
    return np.asarray(picture)


def render_before_after(config: PushDemoConfig, target: np.ndarray, before: _Recording, after: _Recording,
                        path: Path, *, size: tuple[int, int] = (320, 240), fps: int = 15) -> Path:
    """Side-by-side GIF: the initial guess (left) and the optimised pusher (right), with the target."""
    c = config
    all_x = np.concatenate(before.particles + after.particles + [target[None]])
    pusher_half = np.asarray(c.pusher_half_extents)
    pushers = np.concatenate([np.asarray(before.pusher), np.asarray(after.pusher)])
    lo = np.minimum(all_x.min(axis=0), (pushers - pusher_half).min(axis=0)) - 0.01
    hi = np.maximum(all_x.max(axis=0), (pushers + pusher_half).max(axis=0)) + 0.01
    lo[2] = c.floor_height
    floor = _floor_points(c, lo, hi)
    marker = _target_marker(target, 0.008)
    target_image = visualize.render_points([(marker, TARGET_RGB)], bounds=(lo, hi), view="iso", size=size)
    target_mask = np.any(target_image != 255, axis=2, keepdims=True)
    frames = []
    for i in range(len(before.particles)):
        panels = []
        for name, rec in (("initial guess", before), ("optimised", after)):
            outline = visualize.box_outline_points(rec.pusher[i], pusher_half)
            image = visualize.render_points(
                [(floor, FLOOR_RGB), (rec.particles[i], PLASTICINE_RGB), (outline, PUSHER_RGB)],
                bounds=(lo, hi), view="iso", size=size,
            )
            # The target sits inside the material once it is reached: draw it on top to keep it seen.
            image = np.where(target_mask, target_image, image)
            panels.append(_caption(image, f"{name}  t = {i * c.frame_dt:.2f} s"))
        frames.append(np.concatenate([panels[0], np.full((size[1], 4, 3), 80, np.uint8), panels[1]], axis=1))
    # Hold the last frame so the end result can be seen.
    frames.extend([frames[-1]] * fps)
    return visualize.save_gif(frames, path, fps=fps)


def run_demo(
    output_dir: str | Path = "outputs/demo",
    *,
    iterations: int = 15,
    device: str | None = None,
    seed: int = 0,
    progress: bool = True,
    config: PushDemoConfig | None = None,
) -> DemoResult:
    """Optimise the pusher's velocity trajectory by gradient descent through the MPM solver.

    Args:
        output_dir: folder for ``loss.png``, ``before_after.gif`` and ``summary.json``.
        iterations: Adam iterations (each one forward and one checkpointed backward rollout).
        device: Warp device (see :func:`diffsim.core.resolve_device`).
        seed: seed of the particle jitter.
        progress: show a progress bar.
        config: scene and optimiser settings; :class:`PushDemoConfig` defaults when None.

    An interrupted run resumes from ``optimizer_checkpoint.pt`` in ``output_dir`` when started
    again with the same settings; the checkpoint is removed once the demo has finished.
    """
    started = time.perf_counter()
    config = config or PushDemoConfig()
    device = resolve_device(device)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    env = DiffTaskEnv(Push, num_envs=1, device=device, config=_task_config(config, seed))
    env.reset(seed=seed)
    task = env.task
    target = task.com.targets.numpy()[0].astype(np.float64)
    frames = config.horizon
    print(f"diffsim demo: {task.scene.model.particle_count} plasticine particles, grid {config.grid_res}^3, "
          f"{frames} frames x {task.scene.substeps} substeps on {device}; target "
          f"{np.linalg.norm(config.target_offset) * 100:.1f} cm from the start")

    initial = torch.zeros(frames, 2)
    initial[:, 0] = config.initial_speed
    if progress:
        print("simulating the initial guess (a first run also compiles the Warp kernels, ~20 s)")
    before = _record(env, initial)
    parameters = {"pusher_velocity": initial.clone()}
    checkpoint = output / CHECKPOINT_NAME
    result = optimize(
        lambda p: env.rollout(p["pusher_velocity"][:, None, :]), parameters, iterations=iterations,
        learning_rate=config.learning_rate, learning_rate_decay=config.learning_rate_decay, betas=config.adam_betas,
        bounds={"pusher_velocity": Bounds(max_norm=config.max_speed)}, checkpoint_path=checkpoint,
        progress=progress,
    )
    if result.resumed_from is not None:
        print(f"resumed from iteration {result.resumed_from} of an interrupted run ({checkpoint})")
    best = result.best_parameters["pusher_velocity"] if result.losses else initial
    after = _record(env, best)

    initial_distance = float(np.linalg.norm(before.com - target))
    final_distance = float(np.linalg.norm(after.com - target))
    files = {
        "loss": str(visualize.plot_curve(result.losses or [before.loss], output / "loss.png",
                                         title="pusher trajectory optimisation",
                                         ylabel="|centre of mass - target|^2 [m^2]")),
        "gif": str(render_before_after(config, target, before, after, output / "before_after.gif")),
    }
    demo = DemoResult(
        output_dir=str(output), initial_loss=before.loss, final_loss=after.loss,
        initial_distance=initial_distance, final_distance=final_distance, losses=list(result.losses),
        iterations=result.iterations, optimisation_seconds=result.wall_time,
        total_seconds=time.perf_counter() - started, files=files,
    )
    summary = asdict(demo)
    summary.update(
        task=Push.id, device=device, seed=seed, particles=task.scene.model.particle_count,
        substeps=task.scene.substeps, best_iteration=result.best_iteration,
        resumed_from_iteration=result.resumed_from, target=target.tolist(),
        initial_center_of_mass=before.com.tolist(), final_center_of_mass=after.com.tolist(),
        pusher_velocity=best.tolist(), config=asdict(config),
    )
    files["summary"] = str(output / "summary.json")
    summary["files"] = files
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    # Finished: a later run should start afresh, not resume this one.
    checkpoint.unlink(missing_ok=True)
    print(f"loss:     initial {demo.initial_loss:.3e} m^2 -> final {demo.final_loss:.3e} m^2")
    print(f"distance: initial {initial_distance * 100:.2f} cm -> final {final_distance * 100:.2f} cm "
          f"({final_distance / max(initial_distance, 1e-12):.1%} of the initial)")
    print(f"outputs written to {output.resolve()}")
    return demo


def _task_config(config: PushDemoConfig, seed: int) -> PushConfig:
    """The task's part of the demo config, with ``seed`` for the particle jitter."""
    fields = {f.name for f in dataclasses.fields(PushConfig)}
    return PushConfig(**{name: getattr(config, name) for name in fields if name != "jitter_seed"}, jitter_seed=seed)
