"""The README's Python examples run as written."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np


def test_readme_python_example_runs():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the README has no Python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102 -- our own README
    assert math.isfinite(namespace["loss"])
    grad = namespace["controls"][10].collider_velocity.grad.numpy()
    assert abs(grad[namespace["pusher"]]).sum() > 0  # the pusher's velocity moves the loss


def test_readme_rod_example_runs():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 2, "the README has no rod example"
    namespace: dict = {}
    exec(compile(blocks[1], "README.md", "exec"), namespace)  # noqa: S102 -- our own README
    assert math.isfinite(namespace["loss"]) and namespace["loss"] < 0  # the free end sags under gravity
    assert abs(namespace["model"].edge_bend_stiffness.grad.numpy()).sum() > 0


def test_readme_tactile_example_runs():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 3, "the README has no tactile example"
    namespace: dict = {}
    exec(compile(blocks[2], "README.md", "exec"), namespace)  # noqa: S102 -- our own README
    reading = namespace["reading"]
    assert reading["force"][0, 2] < 0  # the ball pushes into the sensor
    assert reading["marker_displacement"].shape == (1, 7, 9, 2)


def test_readme_coupled_example_runs():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 4, "the README has no coupled example"
    namespace: dict = {}
    exec(compile(blocks[3], "README.md", "exec"), namespace)  # noqa: S102 -- our own README
    support, weight = namespace["support"], namespace["weight"]
    assert abs(sum(support[-len(support) // 2:]) / (len(support) - len(support) // 2) / weight - 1.0) < 0.02


def test_readme_environment_example_runs():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 5, "the README has no environment example"
    namespace: dict = {}
    exec(compile(blocks[4], "README.md", "exec"), namespace)  # noqa: S102 -- our own README
    assert namespace["frame"].shape == (256, 256, 3)
    assert namespace["obs"].shape == (4, namespace["envs"].single_observation_space.shape[0])
    grad = namespace["press"].grad.numpy()
    assert np.all(np.isfinite(grad)) and abs(grad).sum() > 0  # the press moves the reward


def test_readme_robot_example_runs():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "MujocoRobot" in b)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 -- our own README
    assert math.isfinite(namespace["loss"])
    drag = namespace["drag"]
    assert drag[0] < -1.0  # the dragged block pushes back on the trailing (left) jaw
    grad = namespace["controls"][14].robot_ctrl.grad.numpy()
    assert grad[0] < 0  # dragging faster along +x brings the block nearer its target at x = 0.6
