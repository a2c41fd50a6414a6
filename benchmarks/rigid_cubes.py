"""Calibrate the cube-table contact on the real ContactNets tosses and collect the metrics.

Runs ``diffsim calibrate rigid`` in a fresh process (its own wall time): train on the even tosses,
score the odd ones, next to reference points measured by the same code (the cube frozen at its
first frame; MuJoCo with the data set's own friction 0.18 and default contact, pyramidal and
elliptic cones). The recordings are read from ``--data`` (default
``../shared/data/contactnets/cube_tosses.npz``); nothing is copied into the repository.

    python benchmarks/rigid_cubes.py --out benchmarks/results/rigid_cubes.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def references(path: Path, split: str) -> dict:
    """Position and angle errors of the reference models on the ``split`` tosses."""
    import mujoco

    from diffsim.calibrate import rigid

    tosses = rigid.load_tosses(f"{path}@{split}")
    values = {"friction": 0.18, "time_constant": 0.02, "damping_ratio": 1.0, "inertia_fraction": 1.0}
    out = {}
    frozen = [np.repeat(tosses.toss(k)[:1, :7], len(tosses.toss(k)), axis=0) for k in range(len(tosses))]
    out["frozen_at_first_frame"] = float(rigid.toss_errors(tosses, frozen)[0].mean())
    for cone in ("elliptic", "pyramidal"):
        position, angle = rigid.toss_errors(tosses, rigid.simulate_tosses(tosses, values, cone=cone))
        out[f"mujoco_friction_0.18_{cone}"] = {"position_error_m": float(position.mean()),
                                              "angle_error_deg": float(angle.mean())}
    out["mujoco_version"] = mujoco.__version__
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared/data/contactnets/cube_tosses.npz")
    parser.add_argument("--work", type=Path, default=Path("outputs/rigid_cubes"), help="the fit's output folder")
    parser.add_argument("--iterations", type=int, default=25)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not args.data.exists():
        print(f"no tosses at {args.data}: pass --data with contactnets/cube_tosses.npz", file=sys.stderr)
        return 2
    command = [sys.executable, "-m", "diffsim.cli", "calibrate", "rigid", "--train", f"{args.data}@0::2",
               "--eval", f"{args.data}@1::2", "--out", str(args.work), "--iterations", str(args.iterations),
               "--no-progress"]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - start
    metrics = json.loads((args.work / "metrics.json").read_text())
    params = json.loads((args.work / "params.json").read_text())
    result = {
        "command": " ".join(command[2:]), "wall_s": wall, "machine": f"{platform.machine()}, {platform.processor()}",
        "train": {k: v for k, v in metrics["train"].items()}, "eval": {k: v for k, v in metrics["eval"].items()},
        "parameters": {k: v["value"] for k, v in params["parameters"].items()},
        "iterations": metrics["fit"]["iterations"], "best_iteration": metrics["fit"]["best_iteration"],
        "evaluations": metrics["fit"]["evaluations"], "fit_seconds": metrics["fit"]["fit_seconds"],
        "loss_curve_m": [h["loss"] for h in metrics["fit"]["history"]],
        "references_eval": references(args.data, "1::2"),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "loss_curve_m"}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
