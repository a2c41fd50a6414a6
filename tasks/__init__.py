"""The task library: gymnasium environments on diffsim scenes, one file per family.

``task.py`` says what a task is (a Scene with variants, an observation, a loss per world, a score,
a horizon) and steps all worlds of one (``TaskBatch``); ``env.py`` gives every task its three
faces (``TaskEnv``, ``TaskVectorEnv``, ``DiffTaskEnv``) and the registry; ``common.py`` holds what
the MPM task files share. The family files (``plasticine``, ``fluid``, ``cable``, ``tactile``,
``locomotion``) only describe their scenes, actuators, observations and losses.

Importing this package registers every task with gymnasium, so that
``gymnasium.make("diffsim/Pinch-v0")`` and ``gymnasium.make_vec("diffsim/Pinch-v0", num_envs=16)``
build them. ``task_type(name)`` gives a task's class.
"""

from diffsim.tasks import cable, fluid, locomotion, plasticine, tactile  # noqa: F401  (registers their tasks)
from diffsim.tasks.env import TASKS, DiffTaskEnv, TaskEnv, TaskVectorEnv, register_task, task_type

__all__ = ["TASKS", "DiffTaskEnv", "TaskEnv", "TaskVectorEnv", "register_task", "task_type"]
