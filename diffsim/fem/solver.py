"""The tetrahedral FEM solver: explicit symplectic Euler on lumped masses, with elastic and damping
forces per tet, penalty contact with friction against the shared colliders, and rigid backings.
"""

from __future__ import annotations

import math

import numpy as np
import warp as wp

from diffsim.core.launch import LaunchCache
from diffsim.core.protocol import Solver
from diffsim.core.scratch import PooledScratchSolver, ScratchPool
from diffsim.errors import ConfigError, InvalidParameter
from diffsim.fem import kernels
from diffsim.fem.implicit import INTEGRATORS, PRECONDITIONERS, ImplicitFEMStep
from diffsim.fem.model import FEMControl, FEMModel, FEMState
from diffsim.geometry import integrate_colliders
from diffsim.geometry.colliders import ColliderSetCache


class FEMSolver(PooledScratchSolver, Solver):
    """Linear tetrahedra stepped with symplectic Euler.

    Each step: body (backing) and collider poses advance by the Control's velocities; every tet
    adds its elastic (stable Neo-Hookean or fixed-corotated) and Rayleigh damping forces to its
    nodes; every contact node meets every collider of its world through a penalty pressure with
    friction; free nodes integrate, backing nodes follow their body's new pose. The contact
    force of each node is kept in the State for the sensor outputs.

    With ``integrator="implicit"`` (backward Euler) or ``"quasistatic"`` (equilibrium at every
    step, inertia dropped) each step is a Newton-CG solve of the step's force balance instead,
    differentiated by the implicit function theorem (:mod:`diffsim.fem.implicit`): any step
    length is stable, and the backward pass stores no iterations.

    Args:
        model: the bodies.
        integrator: "explicit", "implicit" or "quasistatic".
        stability: fraction of the explicit stability limit that ``max_stable_dt`` allows.
        contact_smoothing: width [m] over which contact onset is rounded (smooth gradients).
        friction_velocity: slip speed [m/s] below which friction is viscous (proportional to the
            slip) rather than at the Coulomb limit.
        newton_tolerance: implicit steps converge when no node's force balance is off by more
            than this [N], or once the residual has reached float32's floor (see
            ``newton_step_tolerance``).
        newton_step_tolerance: [m] the floor test: a node's residual over its stiffness (about
            its remaining correction) below this while Newton no longer halves the residual, or
            no step lowers the energy or the residual; default 2^-18 of the largest coordinate (32
            float32 ulps, 40 nm for a part 1 cm from the origin). Within one ulp Newton stops in
            any case.
        newton_iterations: Newton iterations per implicit step before it raises
            :class:`~diffsim.core.implicit.NotConverged`.
        cg_tolerance: the tightest relative residual of Newton's conjugate-gradient solves.
        adjoint_tolerance: relative residual of the backward pass's adjoint CG solve.
        cg_iterations: CG iterations per linear solve.
        preconditioner: "cholesky": CG preconditioned by a sparse Cholesky factor of the
            projected Hessian, kept across steps and refactored once a stale factor has cost
            ``refresh_iterations`` extra CG iterations (:mod:`diffsim.core.cholesky`); "jacobi": by
            the linear-elastic diagonal (no factorisation, ~10-20x more CG iterations on a tactile
            pad); "auto" (default): Cholesky on CPUs up to
            :data:`~diffsim.fem.implicit.AUTO_CHOLESKY_UNKNOWNS` unknowns, where factoring pays
            (on larger meshes a factorisation costs seconds), else Jacobi. Fixed-corotated bodies
            always take Jacobi.
        refresh_iterations: see ``preconditioner``; the default (None) is the factorisation's
            own (:data:`~diffsim.core.cholesky.REFRESH_ITERATIONS`), about what a factorisation of
            an 8k-tet pad costs in CG iterations on a 2-core CPU.
        exact_tail: with the Cholesky preconditioner, Newton switches from the projected to the
            exact Hessian once a line search takes the full step (default; False keeps the projected
            one, which converges linearly).
        predict_contacts: with the Cholesky preconditioner, Newton linearises the contacts a step
            would close as closed (default; see :class:`~diffsim.fem.implicit.ContactPrediction`).
            Neither option changes the solution, only the iterations to it.
    """

    def __init__(self, model: FEMModel, *, integrator: str = "explicit", stability: float = 0.5,
                 contact_smoothing: float = 1e-6, friction_velocity: float = 1e-3, newton_tolerance: float = 1e-5,
                 newton_step_tolerance: float | None = None,
                 newton_iterations: int = 50, cg_tolerance: float = 1e-2, cg_iterations: int = 500,
                 adjoint_tolerance: float = 1e-5, preconditioner: str = "auto", refresh_iterations: int | None = None,
                 exact_tail: bool = True, predict_contacts: bool = True):
        if integrator not in INTEGRATORS:
            raise InvalidParameter("integrator", integrator, ", ".join(f"'{i}'" for i in INTEGRATORS))
        if not (newton_tolerance > 0 and math.isfinite(newton_tolerance)):
            raise InvalidParameter("newton_tolerance", newton_tolerance, "(0, inf) N")
        if preconditioner not in PRECONDITIONERS:
            raise InvalidParameter("preconditioner", preconditioner, ", ".join(f"'{p}'" for p in PRECONDITIONERS))
        for name, value in (("newton_iterations", newton_iterations), ("cg_iterations", cg_iterations),
                            ("refresh_iterations", 1 if refresh_iterations is None else refresh_iterations)):
            if not (isinstance(value, int) and value >= 1):
                raise InvalidParameter(name, value, "positive integers")
        for name, value in (("cg_tolerance", cg_tolerance), ("adjoint_tolerance", adjoint_tolerance)):
            if not (0 < value < 1):
                raise InvalidParameter(name, value, "(0, 1)")
        self.integrator = integrator
        self.newton_tolerance = float(newton_tolerance)
        step_tolerance = newton_step_tolerance
        if step_tolerance is not None and not (step_tolerance >= 0 and math.isfinite(step_tolerance)):
            raise InvalidParameter("newton_step_tolerance", newton_step_tolerance, "[0, inf) m")
        self.newton_step_tolerance = newton_step_tolerance
        self.newton_iterations = newton_iterations
        self.cg_tolerance = float(cg_tolerance)
        self.adjoint_tolerance = float(adjoint_tolerance)
        self.cg_iterations = cg_iterations
        self.preconditioner = preconditioner
        self.refresh_iterations = refresh_iterations
        self.exact_tail = bool(exact_tail)
        self.predict_contacts = bool(predict_contacts)
        if integrator == "quasistatic":
            fixed = np.bincount(model.node_body.numpy()[model.node_fixed.numpy() != 0], minlength=model.num_bodies)
            if np.any(fixed < 3):
                body = int(np.flatnonzero(fixed < 3)[0])
                raise ConfigError(f"quasi-static steps need every body held by its backing (3 or more fixed nodes); "
                                  f"body {body} has {int(fixed[body])}, so its rigid motions are undetermined. "
                                  "Use integrator='implicit' for free bodies.")
        self._implicit = None if integrator == "explicit" else ImplicitFEMStep(self, model, integrator)
        if not (0 < stability <= 1):
            raise InvalidParameter("stability", stability, "(0, 1]")
        if not (contact_smoothing > 0 and math.isfinite(contact_smoothing)):
            raise InvalidParameter("contact_smoothing", contact_smoothing, "(0, inf) m")
        if not (friction_velocity > 0 and math.isfinite(friction_velocity)):
            raise InvalidParameter("friction_velocity", friction_velocity, "(0, inf) m/s")
        self.stability = float(stability)
        self.contact_smoothing = float(contact_smoothing)
        self.friction_velocity = float(friction_velocity)
        self._scratch = ScratchPool(model.device, {"elastic_force": (wp.vec3, model.node_count)})
        self._launches = LaunchCache()
        self._colliders = ColliderSetCache()
        self._max_dt: dict[int, float] = {}
        self._zero_force: wp.array | None = None

    @property
    def last_report(self):
        """The last implicit step's :class:`~diffsim.core.implicit.NewtonReport` (Newton and CG
        iterations, final residual [N]); None for the explicit integrator."""
        return None if self._implicit is None else self._implicit.report

    # -- protocol --------------------------------------------------------------------------
    def new_state(self, model: FEMModel, *, requires_grad: bool = False) -> FEMState:
        return model.state(requires_grad=requires_grad)

    def max_stable_dt(self, model: FEMModel) -> float:
        """Largest stable step [s]: the fastest elastic wave across the thinnest tet (with its
        Rayleigh damping), the stiffest collider contact spring on its node (only when the model
        has colliders: the spring acts on nothing else; coupled contact scales its own stiffness
        to the step), and mass damping. Implicit integrators: unlimited (inf)."""
        if self.integrator != "explicit":
            self._max_dt[id(model)] = math.inf
            return math.inf
        E = model.tet_young_modulus.numpy().astype(np.float64)
        nu = model.tet_poisson_ratio.numpy().astype(np.float64)
        mu = E / (2 * (1 + nu))
        lam = E * nu / ((1 + nu) * (1 - 2 * nu))
        # the stable Neo-Hookean's rescaled moduli are stiffer than (mu, lam) away from rest
        modulus = (lam + 5.0 / 6.0 * mu) + 2.0 * (4.0 / 3.0) * mu
        omega = 2.0 * np.sqrt(modulus / model.tet_density) / model.tet_min_altitude
        zeta = 0.5 * model.tet_damping.numpy().astype(np.float64) * omega
        limit = float(np.min(2.0 / omega * (np.sqrt(1.0 + zeta**2) - zeta)))
        area = model.node_contact_area.numpy().astype(np.float64)
        contact = area > 0
        if model.collider_count and np.any(contact):
            k = model.body_contact_stiffness.numpy().astype(np.float64)[model.node_body.numpy()] * area
            omega_c = np.sqrt(k[contact] / model.node_mass.numpy().astype(np.float64)[contact])
            limit = min(limit, float(2.0 / omega_c.max()))
        damping = float(model.body_damping.numpy().max())
        if damping > 0:
            limit = min(limit, 1.0 / damping)
        limit *= self.stability
        self._max_dt[id(model)] = limit
        return limit

    def stability_limit(self, model: FEMModel) -> str:
        return "explicit elastic waves and contact springs of the smallest tet"

    def step(self, model: FEMModel, state_in: FEMState, state_out: FEMState, control: FEMControl, dt: float, *,
             coupled_contact_force: wp.array | None = None) -> None:
        """One step; ``coupled_contact_force`` [N per node] adds contact forces computed by a
        coupled solver, which then count as contact in the State (and in sensor readings)."""
        limit = self._max_dt.get(id(model))
        if limit is None or dt > limit * (1 + 1e-6):
            self.validate_dt(model, dt)
        device = model.device
        nc = model.collider_count
        self._launch("bodies", integrate_colliders, model.num_bodies,
                     [state_in.body_position, state_in.body_rotation, control.body_velocity,
                      control.body_angular_velocity, dt],
                     [state_out.body_position, state_out.body_rotation], device, state_in)
        if nc:
            self._launch("colliders", integrate_colliders, model.num_worlds * nc,
                         [state_in.collider_position, state_in.collider_rotation, control.collider_velocity,
                          control.collider_angular_velocity, dt],
                         [state_out.collider_position, state_out.collider_rotation], device, state_in)
        if self._implicit is not None:
            self._implicit.step(model, state_in, state_out, control, dt,
                                self._colliders.pack(model, state_out, control, start_state=state_in),
                                self._colliders.pack(model, state_in, control), coupled_contact_force)
            return
        s = self._scratch.take()
        s.elastic_force.zero_()
        self._launch("tet_forces", kernels.tet_forces, model.tet_count,
                     [state_in.node_x, state_in.node_v, model.tet_nodes, model.tet_rest_inverse,
                      model.tet_rest_volume, model.tet_material, model.tet_young_modulus, model.tet_poisson_ratio,
                      model.tet_damping],
                     [s.elastic_force], device, state_in)
        self._launch("contacts", kernels.node_contacts, model.node_count,
                     [state_in.node_x, state_in.node_v, model.node_body, model.node_contact_area, model.body_world,
                      model.body_contact_stiffness, self._colliders.pack(model, state_in, control),
                      self.contact_smoothing, self.friction_velocity,
                      coupled_contact_force if coupled_contact_force is not None else self._no_force(model)],
                     [state_out.node_contact_force], device, state_in)
        self._launch("integrate", kernels.integrate_nodes, model.node_count,
                     [state_in.node_x, state_in.node_v, model.node_body, model.node_mass, model.node_fixed,
                      model.node_rest_local, model.body_damping, state_out.body_position, state_out.body_rotation,
                      s.elastic_force, state_out.node_contact_force, control.node_external_force, model.gravity, dt],
                     [state_out.node_x, state_out.node_v], device, state_in)

    def _no_force(self, model: FEMModel) -> wp.array:
        if self._zero_force is None or self._zero_force.shape[0] != model.node_count:
            self._zero_force = wp.zeros(model.node_count, dtype=wp.vec3, device=model.device)
        return self._zero_force

    def _launch(self, site, kernel, dim, inputs, outputs, device, variant=None) -> None:
        self._launches.launch(site, kernel, dim, inputs, outputs, device, variant=variant)

    # -- diagnostics -----------------------------------------------------------------------
    def elastic_energy(self, model: FEMModel, state: FEMState) -> np.ndarray:
        """Strain energy [J] of each body."""
        energy = wp.zeros(model.num_bodies, dtype=float, device=model.device)
        wp.launch(kernels.tet_energy, dim=model.tet_count,
                  inputs=[state.node_x, model.tet_nodes, model.tet_rest_inverse, model.tet_rest_volume,
                          model.tet_material, model.tet_young_modulus, model.tet_poisson_ratio, model.tet_body],
                  outputs=[energy], device=model.device)
        return energy.numpy().astype(np.float64)

    def elastic_forces(self, model: FEMModel, state: FEMState) -> np.ndarray:
        """Elastic plus damping force on every node [N] for ``state`` (no contact, no gravity)."""
        force = wp.zeros(model.node_count, dtype=wp.vec3, device=model.device)
        wp.launch(kernels.tet_forces, dim=model.tet_count,
                  inputs=[state.node_x, state.node_v, model.tet_nodes, model.tet_rest_inverse,
                          model.tet_rest_volume, model.tet_material, model.tet_young_modulus,
                          model.tet_poisson_ratio, model.tet_damping],
                  outputs=[force], device=model.device)
        return force.numpy().astype(np.float64)
