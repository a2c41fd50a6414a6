"""Differentiable 3-D MLS-MPM: multi-material particles, kinematic colliders, batched worlds.

Build a scene with :class:`MPMBuilder`, step it with :class:`MPMSolver`, differentiate it with
:class:`diffsim.core.Rollout`.
"""

from diffsim.mpm.model import (
    BOUNDARY_CELLS,
    Boundary,
    MPMBuilder,
    MPMControl,
    MPMModel,
    MPMState,
    controls_from_poses,
)
from diffsim.mpm.solver import MPMSolver

__all__ = [
    "BOUNDARY_CELLS", "Boundary", "MPMBuilder", "MPMControl", "MPMModel", "MPMSolver", "MPMState",
    "controls_from_poses",
]
