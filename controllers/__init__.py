"""Controllers that act through the simulators: gradient-based trajectory optimisers (and, later,
torch policies, sampling baselines and RL adapters), imported as ``diffsim.controllers``.
"""

from diffsim.controllers.trajectory import Bounds, OptimizationResult, optimize, optimize_task, score_actions

__all__ = ["Bounds", "OptimizationResult", "optimize", "optimize_task", "score_actions"]
