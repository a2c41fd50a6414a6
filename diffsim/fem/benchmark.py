"""Speed of the FEM tactile sensor: a sensor pad the size of DiffTactile's (about 1.8k nodes,
8.1k tets) pressed by a sliding sphere, forward and forward+backward, per step and per simulated
second, with the explicit, implicit (1 kHz steps) or quasi-static (100 Hz frames) integrator.
"""

from __future__ import annotations

import math
import statistics
import time

import numpy as np
import warp as wp

from diffsim.errors import InvalidParameter
from diffsim.fem.model import FEMBuilder
from diffsim.fem.solver import FEMSolver
from diffsim.geometry import collider_sphere
from diffsim.geometry.tetmesh import tet_mesh_pad

#: default step of each integrator [s]: the explicit one takes its stability limit
FRAME_DT = {"implicit": 1e-3, "quasistatic": 1e-2}
#: the indenter's motion [m/s]: sliding along x at 10 mm/s while pressing in at 5 mm/s
INDENTER_VELOCITY = (0.01, 0.0, -0.005)
#: how long the indenter presses [s] (to 1 mm); it slides at that depth after
PRESS_DURATION = 0.2
#: default simulated time each timed run of the implicit integrators covers [s]: 2 mm of sliding
#: while the indentation goes from 0 to 1 mm
DURATION = 0.2


def sensor_scene(*, resolution=(13, 13, 8), device: str | None = None, requires_grad: bool = False,
                 integrator: str = "explicit", preconditioner: str = "auto", start_x: float = 0.0):
    """A 20 x 20 x 5 mm pad bonded at its base, a 6 mm sphere touching its top at x = ``start_x`` [m]."""
    thickness = 5e-3
    mesh = tet_mesh_pad((20e-3, 20e-3, thickness), resolution)
    builder = FEMBuilder()
    builder.add_body(mesh, young_modulus=1.5e5, poisson_ratio=0.45, density=1100.0, damping=50.0,
                     fixed_nodes=mesh.vertices[:, 2] < 1e-12)
    builder.add_collider(collider_sphere(6e-3, position=(start_x, 0.0, thickness + 6e-3), friction=0.5))
    model = builder.finalize(device, requires_grad=requires_grad)
    return model, FEMSolver(model, integrator=integrator, preconditioner=preconditioner)


def run_benchmark(*, steps: int | None = None, repeats: int = 5, device: str | None = None,
                  integrator: str = "explicit", frame_dt: float | None = None,
                  preconditioner: str = "auto", duration: float = DURATION) -> dict:
    """Wall seconds per simulated second, forward (untaped) and forward+backward (taped steps,
    then the backward pass), medians over ``repeats`` runs after a warm-up run.

    The sphere slides at 10 mm/s, pressing in at 5 mm/s from touching for the first 0.2 s (to
    1 mm) and holding that depth after; the slide is centred on the pad. Explicit runs time
    ``steps`` steps (default 200) at the stability limit, whose cost does not depend on the
    motion. The implicit integrators' cost does (Newton iterations grow with the motion per step),
    so each of their runs simulates ``duration`` seconds of the motion from the start (at most
    1.2 s, which ends the patch 1.5 mm from the pad's edge), with a fresh solver: the first
    factorisation of the Cholesky preconditioner is part of what a run pays."""
    if not 0.0 < duration <= 1.2:
        raise InvalidParameter("duration", duration, "(0, 1.2] s")
    implicit = integrator != "explicit"
    start_x = -0.5 * INDENTER_VELOCITY[0] * max(0.0, duration - PRESS_DURATION)
    model, solver = sensor_scene(device=device, requires_grad=True, integrator=integrator,
                                 preconditioner=preconditioner, start_x=start_x)
    dt = solver.max_stable_dt(model) if not implicit else (frame_dt or FRAME_DT[integrator])
    steps = steps or (max(1, round(duration / dt)) if implicit else 200)
    pressing, sliding = model.control(), model.control()
    pressing.collider_velocity.assign(np.array([INDENTER_VELOCITY], dtype=np.float32))
    sliding.collider_velocity.assign(np.array([[INDENTER_VELOCITY[0], 0.0, 0.0]], dtype=np.float32))
    press_steps = math.ceil(PRESS_DURATION / dt - 1e-9)
    controls = [pressing if k < press_steps else sliding for k in range(steps)]
    newton, cg, factorizations = [], [], []

    def fresh():
        if not implicit:
            return solver
        return FEMSolver(model, integrator=integrator, preconditioner=preconditioner)

    forward = []
    a, b = model.state(), model.state()
    for run in range(repeats + 1):  # the first run compiles and warms up
        run_solver = fresh()
        if implicit:
            a = model.state()
        wp.synchronize_device(model.device)
        start = time.perf_counter()
        for k in range(steps):
            run_solver.step(model, a, b, controls[k], dt)
            a, b = b, a
            if run and run_solver.last_report is not None:
                newton.append(run_solver.last_report.newton_iterations)
                cg.append(run_solver.last_report.cg_iterations)
        wp.synchronize_device(model.device)
        if run:
            forward.append((time.perf_counter() - start) / steps * 1e3)
            if implicit and run_solver._implicit.cholesky is not None:
                factorizations.append(run_solver._implicit.cholesky.factorizations)

    taped_steps = steps if implicit else max(1, steps // 4)
    states = [model.state(requires_grad=True) for _ in range(taped_steps + 1)]
    both = []
    for run in range(repeats + 1):
        run_solver = fresh()
        if implicit:
            states[0].assign(model.state())
        else:
            states[0].assign(a)  # from where the forward runs left off (the sphere in contact)
        wp.synchronize_device(model.device)
        start = time.perf_counter()
        claim = run_solver.begin_step_scratch()
        tape = wp.Tape()
        with tape:
            for k in range(taped_steps):
                run_solver.step(model, states[k], states[k + 1], controls[k], dt)
        run_solver.end_step_scratch(claim)
        states[-1].node_x.grad.fill_(1.0)
        tape.backward()
        wp.synchronize_device(model.device)
        if run:  # the first run allocates scratch
            both.append((time.perf_counter() - start) / taped_steps * 1e3)
        tape.zero()
        run_solver.release_step_scratch(claim)
        for s in states:
            s.zero_grad()
    ms_forward = statistics.median(forward)
    ms_both = statistics.median(both)
    return {
        "device": str(model.device),
        "integrator": integrator,
        "preconditioner": solver._implicit.preconditioner if implicit else None,
        "factorization": solver._implicit.cholesky.backend if implicit and solver._implicit.cholesky else None,
        "nodes": model.node_count,
        "tets": model.tet_count,
        "substep_ms_forward": ms_forward,
        "substep_ms_forward_backward": ms_both,
        "wall_s_per_simulated_s_forward": ms_forward * 1e-3 / dt,
        "wall_s_per_simulated_s_forward_backward": ms_both * 1e-3 / dt,
        "dt": dt,
        "steps_per_simulated_s": 1.0 / dt,
        "simulated_s_per_run": steps * dt,
        "motion": f"press 5 mm/s for {min(PRESS_DURATION, steps * dt):.2g} s while sliding 10 mm/s" + (
            f", then slide at 1 mm depth to {steps * dt:.2g} s" if steps * dt > PRESS_DURATION + 1e-9 else ""),
        "newton_iterations_mean": float(np.mean(newton)) if newton else None,
        "cg_iterations_mean": float(np.mean(cg)) if cg else None,
        "factorizations_per_run": float(np.mean(factorizations)) if factorizations else None,
        "steps": steps,
        "repeats": repeats,
    }


def format_report(result: dict) -> str:
    lines = [f"FEM tactile sensor, {result['nodes']} nodes, {result['tets']} tets, {result['integrator']} steps "
             f"of {result['dt']:.3g} s, on {result['device']} (median of {result['repeats']} runs of "
             f"{result['steps']} steps; {result['motion']}):",
             f"  forward            {result['substep_ms_forward']:.3f} ms per step, "
             f"{result['wall_s_per_simulated_s_forward']:.2f} s per simulated second",
             f"  forward + backward {result['substep_ms_forward_backward']:.3f} ms per step, "
             f"{result['wall_s_per_simulated_s_forward_backward']:.2f} s per simulated second"]
    if result.get("newton_iterations_mean") is not None:
        lines.append(f"  Newton iterations per step {result['newton_iterations_mean']:.1f}, "
                     f"CG iterations per step {result['cg_iterations_mean']:.0f} ({result['preconditioner']}"
                     + (f", {result['factorization']}" if result.get("factorization") else "") + ")")
    if result.get("factorizations_per_run") is not None:
        lines.append(f"  Cholesky factorisations per run of {result['simulated_s_per_run']:.3g} simulated s: "
                     f"{result['factorizations_per_run']:.1f}")
    return "\n".join(lines)
