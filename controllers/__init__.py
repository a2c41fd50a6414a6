"""Controllers that act through the simulators, imported as ``diffsim.controllers``: gradient-based
trajectory optimisation (``trajectory``), policies trained by backpropagation through the simulator
(``bptt``), the run folder both write (``run``) and the Stable-Baselines3 adapter (``sb3``).
"""

from diffsim.controllers.trajectory import Bounds, OptimizationResult, optimize, optimize_task, score_actions

__all__ = ["Bounds", "OptimizationResult", "optimize", "optimize_task", "score_actions"]
