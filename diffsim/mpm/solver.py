"""The MLS-MPM solver: one explicit step per call, with APIC transfers, quadratic B-splines,
per-particle materials, kinematic colliders and domain walls, for many worlds in one launch.
"""

from __future__ import annotations

import math

import numpy as np
import warp as wp

from diffsim.core.protocol import Solver
from diffsim.errors import InvalidParameter, SimulationDiverged, UnstableTimeStep
from diffsim.mpm import kernels
from diffsim.mpm.model import BOUNDARY_CELLS, MPMControl, MPMModel, MPMState


class MPMSolver(Solver):
    """Explicit MLS-MPM (Hu et al. 2018) with APIC transfers.

    The grid is scratch owned by the solver (one per world) and reused by every step, so the
    checkpointed :class:`~diffsim.core.Rollout` is the way to differentiate several steps.

    Args:
        model: the scene; the solver sizes its grid for it.
        cfl: fraction of a cell that the fastest elastic wave may cross in one step.
    """

    def __init__(self, model: MPMModel, *, cfl: float = 0.5):
        if not (0 < cfl <= 1):
            raise InvalidParameter("cfl", cfl, "(0, 1]")
        self.cfl = float(cfl)
        shape = (model.num_worlds, model.grid_res, model.grid_res, model.grid_res)
        kw = dict(device=model.device, requires_grad=True)
        self.grid_mass = wp.zeros(shape, dtype=float, **kw)
        self.grid_momentum = wp.zeros(shape, dtype=wp.vec3, **kw)
        self.grid_v = wp.zeros(shape, dtype=wp.vec3, **kw)
        self.grid_fluid_mass = wp.zeros(shape, dtype=float, **kw)
        self.grid_fluid_volume = wp.zeros(shape, dtype=float, **kw)
        self.particle_F_new = wp.zeros(model.particle_count, dtype=wp.mat33, **kw)
        self._has_fluid = bool(np.any(model.particle_material.numpy() == 4))
        self._first_outside = wp.zeros(1, dtype=int, device=model.device)
        self._bounds = wp.zeros(6, dtype=int, device=model.device)
        self._max_dt: dict[int, float] = {}

    # -- protocol --------------------------------------------------------------------------
    def new_state(self, model: MPMModel, *, requires_grad: bool = False) -> MPMState:
        return model.state(requires_grad=requires_grad)

    def scratch_arrays(self) -> list[wp.array]:
        return [self.grid_mass, self.grid_momentum, self.grid_v, self.grid_fluid_mass, self.grid_fluid_volume,
                self.particle_F_new]

    def max_stable_dt(self, model: MPMModel) -> float:
        """Largest stable step [s]: the elastic-wave CFL limit and the explicit-viscosity limit."""
        dx = model.dx
        wave = model.max_wave_speed()
        limit = self.cfl * dx / wave if wave > 0 else math.inf
        nu = model.max_kinematic_viscosity()
        if nu > 0:
            limit = min(limit, dx * dx / (6.0 * nu))
        self._max_dt[id(model)] = limit
        return limit

    def validate_dt(self, model: MPMModel, dt: float) -> None:
        """Raise :class:`UnstableTimeStep` when ``dt`` exceeds :meth:`max_stable_dt`."""
        if not (dt > 0 and math.isfinite(dt)):
            raise InvalidParameter("dt", dt, "(0, inf) seconds")
        limit = self.max_stable_dt(model)
        if dt > limit * (1 + 1e-6):
            raise UnstableTimeStep(dt, limit, f"CFL {self.cfl} with dx = {model.dx:.4g} m and the stiffest material")

    def step(self, model: MPMModel, state_in: MPMState, state_out: MPMState, control: MPMControl, dt: float) -> None:
        limit = self._max_dt.get(id(model))
        if limit is None:
            self.validate_dt(model, dt)
        elif dt > limit * (1 + 1e-6):
            self.validate_dt(model, dt)
        device = model.device
        res = model.grid_res
        origin = wp.vec3(*model.domain_origin)
        inv_dx = 1.0 / model.dx
        nc = model.collider_count
        if nc:
            wp.launch(
                kernels.integrate_colliders,
                dim=model.num_worlds * nc,
                inputs=[state_in.collider_position, state_in.collider_rotation, control.collider_velocity,
                        control.collider_angular_velocity, dt],
                outputs=[state_out.collider_position, state_out.collider_rotation],
                device=device,
            )
        self.grid_mass.zero_()
        self.grid_momentum.zero_()
        if self._has_fluid:
            self.grid_fluid_mass.zero_()
            self.grid_fluid_volume.zero_()
        wp.launch(
            kernels.particle_to_grid,
            dim=model.particle_count,
            inputs=[state_in.particle_x, state_in.particle_v, state_in.particle_F, state_in.particle_C,
                    model.particle_world, model.particle_material, model.particle_mass, model.particle_volume,
                    model.particle_young_modulus, model.particle_poisson_ratio, model.particle_yield_stress,
                    model.particle_friction_angle, model.particle_viscosity, model.particle_bulk_modulus,
                    origin, inv_dx, dt, res],
            outputs=[self.particle_F_new, self.grid_mass, self.grid_momentum, self.grid_fluid_mass,
                     self.grid_fluid_volume],
            device=device,
        )
        offset, extent = self._active_box(model, state_in)
        wp.launch(
            kernels.grid_update,
            dim=(model.num_worlds, *extent),
            inputs=[self.grid_mass, self.grid_momentum, model.gravity, model.collider_shape, model.collider_size,
                    model.collider_friction, model.collider_mesh, state_out.collider_position,
                    state_out.collider_rotation, control.collider_velocity, control.collider_angular_velocity,
                    nc, model.contact_distance, origin, model.dx, dt, res, int(model.boundary), BOUNDARY_CELLS,
                    offset],
            outputs=[self.grid_v],
            device=device,
        )
        wp.launch(
            kernels.grid_to_particle,
            dim=model.particle_count,
            inputs=[state_in.particle_x, model.particle_world, model.particle_material, self.particle_F_new,
                    self.grid_v, self.grid_fluid_mass, self.grid_fluid_volume, origin, inv_dx, dt, res],
            outputs=[state_out.particle_x, state_out.particle_v, state_out.particle_C, state_out.particle_F],
            device=device,
        )

    def _active_box(self, model: MPMModel, state: MPMState) -> tuple[wp.vec3i, tuple[int, int, int]]:
        """The box of grid nodes any particle's stencil touches (union over worlds).

        Updating only these nodes skips the empty bulk of the grid, which otherwise dominates
        the cost of small objects in large domains; G2P reads nothing outside the box.
        """
        res = model.grid_res
        self._bounds.assign(np.array([res, res, res, -1, -1, -1], dtype=np.int32))
        wp.launch(kernels.stencil_bounds, dim=model.particle_count,
                  inputs=[state.particle_x, wp.vec3(*model.domain_origin), 1.0 / model.dx, res],
                  outputs=[self._bounds], device=model.device)
        b = self._bounds.numpy()
        lo = np.maximum(b[:3], 0)
        hi = np.minimum(b[3:] + 3, res)  # the stencil spans base .. base + 2
        return wp.vec3i(*lo.tolist()), tuple(int(v) for v in (hi - lo))

    def check_finite(self, model: MPMModel, state: MPMState, step: int) -> None:
        """Raise :class:`SimulationDiverged` on non-finite values or particles leaving the grid."""
        super().check_finite(model, state, step)
        margin = (BOUNDARY_CELLS - 1) * model.dx
        lower = np.asarray(model.domain_origin) + margin
        upper = np.asarray(model.domain_origin) + model.domain_size - margin
        self._first_outside.fill_(model.particle_count)
        wp.launch(kernels.particles_outside, dim=model.particle_count,
                  inputs=[state.particle_x, wp.vec3(*lower), wp.vec3(*upper), self._first_outside],
                  device=model.device)
        first = int(self._first_outside.numpy()[0])
        if first < model.particle_count:
            raise SimulationDiverged(
                step, "particle_x", first,
                hint="A particle left the grid domain: the step is too large for the velocities reached, "
                     "or a collider pushed material through a wall.",
            )
