"""Physics checks of the MPM solver against closed-form results and conservation laws.

Each check builds a small scene, runs it and returns a :class:`CheckResult`; the tests and
``diffsim validate mpm`` call the same functions, so the tolerances live here, once.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np

from diffsim.core.validation import CheckResult
from diffsim.geometry import collider_plane
from diffsim.materials import Material, MaterialModel, preset
from diffsim.mpm.model import BOUNDARY_CELLS, Boundary, MPMBuilder, MPMModel, MPMState
from diffsim.mpm.solver import MPMSolver

GRAVITY = 9.81


def simulate(model: MPMModel, solver: MPMSolver, state: MPMState, steps: int, dt: float,
             *, on_step: Callable[[int, MPMState], None] | None = None) -> MPMState:
    """Advance ``state`` by ``steps`` solver steps with colliders at rest; returns the final state."""
    a, b = state, model.state()
    control = model.control()
    for i in range(steps):
        solver.step(model, a, b, control, dt)
        a, b = b, a
        if on_step is not None:
            on_step(i, a)
    solver.check_finite(model, a, steps)
    return a


def _timed(fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        if isinstance(result, list):
            for r in result:
                r.seconds = time.perf_counter() - start
        else:
            result.seconds = time.perf_counter() - start
        return result

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


@_timed
def free_fall(*, device: str | None = None) -> CheckResult:
    """An elastic block falls for 0.2 s: its drop must be g t^2 / 2 within 1%."""
    b = MPMBuilder(grid_res=32, boundary=Boundary.SEPARATE)
    block = Material(MaterialModel.FIXED_COROTATED, density=1000.0, young_modulus=1.0e5, poisson_ratio=0.3)
    b.add_box((0.5, 0.5, 0.75), (0.06, 0.06, 0.06), block)
    model = b.finalize(device)
    solver = MPMSolver(model)
    duration = 0.2
    steps = max(200, math.ceil(duration / solver.max_stable_dt(model)))
    dt = duration / steps
    x0 = model.initial_x.astype(np.float64).mean(axis=0)
    final = simulate(model, solver, model.state(), steps, dt)
    drop = x0[2] - final.particle_x.numpy().astype(np.float64).mean(axis=0)[2]
    expected = 0.5 * GRAVITY * duration**2
    return CheckResult("free fall: drop after 0.2 s", drop, expected, abs(drop - expected) / expected, 0.01,
                       "relative", "m", {"steps": steps, "dt": dt})


def apic_angular_momentum(model: MPMModel, state: MPMState) -> np.ndarray:
    """Total angular momentum about the origin including the APIC affine term [kg m^2/s].

    With quadratic B-splines the affine field adds m dx^2/4 * axial(C^T - C) per particle;
    without it the transfer would appear to lose angular momentum that the grid in fact keeps.
    """
    m = model.particle_mass.numpy().astype(np.float64)
    x = state.particle_x.numpy().astype(np.float64)
    v = state.particle_v.numpy().astype(np.float64)
    C = state.particle_C.numpy().astype(np.float64)
    orbital = np.cross(x, v) * m[:, None]
    axial = np.stack([C[:, 2, 1] - C[:, 1, 2], C[:, 0, 2] - C[:, 2, 0], C[:, 1, 0] - C[:, 0, 1]], axis=1)
    return orbital.sum(0) + (model.dx**2 / 4.0) * (m[:, None] * axial).sum(0)


@_timed
def momentum_conservation(*, device: str | None = None, steps: int = 1000) -> list[CheckResult]:
    """A spinning, drifting two-material elastic body without gravity or walls: linear and angular
    momentum must drift by less than 1e-4 (relative) over 1,000 steps."""
    b = MPMBuilder(grid_res=32, gravity=(0.0, 0.0, 0.0), boundary=Boundary.SEPARATE)
    soft = Material(MaterialModel.NEO_HOOKEAN, density=800.0, young_modulus=5.0e4, poisson_ratio=0.3)
    stiff = Material(MaterialModel.FIXED_COROTATED, density=1200.0, young_modulus=2.0e5, poisson_ratio=0.25)
    center = np.array([0.5, 0.5, 0.5])
    spin = np.array([0.5, -1.0, 3.0])  # rad/s
    drift = np.array([0.03, -0.02, 0.01])  # m/s
    for offset, mat in (((-0.05, 0.0, 0.0), soft), ((0.05, 0.0, 0.0), stiff)):
        from diffsim.geometry import sampling

        spacing = 0.5 * b.dx
        x = sampling.sample_box(center + np.array(offset), (0.05, 0.08, 0.06), spacing)
        v = drift + np.cross(spin, x - center)
        b.add_particles(x, mat, volume=spacing**3, velocity=v)
    model = b.finalize(device)
    solver = MPMSolver(model)
    dt = 0.9 * solver.max_stable_dt(model)
    state0 = model.state()
    m = model.particle_mass.numpy().astype(np.float64)
    p0 = (m[:, None] * state0.particle_v.numpy()).sum(0)
    L0 = apic_angular_momentum(model, state0)
    final = simulate(model, solver, state0, steps, dt)
    p1 = (m[:, None] * final.particle_v.numpy()).sum(0)
    L1 = apic_angular_momentum(model, final)
    dp = np.linalg.norm(p1 - p0) / np.linalg.norm(p0)
    dL = np.linalg.norm(L1 - L0) / np.linalg.norm(L0)
    return [
        CheckResult(f"linear momentum drift ({steps} steps)", np.linalg.norm(p1), np.linalg.norm(p0), dp, 1e-4,
                    "relative", "kg m/s"),
        CheckResult(f"angular momentum drift ({steps} steps)", np.linalg.norm(L1), np.linalg.norm(L0), dL, 1e-4,
                    "relative", "kg m^2/s"),
    ]


@_timed
def elastic_wave_speed(*, device: str | None = None) -> CheckResult:
    """The first longitudinal mode of a free bar (nu = 0) has period 2L/c with c = sqrt(E/rho).

    With nu = 0 the 3-D P-wave speed equals the bar speed sqrt(E/rho), so the two coincide.
    """
    E, rho = 1.0e5, 1000.0
    bar = Material(MaterialModel.FIXED_COROTATED, density=rho, young_modulus=E, poisson_ratio=0.0)
    b = MPMBuilder(grid_res=64, gravity=(0.0, 0.0, 0.0), boundary=Boundary.SEPARATE)
    spacing = 0.5 * b.dx
    half = np.array([0.3, 0.03125, 0.03125])
    from diffsim.geometry import sampling

    x = sampling.sample_box((0.5, 0.5, 0.5), half, spacing)
    length = 2 * half[0]
    xi = (x[:, 0] - (0.5 - half[0])) / length
    shape = np.cos(np.pi * xi)
    amplitude = 0.01  # m/s: strain amplitude 1e-3, linear regime
    v = np.zeros_like(x)
    v[:, 0] = amplitude * shape
    b.add_particles(x, bar, volume=spacing**3, velocity=v)
    model = b.finalize(device)
    solver = MPMSolver(model)
    c = math.sqrt(E / rho)
    period = 2 * length / c
    dt = min(0.5 * solver.max_stable_dt(model), period / 400)
    steps = int(1.3 * period / dt)
    modal = []

    def record(i, state):
        vx = state.particle_v.numpy()[:, 0].astype(np.float64)
        modal.append(float(vx @ shape / (shape @ shape)))

    simulate(model, solver, model.state(), steps, dt, on_step=record)
    q = np.array(modal)
    t = dt * (np.arange(len(q)) + 1)
    crossings = [t[i] - q[i] * (t[i + 1] - t[i]) / (q[i + 1] - q[i])
                 for i in range(len(q) - 1) if q[i] * q[i + 1] < 0]
    if len(crossings) < 2:
        return CheckResult("elastic bar: wave speed", float("nan"), c, float("inf"), 0.05, "relative", "m/s")
    measured_period = 2 * (crossings[1] - crossings[0])
    c_measured = 2 * length / measured_period
    return CheckResult("elastic bar: longitudinal wave speed", c_measured, c, abs(c_measured - c) / c, 0.05,
                       "relative", "m/s", {"period_s": measured_period, "steps": steps})


@_timed
def sand_column_collapse(*, device: str | None = None, friction_angle_deg: float = 30.0) -> CheckResult:
    """A cylinder of dry sand collapses into a cone on a rough floor: the cone's flank must lie
    within 5 degrees of the friction angle."""
    phi = math.radians(friction_angle_deg)
    sand = preset("sand").with_(friction_angle=phi)
    b = MPMBuilder(grid_res=48, boundary=Boundary.SEPARATE)
    floor = BOUNDARY_CELLS * b.dx + 0.01
    b.add_collider(collider_plane(position=(0.0, 0.0, floor), friction=2.0))
    radius, height = 0.08, 0.12
    b.add_cylinder((0.5, 0.5, floor + height / 2 + 0.002), radius, height / 2, sand)
    model = b.finalize(device)
    solver = MPMSolver(model)
    dt = 0.9 * solver.max_stable_dt(model)
    duration = 0.6
    final = simulate(model, solver, model.state(), int(duration / dt), dt)
    x = final.particle_x.numpy().astype(np.float64)
    r = np.hypot(x[:, 0] - 0.5, x[:, 1] - 0.5)
    z = x[:, 2] - floor
    # free-surface height per radial ring, then a line through the flank (20%..80% of the peak)
    edges = np.arange(0.0, r.max() + b.dx / 2, b.dx / 2)
    centers, heights = [], []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (r >= lo) & (r < hi)
        if sel.sum() >= 5:
            centers.append(0.5 * (lo + hi))
            heights.append(np.percentile(z[sel], 95))
    centers, heights = np.array(centers), np.array(heights)
    peak = heights.max()
    flank = (heights > 0.2 * peak) & (heights < 0.8 * peak) & (centers > centers[np.argmax(heights)])
    if flank.sum() < 3:
        return CheckResult("sand column: slope angle", float("nan"), friction_angle_deg, float("inf"), 5.0,
                           "absolute [deg]", "deg")
    slope = -np.polyfit(centers[flank], heights[flank], 1)[0]
    angle = math.degrees(math.atan(slope))
    return CheckResult("sand column collapse: slope angle", angle, friction_angle_deg,
                       abs(angle - friction_angle_deg), 5.0, "absolute [deg]", "deg",
                       {"particles": model.particle_count, "peak_height_m": float(peak)})


@_timed
def hydrostatic_pressure(*, device: str | None = None, bulk_modulus: float | None = None) -> CheckResult:
    """Water at rest in a box: after settling, pressure grows as rho g depth (within 10% of the
    bottom pressure at every depth)."""
    water = preset("water")
    if bulk_modulus is not None:
        water = water.with_(bulk_modulus=bulk_modulus)
    size = 0.2
    # No-slip walls: the physical condition for a viscous liquid (slip walls are noted in the docs
    # to pump energy into the corners of a weakly compressible fluid at this resolution).
    b = MPMBuilder(grid_res=16, domain_size=size, boundary=Boundary.STICKY)
    lo = BOUNDARY_CELLS * b.dx
    depth = 0.1
    spacing = 0.5 * b.dx
    half = np.array([(size - 2 * lo) / 2, (size - 2 * lo) / 2, depth / 2])
    b.add_box((size / 2, size / 2, lo + depth / 2), half - 1e-6, water, spacing=spacing)
    model = b.finalize(device)
    solver = MPMSolver(model)
    dt = 0.9 * solver.max_stable_dt(model)
    settle, average = 0.3, 0.1
    steps_settle, steps_avg = int(settle / dt), int(average / dt)
    rho, K, gamma = water.density, water.bulk_modulus, 7.0
    bins = np.linspace(0, depth - 1.5 * b.dx, 8)
    sums = np.zeros(len(bins) - 1)
    counts = np.zeros(len(bins) - 1)

    def accumulate(i, state):
        if i < steps_settle:
            return
        x = state.particle_x.numpy().astype(np.float64)
        F = state.particle_F.numpy().astype(np.float64)
        J = np.linalg.det(F)
        surface = np.percentile(x[:, 2], 99.5) + spacing / 2
        # the interior only: particles whose stencil reaches a wall node feel the wall condition
        # directly (a one-cell boundary layer), which is not what the closed form describes
        wall_lo, wall_hi = lo + 1.5 * b.dx, size - lo - 1.5 * b.dx
        interior = np.all((x >= wall_lo) & (x <= wall_hi), axis=1) | (x[:, 2] > wall_lo) & np.all(
            (x[:, :2] >= wall_lo) & (x[:, :2] <= wall_hi), axis=1)
        x, J = x[interior], J[interior]
        d = surface - x[:, 2]
        idx = np.clip(np.digitize(d, bins) - 1, 0, len(bins) - 2)
        np.add.at(sums, idx, J)
        np.add.at(counts, idx, 1)

    simulate(model, solver, model.state(), steps_settle + steps_avg, dt, on_step=accumulate)
    # J is averaged per depth bin before the equation of state is applied: p(J) is convex, so
    # averaging p itself would turn particle-level volume noise into a spurious positive bias.
    mean_J = sums / np.maximum(counts, 1)
    mean_p = K / gamma * (mean_J ** (-gamma) - 1.0)
    mid = 0.5 * (bins[:-1] + bins[1:])
    exact = rho * GRAVITY * mid
    scale = rho * GRAVITY * depth
    error = float(np.max(np.abs(mean_p - exact)) / scale)
    return CheckResult("water at rest: hydrostatic pressure", float(mean_p[-1]), float(exact[-1]), error, 0.10,
                       "relative", "Pa", {"profile_Pa": mean_p.round(1).tolist(), "exact_Pa": exact.round(1).tolist()})


PHYSICS_CHECKS = {
    "free_fall": free_fall,
    "momentum": momentum_conservation,
    "wave_speed": elastic_wave_speed,
    "sand_collapse": sand_column_collapse,
    "hydrostatic": hydrostatic_pressure,
}


def run_physics_checks(*, device: str | None = None, only: list[str] | None = None) -> list[CheckResult]:
    results: list[CheckResult] = []
    for name, fn in PHYSICS_CHECKS.items():
        if only and name not in only:
            continue
        out = fn(device=device)
        results.extend(out if isinstance(out, list) else [out])
    return results
