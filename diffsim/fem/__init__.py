"""Tetrahedral FEM bodies and the tactile sensor built on them: the Model/State/Control of elastic
bodies bonded to moving backings, the explicit solver with penalty contact, and sensor outputs.
"""

from diffsim.fem.model import FEMBuilder, FEMControl, FEMMaterial, FEMModel, FEMState
from diffsim.fem.solver import FEMSolver
from diffsim.fem.tactile import PinholeCamera, TactileReading, TactileSensor

__all__ = [
    "FEMBuilder",
    "FEMControl",
    "FEMMaterial",
    "FEMModel",
    "FEMSolver",
    "FEMState",
    "PinholeCamera",
    "TactileReading",
    "TactileSensor",
]
