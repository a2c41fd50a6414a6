"""The headless renderer: depth order, where particles, colliders, rods and FEM surfaces land in the
image, insets, GIF/MP4 files, and clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest

from diffsim.errors import ConfigError, InvalidParameter
from diffsim.geometry import (
    TriangleMesh,
    collider_box,
    collider_capsule,
    collider_cylinder,
    collider_mesh,
    collider_plane,
    collider_sphere,
)
from diffsim.materials import preset
from diffsim.mpm import MPMBuilder
from diffsim.render import Camera, Renderer, SceneRenderer, render_state, write_video

RED, BLUE, GREEN = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, 1.0, 0.0)


def _front_camera(width=96, height=96):
    # looks along +y from y = -1: image right is +x, image up is +z
    return Camera(eye=(0.0, -1.0, 0.0), target=(0.0, 0.0, 0.0), width=width, height=height, fov_deg=40.0)


def _pixel(camera, point):
    u, v, _ = camera.project(np.asarray(point, float)[None])[0]
    return int(v), int(u)  # (row, column)


def _background(camera):
    r = Renderer(camera, threads=1)
    return r.image()


def _changed(image, background, tol=12):
    return np.any(np.abs(image.astype(int) - background.astype(int)) > tol, axis=2)


@pytest.mark.parametrize("threads", [1, 2])
def test_near_sphere_occludes_far_sphere_in_either_draw_order(threads):
    cam = _front_camera()
    near, far = np.array([[0.0, 0.0, 0.0]]), np.array([[0.0, 0.6, 0.0]])
    images = []
    for order in ((near, RED), (far, BLUE)), ((far, BLUE), (near, RED)):
        r = Renderer(cam, threads=threads)
        for points, color in order:
            r.splat_particles(points, color, 0.12 if color == RED else 0.4)
        images.append(r.image())
    np.testing.assert_array_equal(images[0], images[1])
    img = images[0]
    centre = img[_pixel(cam, near[0])]
    assert centre[0] > 150 and centre[2] < 30  # red in front
    # outside the near sphere's disc (radius 0.12 m) but inside the far one's: blue
    ring = img[_pixel(cam, (0.17, 0.0, 0.0))]
    assert ring[2] > 100 and ring[0] < 30
    # the impostor is shaded: its lower rim, turned away from the key light above, is darker
    rim = img[_pixel(cam, (0.0, 0.0, -0.115))]
    assert rim[0] < centre[0]


def test_triangles_and_splats_share_one_depth_buffer():
    cam = _front_camera()
    square = np.array([[-0.2, 0.0, -0.2], [0.2, 0.0, -0.2], [0.2, 0.0, 0.2], [-0.2, 0.0, 0.2]])
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    for y_square, expect in ((-0.3, GREEN), (0.3, RED)):  # square in front of / behind the sphere
        r = Renderer(cam, threads=1)
        r.draw_triangles(square + [0.0, y_square, 0.0], faces, GREEN)
        r.splat_particles(np.zeros((1, 3)), RED, 0.1)
        pixel = r.image()[_pixel(cam, (0.0, 0.0, 0.0))]
        assert np.argmax(pixel) == int(np.argmax(expect))
        r.close()
    depth = Renderer(cam, threads=1)
    depth.draw_triangles(square, faces, GREEN)
    assert depth.depth()[_pixel(cam, (0.0, 0.0, 0.0))] == pytest.approx(1.0, rel=1e-4)


def _block_model(*, colliders=(), worlds=1):
    builder = MPMBuilder(grid_res=16, domain_size=0.32, num_worlds=worlds)
    for c in colliders:
        builder.add_collider(c)
    builder.add_box((0.16, 0.16, 0.16), (0.03, 0.02, 0.02), preset("plasticine"), spacing=0.005)
    return builder.finalize("cpu")


def test_particle_block_lands_in_its_projected_box():
    model = _block_model()
    cam = Camera(eye=(0.16, 0.0, 0.22), target=(0.16, 0.16, 0.16), width=128, height=96)
    img = render_state(model, model.state(), camera=cam, ground=None)
    hit = _changed(img, _background(cam))
    uv = cam.project(model.initial_x)
    radius_px = 0.6 * 0.005 * cam.focal_length / uv[:, 2].min() + 1.5
    rows, cols = np.nonzero(hit)
    assert hit.sum() > 500
    assert cols.min() >= uv[:, 0].min() - radius_px and cols.max() <= uv[:, 0].max() + radius_px
    assert rows.min() >= uv[:, 1].min() - radius_px and rows.max() <= uv[:, 1].max() + radius_px
    # the block is drawn solid: most pixels of the projected box's centre third are covered
    (u0, u1), (v0, v1) = np.percentile(uv[:, 0], [33, 66]), np.percentile(uv[:, 1], [33, 66])
    assert hit[int(v0):int(v1), int(u0):int(u1)].mean() > 0.95
    colour = img[hit].mean(axis=0)
    assert colour[0] > colour[1] > colour[2]  # plasticine orange


def test_only_the_chosen_world_is_drawn():
    model = _block_model(worlds=2)
    state = model.state()
    x = state.particle_x.numpy()
    x[model.particle_world.numpy() == 1] += np.array([0.06, 0.0, 0.0], np.float32)  # world 1 to the right
    state.particle_x.assign(x)
    cam = Camera(eye=(0.19, -0.4, 0.16), target=(0.19, 0.16, 0.16), width=128, height=64)
    left, right = _pixel(cam, (0.13, 0.14, 0.16)), _pixel(cam, (0.25, 0.14, 0.16))
    background = _background(cam)
    for world, drawn, empty in ((0, left, right), (1, right, left)):
        hit = _changed(render_state(model, state, camera=cam, world=world, ground=None), background)
        assert hit[drawn] and not hit[empty]


def test_colliders_follow_their_poses_in_the_state():
    shapes = [collider_box(half_extents=(0.02, 0.02, 0.02), position=(0.06, 0.16, 0.16)),
              collider_sphere(radius=0.02, position=(0.11, 0.16, 0.16)),
              collider_capsule(radius=0.012, half_height=0.01, position=(0.21, 0.16, 0.16)),
              collider_cylinder(radius=0.015, half_height=0.015, position=(0.26, 0.16, 0.16)),
              collider_mesh(TriangleMesh.icosphere(0.015, 1), position=(0.16, 0.16, 0.22))]
    model = _block_model(colliders=shapes)
    state = model.state()
    cam = Camera(eye=(0.16, -0.45, 0.18), target=(0.16, 0.16, 0.17), width=160, height=96)
    background = _background(cam)
    scene = SceneRenderer(model, camera=cam, ground=None, threads=1)
    hit = _changed(scene.render(state), background)
    for c in shapes:
        assert hit[_pixel(cam, c.position)], f"{c.shape.name} collider not drawn"
    # move the box up by 6 cm through the State: its old place empties, its new place fills
    pos = state.collider_position.numpy()
    pos[0] += np.array([0.0, 0.0, 0.06], np.float32)
    state.collider_position.assign(pos)
    moved = _changed(scene.render(state), background)
    assert not moved[_pixel(cam, shapes[0].position)]
    assert moved[_pixel(cam, np.add(shapes[0].position, (0.0, 0.0, 0.06)))]


def test_plane_collider_is_a_checkered_ground():
    model = _block_model(colliders=[collider_plane(position=(0.0, 0.0, 0.1))])
    cam = Camera(eye=(0.16, -0.2, 0.3), target=(0.16, 0.16, 0.1), width=96, height=96)
    img = render_state(model, model.state(), camera=cam)
    ground_rows = img[80:, :, :].reshape(-1, 3).astype(int)
    # two grey tile shades, neither of them the sky
    grey = ground_rows[np.abs(ground_rows[:, 0] - ground_rows[:, 2]) < 20]
    assert len(grey) > 0.5 * len(ground_rows)
    assert np.ptp(grey[:, 0]) > 15


def test_rod_is_drawn_as_a_tube():
    from diffsim.rod import RodBuilder

    builder = RodBuilder()
    points = np.stack([np.linspace(-0.1, 0.1, 12), np.zeros(12), np.full(12, 0.05)], axis=1)
    builder.add_rod(points, contact_radius=0.006)
    model = builder.finalize("cpu")
    cam = Camera(eye=(0.0, -0.5, 0.05), target=(0.0, 0.0, 0.05), width=128, height=64)
    img = render_state(model, model.state(), camera=cam, ground=None)
    hit = _changed(img, _background(cam))
    for x in np.linspace(-0.095, 0.095, 9):  # along the whole rod, joints included
        pixel = img[_pixel(cam, (x, 0.0, 0.05))]
        assert pixel[0] > 1.5 * pixel[1] and pixel[0] > 1.5 * pixel[2]
    rows = np.nonzero(hit.any(axis=1))[0]
    tube_px = 2 * 0.006 * cam.focal_length / 0.5
    assert abs(len(rows) - tube_px) <= 3  # as thick as the tube's diameter


def test_coupled_scene_draws_fem_pad_particles_and_tactile_inset():
    from diffsim.coupling.scenes import material_on_sensor
    from diffsim.render.scene import FEM_COLOR

    model = material_on_sensor().model
    state = model.state()
    cam = Camera(eye=(0.0, -0.06, 0.03), target=(0.0, 0.0, 0.004), width=128, height=96)
    tactile = np.zeros((8, 12, 3))
    tactile[:, :6] = (1.0, 1.0, 0.0)  # left half yellow, right half black
    scene = SceneRenderer(model, camera=cam, threads=1)
    img = scene.render(state, inset=tactile, inset_scale=0.25)
    pad = img[_pixel(cam, (0.0, -0.0095, 0.002))].astype(float)  # the pad's front face
    assert np.corrcoef(pad, FEM_COLOR)[0, 1] > 0.9
    block = img[_pixel(cam, (0.0, 0.0, 0.011))]
    assert block[1] > block[0] and block[1] > block[2]  # rubber green
    # the inset: 32 px wide, 2 px border, in the top-right corner
    x_margin, width = 2 + 2, 32
    top = 2 + 2
    left_half = img[top + 2, 128 - x_margin - width + 4]
    right_half = img[top + 2, 128 - x_margin - 4]
    np.testing.assert_array_equal(left_half, (255, 255, 0))
    np.testing.assert_array_equal(right_half, (0, 0, 0))


def test_gif_and_mp4_round_trip_frame_count(tmp_path):
    import imageio.v3 as iio

    frames = [np.full((32, 48, 3), 20 * k, np.uint8) for k in range(7)]
    gif = write_video(frames, tmp_path / "out" / "episode.gif", fps=20)
    read = iio.imread(gif, index=None)
    assert read.shape[:3] == (7, 32, 48)
    assert iio.immeta(gif, index=0)["duration"] == pytest.approx(50, abs=1)  # ms per frame
    write_video(frames[:3], gif)  # replaced whole
    assert iio.imread(gif, index=None).shape[0] == 3
    pytest.importorskip("imageio_ffmpeg")
    import imageio.v2 as imageio

    mp4 = write_video([np.pad(f, ((0, 1), (0, 1), (0, 0))) for f in frames], tmp_path / "episode.mp4", fps=10)
    reader = imageio.get_reader(mp4, format="FFMPEG")
    count = sum(1 for _ in reader)
    size = reader.get_meta_data()["size"]
    reader.close()
    assert count == 7 and size == (50, 34)  # odd sizes padded to even
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["episode.gif", "episode.mp4", "out"]


def test_bad_input_raises_clear_errors(tmp_path):
    r = Renderer(_front_camera(32, 32), threads=1)
    with pytest.raises(InvalidParameter, match=r"points = .*shape \(5, 2\).*\(N, 3\)"):
        r.splat_particles(np.zeros((5, 2)), RED, 0.01)
    with pytest.raises(InvalidParameter, match="radius"):
        r.splat_particles(np.zeros((5, 3)), RED, -1.0)
    with pytest.raises(InvalidParameter, match="faces"):
        r.draw_triangles(np.zeros((3, 3)), np.array([[0, 1, 3]]))
    with pytest.raises(InvalidParameter, match="corner"):
        r.inset(np.zeros((4, 4, 3)), corner="middle")
    with pytest.raises(InvalidParameter, match=r"\.gif or \.mp4"):
        write_video([np.zeros((4, 4, 3), np.uint8)], tmp_path / "episode.avi")
    with pytest.raises(InvalidParameter, match="frames"):
        write_video([], tmp_path / "episode.gif")
    with pytest.raises(InvalidParameter, match="fov_deg"):
        Camera(eye=(0, -1, 0), target=(0, 0, 0), fov_deg=0.0)
    with pytest.raises(InvalidParameter, match="up"):
        Camera(eye=(0, 0, 1), target=(0, 0, 0))
    model = _block_model()
    with pytest.raises(InvalidParameter, match=r"world = 3 .*\[0, 0\]"):
        render_state(model, model.state(), world=3)
    with pytest.raises(ConfigError, match="cannot draw a str"):
        render_state("not a model", None)


def test_looking_at_box_sees_every_corner():
    lo, hi = np.array([0.1, 0.2, 0.0]), np.array([0.4, 0.3, 0.05])
    cam = Camera.looking_at_box(lo, hi, width=200, height=100, margin=1.05)
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    uvz = cam.project(corners)
    assert np.all(uvz[:, 2] > 0)
    assert np.all((uvz[:, 0] >= 0) & (uvz[:, 0] <= 200) & (uvz[:, 1] >= 0) & (uvz[:, 1] <= 100))
    # and fits tightly: the box centre is the image centre, the outermost corner is 1 / margin
    # (margin 1.05) of the way from there to the border
    reach = np.max(np.maximum(np.abs(uvz[:, 0] - 100) / 100, np.abs(uvz[:, 1] - 50) / 50))
    assert reach == pytest.approx(1 / 1.05, rel=1e-3)


def test_bench_render_reports_frames_per_second():
    from diffsim.render.benchmark import bench_render

    result = bench_render(particles=300, width=48, height=32, frames=2, repeats=1, threads=1)
    assert result["frames_per_second"] > 0 and result["particles"] == 300


def test_two_pass_depth_test_of_cuda_gives_the_same_picture():
    # CUDA draws by atomic_min depth then colour-at-depth; run that path on the CPU and compare
    model = _block_model(colliders=[collider_plane(position=(0.0, 0.0, 0.1)),
                                    collider_sphere(radius=0.02, position=(0.12, 0.16, 0.16))])
    images = []
    for two_pass in (False, True):
        scene = SceneRenderer(model, width=64, height=48, threads=1)
        scene.renderer._two_pass = two_pass
        images.append(scene.render(model.state()))
    assert np.mean(np.any(images[0] != images[1], axis=2)) < 0.002  # only exact depth ties may differ
