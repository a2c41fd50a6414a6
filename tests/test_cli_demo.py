"""The ``diffsim`` command line and the quick-start demo: outputs written, loss down, clean errors.

The demo runs at a tiny size (few frames, coarse particles, two iterations) to stay fast.
"""

from __future__ import annotations

import json

import pytest

from diffsim import demo as demo_module
from diffsim.cli import main
from diffsim.demo import PushDemoConfig, run_demo
from diffsim.errors import SimulationDiverged

TINY = dict(horizon=6, particle_spacing=0.005, initial_speed=0.1, learning_rate=0.05)


def test_demo_writes_outputs_and_reduces_the_loss(tmp_path, capsys):
    result = run_demo(tmp_path / "demo", iterations=3, device="cpu", seed=1, progress=False,
                      config=PushDemoConfig(**TINY))
    out = tmp_path / "demo"
    for name in ("loss.png", "before_after.gif", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    assert not (out / demo_module.CHECKPOINT_NAME).exists()  # removed once finished
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["losses"]) == 3
    assert summary["losses"][-1] < summary["losses"][0]
    assert summary["final_loss"] < summary["initial_loss"]
    assert summary["final_distance"] < summary["initial_distance"]
    assert result.final_loss == pytest.approx(summary["final_loss"])
    printed = capsys.readouterr().out
    assert "initial" in printed and str(out.resolve()) in printed

    import imageio.v2 as imageio

    frames = imageio.mimread(out / "before_after.gif")
    assert frames[0].shape[1] > frames[0].shape[0]  # two panels side by side


def test_cli_demo_runs_and_writes_summary(tmp_path, monkeypatch, capsys):
    # Same command path as `diffsim demo`, with the tiny scene so that it runs quickly.
    monkeypatch.setattr(demo_module, "PushDemoConfig", lambda: PushDemoConfig(**TINY))
    status = main(["demo", "--out", str(tmp_path / "cli"), "--iterations", "2", "--device", "cpu",
                   "--no-progress"])
    assert status == 0
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert summary["iterations"] == 2 and summary["device"] == "cpu"


def test_validate_free_fall_prints_json_and_exits_0(capsys):
    status = main(["validate", "mpm", "--only", "free_fall", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert status == 0
    assert report["passed"] is True
    assert [c["name"] for c in report["checks"]] == ["free fall: drop after 0.2 s"]


def test_validate_table_output(capsys):
    status = main(["--device", "cpu", "validate", "mpm", "--only", "free_fall"])
    out = capsys.readouterr().out
    assert status == 0 and "PASS" in out and "free fall" in out


@pytest.mark.parametrize("argv", [
    ["--device", "cuda:7", "validate", "mpm", "--only", "free_fall"],
    ["validate", "mpm", "--only", "free_fall", "--device", "cuda:7"],
    ["validate", "mpm", "--only", "no_such_check"],
])
def test_bad_arguments_exit_2_with_one_line(argv, capsys):
    status = main(argv)
    captured = capsys.readouterr()
    assert status == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffsim: error:")
    assert "Traceback" not in captured.err and captured.out == ""


def test_bad_device_from_environment_exits_2(monkeypatch, capsys):
    monkeypatch.setenv("DIFFSIM_DEVICE", "cuda:7")
    assert main(["validate", "mpm", "--only", "free_fall"]) == 2
    assert "cuda:7" in capsys.readouterr().err


def test_argparse_errors_exit_2():
    with pytest.raises(SystemExit) as info:
        main(["bench", "mpm", "--particles", "-5", "--grid", "16"])
    assert info.value.code == 2


def _fake_benchmark(monkeypatch, function):
    """Replace the (slow) benchmark run with ``function``; the report formatting stays real."""
    from diffsim.mpm import benchmark

    monkeypatch.setattr(benchmark, "run_benchmark", function)


FAKE_RESULT = {
    "device": "cpu", "particles": 1000, "grid_res": 32, "dt": 1e-4, "substeps_per_frame": 19, "frames": 3,
    "forward_particle_substeps_per_s": 2.0e6, "forward_ms_per_substep": 0.5,
    "forward_backward_particle_substeps_per_s": 4.0e5, "backward_forward_ratio": 4.0,
    "peak_memory_bytes": 300 * 2**20, "rollout_state_bytes": 2**20, "rollout_states_allocated": 7,
}


def test_bench_passes_options_and_prints_json(monkeypatch, capsys):
    calls = []

    def run_benchmark(**kwargs):
        calls.append(kwargs)
        return dict(FAKE_RESULT)

    _fake_benchmark(monkeypatch, run_benchmark)
    assert main(["bench", "mpm", "--particles", "1000", "--grid", "32", "--frames", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["forward_particle_substeps_per_s"] == 2.0e6
    assert calls == [dict(particles=1000, grid_res=32, dt=1e-4, substeps=19, frames=3, repeats=3, device="cpu")]

    assert main(["bench", "mpm", "--particles", "10", "--grid", "16", "--repeats", "1"]) == 0
    table = capsys.readouterr().out
    assert "2.000 M particle-substeps/s" in table and "backward/forward 4.00" in table
    assert calls[-1]["repeats"] == 1


def test_simulation_errors_exit_2_without_traceback(monkeypatch, capsys):
    def run_benchmark(**kwargs):
        raise SimulationDiverged(12, "particle_x", 3)

    _fake_benchmark(monkeypatch, run_benchmark)
    assert main(["bench", "mpm", "--particles", "10", "--grid", "16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "diverged" in err
