"""Two-way contact of the FEM sensor with MPM material and rods: grouped bundles, resting
equilibria, the parallel-jaw gripper, batching, and finite-difference gradients through contact."""

from __future__ import annotations

import numpy as np
import pytest

from diffsim.core.validation import simulate
from diffsim.coupling import CoupledModel, validation
from diffsim.coupling.scenes import material_on_sensor
from diffsim.errors import ConfigError


def test_grouped_bundles_name_clone_and_assign():
    scene = material_on_sensor(device="cpu")
    model, solver = scene.model, scene.solver
    state = model.state()
    names = [name for name, _ in state.arrays()]
    assert "fem.node_x" in names and "mpm.particle_x" in names
    assert state.array("mpm.particle_x") is state.mpm.particle_x
    copy = state.clone()
    assert copy.fem.node_x is not state.fem.node_x
    np.testing.assert_array_equal(copy.fem.node_x.numpy(), state.fem.node_x.numpy())
    moved = simulate(model, solver, state, 5, solver.max_stable_dt(model))
    copy.assign(moved)
    np.testing.assert_array_equal(copy.mpm.particle_x.numpy(), moved.mpm.particle_x.numpy())
    with pytest.raises(KeyError, match="no part 'rod'"):
        state.array("rod.vertex_x")


def test_coupled_models_need_the_same_worlds():
    one = material_on_sensor(device="cpu").model
    two = material_on_sensor(device="cpu", num_worlds=2).model
    with pytest.raises(ConfigError, match="same worlds"):
        CoupledModel(one.fem, two.mpm)


@pytest.mark.parametrize("check", list(validation.PHYSICS_CHECKS))
def test_coupled_physics(check):
    (result,) = validation.run_physics_checks(device="cpu", only=[check])
    assert result.passed, result


def test_batched_coupled_worlds_equal_single_world():
    finals = []
    for worlds in (1, 2):
        scene = material_on_sensor(device="cpu", num_worlds=worlds)
        model, solver = scene.model, scene.solver
        state = simulate(model, solver, model.state(), 1500, solver.max_stable_dt(model))
        x = state.mpm.particle_x.numpy()
        finals.append(x[: len(x) // worlds])
        if worlds == 2:  # both worlds are the same scene
            np.testing.assert_allclose(x[: len(x) // 2], x[len(x) // 2:], atol=1e-7)
    np.testing.assert_allclose(finals[0], finals[1], atol=1e-7)
    assert finals[0][:, 2].min() < 0.0056  # the cube (lowest particles 0.94 mm above its face) has landed ...
    assert finals[0][:, 2].min() > 0.0040  # ... on the pad (top at 4 mm), not through it


@pytest.mark.parametrize("name", list(validation.GRADIENT_CHECKS))
def test_gradients_through_two_way_contact(name):
    (result,) = validation.run_gradient_checks(device="cpu", only=[name])
    assert result.passed, result


def test_grouped_model_swaps_arrays_by_part():
    model = material_on_sensor(device="cpu").model
    import warp as wp

    stiffer = wp.clone(model.fem.tet_young_modulus)
    swapped = model.with_arrays({"fem.tet_young_modulus": stiffer})
    assert swapped.fem.tet_young_modulus is stiffer
    assert swapped.mpm is model.mpm and model.fem.tet_young_modulus is not stiffer
    assert isinstance(swapped, CoupledModel) and swapped.clone().coupling.material_friction is not None


def test_contact_over_a_pad_edge_is_smooth_in_the_controls():
    """A cube hanging over the edge of a two-layer pad, whose side faces take contact too: the
    cube's motion is a smooth function of the pad's velocity. (A flat face normal flipped by 90
    degrees where the nearest face changed from the top to a side face, and the penetration
    measured along it jumped: the centre of mass then scattered around its trend by 8% (x) and
    140% (z) of its change over the scan.)"""
    from diffsim.coupling import CoupledSolver
    from diffsim.coupling.scenes import PAD_THICKNESS, add_sensor_pad
    from diffsim.fem.model import FEMBuilder
    from diffsim.materials import preset
    from diffsim.mpm import MPMBuilder, MPMSolver

    fem = FEMBuilder()
    add_sensor_pad(fem, position=(0.0, 0.0, 0.0), resolution=(4, 4, 2))
    mpm = MPMBuilder(grid_res=16, domain_size=0.06, domain_origin=(-0.03, -0.03, -0.01))
    half = 0.004  # the 8 mm cube's centre 1.5 mm inside the pad's edge at x = 10 mm: 2.5 mm overhang
    mpm.add_box((0.0085, 0.0, PAD_THICKNESS + half), (half, half, half), preset("rubber"))
    mpm_model = mpm.finalize("cpu")
    model = CoupledModel(fem.finalize("cpu"), mpm_model, material_friction=0.5)
    solver = CoupledSolver(model, mpm=MPMSolver(mpm_model))
    dt = 1.5e-5
    mass = mpm_model.particle_mass.numpy().astype(np.float64)
    settled = simulate(model, solver, model.state(), int(0.008 / dt), dt)

    def centre_of_mass(sideways_speed):
        control = model.control()
        control.fem.body_velocity.assign(np.array([[sideways_speed, 0.0, 0.02]], dtype=np.float32))
        state = simulate(model, solver, settled, int(0.004 / dt), dt, control=control)
        return mass @ state.mpm.particle_x.numpy().astype(np.float64) / mass.sum()

    speeds = np.linspace(-2e-3, 2e-3, 13)  # m/s: the pad's end positions 1.3 um apart
    com = np.array([centre_of_mass(v) for v in speeds])
    for axis in (0, 2):
        trend = np.polyval(np.polyfit(speeds, com[:, axis], 2), speeds)
        scatter = np.abs(com[:, axis] - trend).max() / np.ptp(trend)
        assert scatter < 0.02, (axis, scatter)  # 0.1-0.2% with continuous contact normals
