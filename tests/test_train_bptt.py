"""``diffsim train TASK --algo bptt``: a clock-input MLP policy trained through the simulator."""

import json
import subprocess
import sys

import pytest
import torch

from diffsim.controllers.bptt import ClockPolicy, load_policy, train_bptt
from diffsim.errors import ConfigError
from diffsim.tasks import DiffTaskEnv, task_type

TASK = "CableShape-v0"
TINY = dict(task_type(TASK).tiny)


def read_log(folder):
    lines = (folder / "log.csv").read_text().strip().splitlines()[1:]
    return [line.split(",") for line in lines]


def test_bptt_moves_the_policy_by_gradients_and_reruns_identically(tmp_path):
    runs = []
    for name in ("a", "b"):
        summary = train_bptt(TASK, iterations=3, out=tmp_path / name, seed=1, worlds=2, evaluation_worlds=2,
                             options=TINY, progress=False)
        runs.append((summary, read_log(tmp_path / name)))
    (summary, log), (_, again) = runs
    for key in ("initial_score", "final_score", "iterations", "env_steps", "wall_s"):
        assert key in summary
    assert summary["env_steps"] == 3 * TINY["horizon"] * 2
    assert all(float(row[2]) > 0.0 for row in log)  # the loss reaches the weights
    assert [row[:3] for row in log] == [row[:3] for row in again]  # a CPU rerun is identical
    env = DiffTaskEnv(task_type(TASK), num_envs=1, **TINY)
    trained = load_policy(tmp_path / "a" / "policy.pt", env, task_type(TASK).id)
    fresh = ClockPolicy(env.observation_dim, env.action_dim, env.task.horizon, env.action_low, env.action_high)
    assert not torch.equal(trained.out.weight, fresh.out.weight)


def test_training_resumes_where_it_stopped(tmp_path):
    train_bptt(TASK, iterations=2, out=tmp_path, worlds=1, evaluation_worlds=1, options=TINY, progress=False)
    summary = train_bptt(TASK, iterations=4, out=tmp_path, worlds=1, evaluation_worlds=1, options=TINY,
                         progress=False, resume=True)
    assert summary["iterations"] == 4
    assert [int(row[0]) for row in read_log(tmp_path)] == [0, 1, 2, 3]
    assert json.loads((tmp_path / "summary.json").read_text())["iterations"] == 4


def test_a_policy_of_another_task_or_file_is_refused(tmp_path):
    train_bptt(TASK, iterations=1, out=tmp_path, worlds=1, evaluation_worlds=1, options=TINY, progress=False)
    other = DiffTaskEnv(task_type("CableRoute-v0"), num_envs=1, **dict(task_type("CableRoute-v0").tiny))
    with pytest.raises(ConfigError, match="is a policy for"):
        load_policy(tmp_path / "policy.pt", other, task_type("CableRoute-v0").id)
    (tmp_path / "junk.pt").write_bytes(b"not a policy")
    with pytest.raises(ConfigError, match="cannot read"):
        load_policy(tmp_path / "junk.pt", other, task_type("CableRoute-v0").id)


def test_an_unknown_algorithm_is_a_usage_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "diffsim.cli", "train", TASK, "--algo", "dqn", "--iters", "1",
                             "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
    assert not (tmp_path / "x").exists()


def test_evaluate_scores_a_policy_and_actions_and_refuses_another_task(tmp_path):
    train_bptt(TASK, iterations=1, out=tmp_path / "bptt", worlds=1, evaluation_worlds=1, options=TINY,
               progress=False)
    from diffsim.controllers import optimize_task

    optimize_task(TASK, iterations=1, out=tmp_path / "plan", worlds=2, options=TINY, progress=False)
    for file, count in (("bptt/policy.pt", 3), ("plan/actions.pt", 2)):
        result = subprocess.run([sys.executable, "-m", "diffsim.cli", "evaluate", TASK, "--tiny", "--json",
                                 "--worlds", "3", "--policy", str(tmp_path / file),
                                 "--video", str(tmp_path / f"{count}.gif")], capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert len(report["scores"]) == count and 0.0 <= report["score_mean"] <= 1.0
        assert (tmp_path / f"{count}.gif").stat().st_size > 0
    wrong = subprocess.run([sys.executable, "-m", "diffsim.cli", "evaluate", "CableRoute-v0", "--tiny",
                            "--policy", str(tmp_path / "bptt/policy.pt")], capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2 and "was made for diffsim/CableShape-v0" in wrong.stderr
