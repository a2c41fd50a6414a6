"""Small coupled scenes shared by the checks, tests and examples: material or a cable resting on a
sensor pad, and a parallel-jaw gripper of two sensor pads that squeezes and lifts an elastic block.

Each builder returns a :class:`~diffsim.core.Scene` with 1 ms frames (a tactile camera's rate) and
``substeps="auto"``; checks that need a particular step use ``scene.model`` and ``scene.solver``.
"""

from __future__ import annotations

import math

import numpy as np

from diffsim.core.scene import Scene
from diffsim.coupling.solver import CoupledModel, CoupledSolver
from diffsim.fem.model import FEMBuilder, FEMModel
from diffsim.geometry import collider_plane, tet_mesh_pad

PAD_SIZE = 0.02  #: width and depth of the sensor pads [m]
PAD_THICKNESS = 0.004  #: [m]
FRAME_DT = 1e-3  #: frame of the scenes below [s]


def add_sensor_pad(builder: FEMBuilder, *, position, rotation=(0.0, 0.0, 0.0, 1.0), resolution=(6, 6, 2),
                   young_modulus: float = 1e5, damping: float = 200.0, world: int = 0) -> int:
    """A 20 x 20 x 4 mm silicone pad bonded at its base (local z = 0), touching through its top."""
    pad = tet_mesh_pad((PAD_SIZE, PAD_SIZE, PAD_THICKNESS), resolution)
    return builder.add_body(pad, position=position, rotation=rotation, young_modulus=young_modulus,
                            poisson_ratio=0.45, density=1100.0, damping=damping,
                            fixed_nodes=pad.vertices[:, 2] == 0.0, world=world)


def _sensor_solver(fem: FEMModel, integrator: str):
    """The pads' solver; an implicit one steps inside the coupled step's staggered split (see
    :class:`~diffsim.coupling.CoupledSolver`)."""
    from diffsim.fem import FEMSolver

    return FEMSolver(fem, integrator=integrator)


def material_on_sensor(*, device: str | None = None, num_worlds: int = 1, requires_grad: bool = False,
                       integrator: str = "explicit") -> Scene:
    """A 12 mm rubber cube (MPM) dropped from 1 mm onto an upward-facing pad; ``integrator`` is
    the pad's FEM integrator."""
    from diffsim.materials import preset
    from diffsim.mpm import MPMBuilder, MPMSolver

    half = 0.006
    fem = FEMBuilder(num_worlds=num_worlds)
    for world in range(num_worlds):
        add_sensor_pad(fem, position=(0.0, 0.0, 0.0), world=world)
    mpm = MPMBuilder(grid_res=16, domain_size=0.06, domain_origin=(-0.03, -0.03, -0.01), num_worlds=num_worlds)
    mpm.add_box((0.0, 0.0, PAD_THICKNESS + half + 1e-3), (half, half, half), preset("rubber"))
    mpm_model = mpm.finalize(device, requires_grad=requires_grad)
    model = CoupledModel(fem.finalize(device, requires_grad=requires_grad), mpm_model, material_friction=0.5,
                         requires_grad=requires_grad)
    return Scene(model, CoupledSolver(model, fem=_sensor_solver(model.fem, integrator), mpm=MPMSolver(mpm_model)),
                 frame_dt=FRAME_DT)


def rod_on_sensor(*, device: str | None = None, requires_grad: bool = False, drop: float = 0.5e-3,
                  linear_damping: float = 5.0, integrator: str = "explicit") -> Scene:
    """A free 14 mm cable (radius 2 mm, 8 vertices) dropped from ``drop`` [m] onto an upward-facing
    pad, its motion damped at ``linear_damping`` [1/s] (mass-proportional)."""
    from diffsim.rod import RodBuilder, RodSolver

    fem = FEMBuilder()
    add_sensor_pad(fem, position=(0.0, 0.0, 0.0), resolution=(8, 8, 2))
    radius, count = 0.002, 8
    points = np.stack([np.linspace(-0.007, 0.007, count), np.zeros(count),
                       np.full(count, PAD_THICKNESS + radius + drop)], axis=1)
    rods = RodBuilder()
    rods.add_rod(points, mass_per_length=0.05, bend_stiffness=1e-4, twist_stiffness=1e-4, linear_damping=linear_damping,
                 contact_radius=radius)
    rod_model = rods.finalize(device, requires_grad=requires_grad)
    model = CoupledModel(fem.finalize(device, requires_grad=requires_grad), rod=rod_model, rod_friction=0.5,
                         requires_grad=requires_grad)
    return Scene(model, CoupledSolver(model, fem=_sensor_solver(model.fem, integrator), rod=RodSolver(rod_model)),
                 frame_dt=FRAME_DT)


def gripper(*, device: str | None = None, gap: float = 0.002,
            integrator: str = "explicit") -> tuple[Scene, tuple[int, int]]:
    """Two sensor pads face a 20 mm rubber cube (MPM) on the ground from either side, ``gap`` [m]
    away. Returns (scene, fingers), ``fingers`` the two body indices (left, right)."""
    from diffsim.materials import preset
    from diffsim.mpm import MPMBuilder, MPMSolver

    half, ground = 0.01, 0.004
    fem = FEMBuilder()
    turn = math.sqrt(0.5)
    # the pads' touching faces (local +z) turned to face the block: +x for the left, -x for the right
    left = add_sensor_pad(fem, position=(-half - PAD_THICKNESS - gap, 0.0, ground + half),
                          rotation=(0.0, turn, 0.0, turn))
    right = add_sensor_pad(fem, position=(half + PAD_THICKNESS + gap, 0.0, ground + half),
                           rotation=(0.0, -turn, 0.0, turn))
    mpm = MPMBuilder(grid_res=16, domain_size=0.08, domain_origin=(-0.04, -0.04, -0.012))
    mpm.add_collider(collider_plane(position=(0.0, 0.0, ground), friction=0.5))
    mpm.add_box((0.0, 0.0, ground + half), (half, half, half), preset("rubber"))
    mpm_model = mpm.finalize(device)
    model = CoupledModel(fem.finalize(device), mpm_model, material_friction=0.8)
    solver = CoupledSolver(model, fem=_sensor_solver(model.fem, integrator), mpm=MPMSolver(mpm_model))
    return Scene(model, solver, frame_dt=FRAME_DT), (left, right)


def sensor_support(fem: FEMModel, node_contact_force: np.ndarray, body: int = 0) -> float:
    """Upward force [N] that body ``body`` exerts on what rests on it (minus its contact force's z)."""
    return -float(node_contact_force[fem.body_nodes(body)][:, 2].astype(np.float64).sum())
