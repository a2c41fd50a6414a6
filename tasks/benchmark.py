"""What a user of the task layer pays: env steps per second at 1 and 16 worlds, one differentiable
step (forward + backward), and the env layer's overhead over the bare solver on the same scene.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from diffsim.tasks.env import TASKS, DiffTaskEnv, TaskVectorEnv, task_type


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _counts(model) -> dict:
    parts = getattr(model, "parts", {"": model})
    counts = {}
    for part in parts.values():
        worlds = max(1, int(getattr(part, "num_worlds", 1)))
        for attr, key in (("particle_count", "particles"), ("vertex_count", "rod_vertices"),
                          ("tet_count", "tets")):
            value = getattr(part, attr, None)
            if value is not None:
                counts[key + "_per_world"] = int(value) // worlds
    return counts


def _actions(env: TaskVectorEnv, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(0.5 * env.action_space.low, 0.5 * env.action_space.high).astype(np.float32)


def _env_and_bare(task_id: str, num_envs: int, steps: int, repeats: int, options: dict,
                  device) -> tuple[float, float, dict]:
    """Seconds per env step and per bare solver frame of the same scene, measured alternately."""
    env = TaskVectorEnv(task_type(task_id), num_envs=num_envs, device=device, **options)
    env.reset(seed=0)
    actions = _actions(env)
    scene = env.task.scene
    control = env.batch.control
    substeps = scene.substeps_for(env.batch.state, control)
    dt = scene.frame_dt / substeps
    a, b = scene.state(), scene.state()

    def env_steps():
        for _ in range(steps):
            env.step(actions)

    def bare_steps():
        nonlocal a, b
        for _ in range(steps * substeps):
            scene.solver.step(scene.model, a, b, control, dt)
            a, b = b, a

    env_steps(), bare_steps()  # warm-up: kernels compile, buffers grow
    env_times, bare_times = [], []
    for _ in range(repeats):  # alternate, so both see the same machine load
        env_times.append(_median_time(env_steps, 1) / steps)
        bare_times.append(_median_time(bare_steps, 1) / steps)
    info = {"substeps": substeps, **_counts(scene.model)}
    return statistics.median(env_times), statistics.median(bare_times), info


def _diff_step_ms(task_id: str, repeats: int, options: dict, device) -> float:
    denv = DiffTaskEnv(task_type(task_id), num_envs=1, device=device, **options)
    low, high = denv.action_low, denv.action_high

    def one():
        denv.reset(seed=0)
        action = (0.25 * (low + high) + 0.1 * (high - low)).reshape(1, -1).requires_grad_(True)
        _, reward, *_ = denv.step(action)
        reward.sum().backward()

    one()
    return 1e3 * _median_time(one, repeats)


def run_benchmark(task_ids: list[str] | None = None, *, steps: int = 3, repeats: int = 3, tiny: bool = False,
                  worlds: int = 16, device: str | None = None, progress=None) -> dict:
    """Figures per task id: ``steps_per_s_1``, ``steps_per_s_16`` (all worlds counted),
    ``diff_step_ms`` (one differentiable step, forward + backward, one world), ``overhead``
    (vector-env step time / bare solver time of the same scene, minus 1, at ``worlds`` worlds),
    ``overhead_1`` (the same at one world), and particle/vertex/tet counts per world."""
    import diffsim.tasks  # noqa: F401  (registers the tasks)

    results = {}
    for task_id in task_ids or sorted(TASKS):
        task_id = task_type(task_id).id
        options = dict(TASKS[task_id].tiny) if tiny else {}
        if progress:
            progress(f"{task_id} ...")
        env_1, bare_1, info = _env_and_bare(task_id, 1, steps, repeats, options, device)
        env_n, bare_n, _ = _env_and_bare(task_id, worlds, steps, repeats, options, device)
        results[task_id] = {
            "steps_per_s_1": 1.0 / env_1,
            f"steps_per_s_{worlds}": worlds / env_n,
            "diff_step_ms": _diff_step_ms(task_id, repeats, options, device),
            "overhead": env_n / bare_n - 1.0,
            "overhead_1": env_1 / bare_1 - 1.0,
            "env_step_s_1": env_1,
            "bare_frame_s_1": bare_1,
            f"env_step_s_{worlds}": env_n,
            f"bare_frame_s_{worlds}": bare_n,
            "options": options,
            "device": str(device or "default"),
            **info,
        }
    return results


def format_report(results: dict) -> str:
    header = f"{'task':26s} {'steps/s @1':>11s} {'steps/s @16':>12s} {'diff ms':>9s} {'overhead':>9s}  counts"
    lines = [header, "-" * len(header)]
    for task_id, r in results.items():
        counts = ", ".join(f"{k.removesuffix('_per_world')} {v}" for k, v in r.items() if k.endswith("_per_world"))
        lines.append(f"{task_id:26s} {r['steps_per_s_1']:11.2f} {r.get('steps_per_s_16', float('nan')):12.2f} "
                     f"{r['diff_step_ms']:9.1f} {r['overhead']:9.1%}  {counts}, substeps {r['substeps']}")
    return "\n".join(lines)
