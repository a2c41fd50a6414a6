"""Calibrate a family on its real recordings and collect the metrics: ``rigid`` on the ContactNets
cube tosses, ``optics`` on the Taxim GelSight images; and ``mpm`` on synthetic recordings of known
materials (an elastic block dropped, a plasticine block slumping, a sand column collapsing: four
specimens each, tracked points with 0.5 mm noise), trained on three specimens and scored on the
fourth, with each recovered parameter's error against the truth; and ``tactile`` on synthetic
presses of a gel pad (marker fields and forces), likewise.

Each family runs ``diffsim calibrate FAMILY`` in a fresh process (its own wall time), training on
the even recordings and scoring the odd ones, next to reference points measured by the same code:
for ``rigid`` the cube frozen at its first frame and MuJoCo with the data set's own friction 0.18
and default contact (pyramidal and elliptic cones); for ``optics`` the background image alone (in
its metrics). The recordings are read from ``--data`` (default: the family's file under
``../shared/data``); nothing is copied into the repository.

    python benchmarks/calibration.py rigid --out benchmarks/results/rigid_cubes.json
    python benchmarks/calibration.py optics --out benchmarks/results/optics_gelsight.json
    python benchmarks/calibration.py mpm --out benchmarks/results/mpm_materials.json
    python benchmarks/calibration.py tactile --out benchmarks/results/tactile_mechanics.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared/data"
#: per family: the default recordings, the default iterations, the output folder
FAMILIES = {"rigid": (SHARED / "contactnets/cube_tosses.npz", 25, "outputs/rigid_cubes"),
            "optics": (SHARED / "taxim/gelsight_ball_presses.npz", 500, "outputs/optics_gelsight"),
            "mpm": (None, 12, "outputs/mpm_materials"),
            "tactile": (None, 15, "outputs/tactile_mechanics")}


def _fit_synthetic(family: str, data: Path, folder: Path, iterations: int, train: str, eval_: str) -> dict:
    command = [sys.executable, "-m", "diffsim.cli", "calibrate", family, "--train", f"{data}@{train}",
               "--eval", f"{data}@{eval_}", "--out", str(folder / "fit"), "--iterations", str(iterations),
               "--no-progress", "--restart"]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    metrics = json.loads((folder / "fit" / "metrics.json").read_text())
    return {"command": " ".join(command[2:]), "wall_s": time.perf_counter() - start, "train": metrics["train"],
            "eval": metrics["eval"], "iterations": metrics["fit"]["iterations"],
            "fit_seconds": metrics["fit"]["fit_seconds"], "evaluations": metrics["fit"]["evaluations"],
            "loss_curve": [h["loss"] for h in metrics["fit"]["history"]],
            "values_curve": [h["values"] for h in metrics["fit"]["history"]]}


def tactile_recovery(work: Path, iterations: int) -> dict:
    """Synthesize four presses (E 200 kPa, nu 0.45, friction 0.6; markers +-2 um, forces +-2 mN),
    fit three through the CLI from E 100 kPa, nu 0.3, friction 0.3, score the fourth."""
    from diffsim.calibrate.tactile import synthesize

    work.mkdir(parents=True, exist_ok=True)
    presses = synthesize(work / "presses.npz", presses=4, seed=0)
    result = {"truth": presses.truth, **_fit_synthetic("tactile", work / "presses.npz", work, iterations, "0:3", "3:4")}
    print("tactile", {k: v for k, v in result["train"].items() if k != "initial"}, flush=True)
    return result


def mpm_recovery(work: Path, iterations: int) -> dict:
    """Synthesize each experiment's recordings, fit them through the CLI, and compare."""
    from diffsim.calibrate.mpm import EXPERIMENTS, synthesize

    out = {}
    for experiment in EXPERIMENTS:
        folder = work / experiment
        folder.mkdir(parents=True, exist_ok=True)
        data = folder / "recordings.npz"
        recordings = synthesize(experiment, data, specimens=4, seed=0)
        out[experiment] = {"truth": recordings.truth, **_fit_synthetic("mpm", data, folder, iterations, "0:3", "3:4")}
        print(experiment, {k: v for k, v in out[experiment]["train"].items() if k != "initial"}, flush=True)
    # the same fits on recordings simulated at a quarter of the fit's time step: the bias of the
    # fit's own discretization, which a real material would also show
    for experiment in EXPERIMENTS:
        folder = work / f"{experiment}_quarter_dt"
        folder.mkdir(parents=True, exist_ok=True)
        data = folder / "recordings.npz"
        recordings = synthesize(experiment, data, specimens=4, seed=0, substep_factor=4)
        key = f"{experiment}_recorded_at_quarter_dt"
        out[key] = {"truth": recordings.truth, **_fit_synthetic("mpm", data, folder, iterations, "0:3", "3:4")}
        print(key, {k: v for k, v in out[key]["train"].items() if k != "initial"}, flush=True)
    return out


def rigid_references(path: Path, split: str) -> dict:
    """Position and angle errors of the reference models on the ``split`` tosses."""
    import mujoco

    from diffsim.calibrate import rigid

    tosses = rigid.load_tosses(f"{path}@{split}")
    values = {"friction": 0.18, "time_constant": 0.02, "damping_ratio": 1.0, "inertia_fraction": 1.0}
    frozen = [np.repeat(tosses.toss(k)[:1, :7], len(tosses.toss(k)), axis=0) for k in range(len(tosses))]
    out = {"frozen_at_first_frame": float(rigid.toss_errors(tosses, frozen)[0].mean())}
    for cone in ("elliptic", "pyramidal"):
        position, angle = rigid.toss_errors(tosses, rigid.simulate_tosses(tosses, values, cone=cone))
        out[f"mujoco_friction_0.18_{cone}"] = {"position_error_m": float(position.mean()),
                                              "angle_error_deg": float(angle.mean())}
    out["mujoco_version"] = mujoco.__version__
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=sorted(FAMILIES))
    parser.add_argument("--data", type=Path, default=None, help="the recordings (default: under ../shared/data)")
    parser.add_argument("--work", type=Path, default=None, help="the fit's output folder")
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    default_data, default_iterations, default_work = FAMILIES[args.family]
    data, work = args.data or default_data, args.work or Path(default_work)
    iterations = args.iterations or default_iterations
    if args.family in ("mpm", "tactile"):  # synthetic recordings of known parameters
        result = (mpm_recovery if args.family == "mpm" else tactile_recovery)(work, iterations)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        return 0
    if not data.exists():
        print(f"no recordings at {data}: pass --data", file=sys.stderr)
        return 2
    command = [sys.executable, "-m", "diffsim.cli", "calibrate", args.family, "--train", f"{data}@0::2",
               "--eval", f"{data}@1::2", "--out", str(work), "--iterations", str(iterations), "--no-progress",
               "--restart"]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - start
    metrics = json.loads((work / "metrics.json").read_text())
    params = json.loads((work / "params.json").read_text())
    result = {"command": " ".join(command[2:]), "wall_s": wall, "train": metrics["train"], "eval": metrics["eval"],
              "parameters": {k: v["value"] for k, v in params["parameters"].items()},
              "iterations": metrics["fit"]["iterations"], "best_iteration": metrics["fit"]["best_iteration"],
              "evaluations": metrics["fit"]["evaluations"], "fit_seconds": metrics["fit"]["fit_seconds"],
              "loss_curve": [h["loss"] for h in metrics["fit"]["history"]]}
    if args.family == "rigid":
        result["references_eval"] = rigid_references(data, "1::2")
    print(json.dumps({k: v for k, v in result.items() if k != "loss_curve"}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
