"""Worlds sharded over Ray actors equal the single-process run with the same seeds: the vector env
world by world (across an autoreset), a CEM search and a PPO run."""

import csv
import os

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from diffsim.controllers.distributed import RayVectorEnv, connect, shards  # noqa: E402
from diffsim.controllers.sampling import train_sampling  # noqa: E402
from diffsim.errors import InvalidParameter  # noqa: E402
from diffsim.tasks import task_type  # noqa: E402
from diffsim.tasks.env import TaskVectorEnv  # noqa: E402

TASK = "Pinch-v0"
TINY = dict(task_type(TASK).tiny)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    connect("local", num_cpus=2)
    # the actors run Warp on one thread each; so does the reference, so sums add in the same order
    previous = os.environ.get("DIFFSIM_CPU_THREADS")
    os.environ["DIFFSIM_CPU_THREADS"] = "1"
    yield
    if previous is None:
        del os.environ["DIFFSIM_CPU_THREADS"]
    else:
        os.environ["DIFFSIM_CPU_THREADS"] = previous
    ray.shutdown()


def logged(folder):
    with open(folder / "log.csv", newline="") as handle:
        return [row["loss"] for row in csv.DictReader(handle)]


def test_shards_cover_the_worlds_once():
    assert shards(5, 2) == [slice(0, 2), slice(2, 5)]
    with pytest.raises(InvalidParameter, match="actors"):
        shards(2, 3)


def test_the_ray_vector_env_steps_every_world_as_one_process_does():
    sharded = RayVectorEnv(TASK, num_envs=3, actors=2, **TINY)
    local = TaskVectorEnv(task_type(TASK), num_envs=3, **TINY)
    rng = np.random.default_rng(0)
    obs_r, _ = sharded.reset(seed=11)
    obs_l, _ = local.reset(seed=11)
    np.testing.assert_array_equal(obs_r, obs_l)
    for _ in range(TINY["horizon"] + 2):  # through the same-step autoreset
        action = rng.uniform(local.single_action_space.low, local.single_action_space.high, (3, 3)).astype(np.float32)
        out_r, out_l = sharded.step(action), local.step(action)
        for a, b in zip(out_r[:4], out_l[:4], strict=True):
            np.testing.assert_array_equal(a, b)
        info_r, info_l = out_r[4], out_l[4]
        np.testing.assert_array_equal(info_r["score"], info_l["score"])
        if "final_obs" in info_l:
            np.testing.assert_array_equal(np.stack(info_r["final_obs"]), np.stack(info_l["final_obs"]))
            np.testing.assert_array_equal(info_r["final_info"]["loss"], info_l["final_info"]["loss"])
    sharded.close()


def test_cem_over_actors_equals_cem_in_one_process(tmp_path):
    settings = dict(population=4, variants=1, knots=2, seed=3, options=TINY, progress=False)
    local = train_sampling(TASK, "cem", iterations=2, out=tmp_path / "local", **settings)
    sharded = train_sampling(TASK, "cem", iterations=2, out=tmp_path / "ray", ray="local", actors=2, **settings)
    assert logged(tmp_path / "ray") == logged(tmp_path / "local")
    assert sharded["best_loss"] == local["best_loss"] and sharded["final_scores"] == local["final_scores"]


def test_ppo_collecting_over_actors_trains_as_in_one_process(tmp_path):
    pytest.importorskip("stable_baselines3")
    from diffsim.controllers.sb3 import train_sb3

    settings = dict(worlds=2, evaluation_worlds=2, seed=5, options=TINY, progress=False)
    local = train_sb3(TASK, "ppo", iterations=2, out=tmp_path / "local", **settings)
    sharded = train_sb3(TASK, "ppo", iterations=2, out=tmp_path / "ray", ray="local", actors=2, **settings)
    assert logged(tmp_path / "ray") == logged(tmp_path / "local")
    assert sharded["final_scores"] == local["final_scores"]
