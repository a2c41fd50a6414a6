"""Discrete elastic rods (cables, ropes, wires): Bishop-framed bending and twisting, quasi-static
twist, inextensibility by projection, driven ends and contact, many rods per launch.
"""

from diffsim.rod.model import (
    RodBuilder,
    RodControl,
    RodModel,
    RodState,
    controls_from_driven_positions,
    material_curvature,
    spatial_frames,
)
from diffsim.rod.solver import RodSolver

__all__ = [
    "RodBuilder",
    "RodControl",
    "RodModel",
    "RodSolver",
    "RodState",
    "controls_from_driven_positions",
    "material_curvature",
    "spatial_frames",
]
