"""Where the Hertz force error of linear tets goes with mesh size: the tactile validation's Hertz
check (rigid sphere R = 5 mm into a 16 x 16 x 8 mm bonded pad, depths 0.05-0.3 mm) at several
resolutions, each depth one quasi-static equilibrium solve.

    python benchmarks/hertz_convergence.py --resolutions 12 16 20 24 28 32 \\
        --out benchmarks/results/hertz_convergence.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> int:
    from diffsim.fem.validation import hertz_indentation

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[12, 16, 20, 24, 28, 32])
    parser.add_argument("--integrator", default="quasistatic", choices=("quasistatic", "implicit", "explicit"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for resolution in args.resolutions:
        start = time.perf_counter()
        exponent, magnitude = hertz_indentation(resolution=resolution, integrator=args.integrator)
        d = magnitude.details
        ratio = np.array(d["forces_N"]) / (np.array(d["hertz_N"]) * np.array(d["layer_factor"]))
        rows.append({"resolution": resolution, "tets": d["tets"], "exponent": exponent.measured,
                     "force_ratio_mean": float(ratio.mean()), "force_ratio_per_depth": ratio.tolist(),
                     "depths_m": d["depths_m"], "seconds": time.perf_counter() - start})
        r = rows[-1]
        print(f"resolution {resolution:3d}  tets {r['tets']:7d}  exponent {r['exponent']:.3f}  "
              f"F / F_expected {r['force_ratio_mean']:.4f} (shallowest {ratio[0]:.4f}, deepest {ratio[-1]:.4f})  "
              f"{r['seconds']:.0f} s", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"integrator": args.integrator, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
