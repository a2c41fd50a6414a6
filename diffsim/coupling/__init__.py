"""Contact between solvers: the FEM sensor surface in two-way contact with MPM material (forces on
grid nodes) and with rods (forces on edge vertices), stepped together as one coupled solver; and
MuJoCo robots driving the soft solvers (:mod:`diffsim.coupling.mujoco`).
"""

from diffsim.core.protocol import BundleGroup
from diffsim.coupling.solver import (
    CoupledControl,
    CoupledModel,
    CoupledSolver,
    CoupledState,
    CouplingModel,
)

__all__ = ["BundleGroup", "CoupledControl", "CoupledModel", "CoupledSolver", "CoupledState", "CouplingModel"]
