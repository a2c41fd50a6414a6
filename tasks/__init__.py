"""The task library: gymnasium environments on diffsim scenes, one file per family.

Importing this package registers every task with gymnasium, so that
``gymnasium.make("diffsim/Pinch-v0")`` and ``gymnasium.make_vec("diffsim/Pinch-v0", num_envs=16)``
build them. ``diffsim.core.env.task_type(name)`` gives a task's class.
"""

from diffsim.tasks import cable, fluid, locomotion, plasticine, tactile  # noqa: F401  (registers their tasks)

from diffsim.core.env import TASKS, DiffTaskEnv, TaskEnv, TaskVectorEnv, task_type

__all__ = ["TASKS", "DiffTaskEnv", "TaskEnv", "TaskVectorEnv", "task_type"]
