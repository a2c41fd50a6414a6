"""MPM speed and memory at several particle counts, one process per configuration.

Each configuration runs ``diffsim bench mpm --json`` in a fresh process, so its peak resident
memory is its own; results are printed and written as one JSON document.

    python benchmarks/mpm.py --particles 1000 10000 100000 --out benchmarks/results/mpm_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--grid", type=int, default=64)
    parser.add_argument("--dt", type=float, default=1e-4)
    parser.add_argument("--substeps", type=int, default=19)
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    results = []
    for n in args.particles:
        command = [sys.executable, "-m", "diffsim.cli", "bench", "mpm", "--particles", str(n), "--grid", str(args.grid),
                   "--dt", str(args.dt), "--substeps", str(args.substeps), "--frames", str(args.frames),
                   "--repeats", str(args.repeats), "--json"]
        if args.device:
            command += ["--device", args.device]
        print("running:", " ".join(command[1:]), file=sys.stderr, flush=True)
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        result = json.loads(out)
        results.append(result)
        print(f"{n:>7d} particles: forward {result['forward_particle_substeps_per_s'] / 1e6:.3f} M/s, "
              f"forward+backward {result['forward_backward_particle_substeps_per_s'] / 1e6:.3f} M/s, "
              f"backward/forward {result['backward_forward_ratio']:.2f}, "
              f"peak RSS {result['peak_memory_bytes'] / 2**20:.0f} MiB", file=sys.stderr, flush=True)
    document = {"machine": platform.platform(), "processor": platform.processor(), "results": results}
    text = json.dumps(document, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
