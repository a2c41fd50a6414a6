"""A vision-based tactile sensor (GelSight-like) on an FEM elastomer: markers seen by a pinhole camera,
contact pressure map, total contact wrench and a three-light shaded RGB image, all differentiable.

The sensor frame is its body's frame: the elastomer is bonded to the backing at low z and touches
the world through its top surface (outward normal +z); the camera sits behind the backing on the
sensor's z axis and looks along +z.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import warp as wp

from diffsim.errors import ConfigError, InvalidParameter
from diffsim.fem.model import FEMModel, FEMState

# ------------------------------------------------------------------------------------- kernels


@wp.kernel
def _face_normals(
    node_x: wp.array(dtype=wp.vec3),
    faces: wp.array(dtype=wp.vec3i),
    sensor_offset: wp.array(dtype=int),
    faces_per_sensor: int,
    node_normal: wp.array(dtype=wp.vec3),
):
    k = wp.tid()
    f = faces[k % faces_per_sensor]
    o = sensor_offset[k / faces_per_sensor]
    a = node_x[f[0] + o]
    n = wp.cross(node_x[f[1] + o] - a, node_x[f[2] + o] - a)  # area-weighted (twice the area)
    wp.atomic_add(node_normal, f[0] + o, n)
    wp.atomic_add(node_normal, f[1] + o, n)
    wp.atomic_add(node_normal, f[2] + o, n)


@wp.func
def _project(p: wp.vec3, camera_z: float, focal: float, cx: float, cy: float):
    # depth along the optical axis is positive for every point in front of the camera; clamping it
    # keeps the projection finite for points dragged behind it (never the case in normal use)
    depth = wp.max(p[2] - camera_z, 1.0e-6)
    return wp.vec2(cx + focal * p[0] / depth, cy - focal * p[1] / depth)


@wp.kernel
def _sample_surface(
    node_x: wp.array(dtype=wp.vec3),
    node_normal: wp.array(dtype=wp.vec3),
    node_contact_force: wp.array(dtype=wp.vec3),
    node_contact_area: wp.array(dtype=float),
    body_position: wp.array(dtype=wp.vec3),
    body_rotation: wp.array(dtype=wp.quat),
    sensor_body: wp.array(dtype=int),
    sensor_offset: wp.array(dtype=int),
    sample_nodes: wp.array(dtype=wp.vec3i),
    sample_weights: wp.array(dtype=wp.vec3),
    samples_per_sensor: int,
    camera_z: float,
    focal: float,
    cx: float,
    cy: float,
    position: wp.array(dtype=wp.vec3),
    normal: wp.array(dtype=wp.vec3),
    pressure: wp.array(dtype=float),
    image_uv: wp.array(dtype=wp.vec2),
):
    k = wp.tid()
    s = k / samples_per_sensor
    j = k % samples_per_sensor
    body = sensor_body[s]
    o = sensor_offset[s]
    nodes = sample_nodes[j]
    w = sample_weights[j]
    origin = body_position[body]
    rotation = body_rotation[body]
    p = wp.vec3()
    n = wp.vec3()
    load = float(0.0)
    for c in range(3):
        i = nodes[c] + o
        p = p + w[c] * node_x[i]
        n = n + w[c] * node_normal[i]
        area = node_contact_area[i]
        if area > 0.0:
            # pressure pushing into the sensor: contact force against the local outward normal
            local_force = wp.quat_rotate_inv(rotation, node_contact_force[i])
            load = load - w[c] * local_force[2] / area
    local = wp.quat_rotate_inv(rotation, p - origin)
    position[k] = local
    normal[k] = wp.normalize(wp.quat_rotate_inv(rotation, n))
    pressure[k] = load
    image_uv[k] = _project(local, camera_z, focal, cx, cy)


@wp.kernel
def _shade(
    normal: wp.array(dtype=wp.vec3),
    light_direction: wp.array(dtype=wp.vec3),
    light_color: wp.array(dtype=wp.vec3),
    ambient: wp.vec3,
    rgb: wp.array(dtype=wp.vec3),
):
    k = wp.tid()
    # the camera sees the membrane's inner face, whose normal is minus the outward one
    inner = -normal[k]
    color = ambient
    for light in range(3):
        color = color + wp.max(wp.dot(inner, light_direction[light]), 0.0) * light_color[light]
    rgb[k] = color


@wp.kernel
def _wrench(
    node_x: wp.array(dtype=wp.vec3),
    node_contact_force: wp.array(dtype=wp.vec3),
    body_position: wp.array(dtype=wp.vec3),
    body_rotation: wp.array(dtype=wp.quat),
    sensor_body: wp.array(dtype=int),
    sensor_offset: wp.array(dtype=int),
    nodes_per_sensor: int,
    force: wp.array(dtype=wp.vec3),
    torque: wp.array(dtype=wp.vec3),
):
    k = wp.tid()
    s = k / nodes_per_sensor
    i = sensor_offset[s] + k % nodes_per_sensor
    body = sensor_body[s]
    rotation = body_rotation[body]
    f = wp.quat_rotate_inv(rotation, node_contact_force[i])
    r = wp.quat_rotate_inv(rotation, node_x[i] - body_position[body])
    wp.atomic_add(force, s, f)
    wp.atomic_add(torque, s, wp.cross(r, f))


# ------------------------------------------------------------------------------------- Python


@dataclass(frozen=True)
class PinholeCamera:
    """The sensor's camera, on the sensor's z axis behind the elastomer, looking along +z.

    Attributes:
        focal_length: focal length [px].
        image_size: (width, height) [px]; the principal point is the image centre.
        distance: from the camera centre to the undeformed contact surface [m].
    """

    focal_length: float
    image_size: tuple[int, int]
    distance: float

    def __post_init__(self):
        if not (math.isfinite(self.focal_length) and self.focal_length > 0):
            raise InvalidParameter("focal_length", self.focal_length, "(0, inf) px")
        if not (math.isfinite(self.distance) and self.distance > 0):
            raise InvalidParameter("distance", self.distance, "(0, inf) m")
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise InvalidParameter("image_size", self.image_size, "(width, height), both >= 1 px")


@dataclass
class TactileReading:
    """One reading of every sensor; arrays have a leading sensor axis. Warp arrays (for losses)
    and numpy views through :meth:`numpy`.

    Attributes:
        marker_position: (S, rows * cols) vec3, marker positions in the sensor frame [m].
        marker_uv: (S, rows * cols) vec2, marker image coordinates [px].
        marker_displacement: (S, rows * cols) vec2, image motion since rest [px].
        pressure: (S, H * W) float, contact pressure on the surface [Pa].
        normal: (S, H * W) vec3, deformed outward surface normal in the sensor frame.
        rgb: (S, H * W) vec3, shaded tactile image, about 0.5 grey where the surface is flat.
        force: (S,) vec3, contact force on the sensor in its frame [N].
        torque: (S,) vec3, contact torque on the sensor about its origin, in its frame [N m].
    """

    marker_position: wp.array
    marker_uv: wp.array
    marker_displacement: wp.array
    pressure: wp.array
    normal: wp.array
    rgb: wp.array
    force: wp.array
    torque: wp.array
    marker_grid: tuple[int, int]
    image_shape: tuple[int, int]

    def numpy(self) -> dict[str, np.ndarray]:
        """Every output as numpy, images shaped (S, H, W[, C]) and markers (S, rows, cols, C)."""
        S = self.force.shape[0]
        rows, cols = self.marker_grid
        H, W = self.image_shape
        return {
            "marker_position": self.marker_position.numpy().reshape(S, rows, cols, 3),
            "marker_uv": self.marker_uv.numpy().reshape(S, rows, cols, 2),
            "marker_displacement": self.marker_displacement.numpy().reshape(S, rows, cols, 2),
            "pressure": self.pressure.numpy().reshape(S, H, W),
            "normal": self.normal.numpy().reshape(S, H, W, 3),
            "rgb": self.rgb.numpy().reshape(S, H, W, 3),
            "force": self.force.numpy(),
            "torque": self.torque.numpy(),
        }


@wp.kernel
def _subtract_vec2(a: wp.array(dtype=wp.vec2), b: wp.array(dtype=wp.vec2), out: wp.array(dtype=wp.vec2)):
    k = wp.tid()
    out[k] = a[k] - b[k % b.shape[0]]


def _surface_samples(mesh, xy: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each point ``xy`` (K, 2) of the sensing area, the highest upward boundary face above it,
    as (node indices (K, 3), barycentric weights (K, 3))."""
    p = mesh.vertices
    a, b, c = p[faces[:, 0]], p[faces[:, 1]], p[faces[:, 2]]
    nodes = np.zeros((len(xy), 3), dtype=np.int32)
    weights = np.zeros((len(xy), 3))
    for k, q in enumerate(xy):
        v0, v1 = b[:, :2] - a[:, :2], c[:, :2] - a[:, :2]
        v2 = q[None, :] - a[:, :2]
        den = v0[:, 0] * v1[:, 1] - v1[:, 0] * v0[:, 1]
        l1 = (v2[:, 0] * v1[:, 1] - v1[:, 0] * v2[:, 1]) / den
        l2 = (v0[:, 0] * v2[:, 1] - v2[:, 0] * v0[:, 1]) / den
        l0 = 1.0 - l1 - l2
        inside = (l0 >= -1e-9) & (l1 >= -1e-9) & (l2 >= -1e-9)
        if not np.any(inside):
            raise ConfigError(f"sensing point ({q[0]:.4g}, {q[1]:.4g}) m lies outside the elastomer's top surface; "
                              "choose a smaller sensing_size.")
        candidates = np.flatnonzero(inside)
        ca, cb, cc = a[candidates, 2], b[candidates, 2], c[candidates, 2]
        height = l0[candidates] * ca + l1[candidates] * cb + l2[candidates] * cc
        f = candidates[int(np.argmax(height))]
        nodes[k] = faces[f]
        weights[k] = np.clip([l0[f], l1[f], l2[f]], 0.0, 1.0)
        weights[k] /= weights[k].sum()
    return nodes, weights


def _grid(size: tuple[float, float], shape: tuple[int, int]) -> np.ndarray:
    """Cell-centred points of a rows x cols grid over a (width, height) rectangle centred at 0;
    row 0 is the top of the image (largest y)."""
    rows, cols = shape
    xs = (np.arange(cols) + 0.5) / cols * size[0] - 0.5 * size[0]
    ys = 0.5 * size[1] - (np.arange(rows) + 0.5) / rows * size[1]
    X, Y = np.meshgrid(xs, ys)
    return np.stack([X.ravel(), Y.ravel()], axis=1)


class TactileSensor:
    """Reads the sensor outputs of one or more identical elastomer bodies (one per world).

    Args:
        model: the FEM model holding the bodies.
        bodies: the sensor bodies; all share the first one's mesh.
        sensing_size: (width, height) of the sensing area on the top surface [m]; default 90% of
            the top face's extent.
        marker_grid: (rows, cols) of printed markers over the sensing area.
        image_shape: (height, width) [px] of the pressure map and the RGB image.
        camera: the pinhole camera that sees the markers; default: the sensing area fills a
            ``image_shape`` image from 1.5 sensing widths away.
        light_elevation: angle of the three lights above the membrane plane [deg].
        light_colors: RGB colour of each of the three lights (azimuths 90, 210, 330 deg).
        ambient: RGB level of the unlit membrane.
    """

    def __init__(self, model: FEMModel, bodies: int | Sequence[int], *, sensing_size: tuple[float, float] | None = None,
                 marker_grid: tuple[int, int] = (7, 9), image_shape: tuple[int, int] = (48, 64),
                 camera: PinholeCamera | None = None, light_elevation: float = 30.0,
                 light_colors: Sequence[Sequence[float]] = ((0.55, 0.0, 0.0), (0.0, 0.55, 0.0), (0.0, 0.0, 0.55)),
                 ambient: Sequence[float] = (0.25, 0.25, 0.25)):
        bodies = [bodies] if isinstance(bodies, (int, np.integer)) else [int(b) for b in bodies]
        if not bodies or any(not (0 <= b < model.num_bodies) for b in bodies):
            raise InvalidParameter("bodies", bodies, f"body indices in [0, {model.num_bodies - 1}]")
        mesh = model.meshes[bodies[0]]
        for b in bodies[1:]:
            other = model.meshes[b]
            if other.vertex_count != mesh.vertex_count or not np.array_equal(other.tets, mesh.tets):
                raise ConfigError(f"sensor bodies {bodies[0]} and {b} have different meshes; one TactileSensor reads "
                                  "identical elastomers.")
        self.model = model
        self.bodies = bodies
        starts = model.body_node_start.numpy()
        offsets = [int(starts[b]) for b in bodies]  # first node of each sensor body
        device = model.device
        faces = mesh.boundary_faces()
        p = mesh.vertices
        normals = np.cross(p[faces[:, 1]] - p[faces[:, 0]], p[faces[:, 2]] - p[faces[:, 0]])
        top = faces[normals[:, 2] > 0.1 * np.linalg.norm(normals, axis=1)]
        if len(top) == 0:
            raise ConfigError("the sensor elastomer has no upward-facing boundary faces (its top surface, +z).")
        lo, hi = p[top.reshape(-1)].min(axis=0), p[top.reshape(-1)].max(axis=0)
        if sensing_size is None:
            sensing_size = (0.9 * (hi[0] - lo[0]), 0.9 * (hi[1] - lo[1]))
        if len(sensing_size) != 2 or not all(math.isfinite(s) and s > 0 for s in sensing_size):
            raise InvalidParameter("sensing_size", sensing_size, "(width, height), both > 0 m")
        for name, shape in (("marker_grid", marker_grid), ("image_shape", image_shape)):
            if len(shape) != 2 or not all(isinstance(n, (int, np.integer)) and n >= 1 for n in shape):
                raise InvalidParameter(name, shape, "two counts >= 1")
        self.sensing_size = tuple(float(s) for s in sensing_size)
        self.marker_grid = tuple(int(n) for n in marker_grid)
        self.image_shape = tuple(int(n) for n in image_shape)
        surface_z = float(hi[2])
        if camera is None:
            distance = 1.5 * max(self.sensing_size)
            camera = PinholeCamera(focal_length=self.image_shape[1] * distance / self.sensing_size[0],
                                   image_size=(self.image_shape[1], self.image_shape[0]), distance=distance)
        self.camera = camera
        self._camera_args = [surface_z - camera.distance, float(camera.focal_length),
                             0.5 * camera.image_size[0], 0.5 * camera.image_size[1]]
        self.top_faces = top
        self._faces = wp.array(top.astype(np.int32), dtype=wp.vec3i, device=device)
        self._sensor_body = wp.array(np.array(bodies, dtype=np.int32), dtype=int, device=device)
        self._offset = wp.array(np.array(offsets, dtype=np.int32), dtype=int, device=device)
        self._nodes_per_sensor: int | None = None
        self._markers = self._sample_set(mesh, _grid(self.sensing_size, self.marker_grid), top)
        self._pixels = self._sample_set(mesh, _grid(self.sensing_size, self.image_shape), top)
        elevation = math.radians(light_elevation)
        directions = []
        for azimuth in (90.0, 210.0, 330.0):
            a = math.radians(azimuth)
            # lights on the camera side of the membrane (negative z), shining onto its inner face
            horizontal = math.cos(elevation)
            directions.append((horizontal * math.cos(a), horizontal * math.sin(a), -math.sin(elevation)))
        self._light_direction = wp.array(np.array(directions, dtype=np.float32), dtype=wp.vec3, device=device)
        colors = np.asarray(light_colors, dtype=np.float32)
        if colors.shape != (3, 3):
            raise InvalidParameter("light_colors", colors.tolist(), "three RGB triples")
        self._light_color = wp.array(colors, dtype=wp.vec3, device=device)
        self._ambient = wp.vec3(*[float(a) for a in ambient])
        # marker image positions at rest: the reference of the displacements
        rest = model.state()
        self._marker_rest_uv = wp.clone(self._read_samples(model, rest, self._markers)[3])

    def _sample_set(self, mesh, xy, top):
        nodes, weights = _surface_samples(mesh, xy, top)
        return (wp.array(nodes, dtype=wp.vec3i, device=self.model.device),
                wp.array(weights.astype(np.float32), dtype=wp.vec3, device=self.model.device), len(xy))

    @property
    def num_sensors(self) -> int:
        return len(self.bodies)

    def _normals(self, model: FEMModel, state: FEMState) -> wp.array:
        grad = state.node_x.requires_grad
        node_normal = wp.zeros(model.node_count, dtype=wp.vec3, device=model.device, requires_grad=grad)
        wp.launch(_face_normals, dim=self.num_sensors * len(self.top_faces),
                  inputs=[state.node_x, self._faces, self._offset, len(self.top_faces)], outputs=[node_normal],
                  device=model.device)
        return node_normal

    def _read_samples(self, model: FEMModel, state: FEMState, samples, node_normal=None):
        nodes, weights, count = samples
        if node_normal is None:
            node_normal = self._normals(model, state)
        grad = state.node_x.requires_grad
        n = self.num_sensors * count

        def new(dtype):
            return wp.zeros(n, dtype=dtype, device=model.device, requires_grad=grad)

        position, normal, pressure, uv = new(wp.vec3), new(wp.vec3), new(float), new(wp.vec2)
        wp.launch(_sample_surface, dim=n,
                  inputs=[state.node_x, node_normal, state.node_contact_force, model.node_contact_area,
                          state.body_position, state.body_rotation, self._sensor_body, self._offset, nodes, weights,
                          count, *self._camera_args],
                  outputs=[position, normal, pressure, uv], device=model.device)
        return position, normal, pressure, uv

    def wrench(self, model: FEMModel, state: FEMState) -> tuple[wp.array, wp.array]:
        """Net contact force [N] and torque [N m] on each sensor, in its frame: the part of
        :meth:`read` a task's loss often needs alone, at a fraction of its cost."""
        device = model.device
        grad = state.node_x.requires_grad
        force = wp.zeros(self.num_sensors, dtype=wp.vec3, device=device, requires_grad=grad)
        torque = wp.zeros(self.num_sensors, dtype=wp.vec3, device=device, requires_grad=grad)
        if self._nodes_per_sensor is None:
            self._nodes_per_sensor = int(model.body_node_count.numpy()[self.bodies[0]])
        count = self._nodes_per_sensor
        wp.launch(_wrench, dim=self.num_sensors * count,
                  inputs=[state.node_x, state.node_contact_force, state.body_position, state.body_rotation,
                          self._sensor_body, self._offset, count],
                  outputs=[force, torque], device=device)
        return force, torque

    def read(self, model: FEMModel, state: FEMState) -> TactileReading:
        """Every output for ``state`` (differentiable when the state's arrays require grad)."""
        device = model.device
        grad = state.node_x.requires_grad
        node_normal = self._normals(model, state)
        marker_position, _, _, marker_uv = self._read_samples(model, state, self._markers, node_normal)
        displacement = wp.zeros_like(marker_uv)
        wp.launch(_subtract_vec2, dim=marker_uv.shape[0], inputs=[marker_uv, self._marker_rest_uv],
                  outputs=[displacement], device=device)
        _, normal, pressure, _ = self._read_samples(model, state, self._pixels, node_normal)
        rgb = wp.zeros(normal.shape[0], dtype=wp.vec3, device=device, requires_grad=grad)
        wp.launch(_shade, dim=normal.shape[0], inputs=[normal, self._light_direction, self._light_color, self._ambient],
                  outputs=[rgb], device=device)
        force, torque = self.wrench(model, state)
        return TactileReading(marker_position, marker_uv, displacement, pressure, normal, rgb, force, torque,
                              self.marker_grid, self.image_shape)
