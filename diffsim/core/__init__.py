"""The core every solver shares: the Model/State/Control/Solver protocol, the Scene (a solver with
its frames and actuators), checkpointed rollouts, implicit steps differentiated by the implicit
function theorem, finite-difference gradient checks and device selection (the torch bridge is
``diffsim.core.torch``). Tasks and their gymnasium faces stand on the Scene one layer up, in
``diffsim.tasks``.
"""

from diffsim.core.device import init_warp, resolve_device
from diffsim.core.gradcheck import GradCheckResult, check_grad
from diffsim.core.implicit import ImplicitSolve, NewtonReport, NotConverged
from diffsim.core.protocol import ArrayBundle, BundleGroup, Control, Model, Solver, State
from diffsim.core.rollout import FinalLoss, FrameLoss, Rollout, RolloutStats
from diffsim.core.scene import Actuator, Scene

__all__ = [
    "Actuator", "ArrayBundle", "BundleGroup", "Control", "FinalLoss", "FrameLoss", "GradCheckResult",
    "ImplicitSolve", "Model", "NewtonReport", "NotConverged", "Rollout", "RolloutStats", "Scene", "Solver", "State",
    "check_grad", "init_warp", "resolve_device",
]
