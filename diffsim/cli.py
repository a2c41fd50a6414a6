"""The ``diffsim`` command line: ``demo``, ``validate``, ``bench`` and ``calibrate`` subcommands.

Expected errors (diffsim.errors) print one line to stderr and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from diffsim.core.device import init_warp
from diffsim.errors import ConfigError, DiffsimError, InvalidParameter

#: Exit status of a run whose checks failed, and of a command that could not run at all.
EXIT_CHECKS_FAILED = 1
EXIT_USAGE = 2


def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer of at least ``minimum``, described as ``what`` in errors."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


#: ``diffsim train --algo`` choices
TRAIN_ALGORITHMS = ("bptt", "shac", "cem", "cmaes", "ppo", "sac")


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
    commands = parser.add_subparsers(dest="command", required=True,
                                     metavar="{demo,validate,bench,calibrate,optimize,train,evaluate}")

    # the options of a task's scene, shared by the commands that run a task
    task_flags = argparse.ArgumentParser(add_help=False)
    task_flags.add_argument("--tiny", action="store_true", help="the task's tiny test scene")
    task_flags.add_argument("--option", type=_option, action="append", metavar="NAME=VALUE",
                            help="a task option, e.g. horizon=30 or tactile_observation=false (repeatable)")
    demo = commands.add_parser("demo", parents=[device_flag],
                               help="optimise a pusher trajectory through the MPM solver; "
                                    "write a GIF and plots")
    demo.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    demo.add_argument("--iterations", type=_positive_int, default=15, help="Adam iterations (default: 15)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the particle jitter (default: 0)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo.set_defaults(handler=_run_demo)

    validate = commands.add_parser("validate", help="physics and gradient checks against closed forms")
    validate_solvers = validate.add_subparsers(dest="solver", required=True, metavar="{mpm,rod,tactile,coupling}")
    for solver, about in (("mpm", "checks of the MPM solver"), ("rod", "checks of the discrete elastic rod solver"),
                          ("tactile", "checks of the FEM tactile sensor"),
                          ("coupling", "checks of two-way contact between the sensor, MPM material and cables")):
        sub = validate_solvers.add_parser(solver, parents=[device_flag], help=about)
        sub.add_argument("--json", action="store_true", help="print JSON instead of a table")
        sub.add_argument("--only", nargs="+", metavar="NAME", help="run only these checks")
        sub.add_argument("--no-gradients", action="store_true", help="skip the finite-difference gradient checks")
        if solver == "tactile":
            sub.add_argument("--integrator", choices=("explicit", "implicit", "quasistatic"), default="explicit",
                             help="FEM integrator the checks step with (default: explicit)")
        if solver == "coupling":
            sub.add_argument("--integrator", choices=("explicit", "implicit"), default="explicit",
                             help="FEM integrator of the sensor pads (default: explicit)")
        sub.set_defaults(handler=_run_validate)

    bench = commands.add_parser("bench", help="speed and memory figures")
    bench_solvers = bench.add_subparsers(dest="solver", required=True, metavar="{mpm,rod,tactile,tasks}")
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
    bench_rod = bench_solvers.add_parser("rod", parents=[device_flag],
                                         help="time cable replays at batch 1 and batch N, forward and backward")
    bench_rod.add_argument("--frames", type=_positive_int, default=100, help="100 Hz frames to time (default: 100)")
    bench_rod.add_argument("--batch", type=_positive_int, default=56, help="rods in the batched run (default: 56)")
    bench_rod.add_argument("--markers", type=_positive_int, default=13, help="markers per cable (default: 13)")
    bench_rod.add_argument("--repeats", type=_positive_int, default=5,
                           help="timed runs after a warm-up; medians are reported (default: 5)")
    bench_rod.add_argument("--json", action="store_true", help="print JSON instead of a report")
    bench_rod.set_defaults(handler=_run_bench_rod)
    bench_tactile = bench_solvers.add_parser("tactile", parents=[device_flag],
                                             help="time FEM sensor substeps with contact, forward and backward")
    bench_tactile.add_argument("--steps", type=_positive_int, default=None,
                               help="steps per run (default: 200 explicit; implicit integrators: 0.2 simulated s)")
    bench_tactile.add_argument("--integrator", choices=("explicit", "implicit", "quasistatic"), default="explicit",
                               help="FEM integrator (default: explicit; implicit steps 1 ms, quasi-static 10 ms)")
    bench_tactile.add_argument("--frame-dt", type=_positive_float, default=None,
                               help="step of the implicit integrators [s]")
    bench_tactile.add_argument("--preconditioner", choices=("auto", "cholesky", "jacobi"), default="auto",
                               help="CG preconditioner of the implicit integrators (default: auto, Cholesky here)")
    bench_tactile.add_argument("--duration", type=_positive_float, default=0.2,
                               help="simulated seconds per run of the implicit integrators, up to 1.2: the sphere "
                                    "presses for the first 0.2 s while sliding, then slides at depth (default: 0.2)")
    bench_tactile.add_argument("--repeats", type=_positive_int, default=5,
                               help="timed runs after a warm-up; medians are reported (default: 5)")
    bench_tactile.add_argument("--json", action="store_true", help="print JSON instead of a report")
    bench_tactile.set_defaults(handler=_run_bench_tactile)
    bench_tasks = bench_solvers.add_parser("tasks", parents=[device_flag],
                                           help="env steps/s at 1 and 16 worlds, differentiable step, env overhead")
    bench_tasks.add_argument("--tasks", nargs="+", metavar="ID", help="task ids (default: every registered task)")
    bench_tasks.add_argument("--steps", type=_positive_int, default=3, help="env steps per timed run (default: 3)")
    bench_tasks.add_argument("--repeats", type=_positive_int, default=3,
                             help="timed runs after a warm-up; medians are reported (default: 3)")
    bench_tasks.add_argument("--tiny", action="store_true", help="the tasks' tiny test scenes instead of the defaults")
    bench_tasks.add_argument("--json", action="store_true", help="print JSON keyed by task id instead of a table")
    bench_tasks.set_defaults(handler=_run_bench_tasks)

    calibrate = commands.add_parser("calibrate", help="fit physical parameters to real recordings")
    calibrate_targets = calibrate.add_subparsers(dest="target", required=True, metavar="{rod,rigid,optics,mpm,tactile}")
    calibrate_rod = calibrate_targets.add_parser(
        "rod", parents=[device_flag], help="fit a cable's rod parameters to motion-capture recordings")
    calibrate_rod.add_argument("--train", required=True,
                               help="train recordings: a .npz file, or a folder of DEFORM pickles")
    calibrate_rod.add_argument("--eval", required=True, dest="eval_path", help="held-out recordings (same formats)")
    calibrate_rod.add_argument("--out", required=True, help="output folder")
    calibrate_rod.add_argument("--iterations", type=_positive_int, default=None,
                               help="Adam iterations, all on --train-frames (default: 20 on 150 frames, "
                                    "then 25 on all frames)")
    calibrate_rod.add_argument("--train-frames", type=_positive_int, default=None,
                               help="frames of each train recording the fit rolls out (default: all)")
    calibrate_rod.add_argument("--subdivisions", type=_positive_int, default=1, help="rod edges per marker gap")
    calibrate_rod.add_argument(
        "--initial-velocity", choices=("ends", "recorded"), default="ends",
        help="how each rollout's interior starts moving. 'ends' (default; the data set's protocol, only "
             "frame 0 of the interior is read): the grippers' velocities blended along the cable. "
             "'recorded' (the two-frame start of DEFORM's own evaluation): every marker's velocity "
             "over the first frame; frame 1 is then read, and scoring starts at frame 2")
    calibrate_rod.add_argument("--restart", action="store_true", help="ignore a saved fit state in --out")
    calibrate_rod.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    calibrate_rod.set_defaults(handler=_run_calibrate_rod)
    for target, summary, what, default_iterations in (
            ("rigid", "fit a tossed cube's contact (friction, softness, damping) and inertia in MuJoCo to tosses",
             "tosses: a .npz (contactnets/cube_tosses.npz format)", 25),
            ("optics", "fit a tactile sensor's three-light shading to real images of a pressed ball",
             "images: a .npz (taxim/gelsight_ball_presses.npz format)", 500),
            ("mpm", "fit an MPM material's Young's modulus, yield stress or friction angle to tracked points",
             "specimens: a .npz (format in diffsim.calibrate.mpm)", 12),
            ("tactile", "fit a tactile elastomer's Young's modulus, Poisson ratio and friction to presses",
             "presses: a .npz (format in diffsim.calibrate.tactile)", 15)):
        simulated = target in ("mpm", "tactile")  # Warp families: a device, and Levenberg-Marquardt by default
        family = calibrate_targets.add_parser(target, help=summary, parents=[device_flag] if simulated else [])
        family.add_argument("--train", required=True,
                            help=f"train {what}, optionally with a slice after '@', e.g. FILE.npz@0::2")
        family.add_argument("--eval", required=True, dest="eval_path", help="held-out recordings (same form)")
        family.add_argument("--out", required=True, help="output folder")
        family.add_argument("--iterations", type=_positive_int, default=default_iterations,
                            help=f"Adam iterations on all parameters (default: {default_iterations})")
        family.add_argument("--method", choices=("adam", "lm"), default="lm" if simulated else "adam",
                            help="Adam on the gradients, or Levenberg-Marquardt on the residuals "
                                 f"(default: {'lm' if simulated else 'adam'})")
        family.add_argument("--learning-rate", type=_positive_float, default=0.05,
                            help="Adam's step in the fitted coordinates (default: 0.05)")
        family.add_argument("--decay-to", type=_positive_float, default=1.0,
                            help="Adam's learning rate falls geometrically to this fraction by the last iteration "
                                 "(default: 1, constant)")
        if target == "rigid":
            family.add_argument("--substeps", type=_positive_int, default=10,
                                help="MuJoCo steps per recorded frame (default: 10)")
        family.add_argument("--initial", action="append", default=[], metavar="NAME=VALUE",
                            help="initial value of a fitted parameter (repeatable; names in params.json)")
        family.add_argument("--restart", action="store_true", help="ignore a saved fit state in --out")
        family.add_argument("--no-progress", action="store_true", help="hide the progress bar")
        family.set_defaults(handler=_run_calibrate_family)

    optimize = commands.add_parser("optimize", parents=[device_flag, task_flags],
                                   help="open-loop trajectory optimisation of a task (Adam through the simulator)")
    optimize.add_argument("task", help="task id, e.g. Pinch-v0 or diffsim/Pinch-v0")
    optimize.add_argument("--iters", type=_positive_int, required=True, help="Adam iterations (in all, resumed or not)")
    optimize.add_argument("--seed", type=_non_negative_int, default=0,
                          help="seed of the first variant (world i is seed + i; default: 0)")
    optimize.add_argument("--out", required=True, help="output folder (checkpoint, log.csv, summary.json)")
    optimize.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    optimize.add_argument("--worlds", type=_positive_int, default=1,
                          help="task variants optimised at once, as worlds (default: 1)")
    optimize.add_argument("--lr", type=_positive_float, default=0.05,
                          help="Adam step in normalised action units, -1 .. 1 per actuator (default: 0.05)")
    optimize.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    optimize.set_defaults(handler=_run_optimize)

    train = commands.add_parser("train", parents=[device_flag, task_flags],
                                help="train a policy or search plans on a task")
    train.add_argument("task", help="task id, e.g. Pinch-v0 or diffsim/Pinch-v0")
    train.add_argument("--algo", choices=TRAIN_ALGORITHMS, default="bptt",
                       help="bptt: an MLP policy by backpropagation through the simulator; shac: short-horizon "
                            "actor-critic through the simulator; cem, cmaes: sampling search of open-loop plans; "
                            "ppo, sac: Stable-Baselines3 (default: bptt)")
    train.add_argument("--iters", type=_positive_int, required=True,
                       help="iterations: episodes per world (bptt, shac, ppo, sac) or populations played (cem, cmaes)")
    train.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the first training variant")
    train.add_argument("--out", required=True, help="output folder (checkpoint, log.csv, policy.pt or actions.pt, "
                                                    "summary.json)")
    train.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    train.add_argument("--worlds", type=_positive_int, default=4,
                       help="training variants per iteration for bptt, shac, ppo, sac (default: 4)")
    train.add_argument("--eval-worlds", type=_positive_int, default=4,
                       help="held-out variants a policy is scored on (default: 4)")
    train.add_argument("--window", type=_positive_int, default=None,
                       help="env steps per backward pass (bptt default: the whole horizon; shac default: 32)")
    train.add_argument("--lr", type=_positive_float, default=None,
                       help="step size (bptt 3e-3, shac actor 2e-3, ppo and sac 3e-4 by default)")
    train.add_argument("--population", type=_int_at_least(2, "an integer >= 2"), default=16,
                       help="candidates per variant and iteration for cem, cmaes (default: 16)")
    train.add_argument("--variants", type=_positive_int, default=1,
                       help="task variants searched at once by cem, cmaes (default: 1)")
    train.add_argument("--knots", type=_positive_int, default=None,
                       help="control points per actuator of a cem or cmaes plan (default: 8, or the horizon)")
    train.add_argument("--ray", default=None, metavar="ADDRESS",
                       help="step cem/cmaes populations or ppo/sac worlds over Ray actors: 'local' starts Ray "
                            "here, 'auto' joins the cluster of `ray start`, or HOST:PORT")
    train.add_argument("--actors", type=_positive_int, default=2, help="Ray actors with --ray (default: 2)")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.set_defaults(handler=_run_train)

    transfer = commands.add_parser("transfer", parents=[device_flag, task_flags],
                                   help="adapt a solved plan from one task variant to another, against solving "
                                        "it from scratch")
    transfer.add_argument("task", help="task id, e.g. Push-v0 or diffsim/Push-v0")
    transfer.add_argument("--from", dest="source", type=_non_negative_int, required=True,
                          help="seed of the variant whose plan is solved first and transferred")
    transfer.add_argument("--to", dest="target", type=_non_negative_int, required=True,
                          help="seed of the variant to reach")
    transfer.add_argument("--out", required=True, help="output folder (checkpoint, log.csv, actions.pt, summary.json)")
    transfer.add_argument("--steps", type=_positive_int, default=4,
                          help="stages along the path of variants (default: 4)")
    transfer.add_argument("--score", type=_positive_float, default=0.8,
                          help="normalised score at which a stage stops (default: 0.8)")
    transfer.add_argument("--iters", type=_positive_int, default=30,
                          help="most Adam iterations per stage; scratch gets steps x this (default: 30)")
    transfer.add_argument("--lr", type=_positive_float, default=0.05,
                          help="Adam step in normalised action units (default: 0.05)")
    transfer.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    transfer.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    transfer.set_defaults(handler=_run_transfer)

    evaluate = commands.add_parser("evaluate", parents=[device_flag, task_flags],
                                   help="score a trained policy or optimised actions on a task")
    evaluate.add_argument("task", help="task id, e.g. Pinch-v0 or diffsim/Pinch-v0")
    evaluate.add_argument("--policy", required=True,
                          help="a run's policy.pt (scored on held-out variants) or actions.pt (on its own)")
    evaluate.add_argument("--worlds", type=_positive_int, default=8, help="held-out variants for a policy (default: 8)")
    evaluate.add_argument("--video", default=None, help="also write the first world's episode (.gif or .mp4)")
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of a line")
    evaluate.set_defaults(handler=_run_evaluate)
    return parser


def _option(text: str) -> tuple[str, object]:
    """``NAME=VALUE`` of a task option; the value read as JSON where it parses (numbers, true,
    false, lists), else as a string."""
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (a task option), got {text!r}")
    lowered = value.lower() if value.lower() in ("true", "false") else value
    try:
        return name, json.loads(lowered)
    except json.JSONDecodeError:
        return name, value


def _task_options(args: argparse.Namespace) -> dict:
    """The task's options: its tiny scene with --tiny, then every --option on top."""
    from diffsim.tasks import task_type

    options = dict(task_type(args.task).tiny) if args.tiny else {}
    for name, value in args.option or ():
        options[name] = tuple(value) if isinstance(value, list) else value
    return options


def _run_evaluate(args: argparse.Namespace, device: str) -> int:
    from diffsim.controllers.evaluate import evaluate_file

    options = _task_options(args)
    result = evaluate_file(args.task, args.policy, worlds=args.worlds, video=args.video, device=device,
                           options=options)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['task']}: score {result['score_mean']:.3f} +- {result['score_std']:.3f} over "
              f"{len(result['scores'])} variants" + (f"; episode in {result['video']}" if "video" in result else ""))
    return 0


def _run_train(args: argparse.Namespace, device: str) -> int:

    options = _task_options(args)
    common = dict(iterations=args.iters, out=args.out, seed=args.seed, resume=args.resume, device=device,
                  options=options, progress=not args.no_progress)
    rate = {} if args.lr is None else {"learning_rate": args.lr}
    sharded = {"ray": args.ray, "actors": args.actors}
    if args.ray is not None and args.algo in ("bptt", "shac"):
        raise ConfigError(f"--ray shards the worlds of cem, cmaes, ppo and sac; {args.algo} differentiates through "
                          "one process's simulation, so run it without --ray.")
    if args.algo == "bptt":
        from diffsim.controllers.bptt import train_bptt

        summary = train_bptt(args.task, worlds=args.worlds, evaluation_worlds=args.eval_worlds, window=args.window,
                             **rate, **common)
    elif args.algo == "shac":
        from diffsim.controllers.shac import train_shac

        summary = train_shac(args.task, worlds=args.worlds, evaluation_worlds=args.eval_worlds,
                             window=args.window or 32, **({} if args.lr is None else {"actor_lr": args.lr}),
                             **common)
    elif args.algo in ("cem", "cmaes"):
        from diffsim.controllers.sampling import train_sampling

        summary = train_sampling(args.task, args.algo, population=args.population, variants=args.variants,
                                 knots=args.knots, **sharded, **common)
    else:
        from diffsim.controllers.sb3 import train_sb3

        summary = train_sb3(args.task, args.algo, worlds=args.worlds, evaluation_worlds=args.eval_worlds, **rate,
                            **sharded, **common)
    which = "held-out score" if args.algo not in ("cem", "cmaes") else "score"
    print(f"{summary['task']}: {args.algo} {which} {summary['initial_score']:.3f} -> {summary['final_score']:.3f} "
          f"after {summary['iterations']} iterations ({summary['env_steps']} env steps, "
          f"{summary['wall_s']:.1f} s); results in {args.out}")
    return 0


def _run_transfer(args: argparse.Namespace, device: str) -> int:
    from diffsim.controllers.transfer import transfer_task

    summary = transfer_task(args.task, source=args.source, target=args.target, out=args.out, steps=args.steps,
                            score=args.score, max_iterations=args.iters, learning_rate=args.lr, resume=args.resume,
                            device=device, options=_task_options(args), progress=not args.no_progress)
    t, s = summary["transfer"], summary["scratch"]
    print(f"{summary['task']}: variant {args.source} -> {args.target}: transfer {t['iterations']} iterations "
          f"({t['wall_s']:.1f} s, score {t['score']:.3f}{'' if t['reached'] else ', not reached'}); from scratch "
          f"{s['iterations']} iterations ({s['wall_s']:.1f} s, score {s['score']:.3f}"
          f"{'' if s['reached'] else ', not reached'}); results in {args.out}")
    return 0


def _run_optimize(args: argparse.Namespace, device: str) -> int:
    from diffsim.controllers import optimize_task

    options = _task_options(args)
    summary = optimize_task(args.task, iterations=args.iters, out=args.out, seed=args.seed, worlds=args.worlds,
                            learning_rate=args.lr, resume=args.resume, device=device, options=options,
                            progress=not args.no_progress)
    print(f"{summary['task']}: score {summary['initial_score']:.3f} -> {summary['final_score']:.3f} "
          f"after {summary['iterations']} iterations ({summary['env_steps']} env steps, "
          f"{summary['wall_s']:.1f} s); results in {args.out}")
    return 0


# -- commands ----------------------------------------------------------------------------------

def _run_demo(args: argparse.Namespace, device: str) -> int:
    from diffsim.demo import run_demo

    run_demo(args.out, iterations=args.iterations, device=device, seed=args.seed,
             progress=not args.no_progress)
    return 0


def _run_validate(args: argparse.Namespace, device: str) -> int:
    import importlib

    from diffsim.core.validation import format_table, to_json

    # the tactile sensor's checks live with the FEM solver it is built on
    package = {"tactile": "fem"}.get(args.solver, args.solver)
    validation = importlib.import_module(f"diffsim.{package}.validation")
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

    options = {"integrator": args.integrator} if getattr(args, "integrator", "explicit") != "explicit" else {}
    results = []
    if physics_only:
        results += validation.run_physics_checks(device=device, only=physics_only, **options)
    if gradient_only:
        results += validation.run_gradient_checks(device=device, only=gradient_only, **options)
    print(to_json(results) if args.json else format_table(results))
    return 0 if all(r.passed for r in results) else EXIT_CHECKS_FAILED


def _run_bench_mpm(args: argparse.Namespace, device: str) -> int:
    from diffsim.mpm.benchmark import format_report, run_benchmark

    result = run_benchmark(particles=args.particles, grid_res=args.grid, dt=args.dt, substeps=args.substeps,
                           frames=args.frames, repeats=args.repeats, device=device)
    print(json.dumps(result, indent=2, default=str) if args.json else format_report(result))
    return 0


def _run_bench_rod(args: argparse.Namespace, device: str) -> int:
    from diffsim.calibrate.benchmark import format_report, run_benchmark

    result = run_benchmark(frames=args.frames, batch=args.batch, repeats=args.repeats, markers=args.markers,
                           device=device)
    print(json.dumps(result, indent=2, default=str) if args.json else format_report(result))
    return 0


def _run_bench_tactile(args: argparse.Namespace, device: str) -> int:
    from diffsim.fem.benchmark import format_report, run_benchmark

    result = run_benchmark(steps=args.steps, repeats=args.repeats, device=device, integrator=args.integrator,
                           frame_dt=args.frame_dt, preconditioner=args.preconditioner, duration=args.duration)
    print(json.dumps(result, indent=2, default=str) if args.json else format_report(result))
    return 0


def _run_bench_tasks(args: argparse.Namespace, device: str) -> int:
    from diffsim.tasks.benchmark import format_report, run_benchmark

    result = run_benchmark(args.tasks, steps=args.steps, repeats=args.repeats, tiny=args.tiny, device=device,
                           progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(result, indent=2, default=str) if args.json else format_report(result))
    return 0


def _run_calibrate_rod(args: argparse.Namespace, device: str) -> int:
    import dataclasses

    from diffsim.calibrate.fit import FitOptions
    from diffsim.calibrate.run import calibrate_rod

    options = FitOptions(subdivisions=args.subdivisions, initial_velocity=args.initial_velocity)
    if args.iterations is not None or args.train_frames is not None:
        default_steps = sum(steps for steps, _ in options.schedule)
        schedule = ((args.iterations if args.iterations is not None else default_steps, args.train_frames),)
        options = dataclasses.replace(options, schedule=schedule)
    calibrate_rod(args.train, args.eval_path, args.out, options=options, device=device,
                  progress=not args.no_progress, resume=not args.restart,
                  log=lambda line: print(line, flush=True))
    return 0


def _run_calibrate_family(args: argparse.Namespace, device: str) -> int:
    from diffsim.calibrate.engine import FitSettings, calibrate

    if args.target == "rigid":
        from diffsim.calibrate.rigid import CubeFamily, load_tosses

        family, load = CubeFamily(substeps=args.substeps), load_tosses
    elif args.target == "mpm":
        from diffsim.calibrate.mpm import MPMFamily, load_material_recordings

        load = load_material_recordings
        family = MPMFamily.for_recordings(load(args.train), device=device)
    elif args.target == "tactile":
        from diffsim.calibrate.tactile import TactileMechanicsFamily, load_tactile_presses

        load = load_tactile_presses
        family = TactileMechanicsFamily.for_recordings(load(args.train), device=device)
    else:
        from diffsim.calibrate.optics import OpticsFamily, load_presses

        family, load = OpticsFamily(), load_presses
    names = [p.name for p in family.parameters]
    initial = {}
    for item in args.initial:
        name, sep, value = item.partition("=")
        try:
            initial[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or name.strip() not in names:
            raise InvalidParameter("--initial", item, f"NAME=NUMBER with NAME among {', '.join(names)}")
    calibrate(family, load(args.train), load(args.eval_path), args.out,
              settings=FitSettings(iterations=args.iterations, learning_rate=args.learning_rate,
                                   decay_to=args.decay_to, method=args.method), initial=initial,
              resume=not args.restart, progress=not args.no_progress, log=lambda line: print(line, flush=True))
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

        device = resolve_device(getattr(args, "device", None))  # MuJoCo commands take none
        return args.handler(args, device)
    except DiffsimError as exc:
        # One line, whatever the message: scripts grep stderr, people read the first line.
        message = " ".join(str(exc).split())
        print(f"diffsim: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("diffsim: interrupted (a demo or calibration resumes from its checkpoint when run again)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
