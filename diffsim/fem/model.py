"""FEM scene data: the Model (tet meshes, materials, rigid backings, colliders), State and Control of
elastic bodies, and the builder that assembles bodies of many worlds into one batch.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import warp as wp

from diffsim.core.device import resolve_device
from diffsim.core.protocol import Control, Model, State
from diffsim.errors import ConfigError, InvalidParameter
from diffsim.geometry import Collider
from diffsim.geometry._validation import finite_number, finite_vector, positive_number, unit_quaternion
from diffsim.geometry.colliders import ColliderSetBuilder
from diffsim.geometry.motion import rotation_matrix
from diffsim.geometry.tetmesh import TetMesh


class FEMMaterial(enum.IntEnum):
    """Elastic energy of a tet, stored per tet."""

    STABLE_NEO_HOOKEAN = 0  #: Smith, de Goes and Kim 2018; robust to inversion
    FIXED_COROTATED = 1  #: Stomakhin et al. 2012


@dataclass
class FEMModel(Model):
    """Constant data of a batch of tet-mesh bodies. Nodes and tets of all bodies sit in flat
    arrays; body ``b`` owns nodes ``body_node_start[b] ... + body_node_count[b] - 1``. Each body
    has a pose (in the State) that carries its fixed nodes: the rigid backing a sensor's
    elastomer is bonded to. Colliders are shared by all worlds; their poses are per world."""

    device: str
    num_worlds: int
    node_body: wp.array  #: int32, body of each node
    node_mass: wp.array  #: float, lumped mass [kg]
    node_fixed: wp.array  #: int32, 1 where the node is bonded to the body's rigid backing
    node_rest_local: wp.array  #: vec3, rest position in the body frame [m]
    node_contact_area: wp.array  #: float, lumped boundary area of contact-capable nodes [m^2] (0: none)
    tet_nodes: wp.array  #: vec4i, node indices (positively oriented at rest)
    tet_body: wp.array  #: int32, body of each tet
    tet_rest_inverse: wp.array  #: mat33, inverse rest edge matrix [1/m]
    tet_rest_volume: wp.array  #: float, rest volume [m^3]
    tet_material: wp.array  #: int32, an :class:`FEMMaterial`
    tet_young_modulus: wp.array  #: float, Young's modulus [Pa]
    tet_poisson_ratio: wp.array  #: float, Poisson's ratio [-]
    tet_damping: wp.array  #: float, stiffness-proportional (Rayleigh) damping time [s]
    body_world: wp.array  #: int32, world of each body
    body_node_start: wp.array  #: int32, first node of each body
    body_node_count: wp.array  #: int32, nodes of each body
    body_damping: wp.array  #: float, mass-proportional damping rate [1/s]
    body_contact_stiffness: wp.array  #: float, contact pressure per penetration depth [Pa/m]
    gravity: wp.array  #: vec3, gravitational acceleration [m/s^2], one entry
    collider_shape: wp.array  #: int32, a :class:`diffsim.geometry.ShapeType` per collider
    collider_size: wp.array  #: vec3, shape parameters [m]
    collider_friction: wp.array  #: float, Coulomb friction coefficient against the bodies [-]
    collider_mesh: wp.array  #: uint64, Warp mesh id (0 for analytic shapes)
    surface_faces: np.ndarray = field(repr=False, default=None)  #: (K, 3) global node ids, outward
    meshes: list[TetMesh] = field(default_factory=list, repr=False)
    tet_min_altitude: np.ndarray = field(repr=False, default=None)  #: per tet [m], for the step limit
    initial_x: np.ndarray = field(repr=False, default=None)
    initial_v: np.ndarray = field(repr=False, default=None)
    initial_body_position: np.ndarray = field(repr=False, default=None)
    initial_body_rotation: np.ndarray = field(repr=False, default=None)
    initial_collider_position: np.ndarray = field(repr=False, default=None)
    initial_collider_rotation: np.ndarray = field(repr=False, default=None)
    colliders: list[Collider] = field(default_factory=list, repr=False)
    tet_density: np.ndarray = field(repr=False, default=None)  #: [kg/m^3], for the step limit

    @property
    def node_count(self) -> int:
        return self.node_body.shape[0]

    @property
    def tet_count(self) -> int:
        return self.tet_nodes.shape[0]

    @property
    def num_bodies(self) -> int:
        return self.body_world.shape[0]

    @property
    def collider_count(self) -> int:
        return self.collider_shape.shape[0]

    def world_of(self, name: str) -> np.ndarray:
        """World of each element of State or Control array ``name`` (per node, body or collider)."""
        body_world = self.body_world.numpy()
        if name.startswith("collider_"):
            return np.repeat(np.arange(self.num_worlds), self.collider_count)
        if name.startswith("node_"):
            return body_world[self.node_body.numpy()]
        if name.startswith("body_"):
            return body_world
        raise KeyError(f"FEMModel has no per-world array named {name!r}.")

    def body_nodes(self, body: int) -> slice:
        start = int(self.body_node_start.numpy()[body])
        return slice(start, start + int(self.body_node_count.numpy()[body]))

    def state(self, *, requires_grad: bool = False) -> FEMState:
        """A new State at the model's initial configuration."""
        kw = {"device": self.device, "requires_grad": requires_grad}
        return FEMState(
            node_x=wp.array(self.initial_x, dtype=wp.vec3, **kw),
            node_v=wp.array(self.initial_v, dtype=wp.vec3, **kw),
            node_contact_force=wp.zeros(self.node_count, dtype=wp.vec3, **kw),
            body_position=wp.array(self.initial_body_position, dtype=wp.vec3, **kw),
            body_rotation=wp.array(self.initial_body_rotation, dtype=wp.quat, **kw),
            collider_position=wp.array(self.initial_collider_position, dtype=wp.vec3, **kw),
            collider_rotation=wp.array(self.initial_collider_rotation, dtype=wp.quat, **kw),
        )

    def control(self, *, requires_grad: bool = False) -> FEMControl:
        """A new Control that holds every body's backing and every collider still."""
        kw = {"device": self.device, "requires_grad": requires_grad}
        slots = self.num_worlds * self.collider_count
        return FEMControl(
            body_velocity=wp.zeros(self.num_bodies, dtype=wp.vec3, **kw),
            body_angular_velocity=wp.zeros(self.num_bodies, dtype=wp.vec3, **kw),
            collider_velocity=wp.zeros(slots, dtype=wp.vec3, **kw),
            collider_angular_velocity=wp.zeros(slots, dtype=wp.vec3, **kw),
            node_external_force=wp.zeros(self.node_count, dtype=wp.vec3, **kw),
        )


@dataclass
class FEMState(State):
    """Configuration of every body, backing and collider."""

    node_x: wp.array  #: vec3, node positions [m]
    node_v: wp.array  #: vec3, node velocities [m/s]
    node_contact_force: wp.array  #: vec3, contact force on each node during the step that led here [N]
    body_position: wp.array  #: vec3, pose of each body's frame (its backing) [m]
    body_rotation: wp.array  #: quat (x, y, z, w), orientation of each body's frame
    collider_position: wp.array  #: vec3, (world, collider) position [m]
    collider_rotation: wp.array  #: quat (x, y, z, w), (world, collider) orientation


@dataclass
class FEMControl(Control):
    """Inputs of one step: body (backing) and collider motion, and external node forces."""

    body_velocity: wp.array  #: vec3, linear velocity of each body's frame [m/s]
    body_angular_velocity: wp.array  #: vec3, angular velocity of each body's frame [rad/s]
    collider_velocity: wp.array  #: vec3, (world, collider) linear velocity [m/s]
    collider_angular_velocity: wp.array  #: vec3, (world, collider) angular velocity [rad/s]
    node_external_force: wp.array  #: vec3, extra (non-contact) force on each node [N]


def _non_negative(name: str, value, unit: str) -> float:
    valid = f"finite numbers >= 0 {unit}"
    number = finite_number(name, value, valid)
    if number < 0.0:
        raise InvalidParameter(name, value, valid)
    return number


@dataclass
class _Body:
    mesh: TetMesh
    position: np.ndarray
    rotation: np.ndarray
    material: FEMMaterial
    young_modulus: np.ndarray
    poisson_ratio: np.ndarray
    density: np.ndarray
    damping: float
    stiffness_damping: float
    contact_stiffness: float
    fixed: np.ndarray
    contact: np.ndarray
    world: int


class FEMBuilder:
    """Assembles an :class:`FEMModel`: tet-mesh bodies with their materials and backings, colliders.

    Args:
        num_worlds: worlds in the batch; each world has its own collider poses.
        gravity: gravitational acceleration [m/s^2].
    """

    def __init__(self, *, num_worlds: int = 1, gravity: Sequence[float] = (0.0, 0.0, -9.81)):
        if not isinstance(num_worlds, int) or num_worlds < 1:
            raise InvalidParameter("num_worlds", num_worlds, "integers >= 1")
        self.num_worlds = num_worlds
        self.gravity = tuple(float(g) for g in gravity)
        self.bodies: list[_Body] = []
        self._colliders = ColliderSetBuilder("an FEM scene")

    @property
    def colliders(self) -> list[Collider]:
        """The colliders added so far, in index order."""
        return self._colliders.colliders

    def add_body(
        self,
        mesh: TetMesh,
        *,
        position: Sequence[float] = (0.0, 0.0, 0.0),
        rotation: Sequence[float] = (0.0, 0.0, 0.0, 1.0),
        young_modulus: float | np.ndarray = 1.0e5,
        poisson_ratio: float | np.ndarray = 0.45,
        density: float | np.ndarray = 1.1e3,
        material: FEMMaterial = FEMMaterial.STABLE_NEO_HOOKEAN,
        damping: float = 0.0,
        stiffness_damping: float = 0.0,
        contact_stiffness: float | None = None,
        fixed_nodes: np.ndarray | None = None,
        contact_nodes: np.ndarray | None = None,
        world: int = 0,
    ) -> int:
        """Add a body whose ``mesh`` is given in its own frame, placed at (position, rotation).

        Args:
            mesh: the body's tet mesh in its local frame [m].
            position, rotation: pose of the body frame (where its backing is) [m], (x, y, z, w).
            young_modulus: Young's modulus [Pa], one number or one per tet.
            poisson_ratio: Poisson's ratio in [0, 0.5), one number or one per tet.
            density: mass density [kg/m^3], one number or one per tet; nodes get lumped masses.
                Quasi-static studies may scale it per tet (heavier small tets allow larger steps).
            material: the elastic energy.
            damping: mass-proportional damping rate [1/s].
            stiffness_damping: stiffness-proportional (Rayleigh) damping time [s].
            contact_stiffness: contact pressure per penetration depth [Pa/m]; default 30 E over
                the shortest tet altitude, which keeps penetration a few % of the indentation.
            fixed_nodes: boolean mask or indices of the nodes bonded to the backing (moved by
                the body pose); default none (a free body).
            contact_nodes: boolean mask or indices of the boundary nodes that take contact;
                default every boundary node that is not fixed.
            world: the world whose colliders the body meets.
        """
        if not isinstance(mesh, TetMesh):
            raise ConfigError(f"add_body expects a diffsim.geometry.TetMesh, got {type(mesh).__name__}.")
        if not isinstance(world, int) or not (0 <= world < self.num_worlds):
            raise InvalidParameter("world", world, f"integers in [0, {self.num_worlds - 1}]")
        E = np.broadcast_to(np.asarray(young_modulus, dtype=np.float64), (mesh.tet_count,)).copy()
        nu = np.broadcast_to(np.asarray(poisson_ratio, dtype=np.float64), (mesh.tet_count,)).copy()
        rho = np.broadcast_to(np.asarray(density, dtype=np.float64), (mesh.tet_count,)).copy()
        if not np.all(np.isfinite(rho) & (rho > 0)):
            raise InvalidParameter("density", float(rho[~(np.isfinite(rho) & (rho > 0))][0]), "(0, inf) kg/m^3")
        if not np.all(np.isfinite(E) & (E > 0)):
            raise InvalidParameter("young_modulus", float(E[~(np.isfinite(E) & (E > 0))][0]), "(0, inf) Pa")
        if not np.all(np.isfinite(nu) & (nu >= 0) & (nu < 0.5)):
            raise InvalidParameter("poisson_ratio", float(nu[~(np.isfinite(nu) & (nu >= 0) & (nu < 0.5))][0]),
                                   "[0, 0.5)", "Linear tets lock near 0.5; 0.45-0.49 models near-incompressible "
                                   "elastomers.")
        fixed = self._node_mask("fixed_nodes", fixed_nodes, mesh.vertex_count, default=False)
        boundary = np.zeros(mesh.vertex_count, dtype=bool)
        boundary[mesh.boundary_vertices()] = True
        if contact_nodes is None:
            contact = boundary & ~fixed
        else:
            contact = self._node_mask("contact_nodes", contact_nodes, mesh.vertex_count, default=False)
            if np.any(contact & ~boundary):
                k = int(np.flatnonzero(contact & ~boundary)[0])
                raise ConfigError(f"contact node {k} is not on the mesh boundary; only boundary nodes take contact.")
        if contact_stiffness is None:
            contact_stiffness = 30.0 * float(E.max()) / float(mesh.min_altitude().min())
        self.bodies.append(_Body(
            mesh=mesh,
            position=finite_vector("position", position, 3, "three finite numbers [m]"),
            rotation=unit_quaternion("rotation", rotation),
            material=FEMMaterial(material),
            young_modulus=E,
            poisson_ratio=nu,
            density=rho,
            damping=_non_negative("damping", damping, "1/s"),
            stiffness_damping=_non_negative("stiffness_damping", stiffness_damping, "s"),
            contact_stiffness=positive_number("contact_stiffness", contact_stiffness, "Pa/m"),
            fixed=fixed,
            contact=contact,
            world=world,
        ))
        return len(self.bodies) - 1

    @staticmethod
    def _node_mask(name: str, nodes, count: int, *, default: bool) -> np.ndarray:
        if nodes is None:
            return np.full(count, default)
        nodes = np.asarray(nodes)
        if nodes.dtype == bool:
            if nodes.shape != (count,):
                raise InvalidParameter(name, f"mask of shape {nodes.shape}", f"a boolean mask of shape ({count},)")
            return nodes.copy()
        index = nodes.astype(np.int64).reshape(-1)
        if np.any((index < 0) | (index >= count)):
            raise InvalidParameter(name, f"indices up to {int(index.max())}", f"indices in [0, {count - 1}]")
        mask = np.zeros(count, dtype=bool)
        mask[index] = True
        return mask

    def add_ground(self, *, height: float = 0.0, friction: float = 0.5) -> int:
        """Add the ground plane z = ``height`` [m] with Coulomb ``friction``; returns its collider index."""
        return self._colliders.add_ground(height=height, friction=friction)

    def add_collider(self, collider: Collider) -> int:
        """Add a kinematic collider (see ``diffsim.geometry.collider_*``); returns its index."""
        return self._colliders.add(collider)

    def finalize(self, device: str | None = None, *, requires_grad: bool = False) -> FEMModel:
        """Build the model. ``requires_grad`` makes the fittable arrays (E, nu, damping, contact
        stiffness, friction, collider sizes) carry gradients."""
        if not self.bodies:
            raise ConfigError("an FEM model needs at least one body; call add_body first.")
        device = resolve_device(device)
        xs, tets, rest_inverse, volumes, masses, bodies, fixed, local, area = [], [], [], [], [], [], [], [], []
        tet_body, starts, counts, faces, altitudes, densities = [], [], [], [], [], []
        offset = 0
        for b, body in enumerate(self.bodies):
            mesh = body.mesh
            p = mesh.vertices
            t = mesh.tets
            Dm = np.stack([p[t[:, k]] - p[t[:, 0]] for k in (1, 2, 3)], axis=2)
            rest_inverse.append(np.linalg.inv(Dm))
            vol = mesh.volumes()
            volumes.append(vol)
            m = np.zeros(mesh.vertex_count)
            np.add.at(m, t.reshape(-1), np.repeat(vol * body.density / 4.0, 4))
            if np.any(m <= 0):
                raise ConfigError(f"body {b}: node {int(np.flatnonzero(m <= 0)[0])} belongs to no tet.")
            masses.append(m)
            xs.append(p @ rotation_matrix(body.rotation).T + body.position)
            local.append(p)
            tets.append(t + offset)
            bodies.append(np.full(mesh.vertex_count, b))
            tet_body.append(np.full(mesh.tet_count, b))
            fixed.append(body.fixed)
            area.append(np.where(body.contact, mesh.vertex_areas(), 0.0))
            faces.append(mesh.boundary_faces() + offset)
            altitudes.append(mesh.min_altitude())
            densities.append(body.density)
            starts.append(offset)
            counts.append(mesh.vertex_count)
            offset += mesh.vertex_count

        def ints(values):
            return wp.array(np.asarray(values, dtype=np.int32), dtype=wp.int32, device=device)

        def param(values, dtype=float):
            return wp.array(np.asarray(values, dtype=np.float32), dtype=dtype, device=device,
                            requires_grad=requires_grad)

        def per_tet(attribute):
            return param(np.concatenate([getattr(body, attribute) for body in self.bodies]))

        def per_tet_scalar(attribute):
            return param(np.concatenate([np.full(body.mesh.tet_count, getattr(body, attribute))
                                         for body in self.bodies]))

        node_x = np.concatenate(xs).astype(np.float32)
        return FEMModel(
            device=device,
            num_worlds=self.num_worlds,
            node_body=ints(np.concatenate(bodies)),
            node_mass=wp.array(np.concatenate(masses).astype(np.float32), dtype=float, device=device),
            node_fixed=ints(np.concatenate(fixed).astype(np.int32)),
            node_rest_local=wp.array(np.concatenate(local).astype(np.float32), dtype=wp.vec3, device=device),
            node_contact_area=wp.array(np.concatenate(area).astype(np.float32), dtype=float, device=device),
            tet_nodes=wp.array(np.concatenate(tets).astype(np.int32), dtype=wp.vec4i, device=device),
            tet_body=ints(np.concatenate(tet_body)),
            tet_rest_inverse=wp.array(np.concatenate(rest_inverse).astype(np.float32), dtype=wp.mat33, device=device),
            tet_rest_volume=wp.array(np.concatenate(volumes).astype(np.float32), dtype=float, device=device),
            tet_material=ints(np.concatenate([np.full(b.mesh.tet_count, int(b.material)) for b in self.bodies])),
            tet_young_modulus=per_tet("young_modulus"),
            tet_poisson_ratio=per_tet("poisson_ratio"),
            tet_damping=per_tet_scalar("stiffness_damping"),
            body_world=ints([b.world for b in self.bodies]),
            body_node_start=ints(starts),
            body_node_count=ints(counts),
            body_damping=param([b.damping for b in self.bodies]),
            body_contact_stiffness=param([b.contact_stiffness for b in self.bodies]),
            gravity=wp.array(np.array([self.gravity], dtype=np.float32), dtype=wp.vec3, device=device),
            **self._colliders.model_fields(self.num_worlds, device, requires_grad=requires_grad),
            surface_faces=np.concatenate(faces),
            meshes=[b.mesh for b in self.bodies],
            tet_min_altitude=np.concatenate(altitudes),
            initial_x=node_x,
            initial_v=np.zeros_like(node_x),
            initial_body_position=np.array([b.position for b in self.bodies], dtype=np.float32),
            initial_body_rotation=np.array([b.rotation for b in self.bodies], dtype=np.float32),
            tet_density=np.concatenate(densities),
        )
