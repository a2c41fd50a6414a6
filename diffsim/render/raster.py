"""Warp raster kernels of the headless renderer and the :class:`Renderer` that owns the frame buffers:
depth-tested sphere-impostor splats, flat-shaded triangles, tubes, image insets and uint8 output.

Depth testing without atomics: on the CPU one launch runs on one thread, so a fragment's
read-compare-write of the depth buffer cannot race. Launches may be split into horizontal image
bands run on several threads; each band owns its rows (every primitive is clipped to the band),
so the bands never share a pixel. On CUDA, where threads do race, each primitive type is drawn in
two passes: the nearest depth per pixel by ``atomic_min``, then the colour of fragments at that depth.
Either way the picture does not depend on the number of threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import warp as wp

from diffsim.errors import InvalidParameter
from diffsim.render.camera import Camera, CameraData

#: Depth [m] of an empty pixel.
FAR_DEPTH = 1.0e30
_FAR = wp.constant(FAR_DEPTH)

# fragment passes of the raster kernels (see the module docstring)
_TEST_AND_WRITE = 0  # serial per pixel (CPU): depth test and colour in one pass
_DEPTH_ONLY = 1  # CUDA pass 1: nearest depth by atomic_min
_COLOUR_AT_DEPTH = 2  # CUDA pass 2: colour where the fragment is the nearest one

DEFAULT_BACKGROUND = ((0.93, 0.95, 0.98), (0.72, 0.77, 0.84))  #: sky colour at the top and bottom rows


@wp.struct
class Lighting:
    """A directional key light, a head light at the camera and ambient light; intensities in [0, 1]."""

    key_direction: wp.vec3  #: unit direction towards the key light (world)
    key: float  #: key light intensity
    head: float  #: head light intensity (light from the camera)
    ambient: float  #: ambient intensity


@wp.func
def _shade(color: wp.vec3, normal: wp.vec3, cam: CameraData, light: Lighting):
    # normal: unit, facing the camera (dot(normal, forward) <= 0)
    k = wp.max(wp.dot(normal, light.key_direction), 0.0)
    h = wp.max(-wp.dot(normal, cam.forward), 0.0)
    return color * wp.min(light.ambient + light.key * k + light.head * h, 1.0)


@wp.func
def _fragment(mode: int, x: int, y: int, z: float, color: wp.vec3,
              depth: wp.array2d(dtype=float), rgb: wp.array2d(dtype=wp.vec3)):
    if mode == 0:
        if z < depth[y, x]:
            depth[y, x] = z
            rgb[y, x] = color
    elif mode == 1:
        wp.atomic_min(depth, y, x, z)
    else:
        if z == depth[y, x]:
            rgb[y, x] = color


@wp.kernel
def _clear(top: wp.vec3, bottom: wp.vec3, depth: wp.array2d(dtype=float), rgb: wp.array2d(dtype=wp.vec3)):
    y, x = wp.tid()
    t = float(y) / float(wp.max(depth.shape[0] - 1, 1))
    depth[y, x] = _FAR
    rgb[y, x] = top * (1.0 - t) + bottom * t


@wp.kernel
def _splat_spheres(
    points: wp.array(dtype=wp.vec3),
    colors: wp.array(dtype=wp.vec3),
    point_world: wp.array(dtype=wp.int32),
    world: int,
    radius: float,
    min_pixel_radius: float,
    cam: CameraData,
    light: Lighting,
    row_begin: int,
    row_end: int,
    mode: int,
    depth: wp.array2d(dtype=float),
    rgb: wp.array2d(dtype=wp.vec3),
):
    k = wp.tid()
    if point_world.shape[0] > 0:
        if point_world[k] != world:
            return
    p = points[k] - cam.eye
    z = wp.dot(p, cam.forward)
    if z < cam.near + radius:
        return
    u = cam.cx + cam.focal * wp.dot(p, cam.right) / z
    v = cam.cy - cam.focal * wp.dot(p, cam.up) / z
    r = wp.max(cam.focal * radius / z, min_pixel_radius)
    x0 = wp.max(int(wp.floor(u - r)), 0)
    x1 = wp.min(int(wp.floor(u + r)), cam.width - 1)
    y0 = wp.max(int(wp.floor(v - r)), row_begin)
    y1 = wp.min(int(wp.floor(v + r)), row_end - 1)
    color = colors[0]
    if colors.shape[0] > 1:
        color = colors[k]
    inv_r = 1.0 / r
    for y in range(y0, y1 + 1):
        dy = (float(y) + 0.5 - v) * inv_r
        for x in range(x0, x1 + 1):
            dx = (float(x) + 0.5 - u) * inv_r
            d2 = dx * dx + dy * dy
            if d2 <= 1.0:
                # impostor: the visible hemisphere's point under this pixel (orthographic within the disc)
                nz = wp.sqrt(1.0 - d2)
                normal = dx * cam.right - dy * cam.up - nz * cam.forward
                _fragment(mode, x, y, z - radius * nz, _shade(color, normal, cam, light), depth, rgb)


@wp.func
def _edge(a: wp.vec2, b: wp.vec2, p: wp.vec2):
    return (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0])


@wp.kernel
def _triangles(
    vertices: wp.array(dtype=wp.vec3),
    faces: wp.array(dtype=wp.vec3i),
    colors: wp.array(dtype=wp.vec3),
    cam: CameraData,
    light: Lighting,
    row_begin: int,
    row_end: int,
    mode: int,
    depth: wp.array2d(dtype=float),
    rgb: wp.array2d(dtype=wp.vec3),
):
    t = wp.tid()
    f = faces[t]
    n = vertices.shape[0]
    if wp.min(f[0], wp.min(f[1], f[2])) < 0 or wp.max(f[0], wp.max(f[1], f[2])) >= n:
        return
    a = vertices[f[0]] - cam.eye
    b = vertices[f[1]] - cam.eye
    c = vertices[f[2]] - cam.eye
    za = wp.dot(a, cam.forward)
    zb = wp.dot(b, cam.forward)
    zc = wp.dot(c, cam.forward)
    if wp.min(za, wp.min(zb, zc)) < cam.near:
        return  # reaches behind the near plane: skipped, not clipped
    sa = wp.vec2(cam.cx + cam.focal * wp.dot(a, cam.right) / za, cam.cy - cam.focal * wp.dot(a, cam.up) / za)
    sb = wp.vec2(cam.cx + cam.focal * wp.dot(b, cam.right) / zb, cam.cy - cam.focal * wp.dot(b, cam.up) / zb)
    sc = wp.vec2(cam.cx + cam.focal * wp.dot(c, cam.right) / zc, cam.cy - cam.focal * wp.dot(c, cam.up) / zc)
    area = _edge(sa, sb, sc)
    if wp.abs(area) < 1.0e-9:
        return
    normal = wp.cross(b - a, c - a)
    length = wp.length(normal)
    if length <= 0.0:
        return
    normal = normal / length
    if wp.dot(normal, a) > 0.0:
        normal = -normal  # two-sided: light the side that faces the camera
    color = colors[0]
    if colors.shape[0] > 1:
        color = colors[t]
    color = _shade(color, normal, cam, light)
    x0 = wp.max(int(wp.floor(wp.min(sa[0], wp.min(sb[0], sc[0])))), 0)
    x1 = wp.min(int(wp.floor(wp.max(sa[0], wp.max(sb[0], sc[0])))), cam.width - 1)
    y0 = wp.max(int(wp.floor(wp.min(sa[1], wp.min(sb[1], sc[1])))), row_begin)
    y1 = wp.min(int(wp.floor(wp.max(sa[1], wp.max(sb[1], sc[1])))), row_end - 1)
    inv_area = 1.0 / area
    eps = -1.0e-6
    for y in range(y0, y1 + 1):
        for x in range(x0, x1 + 1):
            p = wp.vec2(float(x) + 0.5, float(y) + 0.5)
            w0 = _edge(sb, sc, p) * inv_area
            w1 = _edge(sc, sa, p) * inv_area
            w2 = 1.0 - w0 - w1
            if w0 >= eps and w1 >= eps and w2 >= eps:
                # perspective-correct depth: 1/z is linear in screen space
                z = 1.0 / (w0 / za + w1 / zb + w2 / zc)
                _fragment(mode, x, y, z, color, depth, rgb)


@wp.kernel
def _pose_vertices(
    local: wp.array(dtype=wp.vec3),
    vertex_part: wp.array(dtype=wp.int32),
    part_position: wp.array(dtype=wp.vec3),
    part_rotation: wp.array(dtype=wp.quat),
    part_offset: int,
    out: wp.array(dtype=wp.vec3),
):
    k = wp.tid()
    s = vertex_part[k] + part_offset
    out[k] = part_position[s] + wp.quat_rotate(wp.normalize(part_rotation[s]), local[k])


@wp.kernel
def _inset(
    image: wp.array2d(dtype=wp.vec3),
    x0: int,
    y0: int,
    width: int,
    height: int,
    border: int,
    border_color: wp.vec3,
    depth: wp.array2d(dtype=float),
    rgb: wp.array2d(dtype=wp.vec3),
):
    i, j = wp.tid()  # over the inset and its border
    y = y0 - border + i
    x = x0 - border + j
    if y < 0 or y >= rgb.shape[0] or x < 0 or x >= rgb.shape[1]:
        return
    depth[y, x] = _FAR  # no fog on the inset
    if i < border or j < border or i >= height + border or j >= width + border:
        rgb[y, x] = border_color
        return
    # bilinear sample of the source at this pixel's centre
    sh = image.shape[0]
    sw = image.shape[1]
    fy = wp.clamp((float(i - border) + 0.5) * float(sh) / float(height) - 0.5, 0.0, float(sh - 1))
    fx = wp.clamp((float(j - border) + 0.5) * float(sw) / float(width) - 0.5, 0.0, float(sw - 1))
    iy = wp.min(int(fy), sh - 2)
    ix = wp.min(int(fx), sw - 2)
    iy = wp.max(iy, 0)
    ix = wp.max(ix, 0)
    ty = wp.clamp(fy - float(iy), 0.0, 1.0)
    tx = wp.clamp(fx - float(ix), 0.0, 1.0)
    iy1 = wp.min(iy + 1, sh - 1)
    ix1 = wp.min(ix + 1, sw - 1)
    top = image[iy, ix] * (1.0 - tx) + image[iy, ix1] * tx
    bottom = image[iy1, ix] * (1.0 - tx) + image[iy1, ix1] * tx
    rgb[y, x] = top * (1.0 - ty) + bottom * ty


@wp.kernel
def _to_uint8(rgb: wp.array2d(dtype=wp.vec3), depth: wp.array2d(dtype=float), fog_start: float, fog_end: float,
              fog_color: wp.vec3, out: wp.array3d(dtype=wp.uint8)):
    y, x = wp.tid()
    c = rgb[y, x]
    if fog_end > fog_start:
        z = depth[y, x]
        if z < _FAR:
            t = wp.clamp((z - fog_start) / (fog_end - fog_start), 0.0, 1.0)
            c = c + (fog_color - c) * (t * t * (3.0 - 2.0 * t))
    for k in range(3):
        out[y, x, k] = wp.uint8(int(wp.clamp(c[k], 0.0, 1.0) * 255.0 + 0.5))


# ------------------------------------------------------------------------------- input checks


def _describe(value) -> str:
    shape = getattr(value, "shape", None)
    if shape is not None:
        dtype = getattr(value, "dtype", "")
        name = getattr(dtype, "__name__", dtype)
        return f"{type(value).__name__} of shape {tuple(shape)} and dtype {name}"
    return repr(value) if len(repr(value)) < 80 else type(value).__name__


def _rgb(name: str, value) -> tuple[float, float, float]:
    try:
        c = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise InvalidParameter(name, value, "three numbers in [0, 1] (red, green, blue)") from exc
    if c.shape != (3,) or not np.all(np.isfinite(c)) or np.any(c < 0) or np.any(c > 1):
        raise InvalidParameter(name, value, "three numbers in [0, 1] (red, green, blue)")
    return tuple(float(x) for x in c)


def _positive(name: str, value, unit: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise InvalidParameter(name, value, f"(0, inf) {unit}") from exc
    if not (v > 0 and np.isfinite(v)):
        raise InvalidParameter(name, value, f"(0, inf) {unit}")
    return v


def _unit_direction(name: str, value) -> np.ndarray:
    d = np.asarray(value, dtype=np.float64).reshape(-1)
    if d.shape != (3,) or not np.all(np.isfinite(d)) or np.linalg.norm(d) < 1e-12:
        raise InvalidParameter(name, value, "three finite numbers, not all zero")
    return d / np.linalg.norm(d)


class Renderer:
    """Frame buffers (depth [m], linear RGB in [0, 1]) and the drawing calls that fill them.

    One frame is ``clear()``, any number of ``splat_particles`` / ``draw_*`` calls in any order
    (the depth test sorts them), optionally ``inset`` last, then ``image()``. Buffers, Warp arrays
    of uniform colours and posed-mesh scratch are kept between frames.

    Args:
        camera: the :class:`Camera`; its width and height size the buffers. Change it with
            :meth:`set_camera`.
        device: Warp device of the buffers and kernels (default ``"cpu"``). Inputs on another
            device are copied over.
        background: sky colours (RGB in [0, 1]) of the top and bottom rows, blended in between.
        light_direction: world direction towards the key light (any length).
        ambient, key_light, head_light: light intensities in [0, 1] (ambient, key light, and a
            light at the camera that keeps surfaces facing away from the key light readable).
        threads: CPU threads, each drawing its own band of rows (default: ``DIFFSIM_CPU_THREADS``
            or the core count, at most 8). Ignored on CUDA.

    Attributes:
        fog: ``(start, end)`` camera depths [m] over which surfaces fade smoothly into the bottom
            sky colour (hides the aliasing of a far checkered ground), or None.
    """

    def __init__(
        self,
        camera: Camera,
        *,
        device=None,
        background: Sequence[Sequence[float]] = DEFAULT_BACKGROUND,
        light_direction: Sequence[float] = (-0.45, -0.9, 1.6),
        ambient: float = 0.3,
        key_light: float = 0.6,
        head_light: float = 0.25,
        threads: int | None = None,
    ):
        self.device = wp.get_device(device if device is not None else "cpu")
        if len(background) != 2:
            raise InvalidParameter("background", background, "two RGB colours (top row, bottom row) in [0, 1]")
        self._top = wp.vec3(*_rgb("background[0]", background[0]))
        self._bottom = wp.vec3(*_rgb("background[1]", background[1]))
        light = Lighting()
        light.key_direction = wp.vec3(*_unit_direction("light_direction", light_direction))
        for name, value in (("ambient", ambient), ("key_light", key_light), ("head_light", head_light)):
            v = float(value)
            if not 0.0 <= v <= 1.0:
                raise InvalidParameter(name, value, "[0, 1]")
        light.ambient, light.key, light.head = float(ambient), float(key_light), float(head_light)
        self._light = light
        if threads is None:
            from diffsim.core.parallel import cpu_threads

            threads = cpu_threads()
        if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
            raise InvalidParameter("threads", threads, "integers >= 1")
        self.threads = 1 if self.device.is_cuda else int(threads)
        # threads of one CUDA launch race for pixels: draw in two passes there (see the module docstring)
        self._two_pass = self.device.is_cuda
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="diffsim-render") if self.threads > 1 else None
        self.fog: tuple[float, float] | None = None
        self._colors: dict[tuple, wp.array] = {}
        self._scratch: dict[str, wp.array] = {}
        self._no_world = wp.zeros(0, dtype=wp.int32, device=self.device)
        self.camera = None
        self.set_camera(camera)

    # ---------------------------------------------------------------------------- frame

    def set_camera(self, camera: Camera) -> None:
        """Use ``camera`` from now on; the buffers follow its image size (contents are cleared)."""
        if not isinstance(camera, Camera):
            raise InvalidParameter("camera", _describe(camera), "diffsim.render.Camera instances")
        shape = (camera.height, camera.width)
        if self.camera is None or (self.camera.height, self.camera.width) != shape:
            self._depth = wp.zeros(shape, dtype=float, device=self.device)
            self._rgb = wp.zeros(shape, dtype=wp.vec3, device=self.device)
            self._out = wp.zeros((*shape, 3), dtype=wp.uint8, device=self.device)
        self.camera = camera
        self._cam = camera.data()
        self.clear()

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the image [px]."""
        return (self.camera.height, self.camera.width)

    def clear(self) -> None:
        """Fill the colour buffer with the background and the depth buffer with ``FAR_DEPTH``."""
        wp.launch(_clear, dim=self.shape, inputs=[self._top, self._bottom], outputs=[self._depth, self._rgb],
                  device=self.device)

    def image(self) -> np.ndarray:
        """The frame as a new (height, width, 3) uint8 array (sRGB-agnostic: values are the buffer's)."""
        start, end = self.fog if self.fog is not None else (0.0, 0.0)
        wp.launch(_to_uint8, dim=self.shape, inputs=[self._rgb, self._depth, float(start), float(end), self._bottom],
                  outputs=[self._out], device=self.device)
        return self._out.numpy().copy()

    def depth(self) -> np.ndarray:
        """The depth buffer as a new (height, width) float array: camera depth [m], ``FAR_DEPTH`` where empty."""
        return self._depth.numpy().copy()

    # ---------------------------------------------------------------------------- launches

    def _raster(self, kernel, dim: int, inputs: list) -> None:
        """Launch a raster kernel whose last inputs are (row_begin, row_end, mode) before the buffers."""
        if dim == 0:
            return
        outputs = [self._depth, self._rgb]
        height = self.camera.height
        if self._two_pass:
            for mode in (_DEPTH_ONLY, _COLOUR_AT_DEPTH):
                wp.launch(kernel, dim=dim, inputs=[*inputs, 0, height, mode], outputs=outputs, device=self.device)
            return
        bands = min(self.threads, height)
        if bands == 1:
            wp.launch(kernel, dim=dim, inputs=[*inputs, 0, height, _TEST_AND_WRITE], outputs=outputs,
                      device=self.device)
            return
        edges = [height * b // bands for b in range(bands + 1)]
        jobs = [self._pool.submit(wp.launch, kernel, dim=dim, inputs=[*inputs, edges[b], edges[b + 1], _TEST_AND_WRITE],
                                  outputs=outputs, device=self.device) for b in range(bands)]
        for job in jobs:
            job.result()

    def _uniform_color(self, color) -> wp.array:
        key = _rgb("color", color)
        arr = self._colors.get(key)
        if arr is None:
            arr = wp.array([key], dtype=wp.vec3, device=self.device)
            self._colors[key] = arr
        return arr

    def _color_array(self, name: str, colors, count: int, what: str) -> wp.array:
        """One colour for all (three numbers) or one per item (``count`` x 3, or a wp.vec3 array)."""
        if isinstance(colors, wp.array):
            if colors.dtype != wp.vec3 or colors.ndim != 1 or colors.shape[0] not in (1, count):
                raise InvalidParameter(name, _describe(colors), f"one RGB colour or a wp.vec3 array of {count} {what}")
            return colors if colors.device == self.device else colors.to(self.device)
        c = np.asarray(colors, dtype=np.float32)
        if c.shape == (3,):
            return self._uniform_color(c)
        if c.shape != (count, 3) or not np.all(np.isfinite(c)):
            raise InvalidParameter(name, _describe(colors), f"one RGB colour (3,) or an array ({count}, 3) of {what}")
        return wp.array(np.clip(c, 0.0, 1.0), dtype=wp.vec3, device=self.device)

    def _vec3_array(self, name: str, values) -> wp.array:
        valid = "arrays of shape (N, 3) [m], or a 1-D wp.array of wp.vec3"
        if isinstance(values, wp.array):
            if values.dtype == wp.vec3 and values.ndim == 1:
                return values if values.device == self.device else values.to(self.device)
            if values.dtype == wp.float32 and values.ndim == 2 and values.shape[1] == 3:
                values = values.numpy()
            else:
                raise InvalidParameter(name, _describe(values), valid)
        try:
            p = np.asarray(values, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise InvalidParameter(name, _describe(values), valid) from exc
        if p.ndim != 2 or p.shape[1] != 3:
            raise InvalidParameter(name, _describe(values), valid)
        return wp.array(p, dtype=wp.vec3, device=self.device)

    def _faces_array(self, faces, vertex_count: int) -> wp.array:
        valid = f"integer arrays of shape (F, 3) with indices in [0, {vertex_count - 1}], or a wp.array of wp.vec3i"
        if isinstance(faces, wp.array):
            if faces.dtype != wp.vec3i or faces.ndim != 1:
                raise InvalidParameter("faces", _describe(faces), valid)
            return faces if faces.device == self.device else faces.to(self.device)
        f = np.asarray(faces)
        if f.ndim != 2 or f.shape[1] != 3 or (f.size and not np.issubdtype(f.dtype, np.integer)):
            raise InvalidParameter("faces", _describe(faces), valid)
        if f.size and (f.min() < 0 or f.max() >= vertex_count):
            raise InvalidParameter("faces", f"indices in [{f.min()}, {f.max()}]", valid)
        return wp.array(f.astype(np.int32), dtype=wp.vec3i, device=self.device)

    # ---------------------------------------------------------------------------- drawing

    def splat_particles(
        self,
        points,
        colors=(0.95, 0.55, 0.2),
        radius: float = 0.005,
        *,
        point_world=None,
        world: int = 0,
        min_pixel_radius: float = 0.7,
    ) -> None:
        """Draw each point as a shaded sphere of ``radius`` [m] (a screen-space disc with a sphere
        impostor's depth and normal), at least ``min_pixel_radius`` [px] wide so none vanishes.

        Args:
            points: positions [m], (N, 3) numpy or a wp.array of wp.vec3.
            colors: one RGB in [0, 1] or one per point ((N, 3) numpy, or wp.vec3 array).
            radius: sphere radius [m], > 0.
            point_world: optional int32 wp.array (N,) of world indices; only points with
                ``point_world == world`` are drawn.
            world: the world drawn when ``point_world`` is given.
        """
        pts = self._vec3_array("points", points)
        n = pts.shape[0]
        radius = _positive("radius", radius, "m")
        min_px = float(min_pixel_radius)
        if not (min_px >= 0.0 and np.isfinite(min_px)):
            raise InvalidParameter("min_pixel_radius", min_pixel_radius, "[0, inf) px")
        cols = self._color_array("colors", colors, n, "colours, one per point")
        if point_world is None:
            worlds = self._no_world
        else:
            if not isinstance(point_world, wp.array) or point_world.dtype != wp.int32 or point_world.shape != (n,):
                raise InvalidParameter("point_world", _describe(point_world), f"int32 wp.arrays of shape ({n},)")
            worlds = point_world if point_world.device == self.device else point_world.to(self.device)
        self._raster(_splat_spheres, n, [pts, cols, worlds, int(world), radius, min_px, self._cam, self._light])

    def draw_triangles(self, vertices, faces, colors=(0.4, 0.45, 0.55)) -> None:
        """Draw flat-shaded (Lambert, two-sided) triangles.

        Args:
            vertices: world positions [m], (N, 3) numpy or a wp.array of wp.vec3.
            faces: vertex indices (F, 3), numpy or a wp.array of wp.vec3i. Triangles reaching
                nearer than the camera's ``near`` are skipped, not clipped.
            colors: one RGB in [0, 1] or one per face ((F, 3) numpy or wp.vec3 array).
        """
        verts = self._vec3_array("vertices", vertices)
        tris = self._faces_array(faces, verts.shape[0])
        cols = self._color_array("colors", colors, tris.shape[0], "colours, one per face")
        self._raster(_triangles, tris.shape[0], [verts, tris, cols, self._cam, self._light])

    def draw_posed_triangles(self, local_vertices: wp.array, vertex_part: wp.array, faces: wp.array,
                             colors: wp.array, part_position: wp.array, part_rotation: wp.array, *,
                             part_offset: int = 0) -> None:
        """Draw triangles of rigid parts posed by Warp arrays (e.g. colliders posed by a State).

        Vertex ``k`` of part ``vertex_part[k]`` is drawn at ``part_position[s] + rotate(
        part_rotation[s], local_vertices[k])`` with ``s = vertex_part[k] + part_offset``; rotations
        are quaternions (x, y, z, w). All arguments are Warp arrays on the renderer's device
        (vec3, int32, vec3i, vec3 with 1 or F entries, vec3, quat).
        """
        n = local_vertices.shape[0]
        posed = self._scratch.get("posed")
        if posed is None or posed.shape[0] < n:
            posed = wp.empty(max(n, 1), dtype=wp.vec3, device=self.device)
            self._scratch["posed"] = posed
        out = posed[:n]
        wp.launch(_pose_vertices, dim=n, inputs=[local_vertices, vertex_part, part_position, part_rotation,
                                                 int(part_offset)], outputs=[out], device=self.device)
        self._raster(_triangles, faces.shape[0], [out, faces, colors, self._cam, self._light])

    def draw_mesh(self, vertices, faces, color=(0.4, 0.45, 0.55), *, position: Sequence[float] = (0.0, 0.0, 0.0),
                  rotation: Sequence[float] = (0.0, 0.0, 0.0, 1.0)) -> None:
        """Draw a triangle mesh given in its local frame, posed at ``position`` [m] and ``rotation``
        (unit quaternion x, y, z, w); a ``TriangleMesh`` may stand for ``vertices`` with ``faces=None``."""
        if faces is None and hasattr(vertices, "faces"):
            vertices, faces = vertices.vertices, vertices.faces
        v = np.asarray(self._vec3_array("vertices", vertices).numpy(), dtype=np.float64)
        q = np.asarray(rotation, dtype=np.float64).reshape(-1)
        if q.shape != (4,) or not np.all(np.isfinite(q)) or np.linalg.norm(q) < 1e-9:
            raise InvalidParameter("rotation", rotation, "unit quaternions (x, y, z, w)")
        x, y, z, w = q / np.linalg.norm(q)
        u = np.array([x, y, z])
        world = v * (w * w - u @ u) + 2 * np.outer(v @ u, u) + 2 * w * np.cross(u, v)
        t = np.asarray(position, dtype=np.float64).reshape(-1)
        if t.shape != (3,) or not np.all(np.isfinite(t)):
            raise InvalidParameter("position", position, "three finite numbers [m]")
        self.draw_triangles(world + t, faces, color)

    def draw_tube(self, vertices, radius: float, color=(0.8, 0.2, 0.25)) -> None:
        """Draw a polyline (N, 3) [m] as a tube of ``radius`` [m]: spheres splatted along it at a
        spacing of 0.4 radius, whose union is the tube with rounded joints and ends."""
        pts = self._vec3_array("vertices", vertices).numpy().astype(np.float64)
        radius = _positive("radius", radius, "m")
        if pts.shape[0] == 0:
            return
        samples = [pts[:1]]
        if pts.shape[0] > 1:
            seg = pts[1:] - pts[:-1]
            length = np.linalg.norm(seg, axis=1)
            counts = np.maximum(np.ceil(length / (0.4 * radius)).astype(np.int64), 1)
            seg_index = np.repeat(np.arange(len(seg)), counts)
            t = (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + 1) / counts[seg_index]
            samples.append(pts[seg_index] + t[:, None] * seg[seg_index])
        self.splat_particles(np.concatenate(samples), color, radius)

    def inset(self, image, *, corner: str = "top-right", scale: float = 0.3, border: int = 2,
              border_color: Sequence[float] = (0.15, 0.15, 0.18)) -> None:
        """Paste ``image`` over a corner of the frame, on top of everything drawn so far.

        Args:
            image: (h, w, 3) RGB, float in [0, 1] or uint8 (e.g. a tactile sensor's RGB image,
                ``reading.numpy()["rgb"][k]``), at least 2 x 2.
            corner: ``"top-right"``, ``"top-left"``, ``"bottom-right"`` or ``"bottom-left"``.
            scale: inset width as a fraction of the frame width, in (0, 1]; the aspect ratio is kept.
            border: frame around the inset [px], >= 0.
        """
        corners = ("top-right", "top-left", "bottom-right", "bottom-left")
        if corner not in corners:
            raise InvalidParameter("corner", corner, " or ".join(repr(c) for c in corners))
        if not (0.0 < float(scale) <= 1.0):
            raise InvalidParameter("scale", scale, "(0, 1] (fraction of the frame width)")
        if isinstance(border, bool) or not isinstance(border, (int, np.integer)) or border < 0:
            raise InvalidParameter("border", border, "integers >= 0 px")
        src = image.numpy() if isinstance(image, wp.array) else np.asarray(image)
        if src.ndim != 3 or src.shape[2] != 3 or src.shape[0] < 2 or src.shape[1] < 2:
            raise InvalidParameter("image", _describe(image), "arrays of shape (h, w, 3) with h, w >= 2")
        src = src.astype(np.float32) / 255.0 if src.dtype == np.uint8 else np.clip(src.astype(np.float32), 0.0, 1.0)
        if not np.all(np.isfinite(src)):
            raise InvalidParameter("image", "an array with non-finite entries", "finite RGB values in [0, 1]")
        H, W = self.shape
        width = max(1, min(int(round(float(scale) * W)), W - 2 * border))
        height = max(1, min(int(round(width * src.shape[0] / src.shape[1])), H - 2 * border))
        margin = border + max(2, W // 64)
        x0 = W - margin - width if corner.endswith("right") else margin
        y0 = margin if corner.startswith("top") else H - margin - height
        arr = wp.array(np.ascontiguousarray(src), dtype=wp.vec3, device=self.device)
        wp.launch(_inset, dim=(height + 2 * border, width + 2 * border),
                  inputs=[arr, x0, y0, width, height, int(border), wp.vec3(*_rgb("border_color", border_color))],
                  outputs=[self._depth, self._rgb], device=self.device)

    def close(self) -> None:
        """Stop the band threads (the renderer stays usable on one thread)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.threads = 1

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)
