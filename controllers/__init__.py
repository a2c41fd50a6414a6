"""Controllers that act through the simulators, imported as ``diffsim.controllers``, each a
resumable run with one output folder (``run``): open-loop trajectory optimisation
(``trajectory``), policies trained by backpropagation through the simulator (``bptt``) and by
Short-Horizon Actor-Critic (``shac``), CEM and CMA-ES on open-loop plans (``sampling``),
Stable-Baselines3 PPO and SAC on the SB3 adapter (``sb3``), transfer between task variants
(``transfer``), scoring of what a run saved (``evaluate``), and worlds sharded over Ray actors
(``distributed``, the ``distributed`` extra).
"""

from diffsim.controllers.trajectory import Bounds, OptimizationResult, optimize, optimize_task, score_actions

__all__ = ["Bounds", "OptimizationResult", "optimize", "optimize_task", "score_actions"]
