"""Rod scene data: the Model (topology, rest shape, stiffness, damping, colliders), State and
Control of discrete elastic rods, and the builder that assembles many rods into one batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import warp as wp

from diffsim.core.device import resolve_device
from diffsim.core.protocol import Control, Model, State
from diffsim.errors import ConfigError, InvalidParameter
from diffsim.geometry import Collider
from diffsim.geometry.colliders import ColliderSetBuilder
from diffsim.rod.kernels import CLAMP_FIRST, CLAMP_LAST


@dataclass
class RodModel(Model):
    """Constant data of a batch of rods. Vertices and edges of all rods sit in flat arrays; rod
    ``r`` owns vertices ``rod_vertex_start[r] ... + rod_vertex_count[r] - 1`` and the edges
    between them (edge index = index of its first vertex - r). Colliders are shared by all worlds;
    their poses live in the State, one per (world, collider)."""

    device: str
    num_worlds: int
    vertex_rod: wp.array  #: int32, rod of each vertex
    rod_vertex_start: wp.array  #: int32, first vertex of each rod
    rod_vertex_count: wp.array  #: int32, vertices per rod (>= 3)
    rod_world: wp.array  #: int32, world of each rod (selects its collider poses)
    rod_twist_clamp: wp.array  #: int32, bit 1: first edge's angle driven, bit 2: last edge's
    vertex_mass: wp.array  #: float, mass [kg]
    vertex_driven: wp.array  #: int32, 1 where the Control prescribes the vertex's velocity
    vertex_rest_curvature: wp.array  #: vec2, rest material curvature (kappa b . m2, -kappa b . m1) [-]
    vertex_rest_twist: wp.array  #: float, rest twist about the vertex [rad]
    edge_rest_length: wp.array  #: float, rest length [m]
    edge_bend_stiffness: wp.array  #: float, bending stiffness E I [N m^2]
    edge_twist_stiffness: wp.array  #: float, twisting stiffness G J [N m^2]
    edge_bend_damping: wp.array  #: float, bending-rate (internal) damping [N m^2 s]
    edge_stretch_stiffness: wp.array  #: float, stretching stiffness E A [N] (elastic-stretch mode)
    rod_linear_damping: wp.array  #: float, mass-proportional damping rate [1/s]
    rod_air_drag: wp.array  #: float, quadratic drag per length: force/length = c |v| v [kg/m^2]
    rod_contact_radius: wp.array  #: float, radius used for contact [m]
    gravity: wp.array  #: vec3, gravitational acceleration [m/s^2], one entry
    collider_shape: wp.array  #: int32, a :class:`diffsim.geometry.ShapeType` per collider
    collider_size: wp.array  #: vec3, shape parameters [m]
    collider_friction: wp.array  #: float, Coulomb friction coefficient [-]
    collider_mesh: wp.array  #: uint64, Warp mesh id (0 for analytic shapes)
    initial_x: np.ndarray = field(repr=False, default=None)
    initial_v: np.ndarray = field(repr=False, default=None)
    initial_d1: np.ndarray = field(repr=False, default=None)
    initial_theta: np.ndarray = field(repr=False, default=None)
    initial_collider_position: np.ndarray = field(repr=False, default=None)
    initial_collider_rotation: np.ndarray = field(repr=False, default=None)
    colliders: list[Collider] = field(default_factory=list, repr=False)

    @property
    def num_rods(self) -> int:
        return self.rod_vertex_start.shape[0]

    @property
    def vertex_count(self) -> int:
        return self.vertex_rod.shape[0]

    @property
    def edge_count(self) -> int:
        return self.edge_rest_length.shape[0]

    @property
    def collider_count(self) -> int:
        return self.collider_shape.shape[0]

    def world_of(self, name: str) -> np.ndarray:
        """World of each element of State or Control array ``name`` (per vertex, edge or collider)."""
        rod_world = self.rod_world.numpy()
        if name.startswith("collider_"):
            return np.repeat(np.arange(self.num_worlds), self.collider_count)
        if name.startswith("vertex_"):
            return rod_world[self.vertex_rod.numpy()]
        if name.startswith("edge_"):
            counts = self.rod_vertex_count.numpy()
            return np.repeat(rod_world, counts - 1)
        raise KeyError(f"RodModel has no per-world array named {name!r}.")

    @property
    def driven_vertices(self) -> np.ndarray:
        """Global indices of the driven vertices, in order."""
        return np.flatnonzero(self.vertex_driven.numpy())

    @property
    def clamped_edges(self) -> np.ndarray:
        """Global indices of the edges whose material angle the Control drives, in order."""
        starts, counts = self.rod_vertex_start.numpy(), self.rod_vertex_count.numpy()
        flags = self.rod_twist_clamp.numpy()
        edges = []
        for r in range(self.num_rods):
            first = starts[r] - r
            if flags[r] & CLAMP_FIRST:
                edges.append(first)
            if flags[r] & CLAMP_LAST:
                edges.append(first + counts[r] - 2)
        return np.array(edges, dtype=np.int64)

    def rod_slices(self) -> list[slice]:
        """Vertex range of each rod, for slicing per-vertex numpy arrays."""
        starts, counts = self.rod_vertex_start.numpy(), self.rod_vertex_count.numpy()
        return [slice(int(s), int(s + c)) for s, c in zip(starts, counts, strict=True)]

    def state(self, *, requires_grad: bool = False) -> RodState:
        """A new State at the model's initial configuration."""
        kw = {"device": self.device, "requires_grad": requires_grad}
        return RodState(
            vertex_x=wp.array(self.initial_x, dtype=wp.vec3, **kw),
            vertex_v=wp.array(self.initial_v, dtype=wp.vec3, **kw),
            edge_d1=wp.array(self.initial_d1, dtype=wp.vec3, **kw),
            edge_theta=wp.array(self.initial_theta, dtype=float, **kw),
            collider_position=wp.array(self.initial_collider_position, dtype=wp.vec3, **kw),
            collider_rotation=wp.array(self.initial_collider_rotation, dtype=wp.quat, **kw),
        )

    def control(self, *, requires_grad: bool = False) -> RodControl:
        """A new Control that holds every driven vertex, clamped angle and collider still."""
        kw = {"device": self.device, "requires_grad": requires_grad}
        slots = self.num_worlds * self.collider_count
        return RodControl(
            vertex_velocity=wp.zeros(self.vertex_count, dtype=wp.vec3, **kw),
            edge_twist_rate=wp.zeros(self.edge_count, dtype=float, **kw),
            vertex_external_force=wp.zeros(self.vertex_count, dtype=wp.vec3, **kw),
            collider_velocity=wp.zeros(slots, dtype=wp.vec3, **kw),
            collider_angular_velocity=wp.zeros(slots, dtype=wp.vec3, **kw),
        )


@dataclass
class RodState(State):
    """Configuration of every rod and collider."""

    vertex_x: wp.array  #: vec3, vertex positions [m]
    vertex_v: wp.array  #: vec3, vertex velocities [m/s]
    edge_d1: wp.array  #: vec3, reference director of each edge (unit, normal to the edge)
    edge_theta: wp.array  #: float, material angle from the reference director [rad]
    collider_position: wp.array  #: vec3, (world, collider) position [m]
    collider_rotation: wp.array  #: quat (x, y, z, w), (world, collider) orientation


@dataclass
class RodControl(Control):
    """Inputs of one step: driven-vertex velocities, clamped-end twist rates, collider motion,
    external vertex forces."""

    vertex_velocity: wp.array  #: vec3, velocity of each driven vertex [m/s] (others ignored)
    edge_twist_rate: wp.array  #: float, rate of each clamped end edge's material angle [rad/s]
    collider_velocity: wp.array  #: vec3, (world, collider) linear velocity [m/s]
    collider_angular_velocity: wp.array  #: vec3, (world, collider) angular velocity [rad/s]
    vertex_external_force: wp.array  #: vec3, extra force on each free vertex [N] (e.g. from coupling)


def _per_edge(name: str, value, edges: int, *, allow_zero: bool = False) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(edges, float(arr))
    if arr.shape != (edges,):
        raise InvalidParameter(name, f"an array of shape {arr.shape}", f"a number or {edges} values (one per edge)")
    low_ok = (arr >= 0) if allow_zero else (arr > 0)
    if not np.all(np.isfinite(arr) & low_ok):
        bad = arr[~(np.isfinite(arr) & low_ok)][0]
        raise InvalidParameter(name, float(bad), "[0, inf)" if allow_zero else "(0, inf)")
    return arr


def _non_negative(name: str, value, unit: str) -> float:
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise InvalidParameter(name, value, f"[0, inf) {unit}")
    return value


def spatial_frames(points: np.ndarray, first_director=None) -> np.ndarray:
    """Reference directors of a polyline's edges, parallel-transported from the first edge (so the
    reference twist is zero). ``first_director`` defaults to a vector normal to the first edge."""
    edges = np.diff(points, axis=0)
    tangents = edges / np.linalg.norm(edges, axis=1, keepdims=True)
    t0 = tangents[0]
    if first_director is None:
        helper = np.array([0.0, 0.0, 1.0]) if abs(t0[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
        d = np.cross(helper, t0)
    else:
        d = np.asarray(first_director, dtype=np.float64)
        d = d - np.dot(d, t0) * t0
        if np.linalg.norm(d) < 1e-9:
            raise InvalidParameter("first_director", "a vector parallel to the first edge", "a vector with a "
                                   "component normal to the first edge")
    d = d / np.linalg.norm(d)
    directors = [d]
    for a, b in zip(tangents[:-1], tangents[1:], strict=True):
        w, c = np.cross(a, b), np.dot(a, b)
        d = d * c + np.cross(w, d) + w * np.dot(w, d) / max(1.0 + c, 1e-9)
        d = d - np.dot(d, b) * b
        d = d / np.linalg.norm(d)
        directors.append(d)
    return np.array(directors)


def material_curvature(points: np.ndarray, directors: np.ndarray) -> np.ndarray:
    """Material curvature (kappa b . m2, -kappa b . m1) of each vertex of a polyline whose edges carry
    the given directors at material angle 0 (zero at the two end vertices)."""
    edges = np.diff(points, axis=0)
    lengths = np.linalg.norm(edges, axis=1)
    tangents = edges / lengths[:, None]
    out = np.zeros((points.shape[0], 2))
    for i in range(1, points.shape[0] - 1):
        e0, e1 = edges[i - 1], edges[i]
        kb = 2.0 * np.cross(e0, e1) / (lengths[i - 1] * lengths[i] + np.dot(e0, e1))
        values = []
        for j in (i - 1, i):
            m1 = directors[j]
            m2 = np.cross(tangents[j], m1)
            values.append((np.dot(kb, m2), -np.dot(kb, m1)))
        out[i] = np.mean(values, axis=0)
    return out


class RodBuilder:
    """Assembles a :class:`RodModel`: rods with their rest shape and parameters, and colliders.

    Args:
        gravity: gravitational acceleration [m/s^2].
        num_worlds: worlds in the batch; each world has its own collider poses.
    """

    def __init__(self, *, gravity: Sequence[float] = (0.0, 0.0, -9.81), num_worlds: int = 1):
        g = np.asarray(gravity, dtype=np.float64)
        if g.shape != (3,) or not np.all(np.isfinite(g)):
            raise InvalidParameter("gravity", gravity, "three finite numbers [m/s^2]")
        if not isinstance(num_worlds, int) or num_worlds < 1:
            raise InvalidParameter("num_worlds", num_worlds, "positive integers")
        self.gravity = g
        self.num_worlds = num_worlds
        self.rods: list[dict] = []
        self._colliders = ColliderSetBuilder("a rod scene")

    @property
    def colliders(self) -> list[Collider]:
        """The colliders added so far, in index order."""
        return self._colliders.colliders

    def add_rod(
        self,
        points,
        *,
        mass_per_length: float = 0.1,
        bend_stiffness=1e-3,
        twist_stiffness=1e-3,
        stretch_stiffness=1e4,
        bend_damping=0.0,
        linear_damping: float = 0.0,
        air_drag: float = 0.0,
        contact_radius: float = 0.005,
        rest_points=None,
        rest_curvature=None,
        driven_vertices: Sequence[int] = (),
        clamp_twist: Sequence[str] = (),
        velocities=None,
        first_director=None,
        world: int = 0,
    ) -> int:
        """Add a rod through ``points`` (shape (n, 3), n >= 3) [m]; returns its index.

        Args:
            mass_per_length: linear density [kg/m]; vertices get the mass of their Voronoi length.
            bend_stiffness: E I [N m^2], a number or one value per edge.
            twist_stiffness: G J [N m^2], a number or one value per edge.
            stretch_stiffness: E A [N], a number or one per edge (used by the elastic-stretch mode).
            bend_damping: internal damping of the bending rate [N m^2 s], a number or one per edge;
                it damps flexing, not rigid motion (dissipation gamma / (2 l) |d(kappa b)/dt|^2).
            linear_damping: mass-proportional damping rate [1/s].
            air_drag: quadratic drag coefficient per length [kg/m^2] (force/length = c |v| v).
            contact_radius: the rod's radius for contact [m].
            rest_points: the natural shape (rest lengths and curvature), default ``points``.
            rest_curvature: material curvature per vertex, shape (n, 2), overriding the one of
                ``rest_points``; zeros give a straight rest shape.
            driven_vertices: local indices of vertices whose velocity the Control prescribes.
            clamp_twist: which end edges' material angle the Control drives: "first", "last".
                Both ends of an end edge should then be driven to clamp its orientation fully.
            velocities: initial velocities (n, 3) [m/s], default zero.
            first_director: reference director of the first edge (default: any normal).
            world: the world whose collider poses the rod meets.
        """
        x = np.asarray(points, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != 3 or x.shape[0] < 3:
            raise InvalidParameter("points", f"an array of shape {x.shape}", "(n, 3) with n >= 3 vertices")
        if not np.all(np.isfinite(x)):
            raise InvalidParameter("points", "an array with NaN or inf entries", "finite positions [m]")
        n = x.shape[0]
        rest = x if rest_points is None else np.asarray(rest_points, dtype=np.float64)
        if rest.shape != x.shape:
            raise InvalidParameter("rest_points", f"an array of shape {rest.shape}", f"the shape of points, {x.shape}")
        lengths = np.linalg.norm(np.diff(rest, axis=0), axis=1)
        if np.any(lengths < 1e-6):
            raise InvalidParameter("points", f"an edge of length {lengths.min():.3g} m", "edges longer than 1e-6 m")
        if np.any(np.linalg.norm(np.diff(x, axis=0), axis=1) < 1e-6):
            raise InvalidParameter("points", "two coincident consecutive vertices", "edges longer than 1e-6 m")
        rho = float(mass_per_length)
        if not (math.isfinite(rho) and rho > 0):
            raise InvalidParameter("mass_per_length", rho, "(0, inf) kg/m")
        directors = spatial_frames(x, first_director)
        if rest_curvature is None:
            curvature = material_curvature(rest, spatial_frames(rest))
        else:
            curvature = np.asarray(rest_curvature, dtype=np.float64)
            if curvature.shape != (n, 2) or not np.all(np.isfinite(curvature)):
                raise InvalidParameter("rest_curvature", f"an array of shape {curvature.shape}", f"finite ({n}, 2)")
        driven = np.zeros(n, dtype=np.int32)
        for i in driven_vertices:
            if not (-n <= int(i) < n):
                raise InvalidParameter("driven_vertices", i, f"vertex indices in [0, {n - 1}]")
            driven[int(i)] = 1
        flags = 0
        for end in clamp_twist:
            if end not in ("first", "last"):
                raise InvalidParameter("clamp_twist", end, "'first' and/or 'last'")
            flags |= CLAMP_FIRST if end == "first" else CLAMP_LAST
        v = np.zeros_like(x) if velocities is None else np.asarray(velocities, dtype=np.float64)
        if v.shape != x.shape or not np.all(np.isfinite(v)):
            raise InvalidParameter("velocities", f"an array of shape {v.shape}", f"finite values of shape {x.shape}")
        if not (isinstance(world, int) and 0 <= world < self.num_worlds):
            raise InvalidParameter("world", world, f"[0, {self.num_worlds - 1}]")
        voronoi = np.zeros(n)
        voronoi[:-1] += 0.5 * lengths
        voronoi[1:] += 0.5 * lengths
        self.rods.append({
            "x": x, "v": v, "d1": directors, "rest_length": lengths, "mass": rho * voronoi,
            "bend": _per_edge("bend_stiffness", bend_stiffness, n - 1),
            "twist": _per_edge("twist_stiffness", twist_stiffness, n - 1),
            "stretch": _per_edge("stretch_stiffness", stretch_stiffness, n - 1),
            "bend_damping": _per_edge("bend_damping", bend_damping, n - 1, allow_zero=True),
            "linear_damping": _non_negative("linear_damping", linear_damping, "1/s"),
            "air_drag": _non_negative("air_drag", air_drag, "kg/m^2"),
            "radius": _non_negative("contact_radius", contact_radius, "m"),
            "curvature": curvature, "driven": driven, "flags": flags, "world": world,
        })
        return len(self.rods) - 1

    def add_ground(self, *, height: float = 0.0, friction: float = 0.5) -> int:
        """Add the ground plane z = ``height`` [m] with Coulomb ``friction``; returns its collider index."""
        return self._colliders.add_ground(height=height, friction=friction)

    def add_collider(self, collider: Collider) -> int:
        """Add a kinematic collider (see ``diffsim.geometry.collider_*``); returns its index."""
        return self._colliders.add(collider)

    def finalize(self, device: str | None = None, *, requires_grad: bool = False) -> RodModel:
        """Build the model. ``requires_grad`` gives the physical parameters gradient buffers."""
        if not self.rods:
            raise ConfigError("the builder holds no rod: call add_rod() first.")
        device = resolve_device(device)
        counts = np.array([len(r["x"]) for r in self.rods], dtype=np.int32)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)

        def cat(key):
            return np.concatenate([r[key] for r in self.rods])

        def ints(values):
            return wp.array(np.asarray(values, dtype=np.int32), dtype=int, device=device)

        def param(values, dtype=float):
            return wp.array(np.asarray(values, dtype=np.float32), dtype=dtype, device=device,
                            requires_grad=requires_grad)

        return RodModel(
            device=device,
            num_worlds=self.num_worlds,
            vertex_rod=ints(np.repeat(np.arange(len(self.rods)), counts)),
            rod_vertex_start=ints(starts),
            rod_vertex_count=ints(counts),
            rod_world=ints([r["world"] for r in self.rods]),
            rod_twist_clamp=ints([r["flags"] for r in self.rods]),
            vertex_mass=param(cat("mass")),
            vertex_driven=ints(cat("driven")),
            vertex_rest_curvature=param(cat("curvature"), wp.vec2),
            vertex_rest_twist=param(np.zeros(int(counts.sum()))),
            edge_rest_length=param(cat("rest_length")),
            edge_bend_stiffness=param(cat("bend")),
            edge_twist_stiffness=param(cat("twist")),
            edge_stretch_stiffness=param(cat("stretch")),
            edge_bend_damping=param(cat("bend_damping")),
            rod_linear_damping=param([r["linear_damping"] for r in self.rods]),
            rod_air_drag=param([r["air_drag"] for r in self.rods]),
            rod_contact_radius=param([r["radius"] for r in self.rods]),
            gravity=wp.array(self.gravity.astype(np.float32)[None], dtype=wp.vec3, device=device),
            **self._colliders.model_fields(self.num_worlds, device, requires_grad=requires_grad),
            initial_x=cat("x").astype(np.float32),
            initial_v=cat("v").astype(np.float32),
            initial_d1=cat("d1").astype(np.float32),
            initial_theta=np.zeros(int(counts.sum()) - len(self.rods), dtype=np.float32),
        )


def controls_from_driven_positions(
    model: RodModel,
    positions,
    frame_dt: float,
    *,
    twist_angles=None,
    requires_grad: bool = False,
) -> list[RodControl]:
    """Controls that carry the driven vertices through a trajectory, one control per frame.

    Args:
        positions: driven-vertex positions [m], shape (frames + 1, len(model.driven_vertices), 3),
            in the order of ``model.driven_vertices``; row 0 is where the state starts.
        frame_dt: duration of one frame [s].
        twist_angles: material angles of the clamped edges [rad], shape (frames + 1,
            len(model.clamped_edges)); default: held at their initial value.
        requires_grad: give the controls gradient buffers.
    """
    p = np.asarray(positions, dtype=np.float64)
    driven = model.driven_vertices
    if p.ndim != 3 or p.shape[1:] != (len(driven), 3) or p.shape[0] < 2:
        raise InvalidParameter("positions", f"an array of shape {p.shape}",
                               f"(frames + 1, {len(driven)}, 3) with frames >= 1")
    if not np.all(np.isfinite(p)):
        raise InvalidParameter("positions", "an array with NaN or inf entries", "finite positions [m]")
    if not (frame_dt > 0 and math.isfinite(frame_dt)):
        raise InvalidParameter("frame_dt", frame_dt, "(0, inf) s")
    clamped = model.clamped_edges
    angles = None
    if twist_angles is not None:
        angles = np.asarray(twist_angles, dtype=np.float64)
        if angles.shape != (p.shape[0], len(clamped)) or not np.all(np.isfinite(angles)):
            raise InvalidParameter("twist_angles", f"an array of shape {angles.shape}",
                                   f"finite values of shape ({p.shape[0]}, {len(clamped)})")
    velocity = np.zeros((model.vertex_count, 3), dtype=np.float32)
    rate = np.zeros(model.edge_count, dtype=np.float32)
    controls = []
    for k in range(p.shape[0] - 1):
        control = model.control(requires_grad=requires_grad)
        velocity[driven] = (p[k + 1] - p[k]) / frame_dt
        control.vertex_velocity.assign(velocity)
        if angles is not None:
            rate[clamped] = (angles[k + 1] - angles[k]) / frame_dt
            control.edge_twist_rate.assign(rate)
        controls.append(control)
    return controls
