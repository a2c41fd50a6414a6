"""Tests of diffsim.geometry: analytic and mesh signed distances against closed forms, their tape
gradients against finite differences, mesh helpers, particle samplers and collider validation.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import warp as wp

from diffsim.errors import ConfigError, InvalidParameter
from diffsim.geometry import (
    MAX_COLLIDERS,
    NO_SURFACE_DISTANCE,
    Collider,
    ColliderSet,
    ColliderSetBuilder,
    ColliderSetCache,
    ShapeType,
    TriangleMesh,
    collider_box,
    collider_capsule,
    collider_cylinder,
    collider_mesh,
    collider_plane,
    collider_query,
    collider_sphere,
    collider_surface_velocity,
    mesh_query,
    pack_colliders,
    particle_volume,
    sample_box,
    sample_cylinder,
    sample_mesh,
    sample_sphere,
    shape_query,
    shape_query_world,
)
from diffsim.geometry.colliders import collider_slot

DEVICE = "cpu"

# One size per analytic shape (metres) and the half extents of a box that encloses it.
SIZES = {
    ShapeType.PLANE: ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    ShapeType.BOX: ((0.5, 0.3, 0.2), (0.5, 0.3, 0.2)),
    ShapeType.SPHERE: ((0.4, 0.0, 0.0), (0.4, 0.4, 0.4)),
    ShapeType.CAPSULE: ((0.2, 0.3, 0.0), (0.2, 0.2, 0.5)),
    ShapeType.CYLINDER: ((0.3, 0.25, 0.0), (0.3, 0.3, 0.25)),
}
ANALYTIC = list(SIZES)


# ---------------------------------------------------------------------------- kernels and helpers


@wp.kernel
def _local_query_kernel(
    shape_type: int,
    size: wp.array(dtype=wp.vec3),
    mesh: wp.uint64,
    points: wp.array(dtype=wp.vec3),
    distance: wp.array(dtype=float),
    normal: wp.array(dtype=wp.vec3),
):
    i = wp.tid()
    q = shape_query(shape_type, size[0], mesh, points[i])
    distance[i] = q.distance
    normal[i] = q.normal


@wp.kernel
def _world_query_kernel(
    shape_type: int,
    size: wp.vec3,
    mesh: wp.uint64,
    position: wp.array(dtype=wp.vec3),
    rotation: wp.quat,
    points: wp.array(dtype=wp.vec3),
    distance: wp.array(dtype=float),
    normal: wp.array(dtype=wp.vec3),
):
    i = wp.tid()
    q = shape_query_world(shape_type, size, mesh, position[0], rotation, points[i])
    distance[i] = q.distance
    normal[i] = q.normal


@wp.kernel
def _mesh_range_kernel(
    mesh: wp.uint64, max_distance: float, points: wp.array(dtype=wp.vec3), distance: wp.array(dtype=float)
):
    i = wp.tid()
    distance[i] = mesh_query(mesh, wp.vec3(1.0, 1.0, 1.0), points[i], max_distance).distance


def query(shape, size, points, mesh_id=0):
    """Distance, normal, tape gradient w.r.t. each point, and gradient of the sum w.r.t. size."""
    n = len(points)
    pts = wp.array(np.asarray(points, np.float32), dtype=wp.vec3, device=DEVICE, requires_grad=True)
    sz = wp.array([size], dtype=wp.vec3, device=DEVICE, requires_grad=True)
    dist = wp.zeros(n, dtype=float, device=DEVICE, requires_grad=True)
    nrm = wp.zeros(n, dtype=wp.vec3, device=DEVICE, requires_grad=True)
    tape = wp.Tape()
    with tape:
        wp.launch(
            _local_query_kernel, dim=n, inputs=[int(shape), sz, wp.uint64(mesh_id), pts], outputs=[dist, nrm]
        )
    tape.backward(grads={dist: wp.ones(n, dtype=float, device=DEVICE)})
    return dist.numpy(), nrm.numpy(), pts.grad.numpy(), sz.grad.numpy()[0]


def distances(shape, size, points, mesh_id=0):
    return query(shape, size, points, mesh_id)[0].astype(np.float64)


def warp_fd_gradient(shape, size, points, mesh_id=0, eps=1.0e-3):
    """Central finite differences of the Warp distance (float32) w.r.t. each point."""
    grad = np.zeros((len(points), 3))
    for k in range(3):
        step = np.zeros(3)
        step[k] = eps
        plus = distances(shape, size, points + step, mesh_id)
        minus = distances(shape, size, points - step, mesh_id)
        grad[:, k] = (plus - minus) / (2.0 * eps)
    return grad


# Closed forms in float64 numpy, written independently of the Warp code.
def sdf_reference(shape, size, p):
    p = np.asarray(p, np.float64)
    if shape == ShapeType.PLANE:
        return p[:, 2]
    if shape == ShapeType.BOX:
        q = np.abs(p) - np.asarray(size)
        return np.linalg.norm(np.maximum(q, 0.0), axis=1) + np.minimum(q.max(axis=1), 0.0)
    if shape == ShapeType.SPHERE:
        return np.linalg.norm(p, axis=1) - size[0]
    if shape == ShapeType.CAPSULE:
        on_axis = np.zeros_like(p)
        on_axis[:, 2] = np.clip(p[:, 2], -size[1], size[1])
        return np.linalg.norm(p - on_axis, axis=1) - size[0]
    if shape == ShapeType.CYLINDER:
        dx = np.hypot(p[:, 0], p[:, 1]) - size[0]
        dz = np.abs(p[:, 2]) - size[1]
        return np.hypot(np.maximum(dx, 0.0), np.maximum(dz, 0.0)) + np.minimum(np.maximum(dx, dz), 0.0)
    raise AssertionError(shape)


def reference_gradient(shape, size, p, eps):
    grad = np.zeros_like(p)
    for k in range(3):
        step = np.zeros(3)
        step[k] = eps
        grad[:, k] = (sdf_reference(shape, size, p + step) - sdf_reference(shape, size, p - step)) / (2 * eps)
    return grad


def smooth_mask(shape, size, p, width):
    """Points whose closed-form SDF is smooth within ``width`` (away from medial axes and kinks)."""
    fine = reference_gradient(shape, size, p, 1.0e-7)
    coarse = reference_gradient(shape, size, p, width)
    return (np.abs(np.linalg.norm(fine, axis=1) - 1.0) < 1.0e-5) & np.all(
        np.abs(fine - coarse) < 1.0e-4, axis=1
    )


INSIDE_BLEND = 0.1  # diffsim.geometry.shapes._INSIDE_BLEND


def unblended_mask(shape, size, p):
    """Points where the blended inside normal of a box or cylinder equals the nearest face's
    normal to within 1e-5: outside, or inside with the nearest face ahead by > 12 blend widths."""
    if shape == ShapeType.BOX:
        q = np.abs(p) - np.asarray(size)
        width = INSIDE_BLEND * min(size)
    elif shape == ShapeType.CYLINDER:
        q = np.stack([np.hypot(p[:, 0], p[:, 1]) - size[0], np.abs(p[:, 2]) - size[1]], axis=1)
        width = INSIDE_BLEND * min(size[0], size[1])
    else:
        return np.ones(len(p), dtype=bool)
    inside = np.all(q < 0, axis=1)
    ordered = np.sort(q, axis=1)
    gap = ordered[:, -1] - ordered[:, -2]
    return ~inside | (gap > 12 * width)


def random_points(shape, count=200, seed=0):
    bound = np.asarray(SIZES[shape][1])
    rng = np.random.default_rng(seed + int(shape))
    return rng.uniform(-1.6, 1.6, size=(count, 3)) * bound


def quat_rotate_numpy(q, v):
    x, y, z, w = q
    u = np.array([x, y, z])
    return v + 2.0 * w * np.cross(u, v) + 2.0 * np.cross(u, np.cross(u, v))


# ---------------------------------------------------------------------------- analytic shapes


@pytest.mark.parametrize("shape", ANALYTIC, ids=lambda s: s.name)
def test_analytic_distance_and_normal_match_closed_form(shape):
    size = SIZES[shape][0]
    points = random_points(shape)
    dist, normal, _, _ = query(shape, size, points)
    expected = sdf_reference(shape, size, points)
    if shape != ShapeType.PLANE:
        assert (expected < 0).sum() > 10 and (expected > 0).sum() > 10  # both sides are exercised
    np.testing.assert_allclose(dist, expected, atol=1.0e-5, rtol=0)

    np.testing.assert_allclose(np.linalg.norm(normal, axis=1), 1.0, atol=1.0e-5)
    smooth = smooth_mask(shape, size, points, 1.0e-3) & unblended_mask(shape, size, points)
    assert smooth.sum() > 140
    expected_normal = reference_gradient(shape, size, points[smooth], 1.0e-7)
    np.testing.assert_allclose(normal[smooth], expected_normal, atol=1.0e-4)


@pytest.mark.parametrize("shape", ANALYTIC, ids=lambda s: s.name)
def test_analytic_tape_gradient_matches_finite_differences(shape):
    size = SIZES[shape][0]
    points = random_points(shape, count=60, seed=7)
    points = points[smooth_mask(shape, size, points, 3.0e-3)]
    assert len(points) > 40
    _, normal, grad, size_grad = query(shape, size, points)
    fd = warp_fd_gradient(shape, size, points)
    assert np.all(np.abs(grad - fd) <= np.maximum(1.0e-3, 0.02 * np.abs(fd)))
    # the gradient of an SDF is its normal (except where the inside normal is deliberately blended)
    exact = unblended_mask(shape, size, points)
    np.testing.assert_allclose(grad[exact], normal[exact], atol=1.0e-5)

    # Gradient of the summed distance w.r.t. the size parameters, against the closed form.
    eps = 1.0e-6
    for k in range(3):
        plus, minus = np.array(size, np.float64), np.array(size, np.float64)
        plus[k] += eps
        minus[k] -= eps
        fd_size = (sdf_reference(shape, plus, points) - sdf_reference(shape, minus, points)).sum() / (2 * eps)
        assert abs(size_grad[k] - fd_size) <= max(1.0e-3, 0.02 * abs(fd_size)), (k, size_grad, fd_size)


DEGENERATE = {
    ShapeType.SPHERE: [(0.0, 0.0, 0.0), (1.0e-12, 0.0, 0.0)],
    ShapeType.CAPSULE: [(0.0, 0.0, 0.0), (0.0, 0.0, 0.1), (0.0, 0.0, 0.3), (0.0, 0.0, -0.3)],
    ShapeType.BOX: [(0.0, 0.0, 0.0), (0.5, 0.3, 0.2), (-0.5, 0.3, -0.2), (0.5, 0.3, 0.0), (0.5, 0.0, 0.0)],
    ShapeType.CYLINDER: [(0.0, 0.0, 0.0), (0.0, 0.0, 0.25), (0.3, 0.0, 0.25), (0.0, 0.0, -1.0)],
    ShapeType.PLANE: [(0.0, 0.0, 0.0)],
}


@pytest.mark.parametrize("shape", list(DEGENERATE), ids=lambda s: s.name)
def test_degenerate_points_give_finite_values_and_gradients(shape):
    size = SIZES[shape][0]
    points = np.asarray(DEGENERATE[shape], np.float64)
    dist, normal, grad, size_grad = query(shape, size, points)
    assert np.all(np.isfinite(dist)) and np.all(np.isfinite(normal))
    assert np.all(np.isfinite(grad)) and np.all(np.isfinite(size_grad))
    np.testing.assert_allclose(np.linalg.norm(normal, axis=1), 1.0, atol=1.0e-5)
    np.testing.assert_allclose(dist, sdf_reference(shape, size, points), atol=1.0e-6)


def test_unknown_shape_type_reports_no_surface():
    dist, normal, grad, _ = query(99, (1.0, 1.0, 1.0), np.zeros((1, 3)))
    assert dist[0] == pytest.approx(NO_SURFACE_DISTANCE)
    np.testing.assert_array_equal(normal[0], [0.0, 0.0, 1.0])
    assert np.all(grad == 0.0)


def test_world_query_uses_pose_and_gives_pose_gradient():
    collider = collider_box((0.5, 0.3, 0.2), position=(1.0, 2.0, 3.0), rotation=(0.2, -0.1, 0.4, 0.9))
    rng = np.random.default_rng(3)
    local_points = rng.uniform(-1.0, 1.0, size=(30, 3)) * 0.8
    world_points = (
        np.array([quat_rotate_numpy(collider.rotation, p) for p in local_points]) + collider.position
    )
    pts = wp.array(world_points.astype(np.float32), dtype=wp.vec3, device=DEVICE)
    position = wp.array([collider.position], dtype=wp.vec3, device=DEVICE, requires_grad=True)
    dist = wp.zeros(30, dtype=float, device=DEVICE, requires_grad=True)
    nrm = wp.zeros(30, dtype=wp.vec3, device=DEVICE)
    tape = wp.Tape()
    with tape:
        wp.launch(
            _world_query_kernel,
            dim=30,
            inputs=[
                int(collider.shape),
                wp.vec3(collider.size),
                wp.uint64(0),
                position,
                wp.quat(collider.rotation),
                pts,
            ],
            outputs=[dist, nrm],
        )
    tape.backward(grads={dist: wp.ones(30, dtype=float, device=DEVICE)})
    local_dist, local_normal, _, _ = query(ShapeType.BOX, collider.size, local_points)
    np.testing.assert_allclose(dist.numpy(), local_dist, atol=1.0e-5)
    world_normal = np.array([quat_rotate_numpy(collider.rotation, n) for n in local_normal])
    np.testing.assert_allclose(nrm.numpy(), world_normal, atol=1.0e-5)
    # Moving the collider by dx changes every distance by -normal . dx.
    np.testing.assert_allclose(position.grad.numpy()[0], -world_normal.sum(axis=0), atol=1.0e-4)


# ---------------------------------------------------------------------------- meshes


@pytest.fixture(scope="module")
def box_mesh():
    return TriangleMesh.box((0.5, 0.3, 0.2))


def box_points_with_clear_nearest_face(half, points, gap):
    """Inside points whose nearest box face beats the second nearest by more than ``gap``."""
    depth = np.sort(np.asarray(half) - np.abs(points), axis=1)
    return np.all(depth > 0, axis=1) & (depth[:, 1] - depth[:, 0] > gap)


@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_box_mesh_matches_analytic_box(box_mesh, scale):
    half = np.array([0.5, 0.3, 0.2])
    size = (scale, scale, scale)
    mesh_id = box_mesh.warp_mesh(DEVICE).id
    points = random_points(ShapeType.BOX, count=200, seed=11) * scale
    dist, normal, _, _ = query(ShapeType.MESH, size, points, mesh_id)
    expected = sdf_reference(ShapeType.BOX, half * scale, points)
    outside = expected > 0
    clear_inside = box_points_with_clear_nearest_face(half * scale, points, 1.0e-3)
    assert outside.sum() > 50 and clear_inside.sum() > 10
    np.testing.assert_allclose(dist[outside], expected[outside], atol=1.0e-4)
    np.testing.assert_allclose(dist[clear_inside], expected[clear_inside], atol=1.0e-4)
    smooth = smooth_mask(ShapeType.BOX, half * scale, points, 1.0e-3) & (outside | clear_inside)
    # Mesh normals are float32 (p - closest) / |p - closest|: rounding of p grows as 1 / distance.
    np.testing.assert_allclose(
        normal[smooth], reference_gradient(ShapeType.BOX, half * scale, points[smooth], 1.0e-7), atol=1.0e-3
    )


def test_box_mesh_tape_gradient_matches_finite_differences(box_mesh):
    half = (0.5, 0.3, 0.2)
    mesh_id = box_mesh.warp_mesh(DEVICE).id
    points = random_points(ShapeType.BOX, count=60, seed=5)
    keep = smooth_mask(ShapeType.BOX, half, points, 3.0e-3)
    keep &= (sdf_reference(ShapeType.BOX, half, points) > 0) | box_points_with_clear_nearest_face(
        half, points, 1e-2
    )
    points = points[keep]
    assert len(points) > 30
    _, normal, grad, _ = query(ShapeType.MESH, (1.0, 1.0, 1.0), points, mesh_id)
    fd = warp_fd_gradient(ShapeType.MESH, (1.0, 1.0, 1.0), points, mesh_id)
    assert np.all(np.abs(grad - fd) <= np.maximum(1.0e-3, 0.02 * np.abs(fd)))
    np.testing.assert_allclose(grad, normal, atol=1.0e-5)


def test_non_uniform_mesh_scale_is_exact_over_box_faces(box_mesh):
    # For a box, the face regions outside it are preserved by axis scaling, so there the scaled
    # mesh distance is exact; its gradient w.r.t. the scale is checked against the closed form.
    scale = np.array([2.0, 1.0, 0.5])
    half = np.array([0.5, 0.3, 0.2]) * scale
    rng = np.random.default_rng(9)
    points = rng.uniform(-0.9, 0.9, size=(40, 3)) * half
    axis = rng.integers(0, 3, size=40)
    points[np.arange(40), axis] = np.sign(rng.uniform(-1, 1, 40)) * half[axis] * rng.uniform(1.1, 2.0, 40)
    dist, _, _, size_grad = query(ShapeType.MESH, tuple(scale), points, box_mesh.warp_mesh(DEVICE).id)
    np.testing.assert_allclose(dist, sdf_reference(ShapeType.BOX, half, points), atol=1.0e-5)
    eps = 1.0e-6
    for k in range(3):
        step = np.zeros(3)
        step[k] = eps
        plus = sdf_reference(ShapeType.BOX, np.array([0.5, 0.3, 0.2]) * (scale + step), points).sum()
        minus = sdf_reference(ShapeType.BOX, np.array([0.5, 0.3, 0.2]) * (scale - step), points).sum()
        assert size_grad[k] == pytest.approx((plus - minus) / (2 * eps), rel=0.02, abs=1.0e-3)


def test_mesh_degenerate_points_and_surface_are_finite(box_mesh):
    mesh_id = box_mesh.warp_mesh(DEVICE).id
    points = np.array([[0.0, 0.0, 0.0], [0.5, 0.3, 0.2], [0.5, 0.0, 0.0], [0.1, 0.1, 0.2], [0.5, 0.3, 0.0]])
    dist, normal, grad, size_grad = query(ShapeType.MESH, (1.0, 1.0, 1.0), points, mesh_id)
    assert np.all(np.isfinite(dist)) and np.all(np.isfinite(grad)) and np.all(np.isfinite(size_grad))
    np.testing.assert_allclose(np.linalg.norm(normal, axis=1), 1.0, atol=1.0e-5)
    np.testing.assert_allclose(dist, sdf_reference(ShapeType.BOX, (0.5, 0.3, 0.2), points), atol=1.0e-6)
    np.testing.assert_allclose(normal[3], [0.0, 0.0, 1.0], atol=1.0e-6)  # on a face: the face normal


def test_mesh_query_without_face_in_range_reports_no_surface(box_mesh):
    points = wp.array([[3.0, 0.0, 0.0], [0.6, 0.0, 0.0]], dtype=wp.vec3, device=DEVICE)
    out = wp.zeros(2, dtype=float, device=DEVICE)
    wp.launch(_mesh_range_kernel, dim=2, inputs=[box_mesh.warp_mesh(DEVICE).id, 0.5, points], outputs=[out])
    np.testing.assert_allclose(out.numpy(), [NO_SURFACE_DISTANCE, 0.1], rtol=1.0e-6)


def test_icosphere_is_closed_with_sphere_volume_and_distance():
    sphere = TriangleMesh.icosphere(0.4, 3)
    assert sphere.num_faces == 1280 and sphere.is_closed()
    assert sphere.volume() == pytest.approx(4.0 / 3.0 * math.pi * 0.4**3, rel=0.02)
    np.testing.assert_allclose(np.linalg.norm(sphere.vertices, axis=1), 0.4)
    points = random_points(ShapeType.SPHERE, count=100, seed=2)
    dist = distances(ShapeType.MESH, (1.0, 1.0, 1.0), points, sphere.warp_mesh(DEVICE).id)
    # Faces lie inside the sphere by at most r (1 - cos(edge angle)), about 1 % of r here.
    np.testing.assert_allclose(dist, sdf_reference(ShapeType.SPHERE, (0.4, 0, 0), points), atol=0.004)
    # Points equidistant from many faces (the centre) once got the wrong sign from the pseudo normal.
    centre = distances(
        ShapeType.MESH, (1.0, 1.0, 1.0), np.array([[0, 0, 0], [0, 0, 1e-6]]), sphere.warp_mesh().id
    )
    np.testing.assert_allclose(centre, -0.4, atol=0.004)


def test_triangle_mesh_helpers_and_validation(box_mesh, tmp_path):
    assert box_mesh.is_closed()
    assert box_mesh.volume() == pytest.approx(8 * 0.5 * 0.3 * 0.2)
    open_mesh = TriangleMesh(box_mesh.vertices, box_mesh.faces[1:])
    assert not open_mesh.is_closed()
    flipped = box_mesh.faces.copy()
    flipped[0] = flipped[0, ::-1]
    assert not TriangleMesh(box_mesh.vertices, flipped).is_closed()
    assert TriangleMesh(box_mesh.vertices, box_mesh.faces[:, ::-1]).volume() < 0

    with pytest.raises(InvalidParameter, match="faces"):
        TriangleMesh(box_mesh.vertices, [[0, 1, 8]])
    with pytest.raises(InvalidParameter, match="faces"):
        TriangleMesh(box_mesh.vertices, np.zeros((0, 3), int))
    bad_vertices = np.array(box_mesh.vertices)
    bad_vertices[2, 1] = np.nan
    with pytest.raises(InvalidParameter, match="vertices"):
        TriangleMesh(bad_vertices, box_mesh.faces)

    # A unit cube written with quads, texture/normal corner forms, a negative index and comments.
    obj = tmp_path / "cube.obj"
    corners = [(x, y, z) for z in (0, 1) for y in (0, 1) for x in (0, 1)]
    lines = ["# cube", "o cube"] + [f"v {x} {y} {z}" for x, y, z in corners] + ["vt 0 0", "vn 0 0 1"]
    lines += [
        "f 1/1/1 3/1/1 4/1/1 2/1/1",
        "f 5//1 6//1 8//1 7//1",
        "f 1 2 6 5",
        "f 3 7 8 4",
        "f 1 5 7 3",
        "f 2 4 8 -3  # last corner is vertex 6",
    ]
    obj.write_text("\n".join(lines) + "\n")
    cube = TriangleMesh.from_obj(obj)
    assert cube.num_faces == 12 and cube.is_closed()
    assert cube.volume() == pytest.approx(1.0)
    bad = tmp_path / "bad.obj"
    bad.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 x\n")
    with pytest.raises(ConfigError, match="bad.obj:4"):
        TriangleMesh.from_obj(bad)
    with pytest.raises(ConfigError):
        TriangleMesh.from_obj(tmp_path / "missing.obj")


# ---------------------------------------------------------------------------- samplers


def test_sample_box_count_is_exact_and_points_inside():
    spacing = 0.02
    points = sample_box((1.0, 0.0, 2.0), (0.2, 0.1, 0.06), spacing, jitter=0.3, seed=4)
    assert points.dtype == np.float32 and points.shape[1] == 3
    assert len(points) == 20 * 10 * 6
    assert len(points) * particle_volume(spacing) == pytest.approx(0.4 * 0.2 * 0.12)
    assert np.all(np.abs(points - np.array([1.0, 0.0, 2.0], np.float32)) <= np.array([0.2, 0.1, 0.06]) + 1e-6)
    plain = sample_box((1.0, 0.0, 2.0), (0.2, 0.1, 0.06), spacing)
    assert not np.allclose(points, plain) and len(plain) == len(points)


def test_sample_sphere_and_cylinder_volumes():
    spacing = 0.01
    sphere = sample_sphere((0.0, 0.5, 0.0), 0.1, spacing, jitter=0.4, seed=1)
    assert len(sphere) * spacing**3 == pytest.approx(4.0 / 3.0 * math.pi * 0.1**3, rel=0.05)
    assert np.all(np.linalg.norm(sphere - np.array([0.0, 0.5, 0.0]), axis=1) < 0.1)
    for axis in range(3):
        cylinder = sample_cylinder((0.0, 0.0, 0.0), 0.1, 0.05, spacing, axis=axis, jitter=0.2)
        assert len(cylinder) * spacing**3 == pytest.approx(math.pi * 0.1**2 * 0.1, rel=0.05)
        radial = np.delete(cylinder, axis, axis=1)
        assert np.all(np.linalg.norm(radial, axis=1) < 0.1) and np.all(np.abs(cylinder[:, axis]) <= 0.05)


def test_sample_mesh_matches_box_and_sphere():
    spacing = 0.05
    box = TriangleMesh.box((0.5, 0.3, 0.2))
    np.testing.assert_allclose(
        sample_mesh(box, spacing, position=(0.1, 0.2, 0.3)),
        sample_box((0.1, 0.2, 0.3), (0.5, 0.3, 0.2), spacing),
    )
    sphere = TriangleMesh.icosphere(1.0, 3)
    rotation = (0.3, 0.1, -0.2, 0.9)
    points = sample_mesh(sphere, 0.05, position=(1.0, 0.0, 0.0), rotation=rotation, scale=0.5, jitter=0.3)
    assert len(points) * 0.05**3 == pytest.approx(sphere.volume() * 0.125, rel=0.05)
    assert np.all(np.linalg.norm(points - np.array([1.0, 0.0, 0.0]), axis=1) < 0.5)


def test_sample_mesh_keeps_exactly_the_lattice_points_with_negative_mesh_distance():
    # sample_mesh classifies most points through coarse cells; compare with a point-by-point query.
    sphere, spacing = TriangleMesh.icosphere(0.3, 2), 0.03
    lower, upper = sphere.bounds()
    counts = np.rint((upper - lower) / spacing).astype(int)
    axes = [
        0.5 * (lower[k] + upper[k]) + (np.arange(counts[k]) - 0.5 * (counts[k] - 1)) * spacing
        for k in range(3)
    ]
    lattice = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    inside = distances(ShapeType.MESH, (1.0, 1.0, 1.0), lattice, sphere.warp_mesh(DEVICE).id) < 0
    np.testing.assert_allclose(sample_mesh(sphere, spacing), lattice[inside], atol=1.0e-6)


def test_samplers_are_fast():
    sphere = TriangleMesh.icosphere(1.0, 3)
    sample_mesh(sphere, 0.5)  # compiles the inside-test kernel outside the timed part
    for sample in (
        lambda: sample_sphere((0.0, 0.0, 0.0), 1.0, 0.035, jitter=0.3),
        lambda: sample_mesh(sphere, 0.035, jitter=0.3),
    ):
        start = time.perf_counter()
        points = sample()
        assert len(points) > 90_000
        assert time.perf_counter() - start < 1.0  # typically 0.03 s (sphere) and 0.3 s (mesh)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: sample_box((0, 0, 0), (0.1, 0.1, 0.1), 0.0), "spacing"),
        (lambda: sample_box((0, 0, 0), (0.1, -0.1, 0.1), 0.01), "half_extents"),
        (lambda: sample_box((0, 0, 0), (0.1, 0.1, 0.001), 0.01), "spacing"),
        (lambda: sample_box((0, 0, math.nan), (0.1, 0.1, 0.1), 0.01), "center"),
        (lambda: sample_sphere((0, 0, 0), 0.0, 0.01), "radius"),
        (lambda: sample_sphere((0, 0, 0), 0.004, 0.01), "spacing"),
        (lambda: sample_sphere((0, 0, 0), 0.1, 0.01, jitter=0.5), "jitter"),
        (lambda: sample_cylinder((0, 0, 0), 0.1, -1.0, 0.01), "half_height"),
        (lambda: sample_cylinder((0, 0, 0), 0.1, 0.1, 0.01, axis=3), "axis"),
        (lambda: sample_mesh(TriangleMesh.box((1, 1, 1)), 0.1, scale=0.0), "scale"),
        (lambda: sample_mesh(TriangleMesh.box((1, 1, 1)), 0.1, rotation=(0, 0, 0, 0)), "rotation"),
        (lambda: sample_mesh(TriangleMesh.box((1, 1, 1)), 3.0), "spacing"),
        (lambda: particle_volume(-1.0), "spacing"),
        (lambda: sample_sphere((0, 0, 0), 0.1, "fine"), "spacing"),
    ],
)
def test_sampler_validation_names_the_parameter(call, name):
    with pytest.raises(InvalidParameter, match=name):
        call()


# ---------------------------------------------------------------------------- colliders


def test_collider_plane_rotation_maps_z_to_normal():
    for normal in [(0, 1, 0), (0, 0, 1), (0, 0, -1), (1, -2, 0.5), (0, 0, -3)]:
        collider = collider_plane(normal=normal, position=(0.0, 0.1, 0.0), friction=0.3)
        unit = np.asarray(normal, float) / np.linalg.norm(normal)
        np.testing.assert_allclose(
            quat_rotate_numpy(collider.rotation, np.array([0.0, 0.0, 1.0])), unit, atol=1e-12
        )
        assert collider.shape == ShapeType.PLANE and collider.friction == 0.3
    collider = collider_plane(normal=(0, 1, 0), position=(0.0, 0.1, 0.0))
    np.testing.assert_allclose(collider.rotation, (-math.sqrt(0.5), 0.0, 0.0, math.sqrt(0.5)))


def test_collider_factories_build_expected_sizes():
    assert collider_sphere(0.2).size == (0.2, 0.0, 0.0)
    assert collider_capsule(0.1, 0.3).size == (0.1, 0.3, 0.0)
    assert collider_cylinder(0.1, 0.3).shape == ShapeType.CYLINDER
    box = collider_box((0.1, 0.2, 0.3), position=(1, 2, 3), rotation=(0, 0, 0, 2), friction=0.0)
    assert box.rotation == (0.0, 0.0, 0.0, 1.0) and box.position == (1.0, 2.0, 3.0)
    mesh = TriangleMesh.box((0.1, 0.1, 0.1))
    collider = collider_mesh(mesh, scale=2.0)
    assert collider.size == (2.0, 2.0, 2.0) and collider.warp_mesh_id(DEVICE) == mesh.warp_mesh(DEVICE).id
    assert collider_sphere(0.2).warp_mesh_id() == 0


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: collider_sphere(-0.1), "radius"),
        (lambda: collider_sphere(math.inf), "radius"),
        (lambda: collider_sphere("big"), "radius"),
        (lambda: collider_capsule(0.1, 0.0), "half_height"),
        (lambda: collider_cylinder(0.0, 0.1), "radius"),
        (lambda: collider_box((0.1, 0.0, 0.1)), "half_extents"),
        (lambda: collider_box((0.1, 0.1)), "half_extents"),
        (lambda: collider_sphere(0.1, friction=-0.2), "friction"),
        (lambda: collider_sphere(0.1, friction=math.nan), "friction"),
        (lambda: collider_sphere(0.1, rotation=(0, 0, 0, 0)), "rotation"),
        (lambda: collider_sphere(0.1, position=(0, math.nan, 0)), "position"),
        (lambda: collider_plane(normal=(0, 0, 0)), "normal"),
        (lambda: collider_mesh("cube.obj"), "mesh"),
        (lambda: collider_mesh(TriangleMesh.box((1, 1, 1)), scale=(1, 0, 1)), "scale"),
        (lambda: Collider(ShapeType.MESH, (1.0, 1.0, 1.0), 0.5), "mesh"),
        (lambda: Collider(7, (1.0, 1.0, 1.0), 0.5), "shape"),
    ],
)
def test_collider_validation_names_the_parameter(call, name):
    with pytest.raises(InvalidParameter, match=name):
        call()


@pytest.mark.parametrize("shape", [ShapeType.BOX, ShapeType.CYLINDER], ids=lambda s: s.name)
def test_inside_normal_turns_continuously_across_medial_planes(shape):
    """Crossing the plane where two faces are equally near, the inside normal rotates smoothly
    (a flip would make contact, and so losses, jump as a collider moves)."""
    size = SIZES[shape][0]
    h = min(size[0], size[2]) if shape == ShapeType.BOX else min(size[0], size[1])
    # walk along a line crossing the medial plane between the +x (side) and +z (top/cap) faces
    t = np.linspace(-0.2, 0.2, 401) * h
    top = size[2] if shape == ShapeType.BOX else size[1]
    corner = np.array([size[0], 0.0, top])
    # the medial plane through this edge is the 45-degree plane x - size[0] = z - top
    points = corner - 0.5 * h * np.array([1.0, 0.0, 1.0]) + t[:, None] * np.array([1.0, 0.0, -1.0])
    _, normal, _, _ = query(shape, size, points)
    steps = np.linalg.norm(np.diff(normal, axis=0), axis=1)
    assert np.all(np.isfinite(normal))
    assert steps.max() < 0.05, f"largest normal change between neighbouring points: {steps.max():.3f}"
    assert normal[0] @ np.array([0.0, 0.0, 1.0]) > 0.99 and normal[-1] @ np.array([1.0, 0.0, 0.0]) > 0.99


# -- the shared collider set ------------------------------------------------------------------


@pytest.mark.parametrize("builder", ["mpm", "rod", "fem"])
def test_every_builder_holds_at_most_max_colliders(builder):
    from diffsim.fem import FEMBuilder
    from diffsim.mpm import MPMBuilder
    from diffsim.rod import RodBuilder

    b = {"mpm": lambda: MPMBuilder(grid_res=16), "rod": RodBuilder, "fem": FEMBuilder}[builder]()
    assert b.add_ground(height=0.1, friction=0.3) == 0
    assert b.colliders[0].shape == ShapeType.PLANE and b.colliders[0].position == (0.0, 0.0, 0.1)
    for k in range(1, MAX_COLLIDERS):
        assert b.add_collider(collider_sphere(0.01, position=(0.1 * k, 0.0, 0.5))) == k
    with pytest.raises(ConfigError, match=f"at most {MAX_COLLIDERS} colliders"):
        b.add_collider(collider_sphere(0.01))
    with pytest.raises(ConfigError, match="Collider"):
        b.add_collider("sphere")
    assert len(b.colliders) == MAX_COLLIDERS


@wp.kernel
def _collider_set_probe(colliders: ColliderSet, points: wp.array(dtype=wp.vec3), world: int,
                        loss: wp.array(dtype=float), distance: wp.array2d(dtype=float),
                        normal: wp.array2d(dtype=wp.vec3)):
    i = wp.tid()
    x = points[i]
    for c in range(wp.static(MAX_COLLIDERS)):
        if c < colliders.count:
            slot = collider_slot(colliders, world, c)
            q = collider_query(colliders, c, slot, x)
            distance[i, c] = q.distance
            normal[i, c] = q.normal
            # distance, friction and surface velocity all enter the loss
            v = collider_surface_velocity(colliders, slot, x)
            wp.atomic_add(loss, 0, q.distance + colliders.friction[c] * wp.dot(v, wp.vec3(1.0, 2.0, 3.0)))


def test_collider_set_queries_and_gradients_reach_its_arrays():
    """collider_query equals shape_query_world on the collider's pose, and the tape's gradients
    land in the model's, state's and control's arrays that the struct holds."""
    from types import SimpleNamespace


    builder = ColliderSetBuilder("a test scene")
    builder.add_ground(height=0.05, friction=0.4)
    builder.add(collider_box((0.1, 0.2, 0.05), position=(0.3, 0.0, 0.2), rotation=(0.0, 0.0, 0.38268343, 0.9238795),
                             friction=0.7))
    fields = builder.model_fields(2, DEVICE, requires_grad=True)
    model = SimpleNamespace(**fields, collider_count=len(builder))
    grad = dict(device=DEVICE, requires_grad=True)
    state = SimpleNamespace(collider_position=wp.array(fields["initial_collider_position"], dtype=wp.vec3, **grad),
                            collider_rotation=wp.array(fields["initial_collider_rotation"], dtype=wp.quat, **grad))
    rng = np.random.default_rng(0)
    control = SimpleNamespace(
        collider_velocity=wp.array(rng.standard_normal((4, 3)).astype(np.float32), dtype=wp.vec3, **grad),
        collider_angular_velocity=wp.array(rng.standard_normal((4, 3)).astype(np.float32), dtype=wp.vec3, **grad))
    points = rng.uniform(-0.2, 0.5, (16, 3)).astype(np.float32)
    cache = ColliderSetCache()
    colliders = cache.pack(model, state, control)
    assert cache.pack(model, state, control) is colliders
    loss = wp.zeros(1, dtype=float, **grad)
    distance = wp.zeros((16, 2), dtype=float, device=DEVICE)
    normal = wp.zeros((16, 2), dtype=wp.vec3, device=DEVICE)
    tape = wp.Tape()
    with tape:
        wp.launch(_collider_set_probe, dim=16,
                  inputs=[colliders, wp.array(points, dtype=wp.vec3, device=DEVICE), 1, loss],
                  outputs=[distance, normal], device=DEVICE)
    tape.backward(loss=loss)
    pos = state.collider_position.numpy()
    rot = state.collider_rotation.numpy()
    for c, shape, size in ((0, ShapeType.PLANE, (0.0, 0.0, 0.0)), (1, ShapeType.BOX, (0.1, 0.2, 0.05))):
        d = wp.zeros(16, dtype=float, device=DEVICE)
        n = wp.zeros(16, dtype=wp.vec3, device=DEVICE)
        wp.launch(_world_query_kernel, dim=16,
                  inputs=[int(shape), wp.vec3(*size), wp.uint64(0),
                          wp.array([pos[2 + c]], dtype=wp.vec3, device=DEVICE), wp.quat(*rot[2 + c]),
                          wp.array(points, dtype=wp.vec3, device=DEVICE)],
                  outputs=[d, n], device=DEVICE)
        d, n = d.numpy(), n.numpy()
        np.testing.assert_allclose(distance.numpy()[:, c], d, atol=1e-6)
        np.testing.assert_allclose(normal.numpy()[:, c], n, atol=1e-6)
    v = control.collider_velocity.numpy()
    w = control.collider_angular_velocity.numpy()
    friction = model.collider_friction.numpy()
    e = np.array([1.0, 2.0, 3.0])
    # d loss / d friction = sum over points of the surface velocity along e (world 1's slots 2, 3)
    expected = [sum(float((v[2 + c] + np.cross(w[2 + c], x - pos[2 + c])) @ e) for x in points) for c in (0, 1)]
    np.testing.assert_allclose(model.collider_friction.grad.numpy(), expected, rtol=1e-4)
    # d loss / d velocity = friction * e per point; world 0's slots are untouched
    g_v = control.collider_velocity.grad.numpy()
    np.testing.assert_allclose(g_v[2:], np.outer(16 * friction, e), rtol=1e-5)
    assert not g_v[:2].any() and not state.collider_position.grad.numpy()[:2].any()
    assert np.abs(state.collider_position.grad.numpy()[2:]).max() > 0
    assert np.abs(state.collider_rotation.grad.numpy()[3]).max() > 0
    assert np.abs(control.collider_angular_velocity.grad.numpy()[2:]).max() > 0
    # a replaced array gives a new struct
    state.collider_position = wp.array(fields["initial_collider_position"], dtype=wp.vec3, **grad)
    assert cache.pack(model, state, control) is not colliders
    assert pack_colliders(model, state, control).count == 2
