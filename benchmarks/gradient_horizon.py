"""How the gradient of a task's loss with respect to its actions grows with the horizon.

For each task and horizon H (1, 2, 4, ... up to the task's horizon or ``--max-horizon``), and each of
``--seeds`` variants: play H env steps with random actions (uniform over the middle half of each
actuator's range, fixed per seed), take the task loss at step H and its gradient with respect to
all H actions through the simulator. Reported per horizon: the median gradient norm over seeds
and the spread of the gradient across seeds (the norm of the per-seed gradients' standard
deviation over the norm of their mean; near 0 they agree, above 1 the seeds disagree more than the
mean says anything). Growth that is exponential in H is the chaotic-contact explosion of Metz et
al. ("Gradients are not all you need"); the methods' windows and clipping are sized by it.

    python benchmarks/gradient_horizon.py [--tasks ID ...] [--seeds 3] [--max-horizon 32]

writes ``benchmarks/results/gradient_horizon.json`` and ``gradient_horizon.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"


def gradient_at_horizon(env, horizon: int, seed: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    low, high = env.action_low.float(), env.action_high.float()
    middle, half = 0.5 * (low + high), 0.5 * (high - low)
    u = (torch.rand(horizon, env.num_envs, env.action_dim, generator=generator) - 0.5) * 1.0
    actions = (middle + half * u).requires_grad_(True)
    observation = env.reset(seed=seed)
    loss = None
    for step in range(horizon):
        observation, _, _, _, info = env.step(actions[step])
        loss = info["loss"].sum()
    loss.backward()
    return actions.grad.double().numpy().ravel()


def measure(task_id: str, seeds: int, max_horizon: int) -> dict:
    from diffsim.tasks import DiffTaskEnv, task_type

    kind = task_type(task_id)
    env = DiffTaskEnv(kind, num_envs=1)
    horizons = [h for h in (2**k for k in range(12)) if h <= min(max_horizon, env.task.horizon)]
    rows = []
    for horizon in horizons:
        start = time.perf_counter()
        grads = np.stack([gradient_at_horizon(env, horizon, 1000 + s) for s in range(seeds)])
        norms = np.linalg.norm(grads, axis=1)
        finite = np.all(np.isfinite(grads), axis=1)
        mean = grads[finite].mean(axis=0) if finite.any() else np.full(grads.shape[1], np.nan)
        spread = (float(np.linalg.norm(grads[finite].std(axis=0)) / max(np.linalg.norm(mean), 1e-300))
                  if finite.sum() > 1 else math.nan)
        rows.append({"horizon": horizon, "median_norm": float(np.median(norms)), "norms": norms.tolist(),
                     "finite_seeds": int(finite.sum()), "seed_spread": spread,
                     "seconds": time.perf_counter() - start})
        print(f"  {task_id} H={horizon:3d}: median |g| {rows[-1]['median_norm']:.3g}, spread {spread:.3g}")
    return {"task": kind.id, "seeds": seeds, "rows": rows}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = plt.cm.tab20(np.linspace(0, 1, max(len(results), 1)))
    for k, result in enumerate(results):
        h = [r["horizon"] for r in result["rows"]]
        style = {"color": colours[k], "marker": "osD^v"[k % 5], "linestyle": "-" if k % 2 == 0 else "--"}
        left.plot(h, [r["median_norm"] for r in result["rows"]], label=result["task"].split("/")[-1], **style)
        right.plot(h, [r["seed_spread"] for r in result["rows"]], **style)
    for axis, title in ((left, "median |d loss / d actions|"), (right, "spread across seeds (std / |mean|)")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("horizon [env steps]")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from diffsim.tasks import TASKS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=sorted(TASKS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-horizon", type=int, default=32)
    parser.add_argument("--replot", action="store_true", help="only redraw the plot from the saved JSON")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    if args.replot:
        plot(json.loads((RESULTS / "gradient_horizon.json").read_text()), RESULTS / "gradient_horizon.png")
        return
    results = []
    for task_id in args.tasks:
        results.append(measure(task_id, args.seeds, args.max_horizon))
        (RESULTS / "gradient_horizon.json").write_text(json.dumps(results, indent=2) + "\n")  # saved as it goes
    plot(results, RESULTS / "gradient_horizon.png")


if __name__ == "__main__":
    main()
