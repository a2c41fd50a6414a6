"""Speed of the FEM tactile sensor: one substep of a sensor pad the size of DiffTactile's (about
1.8k nodes, 8.1k tets) pressed by a sphere, forward and forward+backward, on the chosen device.
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


def sensor_scene(*, resolution=(13, 13, 8), device: str | None = None, requires_grad: bool = False):
    """A 20 x 20 x 5 mm pad bonded at its base, a 6 mm sphere pressed 0.3 mm into it."""
    thickness = 5e-3
    mesh = tet_mesh_pad((20e-3, 20e-3, thickness), resolution)
    builder = FEMBuilder()
    builder.add_body(mesh, young_modulus=1.5e5, poisson_ratio=0.45, density=1100.0, damping=50.0,
                     fixed_nodes=mesh.vertices[:, 2] < 1e-12)
    builder.add_collider(collider_sphere(6e-3, position=(0.0, 0.0, thickness + 6e-3 - 0.3e-3), friction=0.5))
    model = builder.finalize(device, requires_grad=requires_grad)
    return model, FEMSolver(model)


def run_benchmark(*, steps: int = 200, repeats: int = 5, device: str | None = None) -> dict:
    """Median milliseconds per substep, forward (untaped) and forward+backward (taped steps, then
    the backward pass), over ``repeats`` runs of ``steps`` substeps."""
    model, solver = sensor_scene(device=device, requires_grad=True)
    dt = solver.max_stable_dt(model)
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
        wp.synchronize_device(model.device)
        forward.append((time.perf_counter() - start) / steps * 1e3)

    taped_steps = max(1, steps // 4)
    states = [model.state(requires_grad=True) for _ in range(taped_steps + 1)]
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
    return {
        "device": str(model.device),
        "nodes": model.node_count,
        "tets": model.tet_count,
        "substep_ms_forward": statistics.median(forward),
        "substep_ms_forward_backward": statistics.median(both[1:]),  # the first run allocates scratch
        "dt": dt,
        "steps": steps,
        "repeats": repeats,
    }


def format_report(result: dict) -> str:
    return (f"FEM tactile sensor, {result['nodes']} nodes, {result['tets']} tets, on {result['device']} "
            f"(median of {result['repeats']} runs of {result['steps']} substeps):\n"
            f"  forward            {result['substep_ms_forward']:.3f} ms per substep\n"
            f"  forward + backward {result['substep_ms_forward_backward']:.3f} ms per substep")
