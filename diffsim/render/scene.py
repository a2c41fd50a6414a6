"""Frames of whole scenes: :class:`SceneRenderer` draws one world of an MPM, rod, FEM or coupled model
from its State (particles, rods as tubes, FEM surfaces, posed colliders, a ground) with cached buffers.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import warp as wp

from diffsim.core.protocol import BundleGroup
from diffsim.errors import ConfigError, InvalidParameter
from diffsim.fem.model import FEMModel
from diffsim.geometry import ShapeType
from diffsim.materials import MaterialModel
from diffsim.mpm.model import BOUNDARY_CELLS, MPMModel
from diffsim.render.camera import Camera
from diffsim.render.meshes import checker_plane, collider_mesh
from diffsim.render.raster import Renderer

#: Particle colour per constitutive model (RGB in [0, 1]).
MATERIAL_COLORS = {
    MaterialModel.FIXED_COROTATED: (0.35, 0.72, 0.45),
    MaterialModel.NEO_HOOKEAN: (0.85, 0.3, 0.35),
    MaterialModel.VON_MISES: (0.95, 0.55, 0.2),
    MaterialModel.DRUCKER_PRAGER: (0.86, 0.74, 0.48),
    MaterialModel.FLUID: (0.25, 0.5, 0.95),
}
COLLIDER_COLOR = (0.38, 0.43, 0.52)  #: tools and obstacles
GROUND_COLORS = ((0.82, 0.82, 0.8), (0.68, 0.69, 0.7))  #: the two checker tiles of the ground
FEM_COLOR = (0.72, 0.66, 0.9)  #: elastomer (tactile pads)
ROD_COLORS = ((0.85, 0.2, 0.25), (0.2, 0.45, 0.85), (0.95, 0.7, 0.15), (0.3, 0.7, 0.4))  #: per rod, cycled
MAX_GROUND_TILES = 48  #: most checker squares along each edge of the drawn ground
GROUND_EXTENT = 3.0  #: least drawn ground half size, in units of the scene's largest half extent


def _rod_model_type():
    from diffsim.rod.model import RodModel

    return RodModel


def _parts(model) -> list[tuple[str, object]]:
    """(name, model) of every drawable solver model in ``model``."""
    RodModel = _rod_model_type()
    if isinstance(model, (MPMModel, RodModel, FEMModel)):
        return [("", model)]
    if isinstance(model, BundleGroup):
        found = [(name, part) for name, part in model.parts.items() if isinstance(part, (MPMModel, RodModel, FEMModel))]
        if found:
            return found
    raise ConfigError(f"render_state cannot draw a {type(model).__name__}; it draws MPMModel, RodModel, FEMModel "
                      "and groups of them (CoupledModel).")


def _part_state(state, name: str):
    if not name:
        return state
    if not isinstance(state, BundleGroup) or name not in state.parts:
        raise ConfigError(f"the state has no part {name!r} for the model's part {name!r}; pass the state of the "
                          "same scene as the model.")
    return state.parts[name]


@dataclass
class _PosedMeshes:
    """The colliders of one solver model as one batch of local triangles, posed per frame."""

    local: wp.array  #: vec3, local vertices [m]
    vertex_part: wp.array  #: int32, collider of each vertex
    faces: wp.array  #: vec3i
    colors: wp.array  #: vec3, per face
    count: int  #: colliders in the model (poses per world)


class SceneRenderer:
    """Draws world ``world`` of a model from its states, keeping everything constant between frames.

    Args:
        model: an ``MPMModel``, ``RodModel``, ``FEMModel`` or a ``CoupledModel`` (a BundleGroup
            of them).
        camera: the :class:`Camera`; default :meth:`Camera.looking_at_box` of the world's initial
            content (particles, rod and FEM vertices, non-plane colliders) at ``width`` x ``height``.
        world: the world drawn, in [0, num_worlds).
        width, height: image size [px] of the default camera.
        ground: ``"auto"`` draws plane colliders as checkered ground and, for MPM models without
            one, the domain floor; a number [m] adds a ground plane at that height; ``None``
            draws plane colliders only.
        particle_radius: drawn MPM particle radius [m]; default 0.6 x the cube root of the
            median particle volume (touching neighbours).
        device, threads: for the :class:`Renderer` (default device: the model's).
    """

    def __init__(self, model, *, camera: Camera | None = None, world: int = 0, width: int = 256, height: int = 256,
                 ground: str | float | None = "auto", particle_radius: float | None = None, device=None,
                 threads: int | None = None):
        self.model = model
        self.parts = _parts(model)
        self.num_worlds = int(self.parts[0][1].num_worlds)
        self.world = self._check_world(world)
        if not (ground is None or ground == "auto" or isinstance(ground, (int, float))):
            raise InvalidParameter("ground", ground, "'auto', None or a height [m]")
        self.ground = ground
        self.device = wp.get_device(device if device is not None else self.parts[0][1].device)
        self.bounds = self._content_bounds(self.world)
        if camera is None:
            camera = Camera.looking_at_box(*self.bounds, width=width, height=height)
        self.renderer = Renderer(camera, device=self.device, threads=threads)
        self._particle_radius = particle_radius
        self._cache: dict = {}
        self._static_ground = self._ground_triangles()
        reach = float(np.linalg.norm(np.asarray(camera.eye) - 0.5 * (self.bounds[0] + self.bounds[1])))
        self.renderer.fog = (1.5 * reach, 3.0 * reach)

    # -------------------------------------------------------------------------- setup

    def _check_world(self, world) -> int:
        if isinstance(world, bool) or not isinstance(world, (int, np.integer)) or not 0 <= world < self.num_worlds:
            raise InvalidParameter("world", world, f"integers in [0, {self.num_worlds - 1}]")
        return int(world)

    def _content_bounds(self, world: int) -> tuple[np.ndarray, np.ndarray]:
        RodModel = _rod_model_type()
        points = []
        for _, m in self.parts:
            if isinstance(m, MPMModel) and m.particle_count:
                points.append(m.initial_x[m.particle_world.numpy() == world])
            elif isinstance(m, RodModel):
                rods = np.flatnonzero(m.rod_world.numpy() == world)
                slices = m.rod_slices()
                points.extend(m.initial_x[slices[r]] for r in rods)
            elif isinstance(m, FEMModel):
                node_world = m.body_world.numpy()[m.node_body.numpy()]
                points.append(m.initial_x[node_world == world])
            nc = len(m.colliders)
            for c, collider in enumerate(m.colliders):
                if collider.shape == ShapeType.PLANE:
                    continue
                local = collider_mesh(collider).vertices
                pos = m.initial_collider_position[world * nc + c]
                reach = float(np.max(np.linalg.norm(local, axis=1)))
                points.append(np.array([pos - reach, pos + reach]))
        points = [np.asarray(p, dtype=np.float64).reshape(-1, 3) for p in points]
        points = [p for p in points if len(p)]
        if not points:
            return np.full(3, -0.05), np.full(3, 0.05)
        allp = np.concatenate(points)
        return allp.min(axis=0), allp.max(axis=0)

    def _ground_tiles(self) -> tuple[float, int]:
        """Half size [m] and tiles per edge of the drawn ground: wide enough for the content and the
        camera's view of the floor around it, in squares of a 1-2-5 length near a third of the content."""
        lo, hi = self.bounds
        extent = max(float(np.max(hi - lo)), 1e-3)
        reach = float(np.linalg.norm(np.asarray(self.renderer.camera.eye) - 0.5 * (lo + hi)))
        half = max(0.5 * GROUND_EXTENT * extent, 2.0 * reach)
        decade = 10.0 ** np.floor(np.log10(extent / 3.0))
        tile = decade * min((1.0, 2.0, 5.0, 10.0), key=lambda k: abs(np.log(k * decade * 3.0 / extent)))
        tiles = int(np.ceil(2.0 * half / tile))
        if tiles > MAX_GROUND_TILES:
            tiles = MAX_GROUND_TILES
            tile = 2.0 * half / tiles
        tiles += tiles % 2  # an even count keeps a tile corner under the scene centre
        return 0.5 * tiles * tile, tiles

    def _ground_triangles(self):
        """World-space ground of ``ground`` (a height, or the MPM floor under 'auto'), or None."""
        height = None
        if isinstance(self.ground, (int, float)) and not isinstance(self.ground, bool):
            height = float(self.ground)
        elif self.ground == "auto":
            has_plane = any(c.shape == ShapeType.PLANE for _, m in self.parts for c in m.colliders)
            mpm = [m for _, m in self.parts if isinstance(m, MPMModel)]
            if mpm and not has_plane:
                # the domain floor, lowered to the lowest content so that it never cuts a body
                m = mpm[0]
                height = min(m.domain_origin[2] + BOUNDARY_CELLS * m.dx, float(self.bounds[0][2]))
        if height is None:
            return None
        lo, hi = self.bounds
        centre = 0.5 * (lo + hi)
        v, f, parity = checker_plane(*self._ground_tiles(), center_xy=centre[:2])
        v[:, 2] = height
        d = self.renderer.device
        return (wp.array(v, dtype=wp.vec3, device=d), wp.array(f.astype(np.int32), dtype=wp.vec3i, device=d),
                wp.array(np.asarray(GROUND_COLORS, np.float32)[parity], dtype=wp.vec3, device=d))

    def _colliders(self, key: str, m) -> _PosedMeshes | None:
        cached = self._cache.get(("colliders", key))
        if cached is not None or ("colliders", key) in self._cache:
            return cached
        nc = len(m.colliders)
        verts, parts, faces, colors = [], [], [], []
        offset = 0
        centre = 0.5 * (self.bounds[0] + self.bounds[1])
        for c, collider in enumerate(m.colliders):
            if collider.shape == ShapeType.PLANE:
                # a square of the plane centred under the scene centre (in the plane's initial frame)
                p0 = np.asarray(m.initial_collider_position[self.world * nc + c], dtype=np.float64)
                q = np.asarray(m.initial_collider_rotation[self.world * nc + c], dtype=np.float64)
                local_centre = _rotate(_conjugate(q), centre - p0)
                v, f, parity = checker_plane(*self._ground_tiles(), center_xy=local_centre[:2])
                col = np.asarray(GROUND_COLORS)[parity]
            else:
                mesh = collider_mesh(collider)
                v, f = mesh.vertices, mesh.faces
                col = np.tile(COLLIDER_COLOR, (len(f), 1))
            verts.append(v)
            parts.append(np.full(len(v), c, dtype=np.int32))
            faces.append(np.asarray(f) + offset)
            colors.append(col)
            offset += len(v)
        result = None
        if verts:
            d = self.renderer.device
            result = _PosedMeshes(
                local=wp.array(np.concatenate(verts).astype(np.float32), dtype=wp.vec3, device=d),
                vertex_part=wp.array(np.concatenate(parts), dtype=wp.int32, device=d),
                faces=wp.array(np.concatenate(faces).astype(np.int32), dtype=wp.vec3i, device=d),
                colors=wp.array(np.concatenate(colors).astype(np.float32), dtype=wp.vec3, device=d),
                count=nc,
            )
        self._cache[("colliders", key)] = result
        return result

    def _mpm_style(self, key: str, m: MPMModel):
        cached = self._cache.get(("mpm", key))
        if cached is None:
            counts: dict[MaterialModel, int] = {}
            palette = []
            for mat in m.materials:
                base = np.asarray(MATERIAL_COLORS.get(MaterialModel(mat.model), (0.6, 0.6, 0.6)))
                k = counts.get(mat.model, 0)
                counts[mat.model] = k + 1
                palette.append(base * (1.0 - 0.18 * (k % 3)))  # a darker shade per further material of a model
            palette = np.asarray(palette if palette else [(0.6, 0.6, 0.6)], dtype=np.float32)
            colors = wp.array(palette[m.particle_material_index] if len(palette) > 1 else palette[:1],
                              dtype=wp.vec3, device=self.renderer.device)
            radius = self._particle_radius
            if radius is None:
                vol = m.particle_volume.numpy()
                radius = 0.6 * float(np.median(vol)) ** (1.0 / 3.0) if vol.size else 1e-3
            world = m.particle_world if self.num_worlds > 1 else None
            if world is not None and world.device != self.renderer.device:
                world = world.to(self.renderer.device)
            cached = (colors, float(radius), world)
            self._cache[("mpm", key)] = cached
        return cached

    def _fem_faces(self, key: str, m: FEMModel) -> wp.array | None:
        if ("fem", key) not in self._cache:
            faces = np.asarray(m.surface_faces).reshape(-1, 3)
            node_world = m.body_world.numpy()[m.node_body.numpy()]
            faces = faces[node_world[faces[:, 0]] == self.world] if len(faces) else faces
            self._cache[("fem", key)] = (wp.array(faces.astype(np.int32), dtype=wp.vec3i, device=self.renderer.device)
                                         if len(faces) else None)
        return self._cache[("fem", key)]

    def _rods(self, key: str, m):
        if ("rod", key) not in self._cache:
            rods = np.flatnonzero(m.rod_world.numpy() == self.world)
            slices = m.rod_slices()
            radius = m.rod_contact_radius.numpy()
            lo, hi = self.bounds
            fallback = 0.01 * max(float(np.max(hi - lo)), 1e-3)
            self._cache[("rod", key)] = [(slices[r], float(radius[r]) if radius[r] > 0 else fallback,
                                          ROD_COLORS[i % len(ROD_COLORS)]) for i, r in enumerate(rods)]
        return self._cache[("rod", key)]

    # -------------------------------------------------------------------------- frames

    def render(self, state, *, world: int | None = None, inset=None, inset_corner: str = "top-right",
               inset_scale: float = 0.3) -> np.ndarray:
        """The frame of ``state`` as a (height, width, 3) uint8 array.

        Args:
            state: the model's State (a ``CoupledState`` for a ``CoupledModel``).
            world: must equal the renderer's world (its caches are per world); for other worlds
                make another SceneRenderer.
            inset: optional (h, w, 3) image pasted in a corner, e.g. the tactile RGB image
                ``sensor.read(model, state).numpy()["rgb"][k]``, float in [0, 1] or uint8.
        """
        RodModel = _rod_model_type()
        if world is not None and self._check_world(world) != self.world:
            raise InvalidParameter("world", world, f"{self.world}, this SceneRenderer's world (make one per world)")
        r = self.renderer
        r.clear()
        if self._static_ground is not None:
            r.draw_triangles(*self._static_ground)
        for key, m in self.parts:
            s = _part_state(state, key)
            if isinstance(m, MPMModel):
                if m.particle_count:
                    colors, radius, point_world = self._mpm_style(key, m)
                    r.splat_particles(s.particle_x, colors, radius, point_world=point_world, world=self.world)
            elif isinstance(m, RodModel):
                rods = self._rods(key, m)
                if rods:
                    x = s.vertex_x.numpy()
                    for sl, radius, color in rods:
                        r.draw_tube(x[sl], radius, color)
            elif isinstance(m, FEMModel):
                faces = self._fem_faces(key, m)
                if faces is not None:
                    r.draw_triangles(s.node_x, faces, FEM_COLOR)
            posed = self._colliders(key, m)
            if posed is not None:
                position, rotation = s.collider_position, s.collider_rotation
                if position.device != r.device:
                    position, rotation = position.to(r.device), rotation.to(r.device)
                r.draw_posed_triangles(posed.local, posed.vertex_part, posed.faces, posed.colors, position, rotation,
                                       part_offset=self.world * posed.count)
        if inset is not None:
            r.inset(inset, corner=inset_corner, scale=inset_scale)
        return r.image()


def _conjugate(q: np.ndarray) -> np.ndarray:
    return np.array([-q[0], -q[1], -q[2], q[3]])


def _rotate(q: np.ndarray, v: np.ndarray) -> np.ndarray:
    x, y, z, w = q / np.linalg.norm(q)
    u = np.array([x, y, z])
    return v * (w * w - u @ u) + 2 * (v @ u) * u + 2 * w * np.cross(u, v)


_renderers: OrderedDict[tuple, tuple[weakref.ref, SceneRenderer]] = OrderedDict()
_MAX_CACHED = 4


def render_state(model, state, *, camera: Camera | None = None, world: int = 0, width: int = 256, height: int = 256,
                 inset=None, ground: str | float | None = "auto") -> np.ndarray:
    """One frame of world ``world`` of ``state`` as a (height, width, 3) uint8 array.

    Dispatches on the model: ``MPMModel`` (particles coloured by material), ``RodModel`` (tubes),
    ``FEMModel`` (surface triangles), ``CoupledModel`` (all of its parts); colliders are drawn at
    their poses in the State, plane colliders as a checkered ground. The :class:`SceneRenderer`
    behind it is cached per (model, camera, world, size, ground), so repeated calls cost only the
    kernels; keep a SceneRenderer yourself to control its lifetime. See :class:`SceneRenderer`
    for the arguments.
    """
    cam_key = None if camera is None else (camera.eye, camera.target, camera.up, camera.fov_deg, camera.width,
                                           camera.height, camera.near)
    key = (id(model), cam_key, world, width, height, ground)
    entry = _renderers.get(key)
    if entry is not None and entry[0]() is model:
        _renderers.move_to_end(key)
        scene = entry[1]
    else:
        scene = SceneRenderer(model, camera=camera, world=world, width=width, height=height, ground=ground)
        _renderers[key] = (weakref.ref(model), scene)
        while len(_renderers) > _MAX_CACHED:
            _renderers.popitem(last=False)
    return scene.render(state, inset=inset)


def frames_of(model, states: Sequence, **kwargs) -> list[np.ndarray]:
    """:func:`render_state` of each state in ``states`` (same model and camera)."""
    return [render_state(model, s, **kwargs) for s in states]
