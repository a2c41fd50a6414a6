"""The quick-start demo: gradients through the MPM solver teach a box pusher how to shove a block of
plasticine across a rough floor so that its centre of mass lands on a target; writes plots and a GIF.
"""

from __future__ import annotations

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
from diffsim.core.rollout import Rollout
from diffsim.errors import InvalidParameter
from diffsim.geometry import collider_box, collider_plane
from diffsim.materials import preset
from diffsim.mpm import MPMBuilder, MPMModel, MPMSolver
from diffsim.mpm.losses import CenterOfMassLoss

PLASTICINE_RGB = (0.95, 0.55, 0.2)
PUSHER_RGB = (0.2, 0.25, 0.35)
TARGET_RGB = (0.85, 0.05, 0.1)
FLOOR_RGB = (0.75, 0.75, 0.75)
CHECKPOINT_NAME = "optimizer_checkpoint.pt"


@dataclass
class PushDemoConfig:
    """The scene and optimisation of the demo; every length in metres, every time in seconds.

    The defaults make a ~1k-particle scene whose optimisation takes about two minutes on a
    2-core CPU; the tests shrink ``frames`` and ``iterations`` further.
    """

    grid_res: int = 32  #: grid cells per axis
    domain_size: float = 0.32  #: edge of the cubic domain [m]
    floor_height: float = 0.04  #: height of the floor plane [m] (above the 3-cell wall layer)
    floor_friction: float = 1.0  #: Coulomb coefficient of the rough floor [-]
    block_center_xy: tuple[float, float] = (0.12, 0.16)  #: block centre in the floor plane [m]
    block_half_extents: tuple[float, float, float] = (0.02, 0.02, 0.015)  #: [m]
    particle_spacing: float = 0.0035  #: distance between neighbouring particles [m]
    particle_jitter: float = 0.1  #: random offset of each particle, as a fraction of the spacing
    pusher_half_extents: tuple[float, float, float] = (0.01, 0.035, 0.025)  #: [m]
    pusher_gap: float = 0.002  #: distance between the pusher face and the block at rest [m]
    pusher_lift: float = 0.003  #: clearance between the pusher and the floor [m]
    pusher_friction: float = 0.3  #: Coulomb coefficient of the pusher [-]
    frames: int = 20  #: control intervals, each with its own pusher velocity
    frame_dt: float = 1.0 / 60.0  #: duration of one control interval [s]
    target_offset: tuple[float, float, float] = (0.06, 0.0, 0.0)  #: target minus initial centre of mass [m]
    initial_speed: float = 0.05  #: pusher speed along +x of the initial guess [m/s]
    max_speed: float = 0.5  #: largest horizontal pusher speed allowed [m/s]
    learning_rate: float = 0.05  #: Adam step size [m/s]
    learning_rate_decay: float = 0.9  #: factor on the step size per iteration [-]
    adam_betas: tuple[float, float] = (0.5, 0.999)  #: little momentum: the loss is nearly quadratic

    def __post_init__(self):
        if not isinstance(self.frames, int) or self.frames < 1:
            raise InvalidParameter("frames", self.frames, "integers >= 1")
        for name in ("domain_size", "particle_spacing", "frame_dt", "max_speed", "learning_rate"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise InvalidParameter(name, value, "(0, inf)")


@dataclass
class PushScene:
    """The built scene: model, solver, rollout and what the demo needs to draw and score it."""

    config: PushDemoConfig
    model: MPMModel
    solver: MPMSolver
    rollout: Rollout
    loss: CenterOfMassLoss
    pusher: int  #: collider index of the pusher
    initial_com: np.ndarray  #: centre of mass at rest [m]
    target: np.ndarray  #: target centre of mass [m]


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


def build_push_scene(config: PushDemoConfig, *, device: str | None = None, seed: int = 0) -> PushScene:
    """Plasticine block on a rough floor with a box pusher beside it, and the rollout to optimise."""
    c = config
    builder = MPMBuilder(grid_res=c.grid_res, domain_size=c.domain_size)
    half = np.asarray(c.block_half_extents, dtype=float)
    center = np.array([*c.block_center_xy, c.floor_height + half[2]])
    builder.add_box(tuple(center), tuple(half), preset("plasticine"), spacing=c.particle_spacing,
                    jitter=c.particle_jitter, seed=seed)
    builder.add_collider(collider_plane(position=(0.0, 0.0, c.floor_height), friction=c.floor_friction))
    pusher_half = np.asarray(c.pusher_half_extents, dtype=float)
    pusher_position = (center[0] - half[0] - c.pusher_gap - pusher_half[0], center[1],
                       c.floor_height + c.pusher_lift + pusher_half[2])
    pusher = builder.add_collider(collider_box(tuple(pusher_half), position=pusher_position,
                                               friction=c.pusher_friction))
    model = builder.finalize(device)
    solver = MPMSolver(model)
    mass = model.particle_mass.numpy().astype(np.float64)
    initial_com = (model.initial_x.astype(np.float64) * mass[:, None]).sum(axis=0) / mass.sum()
    target = initial_com + np.asarray(c.target_offset, dtype=float)
    loss = CenterOfMassLoss(model, target)
    controls = [model.control(requires_grad=True) for _ in range(c.frames)]
    # substeps="auto": the fewest steps per frame that keep the elastic CFL limit.
    rollout = Rollout(solver, model, model.state(), controls, frame_dt=c.frame_dt, substeps="auto",
                      final_loss=loss)
    return PushScene(c, model, solver, rollout, loss, pusher, initial_com, target)


def pusher_inputs(scene: PushScene):
    """Map the optimised (frames, 2) horizontal pusher velocities [m/s] to the rollout's controls."""
    frames, colliders = scene.config.frames, scene.model.collider_count

    def to_inputs(parameters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        horizontal = parameters["pusher_velocity"]
        # The floor and every other collider stay still; the pusher never moves vertically.
        per_collider = [torch.zeros(frames, 3, dtype=horizontal.dtype) for _ in range(colliders)]
        vertical = torch.zeros(frames, 1, dtype=horizontal.dtype)
        per_collider[scene.pusher] = torch.cat([horizontal, vertical], dim=1)
        return {"controls.collider_velocity": torch.stack(per_collider, dim=1)}

    return to_inputs


@dataclass
class _Recording:
    particles: list[np.ndarray] = field(default_factory=list)
    pusher: list[np.ndarray] = field(default_factory=list)
    loss: float = float("nan")
    com: np.ndarray | None = None


def _record(scene: PushScene, velocities: torch.Tensor) -> _Recording:
    """Simulate with ``velocities`` (no gradients) and keep every frame's positions."""
    inputs = pusher_inputs(scene)({"pusher_velocity": velocities.detach()})["controls.collider_velocity"]
    for frame, control in enumerate(scene.rollout.controls):
        control.collider_velocity.assign(inputs[frame].numpy().astype(np.float32))
    recording = _Recording()
    slot = scene.pusher  # world 0

    def keep(state) -> None:
        recording.particles.append(state.particle_x.numpy().copy())
        recording.pusher.append(state.collider_position.numpy()[slot].copy())

    keep(scene.rollout.state0)
    recording.loss = scene.rollout.forward(on_frame=lambda frame, state: keep(state))
    mass = scene.model.particle_mass.numpy().astype(np.float64)
    recording.com = (recording.particles[-1].astype(np.float64) * mass[:, None]).sum(axis=0) / mass.sum()
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


def render_before_after(scene: PushScene, before: _Recording, after: _Recording, path: Path, *,
                        size: tuple[int, int] = (320, 240), fps: int = 15) -> Path:
    """Side-by-side GIF: the initial guess (left) and the optimised pusher (right), with the target."""
    c = scene.config
    all_x = np.concatenate(before.particles + after.particles + [scene.target[None]])
    pusher_half = np.asarray(c.pusher_half_extents)
    pushers = np.concatenate([np.asarray(before.pusher), np.asarray(after.pusher)])
    lo = np.minimum(all_x.min(axis=0), (pushers - pusher_half).min(axis=0)) - 0.01
    hi = np.maximum(all_x.max(axis=0), (pushers + pusher_half).max(axis=0)) + 0.01
    lo[2] = c.floor_height
    floor = _floor_points(c, lo, hi)
    marker = _target_marker(scene.target, 0.008)
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
    scene = build_push_scene(config, device=device, seed=seed)
    print(f"diffsim demo: {scene.model.particle_count} plasticine particles, grid {config.grid_res}^3, "
          f"{config.frames} frames x {scene.rollout.substeps} substeps on {device}; target "
          f"{np.linalg.norm(config.target_offset) * 100:.1f} cm from the start")

    initial = torch.zeros(config.frames, 2)
    initial[:, 0] = config.initial_speed
    if progress:
        print("simulating the initial guess (a first run also compiles the Warp kernels, ~20 s)")
    before = _record(scene, initial)
    parameters = {"pusher_velocity": initial.clone()}
    checkpoint = output / CHECKPOINT_NAME
    result = optimize(
        scene.rollout, parameters, iterations=iterations, learning_rate=config.learning_rate,
        learning_rate_decay=config.learning_rate_decay, betas=config.adam_betas,
        inputs=pusher_inputs(scene), bounds={"pusher_velocity": Bounds(max_norm=config.max_speed)},
        checkpoint_path=checkpoint, progress=progress,
    )
    if result.resumed_from is not None:
        print(f"resumed from iteration {result.resumed_from} of an interrupted run ({checkpoint})")
    best = result.best_parameters["pusher_velocity"] if result.losses else initial
    after = _record(scene, best)

    initial_distance = float(np.linalg.norm(before.com - scene.target))
    final_distance = float(np.linalg.norm(after.com - scene.target))
    files = {
        "loss": str(visualize.plot_curve(result.losses or [before.loss], output / "loss.png",
                                         title="pusher trajectory optimisation",
                                         ylabel="|centre of mass - target|^2 [m^2]")),
        "gif": str(render_before_after(scene, before, after, output / "before_after.gif")),
    }
    demo = DemoResult(
        output_dir=str(output), initial_loss=before.loss, final_loss=after.loss,
        initial_distance=initial_distance, final_distance=final_distance, losses=list(result.losses),
        iterations=result.iterations, optimisation_seconds=result.wall_time,
        total_seconds=time.perf_counter() - started, files=files,
    )
    summary = asdict(demo)
    summary.update(
        device=device, seed=seed, particles=scene.model.particle_count, substeps=scene.rollout.substeps,
        best_iteration=result.best_iteration, resumed_from_iteration=result.resumed_from,
        target=scene.target.tolist(),
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
