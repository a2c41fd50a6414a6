"""The core every solver shares: the Model/State/Control/Solver protocol, checkpointed rollouts,
finite-difference gradient checks and device selection (the torch bridge is ``diffsim.core.torch``).
"""

from diffsim.core.device import init_warp, resolve_device
from diffsim.core.gradcheck import GradCheckResult, check_grad
from diffsim.core.protocol import ArrayBundle, BundleGroup, Control, Model, Solver, State
from diffsim.core.rollout import FinalLoss, FrameLoss, Rollout, RolloutStats

__all__ = [
    "ArrayBundle", "BundleGroup", "Control", "FinalLoss", "FrameLoss", "GradCheckResult", "Model", "Rollout",
    "RolloutStats", "Solver", "State", "check_grad", "init_warp", "resolve_device",
]
