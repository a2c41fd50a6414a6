"""Ray scaling of a task's vector env: env steps per second with one actor and with two, each actor
held to one thread, against one process using every core.

Weak scaling keeps ``--worlds-per-actor`` worlds in each actor (two actors step twice the worlds);
strong scaling splits a fixed ``--worlds`` over the actors. Efficiency from one actor to two is
throughput(2) / (2 throughput(1)) for both. Each figure is the median of ``--repeats`` timings of
``--steps`` vector steps (random actions, after a warm-up episode).

    python benchmarks/ray_scaling.py [--task Push-v0] [--worlds-per-actor 8] [--worlds 16]

adds the run to ``benchmarks/results/ray_scaling_push_cpu.json`` (or ``--json``). Run it on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def throughput(env, steps: int, repeats: int) -> float:
    """Median env steps (worlds x vector steps) per second."""
    rng = np.random.default_rng(0)
    low, high = env.single_action_space.low, env.single_action_space.high
    env.reset(seed=0)
    actions = rng.uniform(low, high, (steps, env.num_envs, low.size)).astype(np.float32)
    for a in actions[: env.horizon]:  # warm-up: kernels loaded, buffers allocated
        env.step(a)
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        for a in actions:
            env.step(a)
        rates.append(env.num_envs * steps / (time.perf_counter() - started))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="Push-v0")
    parser.add_argument("--worlds-per-actor", type=int, default=8)
    parser.add_argument("--worlds", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=RESULTS / "ray_scaling_push_cpu.json")
    args = parser.parse_args()

    from diffsim.controllers.distributed import RayVectorEnv, connect
    from diffsim.controllers.run import write_json_atomic
    from diffsim.tasks.env import TaskVectorEnv, task_type

    connect("local", num_cpus=2)
    result = {"task": task_type(args.task).id, "steps": args.steps, "repeats": args.repeats, "cores": os.cpu_count()}
    for label, worlds_of in (("weak", lambda n: args.worlds_per_actor * n), ("strong", lambda n: args.worlds)):
        rates = {}
        for actors in (1, 2):
            env = RayVectorEnv(args.task, num_envs=worlds_of(actors), actors=actors, threads=1)
            rates[actors] = throughput(env, args.steps, args.repeats)
            env.close()
        result[label] = {"worlds": {n: worlds_of(n) for n in (1, 2)}, "env_steps_per_s": rates,
                         "efficiency": rates[2] / (2 * rates[1])}
        print(f"{label}: {rates[1]:.1f} -> {rates[2]:.1f} env steps/s, efficiency {result[label]['efficiency']:.2f}")
    local = TaskVectorEnv(task_type(args.task), num_envs=args.worlds)  # one process, every core
    result["one_process_all_cores_env_steps_per_s"] = throughput(local, args.steps, args.repeats)
    print(f"one process, {args.worlds} worlds, all cores: {result['one_process_all_cores_env_steps_per_s']:.1f}")
    runs = json.loads(args.json.read_text()).get("runs", []) if args.json.exists() else []
    runs = [r for r in runs if r.get("task") == result["task"]] + [result]  # each run kept, for medians
    write_json_atomic(args.json, {"task": result["task"], "runs": runs})


if __name__ == "__main__":
    main()
