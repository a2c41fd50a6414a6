"""MPM scene data: the Model (particles, materials, colliders, grid), State and Control, and the
builder that assembles them from shapes, presets and colliders with validated SI parameters.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import numpy as np
import warp as wp

from diffsim.core.device import resolve_device
from diffsim.core.protocol import Control, Model, State
from diffsim.errors import ConfigError, InvalidParameter
from diffsim.geometry import Collider, TriangleMesh, sampling
from diffsim.geometry.colliders import ColliderSetBuilder
from diffsim.geometry.motion import rotation_vector
from diffsim.materials import Material, MaterialModel


class Boundary(enum.IntEnum):
    """What the walls of the grid domain do to the material touching them."""

    STICKY = 0  #: velocity set to zero
    SLIP = 1  #: normal velocity set to zero, tangential kept
    SEPARATE = 2  #: normal velocity into the wall set to zero; material may leave the wall


#: Grid cells along each wall where the boundary condition acts (the quadratic stencil is 3 wide).
BOUNDARY_CELLS = 3


@dataclass
class MPMModel(Model):
    """Everything constant during an MPM rollout.

    Particle arrays have one entry per particle of every world; ``particle_world`` says which
    world (and so which grid) a particle belongs to. Collider shapes are shared by all worlds;
    their poses live in the State, one per (world, collider).
    """

    num_worlds: int
    grid_res: int  #: cells per axis of each world's cubic grid
    domain_size: float  #: edge of the cubic domain [m]
    domain_origin: tuple[float, float, float]  #: lower corner of the domain [m]
    boundary: Boundary
    device: str
    contact_distance: float  #: width of the collider contact skin [m]

    particle_world: wp.array  #: int32, world index of each particle
    particle_material: wp.array  #: int32, a :class:`diffsim.materials.MaterialModel` per particle
    particle_mass: wp.array  #: float, mass [kg]
    particle_volume: wp.array  #: float, reference volume [m^3]
    particle_young_modulus: wp.array  #: float [Pa]
    particle_poisson_ratio: wp.array  #: float [-]
    particle_yield_stress: wp.array  #: float, von Mises yield stress [Pa]
    particle_friction_angle: wp.array  #: float, Drucker–Prager friction angle [rad]
    particle_viscosity: wp.array  #: float, dynamic viscosity [Pa s]
    particle_bulk_modulus: wp.array  #: float, fluid bulk modulus [Pa]
    particle_fiber: wp.array  #: vec3, unit fibre direction of the active stress, in the reference shape
    particle_actuation_strength: wp.array  #: float, active stress at activation 1 [Pa] (0: passive)
    particle_actuation_group: wp.array  #: int32, actuation group (muscle) of each particle, -1 if passive
    gravity: wp.array  #: vec3, shape (1,), gravitational acceleration [m/s^2]

    collider_shape: wp.array  #: int32, a :class:`diffsim.geometry.ShapeType` per collider
    collider_size: wp.array  #: vec3, shape parameters [m]
    collider_friction: wp.array  #: float, Coulomb friction coefficient [-]
    collider_mesh: wp.array  #: uint64, Warp mesh id (0 for analytic shapes)

    initial_x: np.ndarray = field(repr=False, default=None)
    initial_v: np.ndarray = field(repr=False, default=None)
    initial_collider_position: np.ndarray = field(repr=False, default=None)
    initial_collider_rotation: np.ndarray = field(repr=False, default=None)
    colliders: list[Collider] = field(default_factory=list, repr=False)
    materials: list[Material] = field(default_factory=list, repr=False)
    particle_material_index: np.ndarray = field(repr=False, default=None)
    _meshes: list = field(default_factory=list, repr=False)

    @property
    def dx(self) -> float:
        """Grid spacing [m]."""
        return self.domain_size / self.grid_res

    @property
    def particle_count(self) -> int:
        return self.particle_world.shape[0]

    @property
    def collider_count(self) -> int:
        return self.collider_shape.shape[0]

    def world_of(self, name: str) -> np.ndarray:
        """World of each element of State or Control array ``name`` (per-particle, per-collider or,
        for ``world_time``, per world)."""
        if name == "world_time":
            return np.arange(self.num_worlds)
        if name.startswith("collider_"):
            return np.repeat(np.arange(self.num_worlds), self.collider_count)
        if name.startswith("particle_"):
            return self.particle_world.numpy()
        raise KeyError(f"MPMModel has no per-world array named {name!r}.")

    def state(self, *, requires_grad: bool = False) -> MPMState:
        """A new State at the builder's initial conditions (F = I, C = 0)."""
        n = self.particle_count
        eye = np.tile(np.eye(3, dtype=np.float32), (n, 1, 1))
        kw = dict(device=self.device, requires_grad=requires_grad)
        return MPMState(
            particle_x=wp.array(self.initial_x, dtype=wp.vec3, **kw),
            particle_v=wp.array(self.initial_v, dtype=wp.vec3, **kw),
            particle_F=wp.array(eye, dtype=wp.mat33, **kw),
            particle_C=wp.zeros(n, dtype=wp.mat33, **kw),
            collider_position=wp.array(self.initial_collider_position, dtype=wp.vec3, **kw),
            collider_rotation=wp.array(self.initial_collider_rotation, dtype=wp.quat, **kw),
            world_time=wp.zeros(self.num_worlds, dtype=float, **kw),
        )

    def control(self, *, requires_grad: bool = False) -> MPMControl:
        """A new Control with every collider at rest and no particle actuated."""
        m = self.num_worlds * self.collider_count
        kw = dict(device=self.device, requires_grad=requires_grad)
        return MPMControl(
            collider_velocity=wp.zeros(m, dtype=wp.vec3, **kw),
            collider_angular_velocity=wp.zeros(m, dtype=wp.vec3, **kw),
            particle_actuation=wp.zeros(self.particle_count, dtype=float, **kw),
        )

    @property
    def actuation_groups(self) -> int:
        """Number of actuation groups (one more than the largest group id; 0 when all passive)."""
        groups = self.particle_actuation_group.numpy()
        return int(groups.max()) + 1 if groups.size else 0

    def max_wave_speed(self) -> float:
        """Largest elastic (or acoustic) wave speed over all particles [m/s]; a muscle's active
        stress adds up to its strength to the tangent modulus (at |activation| <= 1)."""
        E = self.particle_young_modulus.numpy().astype(np.float64)
        nu = self.particle_poisson_ratio.numpy().astype(np.float64)
        K = self.particle_bulk_modulus.numpy().astype(np.float64)
        rho = self.particle_mass.numpy().astype(np.float64) / self.particle_volume.numpy().astype(np.float64)
        fluid = self.particle_material.numpy() == MaterialModel.FLUID
        lam = E * nu / ((1 + nu) * (1 - 2 * nu))
        mu = E / (2 * (1 + nu))
        modulus = np.where(fluid, K, lam + 2 * mu) + self.particle_actuation_strength.numpy().astype(np.float64)
        if modulus.size == 0:
            return 0.0
        return float(np.sqrt(np.max(modulus / rho)))

    def max_kinematic_viscosity(self) -> float:
        """Largest viscosity / density over all particles [m^2/s]."""
        if self.particle_count == 0:
            return 0.0
        rho = self.particle_mass.numpy() / self.particle_volume.numpy()
        return float(np.max(self.particle_viscosity.numpy() / rho))


@dataclass
class MPMState(State):
    """Particle and collider state of every world."""

    particle_x: wp.array  #: vec3, position [m]
    particle_v: wp.array  #: vec3, velocity [m/s]
    particle_F: wp.array  #: mat33, elastic deformation gradient [-]
    particle_C: wp.array  #: mat33, APIC affine velocity field (velocity gradient) [1/s]
    collider_position: wp.array  #: vec3, (world, collider) position [m]
    collider_rotation: wp.array  #: quat (x, y, z, w), (world, collider) orientation
    #: float, simulated time of each world since its initial state [s] (the clock of periodic
    #: controls such as gaits; nothing in the physics reads it)
    world_time: wp.array


@dataclass
class MPMControl(Control):
    """Inputs of one step: kinematic collider motion per (world, collider) and muscle activation
    per particle."""

    collider_velocity: wp.array  #: vec3, linear velocity [m/s]
    collider_angular_velocity: wp.array  #: vec3, angular velocity in world axes [rad/s]
    #: float, activation of each particle's active stress [-] (typically in [-1, 1]; positive
    #: contracts along the fibre, see :class:`Actuation`)
    particle_actuation: wp.array


@dataclass(frozen=True)
class Actuation:
    """Active stress of a group of particles (a muscle of a soft robot, as in DiffTaichi).

    A particle with activation ``a`` (``MPMControl.particle_actuation``) adds the Kirchhoff stress
    ``tau_a = a * strength * (F d)(F d)^T`` to its elastic stress, with ``d`` its fibre direction in
    the reference shape and ``F`` its deformation gradient: positive ``a`` pulls along the fibre
    (a free bar contracts by ``a * strength / E`` at small strain), negative ``a`` pushes.

    Attributes:
        group: actuation group id (>= 0): the action component that drives these particles.
        strength: active stress at activation 1 [Pa] (>= 0).
        fiber: fibre direction (normalised here), one (3,) for all particles or (N, 3).
    """

    group: int
    strength: float
    fiber: tuple[float, float, float] | np.ndarray = (0.0, 0.0, 1.0)

    def __post_init__(self):
        if not isinstance(self.group, (int, np.integer)) or self.group < 0:
            raise InvalidParameter("actuation group", self.group, "integers >= 0")
        if not (self.strength >= 0 and math.isfinite(self.strength)):
            raise InvalidParameter("actuation strength", self.strength, "[0, inf) Pa")

    def fibers(self, count: int) -> np.ndarray:
        """Unit fibre directions of ``count`` particles, (count, 3)."""
        d = np.asarray(self.fiber, dtype=np.float64)
        if d.shape not in ((3,), (count, 3)):
            raise InvalidParameter("fiber", f"an array of shape {d.shape}", f"shape (3,) or ({count}, 3)")
        d = np.broadcast_to(d, (count, 3))
        norm = np.linalg.norm(d, axis=1, keepdims=True)
        if not np.all(np.isfinite(d)) or np.any(norm < 1e-12):
            raise InvalidParameter("fiber", "a zero or non-finite direction", "non-zero finite directions")
        return d / norm


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise InvalidParameter(name, value, "(0, inf)")
    return value


class MPMBuilder:
    """Assembles an :class:`MPMModel`: particles by shape and material, colliders, grid, worlds.

    Args:
        grid_res: grid cells per axis (16..512).
        domain_size: edge of the cubic simulation domain [m].
        domain_origin: its lower corner [m].
        num_worlds: independent copies of the scene simulated in one launch.
        gravity: gravitational acceleration [m/s^2].
        boundary: what the domain walls do.
        contact_distance: width of the skin outside each collider over which its velocity
            projection fades in [m] (default: half a grid cell). A positive skin makes contact
            differentiable with respect to collider poses; 0 gives a sharp, pose-gradient-free
            contact.
    """

    def __init__(
        self,
        *,
        grid_res: int = 64,
        domain_size: float = 1.0,
        domain_origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
        num_worlds: int = 1,
        gravity: tuple[float, float, float] = (0.0, 0.0, -9.81),
        boundary: Boundary = Boundary.SEPARATE,
        contact_distance: float | None = None,
    ):
        if not isinstance(grid_res, int) or not 8 <= grid_res <= 1024:
            raise InvalidParameter("grid_res", grid_res, "integers in [8, 1024]")
        if not isinstance(num_worlds, int) or num_worlds < 1:
            raise InvalidParameter("num_worlds", num_worlds, "integers >= 1")
        self.grid_res = grid_res
        self.domain_size = _positive("domain_size", domain_size)
        self.domain_origin = tuple(float(c) for c in domain_origin)
        self.num_worlds = num_worlds
        g = np.asarray(gravity, dtype=np.float64)
        if g.shape != (3,) or not np.all(np.isfinite(g)):
            raise InvalidParameter("gravity", gravity, "three finite numbers [m/s^2]")
        self.gravity = tuple(g)
        self.boundary = Boundary(boundary)
        if contact_distance is None:
            contact_distance = 0.5 * self.domain_size / grid_res
        contact_distance = float(contact_distance)
        if not (contact_distance >= 0 and math.isfinite(contact_distance)):
            raise InvalidParameter("contact_distance", contact_distance, "[0, inf) m")
        self.contact_distance = contact_distance
        self._x: list[np.ndarray] = []
        self._v: list[np.ndarray] = []
        self._volume: list[np.ndarray] = []
        self._world: list[np.ndarray] = []
        self._material_index: list[np.ndarray] = []
        self._group: list[np.ndarray] = []
        self._fiber: list[np.ndarray] = []
        self._strength: list[np.ndarray] = []
        self._chunks_of: dict[int, list[int]] = {}  # first particle of an add call -> its chunks
        self.materials: list[Material] = []
        self._colliders = ColliderSetBuilder("an MPM scene")

    @property
    def dx(self) -> float:
        return self.domain_size / self.grid_res

    @property
    def colliders(self) -> list[Collider]:
        """The colliders added so far, in index order."""
        return self._colliders.colliders

    @property
    def particle_count(self) -> int:
        return sum(len(x) for x in self._x)

    # -- particles -------------------------------------------------------------------------
    def add_particles(
        self,
        positions: np.ndarray,
        material: Material,
        *,
        volume: float | np.ndarray,
        velocity: tuple[float, float, float] | np.ndarray = (0.0, 0.0, 0.0),
        world: int | None = None,
        actuation: Actuation | None = None,
    ) -> slice:
        """Add particles at ``positions`` [m] (N, 3), each of reference ``volume`` [m^3].

        ``world=None`` adds the particles to every world. ``actuation`` makes them a muscle (see
        :class:`Actuation`); by default they are passive. Returns the index range of the
        particles added to the first world they went to (the others follow in order).
        """
        x = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
        if x.shape[0] == 0:
            raise ConfigError("add_particles got no positions; a shape smaller than the spacing gives none.")
        if not np.all(np.isfinite(x)):
            raise InvalidParameter("positions", "array with non-finite entries", "finite coordinates [m]")
        material.validate()
        lo = np.asarray(self.domain_origin) + BOUNDARY_CELLS * self.dx
        hi = np.asarray(self.domain_origin) + self.domain_size - BOUNDARY_CELLS * self.dx
        outside = np.flatnonzero(np.any((x < lo) | (x > hi), axis=1))
        if outside.size:
            p = x[outside[0]]
            raise InvalidParameter(
                "positions",
                f"particle {outside[0]} at ({p[0]:.4g}, {p[1]:.4g}, {p[2]:.4g})",
                f"the domain interior [{lo[0]:.4g}, {hi[0]:.4g}]^3 m (walls take {BOUNDARY_CELLS} cells)",
                hint="Move the shape, enlarge domain_size or change domain_origin.",
            )
        vol = np.broadcast_to(np.asarray(volume, dtype=np.float64), (x.shape[0],))
        if not np.all(vol > 0) or not np.all(np.isfinite(vol)):
            raise InvalidParameter("volume", float(np.min(vol)), "(0, inf) m^3")
        v = np.broadcast_to(np.asarray(velocity, dtype=np.float64), x.shape)
        if not np.all(np.isfinite(v)):
            raise InvalidParameter("velocity", "non-finite entries", "finite velocities [m/s]")
        if material not in self.materials:
            self.materials.append(material)
        mat_index = self.materials.index(material)
        worlds = range(self.num_worlds) if world is None else [world]
        for w in worlds:
            if not 0 <= w < self.num_worlds:
                raise InvalidParameter("world", w, f"integers in [0, {self.num_worlds - 1}]")
        first = self.particle_count
        self._chunks_of[first] = list(range(len(self._x), len(self._x) + len(worlds)))
        for w in worlds:
            self._x.append(x.copy())
            self._group.append(np.full(x.shape[0], -1, dtype=np.int32))
            self._fiber.append(np.tile(np.array([0.0, 0.0, 1.0]), (x.shape[0], 1)))
            self._strength.append(np.zeros(x.shape[0]))
            self._v.append(np.array(v))
            self._volume.append(np.array(vol))
            self._world.append(np.full(x.shape[0], w, dtype=np.int32))
            self._material_index.append(np.full(x.shape[0], mat_index, dtype=np.int32))
        added = slice(first, first + x.shape[0])
        if actuation is not None:
            self.set_actuation(added, actuation)
        return added

    def set_actuation(self, particles: slice, actuation: Actuation | None) -> None:
        """Make ``particles`` (a range within what one ``add_*`` call returned) a muscle, or passive
        again with ``None``; the same particles of every world that call filled change too."""
        start, stop, step = particles.indices(self.particle_count)
        call = max((f for f in self._chunks_of if f <= start), default=None)
        chunks = self._chunks_of.get(call, [])
        if step != 1 or not chunks or stop - call > len(self._x[chunks[0]]) or stop <= start:
            raise InvalidParameter("particles", particles, "a non-empty range within the particles one add_* call "
                                   "returned")
        local = slice(start - call, stop - call)
        count = stop - start
        fibers = actuation.fibers(count) if actuation is not None else np.tile([0.0, 0.0, 1.0], (count, 1))
        for c in chunks:
            self._group[c][local] = -1 if actuation is None else int(actuation.group)
            self._strength[c][local] = 0.0 if actuation is None else float(actuation.strength)
            self._fiber[c][local] = fibers

    def _spacing(self, spacing: float | None) -> float:
        return _positive("spacing", spacing) if spacing is not None else 0.5 * self.dx

    def add_box(self, center, half_extents, material: Material, *, spacing=None, velocity=(0, 0, 0), world=None,
                jitter: float = 0.0, seed: int = 0, actuation: Actuation | None = None) -> slice:
        """Fill a box with particles, ``spacing`` [m] apart (default: half a grid cell)."""
        h = self._spacing(spacing)
        x = sampling.sample_box(center, half_extents, h, jitter=jitter, seed=seed)
        return self.add_particles(x, material, volume=h**3, velocity=velocity, world=world, actuation=actuation)

    def add_sphere(self, center, radius, material: Material, *, spacing=None, velocity=(0, 0, 0), world=None,
                   jitter: float = 0.0, seed: int = 0, actuation: Actuation | None = None) -> slice:
        """Fill a sphere of ``radius`` [m] with particles."""
        h = self._spacing(spacing)
        x = sampling.sample_sphere(center, radius, h, jitter=jitter, seed=seed)
        return self.add_particles(x, material, volume=h**3, velocity=velocity, world=world, actuation=actuation)

    def add_cylinder(self, center, radius, half_height, material: Material, *, axis: int = 2, spacing=None,
                     velocity=(0, 0, 0), world=None, jitter: float = 0.0, seed: int = 0,
                     actuation: Actuation | None = None) -> slice:
        """Fill a cylinder (``radius``, ``half_height`` [m], along ``axis``) with particles."""
        h = self._spacing(spacing)
        x = sampling.sample_cylinder(center, radius, half_height, h, axis=axis, jitter=jitter, seed=seed)
        return self.add_particles(x, material, volume=h**3, velocity=velocity, world=world, actuation=actuation)

    def add_mesh(self, mesh: TriangleMesh, material: Material, *, position=(0, 0, 0), rotation=(0, 0, 0, 1),
                 scale: float = 1.0, spacing=None, velocity=(0, 0, 0), world=None,
                 actuation: Actuation | None = None) -> slice:
        """Fill the inside of a closed triangle mesh with particles."""
        h = self._spacing(spacing)
        x = sampling.sample_mesh(mesh, h, position=position, rotation=rotation, scale=scale)
        return self.add_particles(x, material, volume=h**3, velocity=velocity, world=world, actuation=actuation)

    # -- colliders -------------------------------------------------------------------------
    def add_collider(self, collider: Collider) -> int:
        """Add a kinematic collider (see ``diffsim.geometry.collider_*``); returns its index."""
        return self._colliders.add(collider)

    def add_ground(self, *, height: float = 0.0, friction: float = 0.5) -> int:
        """Add the ground plane z = ``height`` [m] with Coulomb ``friction``; returns its collider index."""
        return self._colliders.add_ground(height=height, friction=friction)

    # -- finalize --------------------------------------------------------------------------
    def finalize(self, device: str | None = None, *, requires_grad: bool = False) -> MPMModel:
        """Build the Model on ``device`` (see :func:`diffsim.core.resolve_device`).

        ``requires_grad`` makes the material parameter, actuation strength and fibre, and collider
        friction arrays carry gradients (needed to differentiate with respect to them).
        """
        if self.particle_count == 0:
            raise ConfigError("the scene has no particles; add some with add_box, add_sphere, ... first.")
        device = resolve_device(device)
        x = np.concatenate(self._x)
        v = np.concatenate(self._v)
        vol = np.concatenate(self._volume)
        world = np.concatenate(self._world)
        mat_index = np.concatenate(self._material_index)
        mats = self.materials

        def per_particle(attr: str) -> np.ndarray:
            table = np.array([float(getattr(m, attr)) for m in mats], dtype=np.float64)
            return table[mat_index]

        density = per_particle("density")
        grad = dict(device=device, requires_grad=requires_grad)

        def farr(values) -> wp.array:
            return wp.array(np.asarray(values, dtype=np.float32), dtype=float, **grad)

        meshes = [c.mesh.warp_mesh(device) for c in self.colliders if c.mesh is not None]
        return MPMModel(
            num_worlds=self.num_worlds,
            grid_res=self.grid_res,
            domain_size=self.domain_size,
            domain_origin=self.domain_origin,
            boundary=self.boundary,
            device=device,
            contact_distance=self.contact_distance,
            particle_world=wp.array(world, dtype=wp.int32, device=device),
            particle_material=wp.array(np.array([int(m.model) for m in mats], dtype=np.int32)[mat_index],
                                       dtype=wp.int32, device=device),
            particle_mass=farr(density * vol),
            particle_volume=farr(vol),
            particle_young_modulus=farr(per_particle("young_modulus")),
            particle_poisson_ratio=farr(per_particle("poisson_ratio")),
            particle_yield_stress=farr(per_particle("yield_stress")),
            particle_friction_angle=farr(per_particle("friction_angle")),
            particle_viscosity=farr(per_particle("viscosity")),
            particle_bulk_modulus=farr(per_particle("bulk_modulus")),
            particle_fiber=wp.array(np.concatenate(self._fiber).astype(np.float32), dtype=wp.vec3, **grad),
            particle_actuation_strength=farr(np.concatenate(self._strength)),
            particle_actuation_group=wp.array(np.concatenate(self._group), dtype=wp.int32, device=device),
            gravity=wp.array([self.gravity], dtype=wp.vec3, **grad),
            **self._colliders.model_fields(self.num_worlds, device, requires_grad=requires_grad),
            initial_x=x.astype(np.float32),
            initial_v=v.astype(np.float32),
            materials=list(mats),
            particle_material_index=mat_index,
            _meshes=meshes,
        )


def controls_from_poses(
    model: MPMModel,
    positions: np.ndarray,
    rotations: np.ndarray,
    frame_dt: float,
    *,
    requires_grad: bool = False,
) -> list[MPMControl]:
    """Controls that carry every collider through a pose trajectory, one control per frame.

    Colliders are driven by velocities (their poses live in the State), so a trajectory given as
    poses becomes, per frame, the constant linear and angular velocity that moves each collider
    from one pose to the next in ``frame_dt``.

    Args:
        model: the scene.
        positions: collider positions [m], shape (frames + 1, num_worlds * num_colliders, 3); row 0
            is the pose the state starts from.
        rotations: orientations as quaternions (x, y, z, w), shape (frames + 1, num_worlds *
            num_colliders, 4).
        frame_dt: duration of one frame [s].
        requires_grad: give the controls gradient buffers.
    """
    p = np.asarray(positions, dtype=np.float64)
    q = np.asarray(rotations, dtype=np.float64)
    slots = model.num_worlds * model.collider_count
    if p.ndim != 3 or p.shape[1:] != (slots, 3) or p.shape[0] < 2:
        raise InvalidParameter("positions", f"array of shape {p.shape}", f"(frames + 1, {slots}, 3) with frames >= 1")
    if q.shape != (p.shape[0], slots, 4):
        raise InvalidParameter("rotations", f"array of shape {q.shape}", f"({p.shape[0]}, {slots}, 4)")
    if not (frame_dt > 0 and math.isfinite(frame_dt)):
        raise InvalidParameter("frame_dt", frame_dt, "(0, inf) s")
    norms = np.linalg.norm(q, axis=-1, keepdims=True)
    if np.any(norms < 1e-12) or not np.all(np.isfinite(q)):
        raise InvalidParameter("rotations", "a zero or non-finite quaternion", "non-zero finite quaternions")
    q = q / norms
    controls = []
    for k in range(p.shape[0] - 1):
        control = model.control(requires_grad=requires_grad)
        control.collider_velocity.assign(((p[k + 1] - p[k]) / frame_dt).astype(np.float32))
        control.collider_angular_velocity.assign((rotation_vector(q[k], q[k + 1]) / frame_dt).astype(np.float32))
        controls.append(control)
    return controls
