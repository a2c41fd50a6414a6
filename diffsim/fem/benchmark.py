"""Speed of the FEM tactile sensor: a sensor pad the size of DiffTactile's (about 1.8k nodes,
8.1k tets) pressed by a sliding sphere, forward and forward+backward, per step and per simulated
second, with the explicit, implicit (1 kHz steps) or quasi-static (100 Hz frames) integrator.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import warp as wp

from diffsim.fem.model import FEMBuilder
from diffsim.fem.solver import FEMSolver
from diffsim.geometry import collider_sphere
from diffsim.geometry.tetmesh import tet_mesh_pad

#: default step of each integrator [s]: the explicit one takes its stability limit
FRAME_DT = {"implicit": 1e-3, "quasistatic": 1e-2}


def sensor_scene(*, resolution=(13, 13, 8), device: str | None = None, requires_grad: bool = False,
                 integrator: str = "explicit"):
    """A 20 x 20 x 5 mm pad bonded at its base, a 6 mm sphere pressed 0.3 mm into it."""
    thickness = 5e-3
    mesh = tet_mesh_pad((20e-3, 20e-3, thickness), resolution)
    builder = FEMBuilder()
    builder.add_body(mesh, young_modulus=1.5e5, poisson_ratio=0.45, density=1100.0, damping=50.0,
                     fixed_nodes=mesh.vertices[:, 2] < 1e-12)
    builder.add_collider(collider_sphere(6e-3, position=(0.0, 0.0, thickness + 6e-3 - 0.3e-3), friction=0.5))
    model = builder.finalize(device, requires_grad=requires_grad)
    return model, FEMSolver(model, integrator=integrator)


def run_benchmark(*, steps: int | None = None, repeats: int = 5, device: str | None = None,
                  integrator: str = "explicit", frame_dt: float | None = None) -> dict:
    """Median milliseconds per step, forward (untaped) and forward+backward (taped steps, then
    the backward pass), over ``repeats`` runs of ``steps`` steps (default: 200 explicit, 10
    implicit), and the wall seconds per simulated second they make. The sphere slides at 10 mm/s
    while pressing in at 10 mm/s."""
    model, solver = sensor_scene(device=device, requires_grad=True, integrator=integrator)
    dt = solver.max_stable_dt(model) if integrator == "explicit" else (frame_dt or FRAME_DT[integrator])
    steps = steps or (200 if integrator == "explicit" else 10)
    newton, cg = [], []
    control = model.control()
    control.collider_velocity.assign(np.array([[0.01, 0.0, -0.01]], dtype=np.float32))
    a, b = model.state(), model.state()
    for _ in range(5):  # compile and warm up
        solver.step(model, a, b, control, dt)
        a, b = b, a
    forward = []
    for _ in range(repeats):
        wp.synchronize_device(model.device)
        start = time.perf_counter()
        for _ in range(steps):
            solver.step(model, a, b, control, dt)
            a, b = b, a
            if solver.last_report is not None:
                newton.append(solver.last_report.newton_iterations)
                cg.append(solver.last_report.cg_iterations)
        wp.synchronize_device(model.device)
        forward.append((time.perf_counter() - start) / steps * 1e3)

    taped_steps = max(1, steps // 4)
    states = [model.state(requires_grad=True) for _ in range(taped_steps + 1)]
    states[0].assign(a)  # from where the forward runs left off (the sphere already in contact)
    both = []
    for _ in range(repeats + 1):
        wp.synchronize_device(model.device)
        start = time.perf_counter()
        claim = solver.begin_step_scratch()
        tape = wp.Tape()
        with tape:
            for k in range(taped_steps):
                solver.step(model, states[k], states[k + 1], control, dt)
        solver.end_step_scratch(claim)
        states[-1].node_x.grad.fill_(1.0)
        tape.backward()
        wp.synchronize_device(model.device)
        both.append((time.perf_counter() - start) / taped_steps * 1e3)
        tape.zero()
        solver.release_step_scratch(claim)
        for s in states:
            s.zero_grad()
    ms_forward = statistics.median(forward)
    ms_both = statistics.median(both[1:])  # the first run allocates scratch
    return {
        "device": str(model.device),
        "integrator": integrator,
        "nodes": model.node_count,
        "tets": model.tet_count,
        "substep_ms_forward": ms_forward,
        "substep_ms_forward_backward": ms_both,
        "wall_s_per_simulated_s_forward": ms_forward * 1e-3 / dt,
        "wall_s_per_simulated_s_forward_backward": ms_both * 1e-3 / dt,
        "dt": dt,
        "steps_per_simulated_s": 1.0 / dt,
        "newton_iterations_mean": float(np.mean(newton)) if newton else None,
        "cg_iterations_mean": float(np.mean(cg)) if cg else None,
        "steps": steps,
        "repeats": repeats,
    }


def format_report(result: dict) -> str:
    lines = [f"FEM tactile sensor, {result['nodes']} nodes, {result['tets']} tets, {result['integrator']} steps "
             f"of {result['dt']:.3g} s, on {result['device']} (median of {result['repeats']} runs of "
             f"{result['steps']} steps):",
             f"  forward            {result['substep_ms_forward']:.3f} ms per step, "
             f"{result['wall_s_per_simulated_s_forward']:.2f} s per simulated second",
             f"  forward + backward {result['substep_ms_forward_backward']:.3f} ms per step, "
             f"{result['wall_s_per_simulated_s_forward_backward']:.2f} s per simulated second"]
    if result.get("newton_iterations_mean") is not None:
        lines.append(f"  Newton iterations per step {result['newton_iterations_mean']:.1f}, "
                     f"CG iterations per step {result['cg_iterations_mean']:.0f}")
    return "\n".join(lines)
