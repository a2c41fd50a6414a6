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
    model, solver = material_on_sensor(device="cpu")
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
    one, _ = material_on_sensor(device="cpu")
    two, _ = material_on_sensor(device="cpu", num_worlds=2)
    with pytest.raises(ConfigError, match="same worlds"):
        CoupledModel(one.fem, two.mpm)


@pytest.mark.parametrize("check", list(validation.PHYSICS_CHECKS))
def test_coupled_physics(check):
    (result,) = validation.run_physics_checks(device="cpu", only=[check])
    assert result.passed, result


def test_batched_coupled_worlds_equal_single_world():
    finals = []
    for worlds in (1, 2):
        model, solver = material_on_sensor(device="cpu", num_worlds=worlds)
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
    model, _ = material_on_sensor(device="cpu")
    import warp as wp

    stiffer = wp.clone(model.fem.tet_young_modulus)
    swapped = model.with_arrays({"fem.tet_young_modulus": stiffer})
    assert swapped.fem.tet_young_modulus is stiffer
    assert swapped.mpm is model.mpm and model.fem.tet_young_modulus is not stiffer
    assert isinstance(swapped, CoupledModel) and swapped.clone().coupling.material_friction is not None
