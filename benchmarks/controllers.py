"""The controllers' results table: every method on every task, at stated budgets, filled cell by cell.

A cell is one (task, method, seed) run through the ``diffsim`` CLI in its own process, in its own
run folder under ``--runs`` (default ``outputs/controllers``); a cell whose folder holds a
finished summary is read, one with a checkpoint is resumed, so the table fills across sessions and
survives kills; several instances may fill different cells at once. After every cell the table
is re-read, updated and rewritten atomically to ``--json`` (default
``benchmarks/results/controllers_cpu.json``). ``--markdown`` prints the README table and
``--plot`` draws score against env steps and wall time per task family.

Budgets, in world-episodes (one episode of the task in one world):

- gradient methods (``optimize``, ``bptt``, ``shac``): 16 iterations x 4 worlds = 64;
- sampling (``cem``, ``cmaes``: 40 populations of 16) and RL (``ppo``, ``sac``: 40 iterations x
  16 worlds): 640, ten times as many, so that "a gradient method reaches the RL score with at
  most a tenth of its env steps" is read off one row.

Scores are the task's normalised score in [0, 1]: for policies (bptt, shac, ppo, sac) on four
held-out variants, for open-loop plans (optimize, cem, cmaes) on the variants they were made
for. ``TASK:setting`` rows run the task with the options of :data:`SETTINGS`: ``:blind`` zeroes
the tactile tasks' touch block (``tactile_observation=False``, the ablation), ``:6kPa`` gives
SoftWalker muscles that bang-bang actions cannot blow up.

    python benchmarks/controllers.py [--tasks Push-v0 ...] [--methods bptt ppo ...] [--seeds 0 1 2]
                                     [--markdown] [--plot]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).parent.parent

GRADIENT = {"iters": 16, "worlds": 4}
SAMPLED = {"iters": 40, "population": 16}
RL = {"iters": 40, "worlds": 16}
#: per method: the CLI arguments of one cell (the budgets above)
METHODS = {
    "optimize": ["optimize", "--iters", str(GRADIENT["iters"]), "--worlds", str(GRADIENT["worlds"])],
    "bptt": ["train", "--algo", "bptt", "--iters", str(GRADIENT["iters"]), "--worlds", str(GRADIENT["worlds"]),
             "--window", "25"],
    "shac": ["train", "--algo", "shac", "--iters", str(GRADIENT["iters"]), "--worlds", str(GRADIENT["worlds"])],
    "cem": ["train", "--algo", "cem", "--iters", str(SAMPLED["iters"]), "--population", str(SAMPLED["population"])],
    "cmaes": ["train", "--algo", "cmaes", "--iters", str(SAMPLED["iters"]), "--population",
              str(SAMPLED["population"])],
    "ppo": ["train", "--algo", "ppo", "--iters", str(RL["iters"]), "--worlds", str(RL["worlds"])],
    "sac": ["train", "--algo", "sac", "--iters", str(RL["iters"]), "--worlds", str(RL["worlds"])],
}
FAMILIES = {
    "plasticine": ["Push-v0", "Pinch-v0", "Move-v0", "RollingPin-v0", "Writer-v0"],
    "cable": ["CableShape-v0", "CableRoute-v0"],
    "fluid": ["Pour-v0", "GatherSand-v0"],
    "locomotion": ["SoftWalker-v0", "SoftWalker-v0:6kPa"],
    "tactile": ["TactileGrasp-v0", "SurfaceFollow-v0", "TactileGrasp-v0:blind", "SurfaceFollow-v0:blind"],
}
#: cheapest first, so a session's budget fills whole rows
ORDER = ["Push-v0", "CableShape-v0", "CableRoute-v0", "SoftWalker-v0", "SoftWalker-v0:6kPa",
         "SurfaceFollow-v0", "SurfaceFollow-v0:blind", "TactileGrasp-v0", "TactileGrasp-v0:blind",
         "Pinch-v0", "Move-v0", "RollingPin-v0", "Writer-v0", "GatherSand-v0", "Pour-v0"]
#: ``TASK:setting`` rows: the task with these options
SETTINGS = {
    "blind": ["tactile_observation=false"],  # the tactile ablation
    # SoftWalker's default muscles (12 kPa) diverge under bang-bang actions inside the bounds, which
    # PPO's exploration produces; at 6 kPa such actions ran 100 frames (README, known limitations)
    "6kPa": ["actuation_strength=6000"],
}
KEPT = ("initial_score", "final_score", "iterations", "env_steps", "wall_s", "time_split_s", "skipped_updates")


def cell_command(task: str, method: str, seed: int, folder: Path) -> list[str]:
    name, _, setting = task.partition(":")
    command = [sys.executable, "-m", "diffsim.cli", *METHODS[method][:1], name, *METHODS[method][1:],
               "--seed", str(seed), "--out", str(folder), "--no-progress"]
    for option in SETTINGS[setting] if setting else ():
        command += ["--option", option]
    if (folder / "checkpoint.pt").exists():
        command.append("--resume")
    return command


def run_cell(task: str, method: str, seed: int, runs: Path, log, *, collect: bool = False) -> dict | None:
    """The cell's result: read from a finished run, else run (or resume) it; with ``collect``,
    None for a cell not finished yet."""
    folder = runs / task.replace(":", "-") / method / f"seed{seed}"
    summary = folder / "summary.json"
    if summary.exists():
        return _kept(json.loads(summary.read_text()))
    if collect:
        return None
    started = time.perf_counter()
    result = subprocess.run(cell_command(task, method, seed, folder), capture_output=True, text=True, cwd=ROOT)
    log(f"{task} {method} seed {seed}: exit {result.returncode} after {time.perf_counter() - started:.0f} s")
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if "CUDA" not in line]
        return {"status": "failed", "error": lines[-1] if lines else f"exit {result.returncode}"}
    return _kept(json.loads(summary.read_text()))


def _kept(summary: dict) -> dict:
    return {"status": "done", **{k: summary[k] for k in KEPT if k in summary}}


def aggregate(cells: dict) -> dict:
    """Per task and method: mean and std of the final score over finished seeds, mean env steps and wall."""
    table = {}
    for task, methods in cells.items():
        for method, seeds in methods.items():
            done = [c for c in seeds.values() if c.get("status") == "done"]
            if not done:
                continue
            scores = [c["final_score"] for c in done]
            mean = sum(scores) / len(scores)
            table.setdefault(task, {})[method] = {
                "seeds": len(done), "score_mean": mean,
                "score_std": math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores)),
                "initial_score_mean": sum(c["initial_score"] for c in done) / len(done),
                "env_steps": sum(c["env_steps"] for c in done) / len(done),
                "wall_s": sum(c["wall_s"] for c in done) / len(done)}
    return table


def markdown(payload: dict) -> str:
    methods = list(METHODS)
    lines = ["| task | " + " | ".join(methods) + " |", "| --- |" + " --- |" * len(methods)]
    for task in ORDER:
        row = payload["table"].get(task, {})
        if not row and task not in payload["cells"]:
            continue
        cells = []
        for method in methods:
            c = row.get(method)
            failed = [v for v in payload["cells"].get(task, {}).get(method, {}).values() if v.get("status") == "failed"]
            if c is None:
                cells.append(f"failed ({len(failed)})" if failed else "")
            else:
                cells.append(f"{c['score_mean']:.3f} ± {c['score_std']:.3f} ({c['seeds']}; "
                             f"{c['env_steps'] / 1e3:.1f}k, {c['wall_s'] / 60:.0f} min)")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    families = [f for f, tasks in FAMILIES.items() if any(t in payload["table"] for t in tasks)]
    if not families:
        return
    fig, axes = plt.subplots(2, len(families), figsize=(4 * len(families), 7), squeeze=False)
    for column, family in enumerate(families):
        for row, (key, label) in enumerate((("env_steps", "env steps"), ("wall_s", "wall time [s]"))):
            ax = axes[row][column]
            for m, method in enumerate(METHODS):
                for t, task in enumerate(FAMILIES[family]):  # a marker per task, a colour per method
                    c = payload["table"].get(task, {}).get(method)
                    if c:
                        ax.errorbar([c[key]], [c["score_mean"]], yerr=[c["score_std"]], fmt="osD^v<>"[t % 7],
                                    color=f"C{m}", capsize=3, label=f"{method}, {task}")
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_xlabel(label)
            ax.set_ylabel("normalised score")
            ax.set_ylim(-0.05, 1.05)
            ax.set_title(family)
    for ax in axes[0]:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=ORDER, help="task ids (TASK:blind for the tactile ablation)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--runs", type=Path, default=ROOT / "outputs" / "controllers", help="run folders")
    parser.add_argument("--json", type=Path, default=RESULTS / "controllers_cpu.json")
    parser.add_argument("--markdown", action="store_true", help="print the README table and stop")
    parser.add_argument("--plot", action="store_true", help="draw the plots from --json and stop")
    parser.add_argument("--collect", action="store_true",
                        help="only gather the cells whose runs have finished; run nothing")
    args = parser.parse_args()
    from diffsim.controllers.run import write_json_atomic

    payload = json.loads(args.json.read_text()) if args.json.exists() else {"cells": {}}
    if args.markdown or args.plot:
        if args.markdown:
            print(markdown(payload))
        if args.plot:
            plot(payload, args.json.with_suffix(".png"))
        return
    payload["budgets"] = {"gradient": GRADIENT, "sampling": SAMPLED, "rl": RL, "bptt_window": 25, "shac_window": 32}
    payload["machine"] = f"{platform.machine()}, {platform.processor() or 'cpu'}, 2 cores"
    for seed in args.seeds:
        for task in args.tasks:
            for method in args.methods:
                cell = run_cell(task, method, seed, args.runs, lambda text: print(text, flush=True),
                                collect=args.collect)
                if cell is None:
                    continue
                # re-read before writing: another instance may be filling other cells of the table
                if args.json.exists():
                    payload["cells"] = json.loads(args.json.read_text()).get("cells", {})
                payload["cells"].setdefault(task, {}).setdefault(method, {})[str(seed)] = cell
                payload["table"] = aggregate(payload["cells"])
                write_json_atomic(args.json, payload)
    plot(payload, args.json.with_suffix(".png"))
    print(markdown(payload))


if __name__ == "__main__":
    main()
