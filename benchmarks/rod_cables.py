"""Calibrate the rod model on the real DEFORM cable recordings (DLO1-DLO3) and collect the metrics.

Each cable runs ``diffsim calibrate rod`` in a fresh process (its own wall time); the per-cable
metrics and timings are printed as a table and written as one JSON document. The recordings are
read from ``--data`` (default ``../shared/data/deform``); nothing is copied into the repository.

    python benchmarks/rod_cables.py --out benchmarks/results/rod_cables.json
    python benchmarks/rod_cables.py --initial-velocity recorded --out benchmarks/results/rod_cables_two_frames.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/deform")
    parser.add_argument("--cables", nargs="+", default=["DLO1", "DLO2", "DLO3"])
    parser.add_argument("--work", type=Path, default=Path("outputs/rod_cables"), help="per-cable output folders")
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--initial-velocity", choices=("ends", "recorded"), default="ends",
                        help="'ends': the data set's one-frame protocol; 'recorded': DEFORM's two-frame start")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not args.data.is_dir():
        print(f"no recordings at {args.data}: pass --data with the folder of DLO*_train.npz / DLO*_eval.npz",
              file=sys.stderr)
        return 2
    rows = []
    for cable in args.cables:
        out = args.work / cable
        command = [sys.executable, "-m", "diffsim.cli", "calibrate", "rod",
                   "--train", str(args.data / f"{cable}_train.npz"), "--eval", str(args.data / f"{cable}_eval.npz"),
                   "--out", str(out), "--restart", "--no-progress", "--initial-velocity", args.initial_velocity]
        if args.iterations is not None:
            command += ["--iterations", str(args.iterations)]
        if args.device:
            command += ["--device", args.device]
        start = time.perf_counter()
        subprocess.run(command, check=True)
        seconds = time.perf_counter() - start
        metrics = json.loads((out / "metrics.json").read_text())
        params = json.loads((out / "params.json").read_text())
        rows.append({"cable": cable, "wall_seconds": seconds, "train": metrics["train"], "eval": metrics["eval"],
                     "params": {k: v for k, v in params.items() if not isinstance(v, list)}})
        print(f"{cable}: eval l1_all {metrics['eval']['l1_all']:.4f} m, interior_mean_m "
              f"{metrics['eval']['interior_mean_m']:.4f} m, {seconds:.0f} s", flush=True)
    document = {"machine": platform.platform(), "processor": platform.processor(),
                "initial_velocity": args.initial_velocity, "cables": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
