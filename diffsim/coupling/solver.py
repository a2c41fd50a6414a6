"""Scenes of several solvers stepped together: the FEM sensor in two-way contact with MPM material and
with rods. Model, State and Control are groups of the solvers' own bundles; one coupled step is
one step of each solver, with the contact forces between them exchanged first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import warp as wp

from diffsim.core.protocol import BundleGroup, Control, Model, Solver, State
from diffsim.core.scratch import PooledScratchSolver, ScratchPool
from diffsim.coupling import kernels
from diffsim.errors import ConfigError, InvalidParameter
from diffsim.fem.model import FEMModel
from diffsim.fem.solver import FEMSolver

#: height above the surface, in ball radii, below which a contact normal turns from the direction
#: of the ball's centre to the interpolated surface normal (:func:`kernels.contact_normal`)
NORMAL_BLEND = 0.25


class CoupledState(BundleGroup, State):
    """The states of every solver of a coupled scene (parts ``fem``, ``mpm``, ``rod``)."""


class CoupledControl(BundleGroup, Control):
    """The controls of every solver of a coupled scene."""


@dataclass
class CouplingModel(Model):
    """Parameters of the contacts between solvers."""

    material_friction: wp.array  #: float (1,), friction coefficient sensor-MPM [-]
    rod_friction: wp.array  #: float (1,), friction coefficient sensor-rod [-]


class CoupledModel(BundleGroup, Model):
    """The models of a coupled scene: ``fem`` (required), ``mpm`` and/or ``rod``, and ``coupling``.

    Args:
        fem: the sensor bodies.
        mpm: MPM material the sensors touch (same number of worlds), or None.
        rod: rods the sensors touch (same number of worlds), or None.
        material_friction: Coulomb coefficient between sensor surfaces and MPM material.
        rod_friction: Coulomb coefficient between sensor surfaces and rods.
        requires_grad: whether the two friction coefficients carry gradients.
    """

    def __init__(self, fem: FEMModel, mpm=None, rod=None, *, material_friction: float = 0.5,
                 rod_friction: float = 0.5, requires_grad: bool = False, coupling: CouplingModel | None = None):
        if not isinstance(fem, FEMModel):
            raise ConfigError(f"a coupled scene needs an FEMModel as fem, got {type(fem).__name__}.")
        for name, part in (("mpm", mpm), ("rod", rod)):
            if part is not None and part.num_worlds != fem.num_worlds:
                raise ConfigError(f"the {name} model has {part.num_worlds} worlds but the FEM model has "
                                  f"{fem.num_worlds}; coupled models must have the same worlds.")
        if coupling is None:
            for name, value in (("material_friction", material_friction), ("rod_friction", rod_friction)):
                if not (math.isfinite(value) and value >= 0):
                    raise InvalidParameter(name, value, "[0, inf) (Coulomb coefficient)")
            coupling = CouplingModel(
                material_friction=wp.array([material_friction], dtype=float, device=fem.device,
                                           requires_grad=requires_grad),
                rod_friction=wp.array([rod_friction], dtype=float, device=fem.device, requires_grad=requires_grad))
        super().__init__(fem=fem, mpm=mpm, rod=rod, coupling=coupling)

    @property
    def device(self) -> str:
        return self.fem.device

    @property
    def num_worlds(self) -> int:
        return self.fem.num_worlds

    def state(self, *, requires_grad: bool = False) -> CoupledState:
        return CoupledState(**{name: part.state(requires_grad=requires_grad)
                               for name, part in self.parts.items() if name != "coupling"})

    def world_of(self, name: str) -> np.ndarray:
        """World of each element of State or Control array ``"part.field"``."""
        part, _, field_name = name.partition(".")
        return self.parts[part].world_of(field_name)

    def control(self, *, requires_grad: bool = False) -> CoupledControl:
        return CoupledControl(**{name: part.control(requires_grad=requires_grad)
                                 for name, part in self.parts.items() if name != "coupling"})


class CoupledSolver(PooledScratchSolver, Solver):
    """Steps the FEM sensor together with MPM material and/or rods, in two-way contact.

    Per step, from the states at its start: the sensor's contact faces are put in a BVH per world
    (refitted each step); every MPM particle (a ball of half its spacing) and every rod vertex (a
    ball of the rod's contact radius) finds its nearest face there and meets it through one
    contact law (:func:`diffsim.coupling.kernels.coupled_contact_force`) along a normal that is
    continuous over the surface (the direction from the closest point to the ball, or the
    interpolated vertex normal close to and under the surface); the opposite forces go to the
    face's nodes. A particle's force enters the MPM grid through its B-spline stencil (the
    MPM solver's grid-force hook); a vertex's is an external force of the rod step. Then each
    solver takes its step. Searches give indices only (untaped); forces are recomputed with
    differentiable math from the indices. (Contact measured at grid nodes instead would start a
    cell or more before the material, since nodes get mass from particles 1.5 cells away; rod
    capsules against sensor nodes let a rod as thick as the node spacing sink between nodes.)

    The split is staggered (explicit in the coupling): contact forces come from the start of the
    step, and the partners then step one after the other. An implicit sensor
    (``FEMSolver(integrator="implicit")``) takes them as a constant external force of its Newton
    solve. That removes the sensor's own stability limit (4 us on an 8k-tet pad) but not the
    partners' or the coupling springs': MPM and rods step explicitly, and the coupling stiffness
    is sized to their step, so the coupled step stays at the smallest of those limits. A
    monolithic implicit coupled solve would need implicit MPM and rod steps first.

    Args:
        model: the coupled scene.
        fem: the FEM solver (default ``FEMSolver(model.fem)``; explicit or implicit, not
            quasi-static: the coupled partners carry inertia).
        mpm: the MPM solver, when the scene has MPM material.
        rod: the rod solver, when the scene has rods.
        stiffness: contact acceleration per penetration [1/s^2] of the reduced mass of the two
            touching points, for both couplings (default (0.1 / dt)^2: stiff, and stable while up
            to about ten contacts push one node).
        damping_ratio: damping of the approach, as a fraction of critical.
        friction_velocity: slip speed [m/s] below which friction is viscous.
    """

    def __init__(self, model: CoupledModel, *, fem: FEMSolver | None = None, mpm=None, rod=None,
                 stiffness: float | None = None, damping_ratio: float = 1.0, friction_velocity: float = 1e-3):
        if ("mpm" in model.parts) != (mpm is not None) or ("rod" in model.parts) != (rod is not None):
            raise ConfigError("pass an mpm (rod) solver exactly when the coupled model has an mpm (rod) part.")
        self.fem = fem if fem is not None else FEMSolver(model.fem)
        if self.fem.integrator == "quasistatic":
            raise ConfigError("a coupled scene cannot step its sensor quasi-statically: the explicit coupling "
                              "springs need the sensor nodes' inertia; use integrator='implicit' or 'explicit'.")
        self.mpm = mpm
        self.rod = rod
        if stiffness is not None and not (math.isfinite(stiffness) and stiffness > 0):
            raise InvalidParameter("stiffness", stiffness, "(0, inf) 1/s^2")
        self.stiffness = stiffness
        if not (math.isfinite(damping_ratio) and damping_ratio >= 0):
            raise InvalidParameter("damping_ratio", damping_ratio, "[0, inf)")
        self.damping_ratio = float(damping_ratio)
        if not (math.isfinite(friction_velocity) and friction_velocity > 0):
            raise InvalidParameter("friction_velocity", friction_velocity, "(0, inf) m/s")
        self.friction_velocity = float(friction_velocity)
        fem_model = model.fem
        fields = {"fem_coupling_force": (wp.vec3, fem_model.node_count),
                  "normal_sum": (wp.vec3, fem_model.node_count), "vertex_normal": (wp.vec3, fem_model.node_count)}
        if mpm is not None:
            fields["particle_force"] = (wp.vec3, model.mpm.particle_count)
            self._particles = _particle_points(model.mpm)
            mpm.grid_force_hooks.append(self._material_forces)
        if rod is not None:
            fields["rod_coupling_force"] = (wp.vec3, model.rod.vertex_count)
            fields["rod_total_force"] = (wp.vec3, model.rod.vertex_count)
            self._vertices = _vertex_points(model.rod)
        self._scratch = ScratchPool(fem_model.device, fields)
        self._setup_surfaces(fem_model)
        self._step_context = None

    # -- geometry ----------------------------------------------------------------------------
    def _setup_surfaces(self, fem: FEMModel) -> None:
        """One BVH per world over the contact faces of that world's bodies (points shared): the
        boundary faces whose three nodes all take contact, so the backing is never a target."""
        device = fem.device
        body_world = fem.body_world.numpy()
        node_body = fem.node_body.numpy()
        faces = fem.surface_faces
        faces = faces[np.all(fem.node_contact_area.numpy()[faces] > 0, axis=1)]
        face_world = body_world[node_body[faces[:, 0]]]
        self._points = wp.array(fem.initial_x, dtype=wp.vec3, device=device)
        self._meshes, starts, ordered = [], [], []
        start = 0
        for world in range(fem.num_worlds):
            mine = faces[face_world == world]
            starts.append(start)
            start += len(mine)
            ordered.append(mine)
            if len(mine):
                indices = wp.array(mine.reshape(-1).astype(np.int32), dtype=int, device=device)
                self._meshes.append(wp.Mesh(points=self._points, indices=indices))
            else:
                self._meshes.append(None)
        self._world_mesh = wp.array(np.array([m.id if m is not None else 0 for m in self._meshes], dtype=np.uint64),
                                    dtype=wp.uint64, device=device)
        self._world_face_start = wp.array(np.array(starts, dtype=np.int32), dtype=int, device=device)
        self._faces = wp.array(np.concatenate(ordered).astype(np.int32), dtype=wp.vec3i, device=device)

    def _refit(self, node_x: wp.array) -> None:
        # only the search reads these points: kept off any tape
        wp.launch(kernels.copy_vec3, dim=node_x.shape[0], inputs=[node_x], outputs=[self._points],
                  device=node_x.device, record_tape=False)
        for mesh in self._meshes:
            if mesh is not None:
                mesh.refit()

    def _vertex_normals(self, node_x: wp.array, s) -> None:
        """Area-weighted vertex normals of the deformed contact faces (taped: contact normals are
        interpolated from them)."""
        s.normal_sum.zero_()
        if self._faces.shape[0]:
            wp.launch(kernels.face_normals_to_vertices, dim=self._faces.shape[0], inputs=[self._faces, node_x],
                      outputs=[s.normal_sum], device=node_x.device)
        wp.launch(kernels.normalize_vec3, dim=node_x.shape[0], inputs=[s.normal_sum], outputs=[s.vertex_normal],
                  device=node_x.device)

    # -- protocol ----------------------------------------------------------------------------
    def new_state(self, model: CoupledModel, *, requires_grad: bool = False) -> CoupledState:
        return model.state(requires_grad=requires_grad)

    def max_stable_dt(self, model: CoupledModel) -> float:
        limits = [self.fem.max_stable_dt(model.fem)]
        if self.mpm is not None:
            limits.append(self.mpm.max_stable_dt(model.mpm))
        if self.rod is not None:
            limits.append(self.rod.max_stable_dt(model.rod))
        return min(limits)

    def validate_dt(self, model: CoupledModel, dt: float) -> None:
        self.fem.validate_dt(model.fem, dt)
        if self.mpm is not None:
            self.mpm.validate_dt(model.mpm, dt)
        if self.rod is not None:
            self.rod.validate_dt(model.rod, dt)

    def check_finite(self, model: CoupledModel, state: CoupledState, step: int) -> None:
        for name, solver in (("fem", self.fem), ("mpm", self.mpm), ("rod", self.rod)):
            if solver is not None:
                solver.check_finite(model.parts[name], state.parts[name], step)

    def scratch_arrays(self) -> list[wp.array]:
        return [*self.fem.scratch_arrays(), *(self.mpm.scratch_arrays() if self.mpm else []),
                *(self.rod.scratch_arrays() if self.rod else [])]

    def begin_step_scratch(self):
        return [super().begin_step_scratch(), *(s.begin_step_scratch() for s in self._solvers())]

    def end_step_scratch(self, claim) -> None:
        super().end_step_scratch(claim[0])
        for solver, token in zip(self._solvers(), claim[1:], strict=True):
            solver.end_step_scratch(token)

    def release_step_scratch(self, claim) -> None:
        super().release_step_scratch(claim[0])
        for solver, token in zip(self._solvers(), claim[1:], strict=True):
            solver.release_step_scratch(token)

    def _solvers(self):
        return [s for s in (self.fem, self.mpm, self.rod) if s is not None]

    def step(self, model: CoupledModel, state_in: CoupledState, state_out: CoupledState, control: CoupledControl,
             dt: float) -> None:
        fem_model, fem_in = model.fem, state_in.fem
        device = fem_model.device
        s = self._scratch.take()
        s.fem_coupling_force.zero_()
        self._refit(fem_in.node_x)
        self._vertex_normals(fem_in.node_x, s)
        if self.mpm is not None:
            self._step_context = (model, state_in, s)
            try:
                self.mpm.step(model.mpm, state_in.mpm, state_out.mpm, control.mpm, dt)
            finally:
                self._step_context = None
        if self.rod is not None:
            rod_model, rod_in = model.rod, state_in.rod
            self._rod_forces(model, state_in, s, dt)
            wp.launch(kernels.add_vec3, dim=rod_model.vertex_count,
                      inputs=[control.rod.vertex_external_force, s.rod_coupling_force], outputs=[s.rod_total_force],
                      device=device)
            rod_control = control.rod.with_arrays({"vertex_external_force": s.rod_total_force})
            self.rod.step(rod_model, rod_in, state_out.rod, rod_control, dt)
        self.fem.step(fem_model, fem_in, state_out.fem, control.fem, dt, coupled_contact_force=s.fem_coupling_force)

    # -- contacts ----------------------------------------------------------------------------
    def _material_forces(self, mpm_model, mpm_state, grid, dt: float) -> None:
        """The MPM solver's grid-force hook: particle-sensor contact forces onto the grid nodes."""
        if self._step_context is None:
            return  # the MPM solver stepped on its own
        model, state_in, s = self._step_context
        self._point_forces(model, state_in, self._particles, mpm_state.particle_x, mpm_state.particle_v,
                           model.mpm.particle_mass, model.coupling.material_friction, s.particle_force, s, dt)
        wp.launch(kernels.particle_forces_to_grid, dim=mpm_model.particle_count,
                  inputs=[mpm_state.particle_x, mpm_model.particle_world, s.particle_force, grid.origin,
                          1.0 / grid.dx, grid.grid_res, grid.offset],
                  outputs=[grid.force], device=mpm_model.device)

    def _rod_forces(self, model: CoupledModel, state_in: CoupledState, s, dt: float) -> None:
        rod = state_in.rod
        self._point_forces(model, state_in, self._vertices, rod.vertex_x, rod.vertex_v, model.rod.vertex_mass,
                           model.coupling.rod_friction, s.rod_coupling_force, s, dt)

    def _point_forces(self, model, state_in, points: _Points, x, v, mass, friction, point_force, s, dt) -> None:
        """Contact of balls at ``x`` with the sensor faces: forces on the balls into ``point_force``,
        the opposite forces into the step's sensor coupling force."""
        fem_model, fem_in = model.fem, state_in.fem
        device = fem_model.device
        candidate = wp.empty(x.shape[0], dtype=int, device=device)
        wp.launch(kernels.point_candidates, dim=x.shape[0],
                  inputs=[x, points.world, self._world_mesh, 2.0 * points.largest_radius],
                  outputs=[candidate], device=device, record_tape=False)
        wp.launch(kernels.point_face_forces, dim=x.shape[0],
                  inputs=[candidate, x, v, points.world, mass, points.kinematic, points.radius,
                          self._world_face_start, self._faces, fem_in.node_x, fem_in.node_v, fem_model.node_mass,
                          fem_model.node_fixed, s.vertex_normal, self._stiffness(dt), self.damping_ratio, friction,
                          self.friction_velocity, 0.05, NORMAL_BLEND, dt],
                  outputs=[point_force, s.fem_coupling_force], device=device)

    def _stiffness(self, dt: float) -> float:
        return self.stiffness if self.stiffness is not None else (0.1 / dt) ** 2


@dataclass
class _Points:
    """Constant per-point data of the balls that touch the sensor (MPM particles or rod vertices)."""

    world: wp.array  #: int32, world of each point
    radius: wp.array  #: float, ball radius [m]
    kinematic: wp.array  #: int32, 1 where the point's motion is prescribed (driven rod vertices)
    largest_radius: float


def _particle_points(mpm) -> _Points:
    radius = 0.5 * np.cbrt(mpm.particle_volume.numpy().astype(np.float64))
    return _Points(mpm.particle_world, wp.array(radius.astype(np.float32), dtype=float, device=mpm.device),
                   wp.zeros(mpm.particle_count, dtype=wp.int32, device=mpm.device), float(radius.max()))


def _vertex_points(rod) -> _Points:
    vertex_rod = rod.vertex_rod.numpy()
    radius = rod.rod_contact_radius.numpy()[vertex_rod]
    world = rod.rod_world.numpy()[vertex_rod]
    return _Points(wp.array(world.astype(np.int32), dtype=wp.int32, device=rod.device),
                   wp.array(radius.astype(np.float32), dtype=float, device=rod.device), rod.vertex_driven,
                   float(radius.max()))


__all__ = ["CoupledControl", "CoupledModel", "CoupledSolver", "CoupledState", "CouplingModel"]
