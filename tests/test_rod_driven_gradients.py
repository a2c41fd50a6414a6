"""A cable held at both ends lying on a rough floor, at the small steps of the cable tasks
(diffsim/CableShape-v0): it stays at rest when the grippers do; and held in the air, the tape
gradient of a short rollout with respect to the grippers' velocities agrees with central finite
differences.

The first failed (and made the task's gradients meaningless) while the rounded contact ramp
pushed a touching vertex a quarter of its width beyond the surface (a launch of width / (4 dt),
0.4 m/s at dt = 1.2e-4 s) and the rounded friction returned more slip than it was given: the
cable bounced and skidded chaotically, and the loss was rough at the scale of any
finite-difference step.
"""

import numpy as np
import pytest

from diffsim.core.rollout import Rollout
from diffsim.core.validation import rollout_gradient_check, simulate
from diffsim.rod import RodBuilder, RodSolver
from diffsim.rod.losses import VertexTargetLoss

RADIUS = 0.005


def _cable(n=7, height=RADIUS, sag=0.0):
    """The cable task's cable (25 mm edges, 50 g/m, E I = 2e-3 N m^2, bending damping), shorter,
    straight at ``height`` above the floor with both end pairs driven."""
    s = np.arange(n) * 0.025
    x = np.stack([s, np.zeros(n), height - sag * np.sin(np.pi * s / s[-1])], axis=1)
    builder = RodBuilder()
    builder.add_rod(x, mass_per_length=0.05, bend_stiffness=2e-3, twist_stiffness=2e-3, linear_damping=1.0,
                    bend_damping=1e-5, contact_radius=RADIUS, rest_curvature=np.zeros((n, 2)),
                    driven_vertices=(0, 1, n - 2, n - 1))
    builder.add_ground(friction=0.6)
    model = builder.finalize("cpu", requires_grad=True)
    return x, model, RodSolver(model)


def test_cable_on_the_floor_stays_at_rest_at_small_steps():
    x, model, solver = _cable()
    dt = solver.max_stable_dt(model)
    assert dt < 2e-4  # the regime where the old ramp launched touching vertices
    state = simulate(model, solver, model.state(), int(0.05 / dt), dt)
    assert np.abs(state.vertex_v.numpy()).max() < 1e-3
    assert np.abs(state.vertex_x.numpy()[:, 2] - RADIUS).max() < 1e-4


@pytest.mark.parametrize("frame", [0, 1])
def test_gripper_velocity_gradient_matches_finite_differences(frame):
    """Held slack in the air (a straight cable pulled beyond its length is an infeasible
    constraint, and one pushed together buckles: both make the loss rough at any finite-difference
    step)."""
    x, model, solver = _cable(height=0.2, sag=0.02)
    n = len(x)
    rng = np.random.default_rng(1)
    controls = []
    for _ in range(3):
        control = model.control(requires_grad=True)
        v = np.zeros((n, 3), np.float32)
        v[[0, 1]] = rng.uniform(-0.1, 0.1, 3)  # each gripper moves its two vertices together
        v[[n - 2, n - 1]] = rng.uniform(-0.1, 0.1, 3)
        control.vertex_velocity.assign(v)
        controls.append(control)
    targets = VertexTargetLoss(model)
    goal = x.copy()
    goal[:, 1] += 0.03 * np.sin(np.linspace(0.0, 3.0, n))
    targets.set_world(0, goal)
    state0 = model.state(requires_grad=True)
    rollout = Rollout(solver, model, state0, controls, frame_dt=1.0 / 30.0, substeps="auto",
                      final_loss=lambda m, s, loss: targets(m, s, loss))
    assert rollout.substeps > 200  # the cable task's step
    mask = np.zeros((n, 3), bool)
    mask[model.driven_vertices] = True
    result = rollout_gradient_check("gripper velocity", rollout, controls[frame].vertex_velocity,
                                    (model, state0, *controls), eps=1e-3, directions=2, mask=mask,
                                    tolerance=0.05)
    assert result.passed, result.details
