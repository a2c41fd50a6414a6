"""Calibrate the tactile optics on the real GelSight images of a pressed ball and collect the metrics.

Runs ``diffsim calibrate optics`` in a fresh process (its own wall time): train on the even
images, score the odd ones, with the background image alone as the reference point. The images
are read from ``--data`` (default ``../shared/data/taxim/gelsight_ball_presses.npz``); nothing is
copied into the repository.

    python benchmarks/optics_gelsight.py --out benchmarks/results/optics_gelsight.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared/data/taxim/gelsight_ball_presses.npz")
    parser.add_argument("--work", type=Path, default=Path("outputs/optics_gelsight"), help="the fit's output folder")
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not args.data.exists():
        print(f"no images at {args.data}: pass --data with taxim/gelsight_ball_presses.npz", file=sys.stderr)
        return 2
    command = [sys.executable, "-m", "diffsim.cli", "calibrate", "optics", "--train", f"{args.data}@0::2",
               "--eval", f"{args.data}@1::2", "--out", str(args.work), "--iterations", str(args.iterations),
               "--no-progress", "--restart"]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - start
    metrics = json.loads((args.work / "metrics.json").read_text())
    params = json.loads((args.work / "params.json").read_text())
    result = {"command": " ".join(command[2:]), "wall_s": wall, "train": metrics["train"], "eval": metrics["eval"],
              "parameters": {k: v["value"] for k, v in params["parameters"].items()},
              "iterations": metrics["fit"]["iterations"], "best_iteration": metrics["fit"]["best_iteration"],
              "fit_seconds": metrics["fit"]["fit_seconds"],
              "loss_curve": [h["loss"] for h in metrics["fit"]["history"]]}
    print(json.dumps({k: v for k, v in result.items() if k != "loss_curve"}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
