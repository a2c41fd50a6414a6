"""The discrete-elastic-rod solver: explicit bending and twisting forces on Bishop-framed rods,
quasi-static twist, inextensibility by mass-weighted projection (or elastic stretching), contact.
"""

from __future__ import annotations

import math

import numpy as np
import warp as wp

from diffsim.core.launch import LaunchCache
from diffsim.core.protocol import Solver
from diffsim.core.scratch import PooledScratchSolver, ScratchPool, taping
from diffsim.errors import InvalidParameter
from diffsim.geometry import integrate_colliders
from diffsim.geometry.colliders import ColliderSetCache
from diffsim.rod import kernels
from diffsim.rod.model import RodControl, RodModel, RodState


class RodSolver(PooledScratchSolver, Solver):
    """Discrete elastic rods (Bergou et al. 2008/2010) stepped with symplectic Euler.

    Each step: reference twist from the time-transported reference frames; material angles solved
    quasi-statically (twist waves are orders of magnitude faster than bending, so resolving them
    would force tiny steps for no visible effect); bending, twisting, stretching, gravity and
    damping forces; explicit velocity and position update; then, for inextensible rods,
    red-black Gauss-Seidel sweeps of mass-weighted length projection; contact with every collider
    (position-level, Coulomb friction); velocities from the position change; reference frames
    carried to the new tangents by parallel transport in time.

    Args:
        model: the rods.
        inextensible: project edge lengths back to rest (True) or treat stretching as an elastic
            energy with ``edge_stretch_stiffness`` (False, needs much smaller steps).
        projection_iterations: red-black sweeps per step when ``inextensible``.
        stability: fraction of the explicit stability limit that ``max_stable_dt`` allows.
        contact_smoothing: width [m] over which contact and the stick-slip transition are
            rounded, so that gradients through contact are smooth (0 gives hard contact).
        relaxation: over-relaxation of the length projection, in (0, 2). 1.5 leaves a hanging
            cable stretched about 4x less than plain Gauss-Seidel (1.0) for the same sweeps, but
            diverged on recordings whose driven ends jump (capture glitches), so 1.0 is the default.
    """

    def __init__(self, model: RodModel, *, inextensible: bool = True, projection_iterations: int = 4,
                 stability: float = 0.5, contact_smoothing: float = 2e-4, relaxation: float = 1.0):
        if not isinstance(projection_iterations, int) or projection_iterations < 1:
            raise InvalidParameter("projection_iterations", projection_iterations, "positive integers")
        if not (0 < stability <= 1):
            raise InvalidParameter("stability", stability, "(0, 1]")
        if not (contact_smoothing >= 0 and math.isfinite(contact_smoothing)):
            raise InvalidParameter("contact_smoothing", contact_smoothing, "[0, inf) m")
        # a zero width would divide by zero in the rounded ramp: use a width far below float32 noise
        self.contact_smoothing = max(float(contact_smoothing), 1e-9)
        if not (0 < relaxation < 2):
            raise InvalidParameter("relaxation", relaxation, "(0, 2)")
        self.relaxation = float(relaxation)
        self.inextensible = bool(inextensible)
        self.projection_iterations = projection_iterations
        self.stability = float(stability)
        passes = 2 * projection_iterations if self.inextensible else 1
        V, E, R = model.vertex_count, model.edge_count, model.num_rods
        fields = {
            "rod_twist_sum": (float, R),
            "rod_twist_compliance": (float, R),
            "vertex_reference_twist": (float, V),
            "edge_theta": (float, E),
            "x_predicted": (wp.vec3, V),
        }
        for k in range(passes):
            fields[f"x_pass{k}"] = (wp.vec3, V)
        self._passes = passes
        self._scratch = ScratchPool(model.device, fields)
        self._max_dt: dict[int, float] = {}
        self._launches = LaunchCache()
        self._colliders = ColliderSetCache()
        #: when True, every step writes :attr:`collider_wrench`: per (world, collider) slot ``s``,
        #: the force [N] (entry ``2 s``) and torque about the collider's origin [N m] (``2 s + 1``,
        #: world axes) that the rods exerted on it, averaged over the step (two-way coupling)
        self.measure_collider_wrench = False
        self._wrench_buffer = wp.zeros(max(2 * model.num_worlds * model.collider_count, 1), dtype=wp.vec3,
                                       device=model.device)
        self.collider_wrench = self._wrench_buffer

    # -- protocol --------------------------------------------------------------------------
    def new_state(self, model: RodModel, *, requires_grad: bool = False) -> RodState:
        return model.state(requires_grad=requires_grad)

    def max_stable_dt(self, model: RodModel) -> float:
        """Largest stable step [s]: the fastest bending mode of the shortest, lightest edge
        (omega^2 = 16 E I / (rho l^4)), stretching when elastic, and the damping rates."""
        lengths = model.edge_rest_length.numpy().astype(np.float64)
        mass = model.vertex_mass.numpy().astype(np.float64)
        driven = model.vertex_driven.numpy() != 0
        counts = model.rod_vertex_count.numpy()
        edge_rod = np.repeat(np.arange(model.num_rods), counts - 1)
        a = np.arange(model.edge_count) + edge_rod  # first vertex of each edge
        b = a + 1
        # an edge between two driven vertices moves rigidly: it sets no limit
        free_mass = np.minimum(np.where(driven[a], np.inf, mass[a]), np.where(driven[b], np.inf, mass[b]))
        active = np.isfinite(free_mass)
        if not np.any(active):
            self._max_dt[id(model)] = math.inf
            return math.inf
        lengths, free_mass = lengths[active], free_mass[active]
        # omega^2 = 16 E I / (rho l^4), with a vertex mass of about rho l
        bend = model.edge_bend_stiffness.numpy().astype(np.float64)[active]
        omega_sq = 16.0 * bend / (free_mass * lengths**3)
        if not self.inextensible:
            omega_sq = omega_sq + 4.0 * model.edge_stretch_stiffness.numpy()[active] / (lengths * free_mass)
        limit = 2.0 / math.sqrt(float(omega_sq.max())) if omega_sq.max() > 0 else math.inf
        # bending-rate damping, explicit: its fastest mode decays at 16 gamma / (m l^3) per second
        gamma = model.edge_bend_damping.numpy().astype(np.float64)[active]
        if gamma.max() > 0:
            limit = min(limit, float(np.min(free_mass * lengths**3 / (8.0 * np.maximum(gamma, 1e-30)))))
        damping = float(model.rod_linear_damping.numpy().max()) if model.num_rods else 0.0
        if damping > 0:
            limit = min(limit, 1.0 / damping)
        limit *= self.stability
        self._max_dt[id(model)] = limit
        return limit

    def stability_limit(self, model: RodModel) -> str:
        return "explicit bending (and stretching) of the stiffest, shortest edge"

    def step(self, model: RodModel, state_in: RodState, state_out: RodState, control: RodControl, dt: float) -> None:
        limit = self._max_dt.get(id(model))
        if limit is None or dt > limit * (1 + 1e-6):
            self.validate_dt(model, dt)
        device = model.device
        V = model.vertex_count
        nc = model.collider_count
        if nc:
            self._launch("colliders", integrate_colliders, model.num_worlds * nc,
                         [state_in.collider_position, state_in.collider_rotation, control.collider_velocity,
                          control.collider_angular_velocity, dt],
                         [state_out.collider_position, state_out.collider_rotation], device, state_in)
        s = self._scratch.take()
        self._solve_twist(model, state_in, s)
        topology = [model.vertex_rod, model.rod_vertex_start, model.rod_vertex_count]
        self._launch("integrate_vertices", kernels.integrate_vertices, V,
                     [state_in.vertex_x, state_in.vertex_v, state_in.edge_d1, s.edge_theta, state_in.edge_theta,
                      *topology, model.rod_twist_clamp, s.rod_twist_sum, s.rod_twist_compliance,
                      model.vertex_mass, model.vertex_driven, model.vertex_rest_curvature,
                      model.edge_rest_length, model.edge_bend_stiffness, model.edge_bend_damping,
                      model.edge_stretch_stiffness, model.rod_linear_damping, model.rod_air_drag, model.gravity,
                      control.vertex_velocity, control.vertex_external_force, 0 if self.inextensible else 1, dt],
                     [s.x_predicted], device, state_in)
        x = s.x_predicted
        colliders = self._colliders.pack(model, state_out, control, start_state=state_in)
        measure = bool(self.measure_collider_wrench and nc)
        if measure and taping():  # a taped step's wrench is its own array, so its gradient stays with it
            self.collider_wrench = wp.zeros(2 * model.num_worlds * nc, dtype=wp.vec3, device=device,
                                            requires_grad=True)
        elif measure:
            self.collider_wrench = self._wrench_buffer
            self.collider_wrench.zero_()
        for k in range(self._passes):
            out = getattr(s, f"x_pass{k}")
            parity = k % 2 if self.inextensible else -1
            contact = (2 if measure else 1) if (k == self._passes - 1 and nc) else 0
            self._launch(("project_edges", k), kernels.project_edges, V,
                         [x, state_in.vertex_x, *topology, model.vertex_mass, model.vertex_driven,
                          model.edge_rest_length, model.rod_contact_radius, model.rod_world, colliders,
                          self.contact_smoothing, self.relaxation, parity, contact, 1.0 / (dt * dt)],
                         [out, self.collider_wrench if contact == 2 else self._wrench_buffer], device, state_in)
            x = out
        self._launch("finish_step", kernels.finish_step, V,
                     [state_in.vertex_x, x, state_in.edge_d1, s.edge_theta, state_in.edge_theta,
                      control.edge_twist_rate, *topology, model.rod_twist_clamp, dt],
                     [state_out.vertex_x, state_out.vertex_v, state_out.edge_d1, state_out.edge_theta], device,
                     state_in)

    def _launch(self, site, kernel, dim, inputs, outputs, device, variant=None) -> None:
        self._launches.launch(site, kernel, dim, inputs, outputs, device, variant=variant)

    def _solve_twist(self, model: RodModel, state: RodState, s) -> None:
        """Reference twists, per-rod twist sums and the quasi-static material angles into scratch ``s``."""
        s.rod_twist_sum.zero_()
        s.rod_twist_compliance.zero_()
        s.edge_theta.zero_()
        topology = [model.vertex_rod, model.rod_vertex_start, model.rod_vertex_count]
        self._launch("twist_sums", kernels.twist_sums, model.vertex_count,
                     [state.vertex_x, state.edge_d1, *topology, model.edge_rest_length,
                      model.edge_twist_stiffness, model.vertex_rest_twist],
                     [s.vertex_reference_twist, s.rod_twist_sum, s.rod_twist_compliance], model.device, state)
        self._launch("material_angles", kernels.material_angles, model.vertex_count,
                     [*topology, model.rod_twist_clamp, s.rod_twist_sum, s.rod_twist_compliance,
                      model.edge_rest_length, model.edge_twist_stiffness, model.vertex_rest_twist,
                      s.vertex_reference_twist, state.edge_theta],
                     [s.edge_theta], model.device, state)

    def energy(self, model: RodModel, state: RodState) -> np.ndarray:
        """Energy [J] of each rod by part, shape (num_rods, 5): kinetic, gravity (zero at z = 0),
        stretching (elastic mode only), bending, twisting (at the quasi-static material angles)."""
        s = self._scratch.take()
        self._solve_twist(model, state, s)
        energy = wp.zeros((model.num_rods, 5), dtype=float, device=model.device)
        wp.launch(kernels.rod_energy, dim=model.vertex_count,
                  inputs=[state.vertex_x, state.vertex_v, state.edge_d1, s.edge_theta, s.vertex_reference_twist,
                          model.vertex_rod, model.rod_vertex_start, model.rod_vertex_count, model.vertex_mass,
                          model.vertex_rest_curvature, model.vertex_rest_twist, model.edge_rest_length,
                          model.edge_bend_stiffness, model.edge_twist_stiffness, model.edge_stretch_stiffness,
                          model.gravity, 0 if self.inextensible else 1],
                  outputs=[energy], device=model.device)
        return energy.numpy().astype(np.float64)

    def material_angles(self, model: RodModel, state: RodState) -> np.ndarray:
        """Quasi-static material angle of every edge [rad] for ``state``."""
        s = self._scratch.take()
        self._solve_twist(model, state, s)
        return s.edge_theta.numpy().copy()
