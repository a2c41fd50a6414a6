"""diffsim: differentiable soft-matter simulation on NVIDIA Warp.

Solvers (MPM, rods, FEM) share one Model/State/Control/Solver protocol and one checkpointed
rollout mechanism for gradients over long horizons; see ``diffsim.core``.
"""

__version__ = "0.1.0"
