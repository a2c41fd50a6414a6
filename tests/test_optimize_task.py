"""``diffsim optimize TASK``: open-loop trajectory optimisation of a task as a resumable run."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from diffsim.controllers import optimize_task
from diffsim.tasks import task_type

TASK = "CableShape-v0"
TINY = dict(task_type(TASK).tiny)


def logged(folder) -> list[dict]:
    with open(folder / "log.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def diffsim_command(*args) -> list[str]:
    return [sys.executable, "-m", "diffsim.cli", *args]


def test_optimize_task_lowers_the_loss_writes_the_summary_and_reruns_identically(tmp_path):
    runs = []
    for name in ("a", "b"):
        summary = optimize_task(TASK, iterations=4, out=tmp_path / name, seed=3, worlds=2, options=TINY,
                                progress=False)
        runs.append((summary, [float(r["loss"]) for r in logged(tmp_path / name)]))
    (summary, losses), (_, again) = runs
    for key in ("initial_score", "final_score", "iterations", "env_steps", "wall_s"):
        assert key in summary
    assert summary["iterations"] == 4 and summary["env_steps"] == 4 * TINY["horizon"] * 2
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["final_score"] == summary["final_score"]
    assert losses[-1] < losses[0]
    assert losses == again  # a CPU rerun with the same seed is identical
    actions = torch.load(tmp_path / "a" / "actions.pt", weights_only=True)["actions"]
    assert tuple(actions.shape) == (TINY["horizon"], 2, 6)


def test_a_killed_run_resumes_losing_at_most_one_iteration(tmp_path):
    out = tmp_path / "run"
    iterations = 60
    command = diffsim_command("optimize", TASK, "--tiny", "--iters", str(iterations), "--out", str(out),
                              "--no-progress", "--device", "cpu")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if (out / "log.csv").exists() and len(logged(out)) >= 5:
                break
            assert process.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    done_before = max(int(r["iteration"]) for r in logged(out))
    assert done_before < iterations - 1, "the run finished before it was killed"
    finished = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == iterations
    assert summary["resumed_from"] >= done_before  # at most the iteration in flight is redone
    assert [int(r["iteration"]) for r in logged(out)] == list(range(iterations))


@pytest.mark.parametrize("args, message", [
    (["optimize", "NoSuchTask-v0", "--iters", "2"], "unknown task"),
    (["optimize", TASK, "--iters", "0"], "positive integer"),
    (["optimize", TASK, "--iters", "two"], "positive integer"),
])
def test_bad_input_is_one_sentence_and_exit_code_2(tmp_path, args, message):
    result = subprocess.run(diffsim_command(*args, "--out", str(tmp_path / "x")), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "x").exists()


def test_an_existing_run_is_not_overwritten_without_resume(tmp_path):
    out = tmp_path / "run"
    optimize_task(TASK, iterations=1, out=out, options=TINY, progress=False)
    before = (out / "summary.json").read_text()
    result = subprocess.run(diffsim_command("optimize", TASK, "--tiny", "--iters", "2", "--out", str(out)),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "--resume" in result.stderr
    assert (out / "summary.json").read_text() == before
