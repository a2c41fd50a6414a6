"""Transfer against solving from scratch, on two task families: ``diffsim transfer`` for each pair
of variants below, one process and one run folder each (``--runs``, resumable), collected into
``benchmarks/results/transfer_cpu.json`` (keyed ``TASK A->B``, ``TASK A->B in N`` for N stages
other than two).

Push's targets are spread over +-6 cm (``target_jitter=0.06``): variants 1 and 3 lie 9 cm apart
on opposite sides of the block's path, 2 and 3 2 cm apart, 0 and 5 7 cm apart on the same side.
CableShape goes from a bend one way to a bend the other way (variant 5 turns +95 degrees,
variant 2 -71 degrees). A stage stops at ``score``; scratch may spend what the transfer may at
most (steps x iterations per stage).

    python benchmarks/transfer.py [--only Push-v0 ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).parent.parent

#: task, source seed, target seed, stages, iterations per stage, score a stage stops at, task options
PAIRS = [
    ("Push-v0", 1, 3, 2, 20, 0.9, ["target_jitter=0.06"]),  # targets on opposite sides of the block
    ("Push-v0", 2, 3, 2, 20, 0.7, ["target_jitter=0.06"]),  # neighbouring targets, 2 cm apart
    ("Push-v0", 0, 5, 2, 20, 0.7, ["target_jitter=0.06"]),  # same side, 7 cm apart
    ("Push-v0", 0, 5, 1, 20, 0.7, ["target_jitter=0.06"]),  # the same, warm-started directly
    ("Push-v0", 0, 5, 4, 20, 0.7, ["target_jitter=0.06"]),  # the same, along four stages
    ("Push-v0", 2, 3, 1, 20, 0.7, ["target_jitter=0.06"]),  # neighbouring targets, directly
    ("CableShape-v0", 5, 2, 2, 8, 0.5, []),  # a bend one way, then the other
]
#: Push pairs not chosen by their outcome: seeds 2k -> 2k + 1 (targets 2-11 cm apart), directly and
#: in two stages, for the spread of the ratio over variants
PAIRS += [("Push-v0", 2 * k, 2 * k + 1, steps, 20, 0.7, ["target_jitter=0.06"]) for k in range(6) for steps in (1, 2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", default=None, help="tasks to run (default: all pairs)")
    parser.add_argument("--runs", type=Path, default=ROOT / "outputs" / "transfer")
    parser.add_argument("--json", type=Path, default=RESULTS / "transfer_cpu.json")
    args = parser.parse_args()
    from diffsim.controllers.run import write_json_atomic

    results = json.loads(args.json.read_text()) if args.json.exists() else {}
    for task, source, target, steps, iterations, score, options in PAIRS:
        if args.only and task not in args.only:
            continue
        key = f"{task} {source}->{target}" + ("" if steps == 2 else f" in {steps}")
        folder = args.runs / task / (f"{source}-{target}" + ("" if steps == 2 else f"-s{steps}"))
        command = [sys.executable, "-m", "diffsim.cli", "transfer", task, "--from", str(source), "--to", str(target),
                   "--steps", str(steps), "--iters", str(iterations), "--score", str(score), "--out", str(folder),
                   "--no-progress", *[f"--option={o}" for o in options]]
        if (folder / "summary.json").exists():
            summary = json.loads((folder / "summary.json").read_text())
        else:
            if (folder / "checkpoint.pt").exists() or (folder / "log.csv").exists():
                command.append("--resume")
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                print(f"{key}: failed: {done.stderr.strip().splitlines()[-1]}", flush=True)
                continue
            summary = json.loads((folder / "summary.json").read_text())
        results[key] = {"options": options, **{k: summary[k] for k in (
            "steps", "score_threshold", "max_iterations", "source", "stages", "transfer", "scratch",
            "iteration_ratio", "wall_ratio")}}
        t, s = summary["transfer"], summary["scratch"]
        print(f"{key}: transfer {t['iterations']} it ({t['wall_s']:.0f} s, {t['score']:.3f}) vs scratch "
              f"{s['iterations']} it ({s['wall_s']:.0f} s, {s['score']:.3f}): ratio {summary['iteration_ratio']:.2f}",
              flush=True)
        write_json_atomic(args.json, results)


if __name__ == "__main__":
    main()
