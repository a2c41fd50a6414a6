"""The MLS-MPM solver: one explicit step per call, with APIC transfers, quadratic B-splines,
per-particle materials, kinematic colliders and domain walls, for many worlds in one launch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import warp as wp

from diffsim.core.launch import LaunchCache
from diffsim.core.parallel import launch_items
from diffsim.core.protocol import Solver
from diffsim.errors import InvalidParameter, SimulationDiverged
from diffsim.geometry.colliders import ColliderSetCache
from diffsim.materials import MaterialModel
from diffsim.mpm import kernels
from diffsim.mpm.model import BOUNDARY_CELLS, MPMControl, MPMModel, MPMState


@dataclass
class _StepScratch:
    """Scratch of one step: grids over the active box (world, i, j, k) and per-particle arrays."""

    grid_mass: wp.array
    grid_momentum: wp.array
    grid_force: wp.array
    grid_v: wp.array
    grid_fluid_mass: wp.array
    grid_fluid_volume: wp.array
    particle_F_new: wp.array
    particle_affine: wp.array


class _ScratchSlot:
    """Growable flat buffers (values and gradients) from which one taped step's scratch is viewed."""

    _FIELDS = (("grid_mass", float), ("grid_momentum", wp.vec3), ("grid_force", wp.vec3), ("grid_v", wp.vec3),
               ("grid_fluid_mass", float), ("grid_fluid_volume", float),
               ("particle_F_new", wp.mat33), ("particle_affine", wp.mat33))

    def __init__(self, device):
        self.device = device
        self.values: dict[str, wp.array] = {}
        self.grads: dict[str, wp.array] = {}

    def _view(self, name, dtype, shape) -> wp.array:
        size = int(np.prod(shape))
        if name not in self.values or self.values[name].shape[0] < size:
            capacity = max(size, 1)
            self.values[name] = wp.zeros(capacity, dtype=dtype, device=self.device)
            self.grads[name] = wp.zeros(capacity, dtype=dtype, device=self.device)
        view = wp.array(ptr=self.values[name].ptr, dtype=dtype, shape=shape, device=self.device)
        view.grad = wp.array(ptr=self.grads[name].ptr, dtype=dtype, shape=shape, device=self.device)
        # Views do not own memory: tie the buffers' lifetime to the views (a tape may outlive the
        # solver, and a slot may be re-grown while an old view is still referenced).
        view._keepalive = self.values[name]
        view.grad._keepalive = self.grads[name]
        view.zero_()
        view.grad.zero_()
        return view

    def views(self, shape, fluid_shape, particles) -> _StepScratch:
        shapes = (shape, shape, shape, shape, fluid_shape, fluid_shape, (particles,), (particles,))
        return _StepScratch(*(self._view(n, t, sh) for (n, t), sh in zip(self._FIELDS, shapes, strict=True)))


@dataclass
class GridView:
    """The grid of one step as a grid-force hook sees it: arrays over the active box of nodes
    (world, i, j, k), the box's first global node index ``offset`` and its ``extent``, the
    domain ``origin`` [m], the node spacing ``dx`` [m] and the nodes per axis ``grid_res``.
    Hooks add forces [N] into ``force`` (atomically) and must not write ``mass`` or ``momentum``."""

    mass: wp.array
    momentum: wp.array
    force: wp.array
    offset: wp.vec3i
    extent: tuple[int, int, int]
    origin: wp.vec3
    dx: float
    grid_res: int


def _taping() -> bool:
    from warp._src.context import runtime

    return runtime.tape is not None


class MPMSolver(Solver):
    """Explicit MLS-MPM (Hu et al. 2018) with APIC transfers.

    Grids cover only the box of nodes the particles reach. Untaped steps reuse the solver's
    buffers; a taped step takes its own scratch slot, so one tape may record several steps (the
    checkpointed :class:`~diffsim.core.Rollout` records one segment per tape this way).

    ``grid_force_hooks`` are called after particle-to-grid transfer with (model, state_in,
    :class:`GridView`, dt): the entry point of forces from coupled solvers (see
    :mod:`diffsim.coupling`).

    Args:
        model: the scene; the solver sizes its grid for it.
        cfl: fraction of a cell that the fastest elastic wave may cross in one step.
        hand_adjoints: use the hand-written adjoints of the two transfer kernels (several times
            faster than Warp's generated ones, which remain available for comparison).
    """

    def __init__(self, model: MPMModel, *, cfl: float = 0.5, hand_adjoints: bool = True):
        if not (0 < cfl <= 1):
            raise InvalidParameter("cfl", cfl, "(0, 1]")
        self.cfl = float(cfl)
        self.hand_adjoints = bool(hand_adjoints)
        # Persistent scratch for untaped steps; a taped step gets fresh scratch (see _scratch).
        self._grid_capacity = model.num_worlds * model.grid_res**3
        self._buffers = {
            "grid_mass": wp.zeros(self._grid_capacity, dtype=float, device=model.device),
            "grid_momentum": wp.zeros(self._grid_capacity, dtype=wp.vec3, device=model.device),
            "grid_force": wp.zeros(self._grid_capacity, dtype=wp.vec3, device=model.device),
            "grid_v": wp.zeros(self._grid_capacity, dtype=wp.vec3, device=model.device),
            "grid_fluid_mass": wp.zeros(self._grid_capacity, dtype=float, device=model.device),
            "grid_fluid_volume": wp.zeros(self._grid_capacity, dtype=float, device=model.device),
            "particle_F_new": wp.zeros(model.particle_count, dtype=wp.mat33, device=model.device),
            "particle_affine": wp.zeros(model.particle_count, dtype=wp.mat33, device=model.device),
        }
        self._has_fluid = bool(np.any(model.particle_material.numpy() == MaterialModel.FLUID))
        self._free_slots: list[_ScratchSlot] = []
        self._claims: list[list] = []
        self._slots_taken = 0  # scratch slots handed out to taped steps, ever (for tests)
        self._first_outside = wp.zeros(1, dtype=int, device=model.device)
        self._bounds = wp.zeros(6, dtype=int, device=model.device)
        self._max_dt: dict[int, float] = {}
        self._colliders = ColliderSetCache()
        self._launches = LaunchCache()
        self._views: dict[tuple, wp.array] = {}
        self.grid_force_hooks: list[Callable[[MPMModel, MPMState, GridView, float], None]] = []
        #: when True, every step writes :attr:`collider_wrench`: per (world, collider) slot ``s``,
        #: the force [N] (entry ``2 s``) and torque about the collider's origin [N m] (``2 s + 1``,
        #: world axes) that the material exerted on it, averaged over the step (two-way coupling)
        self.measure_collider_wrench = False
        self._wrench_buffer = wp.zeros(2 * model.num_worlds * model.collider_count, dtype=wp.vec3,
                                       device=model.device)
        self.collider_wrench = self._wrench_buffer

    # -- protocol --------------------------------------------------------------------------
    def new_state(self, model: MPMModel, *, requires_grad: bool = False) -> MPMState:
        return model.state(requires_grad=requires_grad)

    #: A taped step allocates its own scratch, so one tape may record several steps.
    tape_spans_steps = True

    def _scratch(self, model: MPMModel, extent: tuple[int, int, int]) -> _StepScratch:
        """Grid arrays over the active box only, and per-particle scratch.

        Without a tape, views into the persistent buffers are reused and only their used part is
        cleared. Under a tape each step takes the next slot of a pool (with gradients), so one
        tape can record many steps without any recorded kernel's input being overwritten; the
        rollout hands the slots back with :meth:`release_step_scratch` after each backward
        segment. Scenes without fluid get empty fluid grids.
        """
        shape = (model.num_worlds, *extent)
        fluid_shape = shape if self._has_fluid else (model.num_worlds, 0, 0, 0)
        if _taping():
            slot = self._free_slots.pop() if self._free_slots else _ScratchSlot(model.device)
            self._slots_taken += 1
            if self._claims:
                self._claims[-1].append(slot)  # handed back when that claim is released
            # a slot taken outside any claim is never reused: safe, at the cost of memory
            return slot.views(shape, fluid_shape, model.particle_count)
        device = model.device

        def grid(name, dtype, grid_shape):
            # one view object per (array, shape): cached launch commands then need no re-packing
            view = self._views.get((name, grid_shape))
            if view is None:
                if len(self._views) > 512:  # the active box wanders: forget old shapes
                    self._views.clear()
                view = wp.array(ptr=self._buffers[name].ptr, dtype=dtype, shape=grid_shape, device=device)
                view._keepalive = self._buffers[name]  # a view does not own its memory
                self._views[(name, grid_shape)] = view
            view.zero_()
            return view

        return _StepScratch(
            grid("grid_mass", float, shape), grid("grid_momentum", wp.vec3, shape),
            grid("grid_force", wp.vec3, shape), grid("grid_v", wp.vec3, shape),
            grid("grid_fluid_mass", float, fluid_shape), grid("grid_fluid_volume", float, fluid_shape),
            self._buffers["particle_F_new"], self._buffers["particle_affine"],
        )

    def begin_step_scratch(self) -> list:
        """Start collecting the scratch slots that taped steps take; returns the claim token."""
        claim: list = []
        self._claims.append(claim)
        return claim

    def end_step_scratch(self, claim: list) -> None:
        """Stop collecting into ``claim`` (its slots stay taken until released)."""
        # by identity: claims are lists, and two empty ones compare equal
        self._claims = [c for c in self._claims if c is not claim]

    def release_step_scratch(self, claim: list) -> None:
        """Hand back the slots of ``claim``: call once the tapes that recorded those steps are gone."""
        self.end_step_scratch(claim)
        self._free_slots.extend(claim)
        claim.clear()

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

    #: Fraction of a grid cell that the fastest particle or collider surface point may travel in
    #: one step (see :meth:`max_advective_dt`).
    advective_cfl: float = 0.3

    def max_advective_dt(self, model: MPMModel, state: MPMState, control: MPMControl) -> float:
        """Largest step [s] in which the fastest particle of ``state`` and the fastest collider
        surface point under ``control`` (linear speed + |angular velocity| x the collider's extent
        from ``model.collider_size``) travel at most ``advective_cfl`` of a cell (inf when nothing moves).

        Unlike :meth:`max_stable_dt`, which bounds elastic waves, this depends on the motion: a
        tool that crosses more than a cell per step pushes material through the grid's skin.
        """
        speeds = wp.zeros(2, dtype=float, device=model.device)
        # a bound on speeds, nothing to differentiate: off the tape
        if model.particle_count:
            wp.launch(kernels.max_particle_speed, dim=model.particle_count, inputs=[state.particle_v],
                      outputs=[speeds], device=model.device, record_tape=False)
        nc = model.collider_count
        if nc:
            lower = np.asarray(model.domain_origin, dtype=np.float64)
            wp.launch(kernels.max_collider_speed, dim=model.num_worlds * nc,
                      inputs=[self._colliders.pack(model, state, control), float(model.contact_distance),
                              wp.vec3(*lower), wp.vec3(*(lower + model.domain_size))],
                      outputs=[speeds], device=model.device, record_tape=False)
        fastest = float(speeds.numpy().max())
        return self.advective_cfl * model.dx / fastest if fastest > 0 else math.inf

    def stability_limit(self, model: MPMModel) -> str:
        return f"CFL {self.cfl} with dx = {model.dx:.4g} m and the stiffest material"

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
        launch = self._launches.launch
        launch("time", kernels.advance_time, model.num_worlds, [state_in.world_time, dt], [state_out.world_time],
               device, variant=state_in)
        nc = model.collider_count
        if nc:
            launch("colliders", kernels.integrate_colliders, model.num_worlds * nc,
                   [state_in.collider_position, state_in.collider_rotation, control.collider_velocity,
                    control.collider_angular_velocity, dt],
                   [state_out.collider_position, state_out.collider_rotation], device, variant=state_in)
        offset, extent = self._active_box(model, state_in)
        scratch = self._scratch(model, extent)
        cached = {"cache": self._launches, "variant": state_in}
        launch_items(
            kernels.particle_stress,
            model.particle_count,
            inputs=[state_in.particle_F, state_in.particle_C, model.particle_material, model.particle_mass,
                    model.particle_volume, model.particle_young_modulus, model.particle_poisson_ratio,
                    model.particle_yield_stress, model.particle_friction_angle, model.particle_viscosity,
                    model.particle_bulk_modulus, model.particle_fiber, model.particle_actuation_strength,
                    control.particle_actuation, inv_dx, dt],
            outputs=[scratch.particle_F_new, scratch.particle_affine],
            device=device, site="stress", **cached,
        )
        launch_items(
            kernels.particle_to_grid,
            model.particle_count,
            inputs=[state_in.particle_x, state_in.particle_v, scratch.particle_affine, scratch.particle_F_new,
                    model.particle_world, model.particle_material, model.particle_mass, origin, inv_dx, res,
                    offset, int(self._has_fluid)],
            outputs=[scratch.grid_mass, scratch.grid_momentum, scratch.grid_fluid_mass, scratch.grid_fluid_volume],
            device=device,
            scattered_outputs=True,  # atomic adds into the shared grid
            adjoint_kernel=kernels.particle_to_grid_adjoint if self.hand_adjoints else None,
            adjoint_of=(0, 1, 2, 3, 6),
            site="p2g", **cached,
        )
        if self.grid_force_hooks:
            grid = GridView(scratch.grid_mass, scratch.grid_momentum, scratch.grid_force, offset, extent, origin,
                            model.dx, res)
            for hook in self.grid_force_hooks:
                hook(model, state_in, grid, dt)
        launch("grid", kernels.grid_update, (model.num_worlds, *extent),
               [scratch.grid_mass, scratch.grid_momentum, scratch.grid_force, model.gravity,
                self._colliders.pack(model, state_out, control), model.contact_distance, origin, model.dx, dt, res,
                int(model.boundary), BOUNDARY_CELLS, offset],
               [scratch.grid_v], device, variant=state_in)
        if self.measure_collider_wrench and nc:
            recording = _taping()
            if recording:  # a taped step's wrench is its own array, so its gradient stays with it
                self.collider_wrench = wp.zeros(2 * model.num_worlds * nc, dtype=wp.vec3, device=device,
                                                requires_grad=True)
            else:
                self.collider_wrench = self._wrench_buffer
                self.collider_wrench.zero_()
            wp.launch(kernels.collider_wrench, dim=(model.num_worlds, *extent),
                      inputs=[scratch.grid_mass, scratch.grid_momentum, scratch.grid_force, model.gravity,
                              self._colliders.pack(model, state_out, control), model.contact_distance, origin,
                              model.dx, dt, offset],
                      outputs=[self.collider_wrench], device=device, record_tape=recording)
        launch_items(
            kernels.grid_to_particle,
            model.particle_count,
            inputs=[state_in.particle_x, model.particle_world, model.particle_material, scratch.particle_F_new,
                    scratch.grid_v, scratch.grid_fluid_mass, scratch.grid_fluid_volume, origin, inv_dx, dt, res,
                    offset, int(self._has_fluid)],
            outputs=[state_out.particle_x, state_out.particle_v, state_out.particle_C, state_out.particle_F],
            device=device,
            scattered_adjoints=(4, 5, 6),  # every particle reads the grid: its adjoint scatters there
            adjoint_kernel=kernels.grid_to_particle_adjoint if self.hand_adjoints else None,
            adjoint_of=(0, 3, 4, 5, 6),
            site="g2p", **cached,
        )

    def _active_box(self, model: MPMModel, state: MPMState) -> tuple[wp.vec3i, tuple[int, int, int]]:
        """The box of grid nodes any particle's stencil touches (union over worlds).

        Updating only these nodes skips the empty bulk of the grid, which otherwise dominates
        the cost of small objects in large domains; G2P reads nothing outside the box.
        """
        res = model.grid_res
        self._bounds.assign(np.array([res, res, res, -1, -1, -1], dtype=np.int32))
        # integers only, nothing to differentiate: keep it off the tape
        inputs = [state.particle_x, wp.vec3(*model.domain_origin), 1.0 / model.dx, res]
        if _taping():
            wp.launch(kernels.stencil_bounds, dim=model.particle_count, inputs=inputs, outputs=[self._bounds],
                      device=model.device, record_tape=False)
        else:
            self._launches.launch("bounds", kernels.stencil_bounds, model.particle_count, inputs, [self._bounds],
                                  model.device, variant=state)
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
