"""The ``diffsim`` command line: ``demo``, ``validate`` and ``bench`` subcommands.

Expected errors (diffsim.errors) print one line to stderr and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from diffsim.core.device import init_warp
from diffsim.errors import ConfigError, DiffsimError

#: Exit status of a run whose checks failed, and of a command that could not run at all.
EXIT_CHECKS_FAILED = 1
EXIT_USAGE = 2


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    # --device works before or after the subcommand; SUPPRESS keeps the subcommand's absent flag
    # from overwriting a global one.
    device_flag = argparse.ArgumentParser(add_help=False)
    device_flag.add_argument("--device", default=argparse.SUPPRESS,
                             help="Warp device: cpu, cuda or cuda:N (default: $DIFFSIM_DEVICE, else auto)")

    parser = argparse.ArgumentParser(prog="diffsim",
                                     description="Differentiable soft-matter simulation on Warp.")
    parser.add_argument("--device", default=None,
                        help="Warp device: cpu, cuda or cuda:N (default: $DIFFSIM_DEVICE, else auto)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{demo,validate,bench}")

    demo = commands.add_parser("demo", parents=[device_flag],
                               help="optimise a pusher trajectory through the MPM solver; "
                                    "write a GIF and plots")
    demo.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    demo.add_argument("--iterations", type=_positive_int, default=15, help="Adam iterations (default: 15)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the particle jitter (default: 0)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo.set_defaults(handler=_run_demo)

    validate = commands.add_parser("validate", help="physics and gradient checks against closed forms")
    validate_solvers = validate.add_subparsers(dest="solver", required=True, metavar="{mpm}")
    validate_mpm = validate_solvers.add_parser("mpm", parents=[device_flag], help="checks of the MPM solver")
    validate_mpm.add_argument("--json", action="store_true", help="print JSON instead of a table")
    validate_mpm.add_argument("--only", nargs="+", metavar="NAME", help="run only these checks")
    validate_mpm.add_argument("--no-gradients", action="store_true",
                              help="skip the finite-difference gradient checks")
    validate_mpm.set_defaults(handler=_run_validate_mpm)

    bench = commands.add_parser("bench", help="speed and memory figures")
    bench_solvers = bench.add_subparsers(dest="solver", required=True, metavar="{mpm}")
    bench_mpm = bench_solvers.add_parser("mpm", parents=[device_flag], help="time MPM steps")
    bench_mpm.add_argument("--particles", type=_positive_int, required=True, help="number of particles")
    bench_mpm.add_argument("--grid", type=_positive_int, required=True, help="grid cells per axis")
    bench_mpm.add_argument("--dt", type=_positive_float, default=1e-4, help="solver step [s] (default: 1e-4)")
    bench_mpm.add_argument("--substeps", type=_positive_int, default=19,
                           help="solver steps per frame (default: 19)")
    bench_mpm.add_argument("--frames", type=_positive_int, default=50, help="frames to time (default: 50)")
    bench_mpm.add_argument("--repeats", type=_positive_int, default=3,
                           help="timed runs after a warm-up; medians are reported (default: 3)")
    bench_mpm.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench_mpm.set_defaults(handler=_run_bench_mpm)
    return parser


# -- commands ----------------------------------------------------------------------------------

def _run_demo(args: argparse.Namespace, device: str) -> int:
    from diffsim.demo import run_demo

    run_demo(args.out, iterations=args.iterations, device=device, seed=args.seed,
             progress=not args.no_progress)
    return 0


def _run_validate_mpm(args: argparse.Namespace, device: str) -> int:
    from diffsim.core.validation import format_table, to_json
    from diffsim.mpm import validation

    physics_names = list(validation.PHYSICS_CHECKS)
    gradient_names = [] if args.no_gradients else list(validation.GRADIENT_CHECKS)
    physics_only, gradient_only = physics_names, gradient_names
    if args.only:
        known = physics_names + gradient_names
        unknown = [n for n in args.only if n not in known]
        if unknown:
            raise ConfigError(f"unknown check {', '.join(map(repr, unknown))}; "
                              f"valid names are: {', '.join(known)}.")
        physics_only = [n for n in args.only if n in physics_names]
        gradient_only = [n for n in args.only if n in gradient_names]

    results = []
    if physics_only:
        results += validation.run_physics_checks(device=device, only=physics_only)
    if gradient_only:
        results += validation.run_gradient_checks(device=device, only=gradient_only)
    print(to_json(results) if args.json else format_table(results))
    return 0 if all(r.passed for r in results) else EXIT_CHECKS_FAILED


def _run_bench_mpm(args: argparse.Namespace, device: str) -> int:
    from diffsim.mpm.benchmark import format_report, run_benchmark

    result = run_benchmark(particles=args.particles, grid_res=args.grid, dt=args.dt, substeps=args.substeps,
                           frames=args.frames, repeats=args.repeats, device=device)
    print(json.dumps(result, indent=2, default=str) if args.json else format_report(result))
    return 0


# -- entry point -------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``diffsim`` command; returns the exit status (0 ok, 1 checks failed, 2 error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Warp's banner and module-load lines must stay off stdout, which may carry JSON
    init_warp()
    try:
        from diffsim.core.device import resolve_device

        device = resolve_device(args.device)
        return args.handler(args, device)
    except DiffsimError as exc:
        # One line, whatever the message: scripts grep stderr, people read the first line.
        message = " ".join(str(exc).split())
        print(f"diffsim: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("diffsim: interrupted (a demo resumes from its checkpoint when run again)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
