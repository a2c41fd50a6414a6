"""The task layer: every registered task passes gymnasium's checker, its vector env equals the
single env world by world, partial resets leave other worlds alone, bad input gets a sentence,
and the differentiable face's gradients match finite differences."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import diffsim.tasks  # noqa: F401  (registers the tasks)
from diffsim.errors import ConfigError, InvalidParameter
from diffsim.tasks.env import TASKS, DiffTaskEnv, task_type

TASK_IDS = sorted(TASKS)


def _tiny(task_id: str) -> dict:
    return dict(TASKS[task_id].tiny)


def _actions(env, steps: int, seed: int = 0) -> np.ndarray:
    """Random in-bounds actions, (steps, num_envs, dim) for a vector env."""
    rng = np.random.default_rng(seed)
    space = env.action_space
    return rng.uniform(space.low, space.high, (steps, *space.shape)).astype(np.float32)


def test_the_task_library_has_its_families():
    families = {TASKS[t].__module__.rsplit(".", 1)[-1] for t in TASK_IDS}
    assert {"plasticine", "cable"} <= families
    assert {"diffsim/Move-v0", "diffsim/Pinch-v0", "diffsim/RollingPin-v0", "diffsim/Writer-v0",
            "diffsim/CableShape-v0", "diffsim/CableRoute-v0"} <= set(TASK_IDS)


@pytest.mark.parametrize("task_id", TASK_IDS)
def test_gymnasium_checker_passes(task_id):
    env = gym.make(task_id, **_tiny(task_id))
    check_env(env.unwrapped, skip_render_check=True)  # spaces, reset/step API, seeded determinism
    obs, info = env.reset(seed=3)
    assert obs.dtype == np.float32 and env.observation_space.contains(obs)
    assert 0.0 <= info["score"] <= 1.0


@pytest.mark.parametrize("task_id", TASK_IDS)
def test_vector_world_equals_single_env(task_id):
    """World i of make_vec(seed=s) follows make(seed=s+i) under the same actions, through an autoreset."""
    options = _tiny(task_id)
    horizon = TASKS[task_id].Config(**{k: v for k, v in options.items() if k == "horizon"}).horizon
    venv = gym.make_vec(task_id, num_envs=2, **options)
    assert venv.metadata["autoreset_mode"] == gym.vector.AutoresetMode.SAME_STEP
    obs, _ = venv.reset(seed=10)
    steps = horizon + 1  # one step past the horizon: the autoreset happens in between
    actions = _actions(venv, steps)
    vector = [obs]
    for k in range(steps):
        obs, reward, terminated, truncated, info = venv.step(actions[k])
        vector.append((obs, reward, truncated, info))
    for world in range(2):
        env = gym.make(task_id, **options)
        single, _ = env.reset(seed=10 + world)
        np.testing.assert_allclose(single, vector[0][world], atol=1e-6)
        for k in range(steps):
            obs, reward, terminated, truncated, _ = env.step(actions[k, world])
            v_obs, v_reward, v_truncated, info = vector[k + 1]
            assert v_truncated[world] == truncated
            expected = info["final_obs"][world] if truncated else v_obs[world]
            np.testing.assert_allclose(obs, expected, rtol=1e-4, atol=1e-5)
            assert reward == pytest.approx(v_reward[world], rel=1e-3, abs=1e-6)
            if truncated:
                obs, _ = env.reset()  # the single env continues its generator, as the world did
                np.testing.assert_allclose(obs, v_obs[world], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("task_id", ["diffsim/Pinch-v0", "diffsim/CableShape-v0"])
def test_partial_reset_leaves_other_worlds_alone(task_id):
    venv = gym.make_vec(task_id, num_envs=2, **_tiny(task_id))
    start, _ = venv.reset(seed=1)
    for a in _actions(venv, 2):
        moved, *_ = venv.step(a)
    obs, _ = venv.reset(seed=1, options={"reset_mask": np.array([True, False])})
    np.testing.assert_allclose(obs[0], start[0], atol=1e-6)  # world 0 starts again
    np.testing.assert_array_equal(obs[1], moved[1])  # world 1 untouched


def test_bad_actions_and_options_get_a_sentence():
    env = gym.make("diffsim/Pinch-v0", **_tiny("diffsim/Pinch-v0")).unwrapped
    env.reset(seed=0)
    with pytest.raises(InvalidParameter, match=r"action = .*shape \(2,\).*valid range is shape \(3,\)"):
        env.step(np.zeros(2, np.float32))
    with pytest.raises(InvalidParameter, match="action .*NaN"):
        env.step(np.array([0.0, np.nan, 0.0], np.float32))
    with pytest.raises(InvalidParameter, match="dtype"):
        env.step(np.array(["a", "b", "c"]))
    with pytest.raises(ConfigError, match=r"unknown task option\(s\) \['stiffnes'\]"):
        gym.make("diffsim/Pinch-v0", stiffnes=3)
    with pytest.raises(InvalidParameter, match=r"grid_res = 4 .*\[16, 256\]"):
        gym.make("diffsim/Pinch-v0", grid_res=4)
    with pytest.raises(ConfigError, match="unknown task 'Nope-v0'"):
        task_type("Nope-v0")


def test_out_of_bound_actions_are_clipped_to_the_space():
    options = _tiny("diffsim/Pinch-v0")
    results = []
    for action in (np.array([9.0, -9.0, 9.0], np.float32), np.array([0.5, -0.5, 0.5], np.float32)):
        env = gym.make("diffsim/Pinch-v0", **options)
        env.reset(seed=0)
        results.append(env.step(action)[0])
    np.testing.assert_array_equal(results[0], results[1])


@pytest.mark.parametrize("task_id", ["diffsim/TactileGrasp-v0", "diffsim/SurfaceFollow-v0"])
def test_a_blind_tactile_task_zeroes_only_the_touch_block(task_id):
    observations = []
    for touch in (True, False):
        env = gym.make(task_id, tactile_observation=touch, **_tiny(task_id))
        env.reset(seed=3)
        action = env.action_space.high * 0.5
        observations.append(np.stack([env.step(action)[0] for _ in range(2)]))
    n = env.unwrapped.task.tactile_dim
    seen, blind = observations
    assert np.any(seen[:, :n] != 0.0) and np.all(blind[:, :n] == 0.0)
    np.testing.assert_array_equal(seen[:, n:], blind[:, n:])  # the rest of the scene is the same


def test_render_gives_an_rgb_frame():
    env = gym.make("diffsim/Pinch-v0", render_mode="rgb_array", **_tiny("diffsim/Pinch-v0"))
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (256, 256, 3) and frame.dtype == np.uint8
    assert frame.std() > 10  # not a blank image


def _summed_reward(denv: DiffTaskEnv, actions: torch.Tensor, warmup: tuple[int, list]) -> torch.Tensor:
    """Rewards of ``actions``' steps after ``warmup`` = (steps, action) steps off the graph."""
    denv.reset(seed=0)
    steps, action = warmup
    for _ in range(steps):
        denv.step(torch.tensor([action] * denv.num_envs, dtype=torch.float32))
    denv.detach()
    total = torch.zeros(())
    for a in actions:
        _, reward, *_ = denv.step(a)
        total = total + reward.sum()
    return total


# one task per family: (action bias, finite-difference step, warm-up), chosen so that the tools
# touch the material (the gradient is then not zero) and where the finite difference has settled
_DIFF_CASES = {
    "diffsim/Pinch-v0": ([0.0, 0.0, -0.4], 0.005, (0, [])),
    "diffsim/CableShape-v0": ([0.1, 0.0, 0.0, -0.1, 0.0, 0.0], 0.003, (0, [])),
    "diffsim/GatherSand-v0": ([0.25, 0.0, 0.0, 0.0], 0.003, (0, [])),
    "diffsim/SurfaceFollow-v0": ([0.01, 0.0, -0.01, 0.0, 0.0], 0.003, (10, [0.0, 0.0, -0.05, 0.0, 0.0])),
    "diffsim/SoftWalker-v0": ([0.0] * 8, 3e-4, (0, [])),
    # the jaws close on the block for four steps, then squeeze it while the hand moves a little
    "diffsim/RobotMove-v0": ([0.0, 0.0, 0.0, 0.08], 0.003, (4, [0.0, 0.0, 0.0, 0.08])),
}


@pytest.mark.parametrize("task_id", sorted(_DIFF_CASES))
def test_differentiable_face_matches_finite_differences(task_id):
    bias, eps, warmup = _DIFF_CASES[task_id]
    denv = DiffTaskEnv(task_type(task_id), num_envs=2, **_tiny(task_id))
    rng = np.random.default_rng(1)
    spread = 0.2 * denv.action_high.numpy()  # a fifth of each action's range around the bias
    base = torch.tensor(rng.uniform(-spread, spread, (3, 2, denv.action_dim)) + np.array(bias), dtype=torch.float32)
    actions = base.clone().requires_grad_(True)
    _summed_reward(denv, actions, warmup).backward()
    direction = torch.tensor(rng.normal(size=base.shape), dtype=torch.float32)
    tape = float((actions.grad * direction).sum())
    fd = (float(_summed_reward(denv, base + eps * direction, warmup))
          - float(_summed_reward(denv, base - eps * direction, warmup))) / (2 * eps)
    assert abs(tape - fd) <= 0.02 * abs(fd), (tape, fd)

    if warmup[0] == 0:
        # the whole-horizon rollout's loss is the final loss: its gradient is minus the summed reward's
        denv.reset(seed=0)
        whole = base.clone().requires_grad_(True)
        denv.rollout(whole).backward()
        np.testing.assert_allclose(whole.grad.numpy(), -actions.grad.numpy(), rtol=1e-3, atol=1e-6)


# SoftWalker pays running costs: its objective sums them
@pytest.mark.parametrize("task_id", ["diffsim/Push-v0", "diffsim/CableShape-v0", "diffsim/SoftWalker-v0"])
def test_differentiable_face_scores_and_observes_what_the_vector_env_does(task_id):
    options = _tiny(task_id)
    venv = gym.make_vec(task_id, num_envs=2, vectorization_mode="vector_entry_point", **options)
    denv = DiffTaskEnv(task_type(task_id), num_envs=2, **options)
    venv.reset(seed=5)
    denv.reset(seed=5)
    start = denv.batch.loss.copy()  # J_0
    returns = np.zeros(2)
    for action in _actions(venv, options["horizon"] - 1, seed=2):  # stop before the autoreset
        obs, reward, _, _, info = venv.step(action)
        returns += reward
        with torch.no_grad():
            dobs, _, _, _, dinfo = denv.step(torch.as_tensor(action))
    np.testing.assert_allclose(dobs.numpy(), obs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dinfo["loss"].numpy(), info["loss"], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(returns, start - info["loss"], rtol=1e-5, atol=1e-9)  # the return is J_0 - J_t
    np.testing.assert_allclose(denv.score(), info["score"], rtol=1e-5, atol=1e-7)
    assert np.any(info["score"] != denv.batch.score())  # the batch's own state never moved


def test_detach_cuts_the_graph():
    denv = DiffTaskEnv(task_type("diffsim/Pinch-v0"), num_envs=1, **_tiny("diffsim/Pinch-v0"))
    denv.reset(seed=0)
    first = torch.tensor([[0.0, 0.0, -0.4]], requires_grad=True)
    denv.step(first)
    denv.detach()
    second = torch.tensor([[0.0, 0.0, -0.4]], requires_grad=True)
    obs, reward, *_ = denv.step(second)
    reward.sum().backward()
    assert first.grad is None and second.grad is not None


def test_differentiable_face_refuses_bad_actions():
    denv = DiffTaskEnv(task_type("diffsim/Pinch-v0"), num_envs=2, **_tiny("diffsim/Pinch-v0"))
    denv.reset(seed=0)
    with pytest.raises(InvalidParameter, match=r"shape \(2, 3\)"):
        denv.step(torch.zeros(3))
    with pytest.raises(InvalidParameter, match="NaN"):
        denv.step(torch.full((2, 3), float("nan")))


def test_bench_tasks_prints_json_keyed_by_task_id(capsys):
    import json

    from diffsim.cli import main

    assert main(["bench", "tasks", "--tiny", "--tasks", "Pinch-v0", "--steps", "1", "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["diffsim/Pinch-v0"]
    for key in ("steps_per_s_1", "steps_per_s_16", "diff_step_ms", "overhead", "particles_per_world"):
        assert key in result
    assert result["steps_per_s_1"] > 0 and result["diff_step_ms"] > 0 and result["overhead"] > -0.5


def test_record_episode_writes_a_gif(tmp_path):
    from PIL import Image

    from diffsim.tasks.env import record_episode

    press = np.tile(np.array([0.0, 0.0, -0.4], np.float32), (3, 1))
    result = record_episode("Pinch-v0", tmp_path / "pinch.gif", actions=press, **_tiny("diffsim/Pinch-v0"))
    assert result["steps"] == 3 and 0.0 <= result["score"] <= 1.0
    with Image.open(result["path"]) as gif:
        assert gif.n_frames == 4 and gif.size == (256, 256)  # the start and three steps
