"""``diffsim transfer``: paths of variants interpolate their ends, and a transfer run is resumable
after a kill, logging every iteration of every stage once."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from diffsim.controllers.transfer import transfer_task, variant_of_seed
from diffsim.tasks import task_type

TASK = "Push-v0"
TINY = dict(task_type(TASK).tiny)


def logged(folder):
    with open(folder / "log.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_variant_paths_start_and_end_at_their_variants():
    task = task_type("CableShape-v0")(num_worlds=1, **dict(task_type("CableShape-v0").tiny))
    a, b = variant_of_seed(task, 1), variant_of_seed(task, 2)
    for t, end in ((0.0, a), (1.0, b)):
        mid = task.interpolate_variant(a, b, t)
        for key in a:
            np.testing.assert_allclose(mid[key], end[key])
    half = task.interpolate_variant(a, b, 0.5)
    np.testing.assert_allclose(half["shift"], 0.5 * (a["shift"] + b["shift"]))
    # a bend either way passes through the straight cable, which is the arcs' limit, not 0/0
    straight = task.target_points({**a, "turn": 0.0})
    slight = task.target_points({**a, "turn": 1e-6})
    assert np.all(np.isfinite(straight)) and np.allclose(straight, slight, atol=1e-9)
    assert np.allclose(straight[:, 1], straight[0, 1])
    route = task_type("CableRoute-v0")(num_worlds=1, **dict(task_type("CableRoute-v0").tiny))
    left, right = {**variant_of_seed(route, 1), "side": -1.0}, {**variant_of_seed(route, 1), "side": 1.0}
    assert [route.interpolate_variant(left, right, t)["side"] for t in (0.25, 0.5, 0.75)] == [-1.0, 1.0, 1.0]


def test_transfer_runs_its_stages_and_scratch_and_reports_both(tmp_path):
    summary = transfer_task(TASK, source=1, target=2, out=tmp_path, steps=2, score=0.05, max_iterations=6,
                            options=TINY, progress=False)
    stages = summary["stages"]
    assert [s["stage"] for s in stages] == ["t=0.5", "t=1"]
    used = summary["source"]["iterations"] + sum(s["iterations"] for s in stages) + summary["scratch"]["iterations"]
    assert [int(r["iteration"]) for r in logged(tmp_path)] == list(range(used))
    for part in ("transfer", "scratch"):
        reached = summary[part]["reached"]
        assert reached == (summary[part]["score"] >= 0.05)
    assert json.loads((tmp_path / "summary.json").read_text())["iteration_ratio"] == summary["iteration_ratio"]


def test_a_killed_transfer_resumes_and_logs_each_iteration_once(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "diffsim.cli", "transfer", TASK, "--tiny", "--from", "1", "--to", "2",
               "--steps", "2", "--iters", "6", "--score", "1", "--out", str(out), "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if (out / "log.csv").exists() and len(logged(out)) >= 9:  # inside the second stage
                break
            assert process.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    result = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    total = 6 + 6 + 6 + 12  # source, two stages, scratch (2 x 6); a score of 1 is never reached
    assert summary["scratch"]["iterations"] == 12
    assert [int(r["iteration"]) for r in logged(out)] == list(range(total))


def test_a_stage_whose_warm_start_reaches_its_score_costs_no_iteration(tmp_path):
    import torch

    from diffsim.controllers.transfer import _Stage
    from diffsim.tasks.env import DiffTaskEnv
    from diffsim.tasks.task import TaskBatch

    env = DiffTaskEnv(task_type(TASK), num_envs=1, **TINY)
    variant, scorer = variant_of_seed(env.task, 1), TaskBatch(env.task)

    def stage(score):
        return _Stage(env, scorer, variant, score=score, learning_rate=0.05, log=lambda *row: None, first_row=0)

    start = torch.full((env.task.horizon, 1, env.action_dim), 0.5)
    as_is = stage(1.0).play(start)
    plan, used, score = stage(as_is).run(start, 3, tmp_path / "stage.pt")
    assert used == 0 and score == as_is and torch.equal(plan, start)
    plan, used, score = stage(1.0).run(start, 1, tmp_path / "stage.pt")  # a score it cannot reach: it iterates
    assert used == 1
