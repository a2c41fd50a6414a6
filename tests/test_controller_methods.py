"""``diffsim train --algo shac|cem|cmaes|ppo|sac``: each method moves what it trains, reruns
identically on a CPU, resumes exactly where it stopped, and refuses bad input with exit code 2."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffsim.controllers.sampling import PlanBatch, interpolation_matrix, train_sampling
from diffsim.controllers.shac import td_lambda_targets, train_shac
from diffsim.errors import ConfigError, InvalidParameter
from diffsim.tasks import task_type

SHAC_TASK = "CableShape-v0"
SAMPLING_TASK = "Pinch-v0"


def tiny(task):
    return dict(task_type(task).tiny)


def logged(folder) -> list[dict]:
    with open(folder / "log.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def diffsim(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "diffsim.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


# -- sampling ---------------------------------------------------------------------------------------

def test_the_plan_basis_interpolates_its_knots_linearly():
    assert np.array_equal(interpolation_matrix(5, 5), np.eye(5))
    m = interpolation_matrix(7, 3)
    assert np.allclose(m.sum(1), 1.0) and np.all(m >= 0)
    assert np.allclose(m[0], [1, 0, 0]) and np.allclose(m[3], [0, 1, 0]) and np.allclose(m[-1], [0, 0, 1])
    knots = np.array([0.0, 1.0, -1.0])
    assert np.allclose(m @ knots, [0, 1 / 3, 2 / 3, 1, 1 / 3, -1 / 3, -1])


@pytest.mark.parametrize("method", ["cem", "cmaes"])
def test_sampling_lowers_the_loss_reruns_identically_and_resumes_exactly(tmp_path, method):
    options = tiny(SAMPLING_TASK)
    settings = dict(population=6, variants=2, knots=2, seed=4, options=options, progress=False)
    whole = train_sampling(SAMPLING_TASK, method, iterations=4, out=tmp_path / "whole", **settings)
    again = train_sampling(SAMPLING_TASK, method, iterations=4, out=tmp_path / "again", **settings)
    train_sampling(SAMPLING_TASK, method, iterations=2, out=tmp_path / "split", **settings)
    resumed = train_sampling(SAMPLING_TASK, method, iterations=4, out=tmp_path / "split", resume=True, **settings)
    losses = [float(r["loss"]) for r in logged(tmp_path / "whole")]
    assert [float(r["loss"]) for r in logged(tmp_path / "again")] == losses
    assert [float(r["loss"]) for r in logged(tmp_path / "split")] == losses
    assert resumed["best_loss"] == whole["best_loss"] == again["best_loss"]
    assert whole["env_steps"] == 4 * options["horizon"] * 2 * 6
    # the zero plan is what the search starts from; it must find a better one
    start = torch.load(tmp_path / "whole" / "actions.pt", weights_only=True)["actions"]
    assert tuple(start.shape) == (options["horizon"], 2, 3)
    assert losses[-1] <= losses[0]
    worlds = PlanBatch(task_type(SAMPLING_TASK), 2, 1, 4, None, options)
    zero_loss, _ = worlds.play(np.zeros((options["horizon"], 2, 3)))
    assert whole["best_loss"] < float(zero_loss.sum())


def test_sampling_refuses_settings_outside_their_range(tmp_path):
    with pytest.raises(InvalidParameter, match="knots"):
        train_sampling(SAMPLING_TASK, "cem", iterations=1, out=tmp_path / "a", knots=99, options=tiny(SAMPLING_TASK),
                       progress=False)
    with pytest.raises(ConfigError, match="unknown sampling method"):
        train_sampling(SAMPLING_TASK, "random", iterations=1, out=tmp_path / "b", options=tiny(SAMPLING_TASK),
                       progress=False)
    assert not (tmp_path / "a" / "log.csv").exists() and not (tmp_path / "b").exists()


# -- SHAC -------------------------------------------------------------------------------------------

def test_td_lambda_targets_match_their_closed_forms():
    rewards = torch.tensor([[1.0], [2.0], [3.0]])
    values = torch.tensor([[10.0], [20.0], [30.0]])  # V of the state after each step
    gamma = 0.9
    monte_carlo = td_lambda_targets(rewards, values, gamma, 1.0)  # lambda 1: rewards to the end + bootstrap
    assert torch.allclose(monte_carlo[:, 0], torch.tensor([1 + 0.9 * 2 + 0.81 * 3 + 0.729 * 30,
                                                           2 + 0.9 * 3 + 0.81 * 30, 3 + 0.9 * 30]))
    one_step = td_lambda_targets(rewards, values, gamma, 0.0)  # lambda 0: r + gamma V(next)
    assert torch.allclose(one_step, rewards + gamma * values)


def test_shac_trains_the_actor_reruns_identically_and_resumes_exactly(tmp_path):
    settings = dict(worlds=2, window=2, evaluation_worlds=1, seed=2, options=tiny(SHAC_TASK), progress=False)
    whole = train_shac(SHAC_TASK, iterations=3, out=tmp_path / "whole", **settings)
    again = train_shac(SHAC_TASK, iterations=3, out=tmp_path / "again", **settings)
    train_shac(SHAC_TASK, iterations=1, out=tmp_path / "split", **settings)
    resumed = train_shac(SHAC_TASK, iterations=3, out=tmp_path / "split", resume=True, **settings)
    rows = [(r["loss"], r["grad_norm"]) for r in logged(tmp_path / "whole")]
    assert rows == [(r["loss"], r["grad_norm"]) for r in logged(tmp_path / "again")]
    assert rows == [(r["loss"], r["grad_norm"]) for r in logged(tmp_path / "split")]
    assert whole["final_loss"] == again["final_loss"] == resumed["final_loss"]
    assert all(float(g) > 0 for _, g in rows)  # the simulator's gradient reaches the actor
    split = whole["time_split_s"]
    assert split["simulation_forward"] > 0 and split["simulation_backward"] > 0 and split["critic"] > 0
    assert abs(sum(split.values()) - whole["wall_s"]) < 1e-6


# -- Stable-Baselines3 ------------------------------------------------------------------------------

@pytest.mark.parametrize("algo", ["ppo", "sac"])
def test_sb3_runs_resume_and_their_policy_is_evaluated(tmp_path, algo):
    pytest.importorskip("stable_baselines3")
    from diffsim.controllers.sb3 import train_sb3

    settings = dict(worlds=2, evaluation_worlds=2, seed=1, options=tiny(SAMPLING_TASK), progress=False)
    train_sb3(SAMPLING_TASK, algo, iterations=2, out=tmp_path, **settings)
    summary = train_sb3(SAMPLING_TASK, algo, iterations=3, out=tmp_path, resume=True, **settings)
    assert summary["iterations"] == 3 and summary["env_steps"] == 3 * tiny(SAMPLING_TASK)["horizon"] * 2
    assert [int(r["iteration"]) for r in logged(tmp_path)] == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.glob("sb3_*")) == (
        ["sb3_buffer_3.pkl", "sb3_model_3.zip"] if algo == "sac" else ["sb3_model_3.zip"])
    result = diffsim("evaluate", SAMPLING_TASK, "--tiny", "--json", "--worlds", "2", "--policy",
                     str(tmp_path / "policy.pt"))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["scores"] == summary["final_scores"]  # the same held-out variants, the same policy
    wrong = diffsim("evaluate", SHAC_TASK, "--tiny", "--policy", str(tmp_path / "policy.pt"))
    assert wrong.returncode == 2 and "was made for diffsim/Pinch-v0" in wrong.stderr


def test_a_corrupt_checkpoint_or_another_algorithms_run_is_refused_and_kept(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"truncated")
    for algo in ("cem", "shac"):
        result = diffsim("train", SHAC_TASK, "--tiny", "--algo", algo, "--iters", "1", "--out", str(tmp_path),
                         "--resume", "--no-progress")
        assert result.returncode == 2 and "cannot read" in result.stderr, result.stderr
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"truncated"
    other = tmp_path / "other"
    assert diffsim("train", SAMPLING_TASK, "--tiny", "--algo", "cem", "--iters", "1", "--population", "2",
                   "--out", str(other), "--no-progress").returncode == 0
    result = diffsim("train", SAMPLING_TASK, "--tiny", "--algo", "cmaes", "--iters", "2", "--population", "2",
                     "--out", str(other), "--resume", "--no-progress")
    assert result.returncode == 2 and "holds a cem run" in result.stderr
    zero = diffsim("train", SAMPLING_TASK, "--algo", "cem", "--iters", "0", "--out", str(tmp_path / "z"))
    assert zero.returncode == 2
    assert not (tmp_path / "z").exists()
