"""Tet meshes, the FEM solver and the tactile sensor: meshes and their checks, physics against closed
forms, finite-difference gradients through contact, batching, sensor outputs, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import warp as wp

from diffsim.cli import main
from diffsim.errors import ConfigError, InvalidParameter, UnstableTimeStep
from diffsim.fem import validation
from diffsim.fem.model import FEMBuilder, FEMMaterial
from diffsim.fem.solver import FEMSolver
from diffsim.fem.tactile import TactileSensor
from diffsim.geometry import collider_sphere
from diffsim.geometry.tetmesh import TetMesh, load_tet_mesh, save_tet_mesh, tet_mesh_dome, tet_mesh_pad

# ------------------------------------------------------------------------------------- meshes


def test_pad_volume_and_outward_boundary():
    mesh = tet_mesh_pad((0.02, 0.03, 0.01), (4, 5, 3), grading=3.0)
    assert mesh.volumes().min() > 0
    assert mesh.volumes().sum() == pytest.approx(0.02 * 0.03 * 0.01, rel=1e-9)
    assert mesh.vertex_areas().sum() == pytest.approx(2 * (0.02 * 0.03 + 0.02 * 0.01 + 0.03 * 0.01), rel=1e-9)
    # divergence theorem: the outward normals of a closed surface integrate x to the volume
    p, f = mesh.vertices, mesh.boundary_faces()
    n = 0.5 * np.cross(p[f[:, 1]] - p[f[:, 0]], p[f[:, 2]] - p[f[:, 0]])
    centroid = p[f].mean(axis=1)
    assert np.sum(n[:, 0] * centroid[:, 0]) == pytest.approx(mesh.volumes().sum(), rel=1e-9)


def test_dome_is_valid_and_has_its_apex_height():
    mesh = tet_mesh_dome(0.01, 0.004, base_thickness=0.002, resolution=(10, 4))
    assert mesh.volumes().min() > 0
    assert mesh.vertices[:, 2].max() == pytest.approx(0.006, rel=1e-6)
    r = np.hypot(mesh.vertices[:, 0], mesh.vertices[:, 1])
    assert r.max() == pytest.approx(0.01, rel=1e-6)


def test_inverted_and_degenerate_tets_are_refused_by_index():
    mesh = tet_mesh_pad((1.0, 1.0, 1.0), (1, 1, 1))
    tets = mesh.tets.copy()
    tets[3] = tets[3][[1, 0, 2, 3]]
    with pytest.raises(ConfigError, match=r"tet 3 .* inverted"):
        TetMesh(mesh.vertices, tets)
    vertices = np.vstack([mesh.vertices, [[0.5, 0.5, 0.0]]])
    flat = np.vstack([mesh.tets, [[0, 2, 4, 8]]])  # four points in the plane z = 0
    with pytest.raises(ConfigError, match=r"tet 6 .* degenerate"):
        TetMesh(vertices, flat)


@pytest.mark.parametrize("suffix", [".vtk", ".msh"])
def test_meshio_round_trip(tmp_path, suffix):
    mesh = tet_mesh_pad((0.01, 0.01, 0.005), (2, 2, 1))
    path = tmp_path / f"pad{suffix}"
    save_tet_mesh(mesh, path)
    loaded = load_tet_mesh(path)
    np.testing.assert_allclose(loaded.vertices, mesh.vertices)
    np.testing.assert_array_equal(loaded.tets, mesh.tets)


def test_meshio_refuses_inverted_file_and_missing_tets(tmp_path):
    import meshio

    mesh = tet_mesh_pad((0.01, 0.01, 0.005), (1, 1, 1))
    bad = mesh.tets.copy()
    bad[2] = bad[2][[0, 2, 1, 3]]
    path = tmp_path / "bad.vtk"
    meshio.write(path, meshio.Mesh(mesh.vertices, [("tetra", bad)]))
    with pytest.raises(ConfigError, match="tet 2"):
        load_tet_mesh(path)
    meshio.write(tmp_path / "tri.vtk", meshio.Mesh(mesh.vertices, [("triangle", mesh.boundary_faces())]))
    with pytest.raises(ConfigError, match="no linear tetrahedra"):
        load_tet_mesh(tmp_path / "tri.vtk")


def test_bad_parameters_name_value_and_range():
    mesh = tet_mesh_pad((0.01, 0.01, 0.005), (1, 1, 1))
    builder = FEMBuilder()
    with pytest.raises(InvalidParameter, match=r"poisson_ratio = 0.5 .*\[0, 0.5\)"):
        builder.add_body(mesh, poisson_ratio=0.5)
    with pytest.raises(InvalidParameter, match="young_modulus"):
        builder.add_body(mesh, young_modulus=-1.0)
    with pytest.raises(InvalidParameter, match="resolution"):
        tet_mesh_pad((0.01, 0.01, 0.005), (0, 1, 1))
    builder.add_body(mesh)
    model = builder.finalize("cpu")
    solver = FEMSolver(model)
    with pytest.raises(UnstableTimeStep):
        solver.step(model, model.state(), model.state(), model.control(), 1.0)


# ------------------------------------------------------------------------------------- physics


@pytest.mark.parametrize("material", list(FEMMaterial))
def test_forces_are_minus_energy_gradient(material):
    mesh = tet_mesh_pad((0.02, 0.02, 0.01), (2, 2, 1))
    builder = FEMBuilder(gravity=(0.0, 0.0, 0.0))
    builder.add_body(mesh, material=material, young_modulus=1e5, poisson_ratio=0.3)
    model = builder.finalize("cpu")
    solver = FEMSolver(model)
    state = model.state()
    rng = np.random.default_rng(1)
    x = mesh.vertices @ (np.eye(3) + 0.15 * rng.standard_normal((3, 3))).T
    state.node_x.assign(x.astype(np.float32))
    force = solver.elastic_forces(model, state)
    h = 2e-5
    for node, axis in ((3, 0), (7, 2), (10, 1)):
        energies = []
        for sign in (1, -1):
            xp = x.copy()
            xp[node, axis] += sign * h
            state.node_x.assign(xp.astype(np.float32))
            energies.append(solver.elastic_energy(model, state)[0])
        fd = -(energies[0] - energies[1]) / (2 * h)
        assert force[node, axis] == pytest.approx(fd, rel=0.02, abs=2e-3 * np.abs(force).max())


def test_patch_test():
    result = validation.patch_test(device="cpu")
    assert result.passed, result


def test_resting_block_weight_equals_contact_force():
    result = validation.resting_equilibrium(device="cpu")
    assert result.passed, result


def test_steady_sliding_friction_ratio():
    result = validation.sliding_friction(device="cpu")
    assert result.passed, result


@pytest.mark.slow
def test_hertz_sphere_indentation():
    exponent, magnitude = validation.hertz_indentation(device="cpu")
    assert exponent.passed, exponent
    assert magnitude.passed, magnitude


@pytest.mark.parametrize("name", list(validation.GRADIENT_CHECKS))
def test_gradients_through_contact_match_finite_differences(name):
    (result,) = validation.run_gradient_checks(device="cpu", only=[name])
    assert result.passed, result


def _two_world_scene(num_worlds):
    mesh = tet_mesh_pad((0.012, 0.012, 0.003), (4, 4, 2))
    builder = FEMBuilder(num_worlds=num_worlds)
    for world in range(num_worlds):
        builder.add_body(mesh, position=(0.0, 0.0, 0.0), young_modulus=1e5, poisson_ratio=0.4, damping=100.0,
                         fixed_nodes=mesh.vertices[:, 2] < 1e-12, world=world)
    builder.add_collider(collider_sphere(0.004, position=(0.0, 0.0, 0.003 + 0.004 - 1e-4), friction=0.5))
    model = builder.finalize("cpu")
    if num_worlds == 2:  # world 1 presses off-centre
        pos = model.initial_collider_position.copy()
        pos[1, 0] += 1e-3
        model.initial_collider_position = pos
    return model


def test_collider_contact_spring_limits_the_step_only_when_there_are_colliders():
    mesh = tet_mesh_pad((0.02, 0.02, 0.004), (3, 3, 1))

    def limit(contact_stiffness, with_collider):
        builder = FEMBuilder()
        builder.add_body(mesh, young_modulus=1e5, contact_stiffness=contact_stiffness,
                         fixed_nodes=mesh.vertices[:, 2] == 0)
        if with_collider:
            builder.add_collider(collider_sphere(0.005, position=(0.0, 0.0, 0.01)))
        model = builder.finalize("cpu")
        return FEMSolver(model).max_stable_dt(model)

    elastic = limit(1e7, False)
    assert limit(1e13, False) == elastic  # the spring pushes against no collider
    assert limit(1e7, True) == elastic  # a soft spring does not set the step ...
    assert limit(1e13, True) < 0.2 * elastic  # ... a stiff one does, when it meets a collider


def test_batched_worlds_equal_single_runs():
    batched, single = _two_world_scene(2), _two_world_scene(1)
    pos = single.initial_collider_position.copy()
    pos[0, 0] += 1e-3
    single.initial_collider_position = pos
    results = []
    for model in (batched, single):
        solver = FEMSolver(model)
        dt = solver.max_stable_dt(model)
        control = model.control()
        control.collider_velocity.assign(np.tile([[0.01, 0.0, -0.02]], (model.num_worlds, 1)).astype(np.float32))
        state = validation.simulate(model, solver, model.state(), 200, dt, control=control)
        results.append(state.node_x.numpy()[model.body_nodes(model.num_bodies - 1)])
    np.testing.assert_allclose(results[0], results[1], atol=1e-9)


# ------------------------------------------------------------------------------------- sensor


def _pressed_sensor(frames=400):
    mesh = tet_mesh_pad((0.02, 0.02, 0.004), (20, 20, 2))
    builder = FEMBuilder(gravity=(0.0, 0.0, 0.0))
    builder.add_body(mesh, young_modulus=2e5, poisson_ratio=0.4, density=1000.0, damping=300.0,
                     fixed_nodes=mesh.vertices[:, 2] < 1e-12)
    builder.add_collider(collider_sphere(0.005, position=(0.002, 0.0, 0.004 + 0.005 - 0.4e-3), friction=0.5))
    model = builder.finalize("cpu")
    solver = FEMSolver(model)
    state = validation.simulate(model, solver, model.state(), frames, solver.max_stable_dt(model))
    return model, state, TactileSensor(model, 0, marker_grid=(5, 6), image_shape=(24, 32))


def test_sensor_outputs_are_consistent():
    model, state, sensor = _pressed_sensor()
    rest = sensor.read(model, model.state()).numpy()
    assert np.abs(rest["marker_displacement"]).max() < 1e-3  # pixels
    assert np.abs(rest["pressure"]).max() == 0.0
    np.testing.assert_allclose(rest["normal"][..., 2], 1.0, atol=1e-6)
    out = sensor.read(model, state).numpy()
    assert out["marker_uv"].shape == (1, 5, 6, 2) and out["rgb"].shape == (1, 24, 32, 3)
    for value in out.values():
        assert np.all(np.isfinite(value))
    # the pressure map integrates to the normal force on the sensor (the patch lies inside the map)
    cell = sensor.sensing_size[0] * sensor.sensing_size[1] / (24 * 32)
    assert out["pressure"].sum() * cell == pytest.approx(-out["force"][0, 2], rel=0.05)
    assert out["force"][0, 2] < 0  # pushed into the sensor
    # pressure peaks under the sphere (x = +2 mm: right of centre), markers move away from it
    row, col = np.unravel_index(np.argmax(out["pressure"][0]), (24, 32))
    assert col > 16
    assert np.abs(out["marker_displacement"]).max() > 0.05
    # shading differs from the flat grey only where the surface is tilted
    flat = rest["rgb"][0, 0, 0]
    assert np.abs(out["rgb"][0] - flat).max() > 0.01
    np.testing.assert_allclose(rest["rgb"][0], np.broadcast_to(flat, rest["rgb"][0].shape), atol=1e-6)


def _collider(kind, z):
    from diffsim.geometry import TriangleMesh, collider_box, collider_capsule, collider_cylinder, collider_mesh

    rot_x = (np.sqrt(0.5), 0.0, 0.0, np.sqrt(0.5))  # lay capsules and cylinders on their side
    return {
        "sphere": lambda: collider_sphere(0.004, position=(0, 0, z + 0.004)),
        "box": lambda: collider_box((0.003, 0.003, 0.003), position=(0, 0, z + 0.003)),
        "capsule": lambda: collider_capsule(0.003, 0.004, position=(0, 0, z + 0.003), rotation=rot_x),
        "cylinder": lambda: collider_cylinder(0.003, 0.004, position=(0, 0, z + 0.003), rotation=rot_x),
        "mesh": lambda: collider_mesh(TriangleMesh.icosphere(0.004, 2), position=(0, 0, z + 0.004)),
    }[kind]()


@pytest.mark.parametrize("kind", ["sphere", "box", "capsule", "cylinder", "mesh"])
def test_every_collider_shape_presses_the_sensor(kind):
    """Each rigid shape driven down into the pad by its Control: a finite push into the sensor."""
    mesh = tet_mesh_pad((0.02, 0.02, 0.004), (12, 12, 2))
    builder = FEMBuilder(gravity=(0.0, 0.0, 0.0))
    builder.add_body(mesh, young_modulus=1e5, poisson_ratio=0.4, damping=300.0, fixed_nodes=mesh.vertices[:, 2] == 0)
    builder.add_collider(_collider(kind, 0.004 + 1e-4))
    model = builder.finalize("cpu")
    solver = FEMSolver(model)
    dt = solver.max_stable_dt(model)
    control = model.control()
    control.collider_velocity.assign(np.array([[0.0, 0.0, -0.05]], dtype=np.float32))  # 0.4 mm deep at the end
    state = validation.simulate(model, solver, model.state(), int(0.01 / dt), dt, control=control)
    force = TactileSensor(model, 0, image_shape=(4, 4)).read(model, state).numpy()["force"][0]
    assert np.all(np.isfinite(force)) and force[2] < -1e-3


def test_projection_stays_finite_on_the_optical_axis():
    model, state, sensor = _pressed_sensor(frames=50)
    reading = sensor.read(model, state).numpy()
    centre = reading["marker_uv"][0, 2, 3]  # a marker near x = y = 0
    assert np.all(np.isfinite(centre))


# ------------------------------------------------------------------------------------- commands


def test_validate_tactile_command(capsys):
    code = main(["validate", "tactile", "--only", "patch", "equilibrium", "--json", "--device", "cpu"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["passed"]
    assert [c["name"] for c in out["checks"]][0].startswith("equilibrium")


def test_bench_tactile_command(capsys):
    code = main(["bench", "tactile", "--steps", "5", "--repeats", "1", "--json", "--device", "cpu"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    for key in ("substep_ms_forward", "substep_ms_forward_backward", "nodes", "tets"):
        assert out[key] > 0


def test_warp_kernels_do_not_keep_stale_gradients():
    """Two backward passes of the same taped steps give the same gradient (scratch is reset)."""
    scene, sensor, state0, controls = validation.indentation_scene(frames=2)
    model, solver, frame_dt = scene.model, scene.solver, scene.frame_dt
    from diffsim.core.rollout import Rollout

    def loss_fn(m, s, loss):
        reading = sensor.read(m, s)
        weights = wp.array(np.ones((9, 3), dtype=np.float32), dtype=wp.vec3, device=m.device)
        wp.launch(validation.weighted_vec3, dim=9, inputs=[reading.marker_position, weights], outputs=[loss],
                  device=m.device)

    rollout = Rollout(solver, model, state0, controls, frame_dt=frame_dt, substeps="auto", final_loss=loss_fn)
    grads = []
    for _ in range(2):
        model.zero_grad()
        rollout.forward()
        rollout.backward()
        grads.append(model.tet_young_modulus.grad.numpy().copy())
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-6)
