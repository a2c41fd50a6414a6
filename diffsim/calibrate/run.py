"""The ``diffsim calibrate rod`` workflow: fit a cable's parameters on a train split, score the fit
on train and eval with the data set's metrics, and write parameters, metrics and overlay plots.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from diffsim.calibrate.cable import GIVEN_FRAMES, CableParameters, simulate_recordings
from diffsim.calibrate.fit import FitOptions, fit_cable
from diffsim.calibrate.recordings import CableRecordings, evaluate, frozen_interior_prediction, load_recordings
from diffsim.core.files import write_json_atomic


def _score(predicted: np.ndarray, recordings: CableRecordings, given_frames: int) -> dict:
    scores = evaluate(predicted, recordings, given_frames=given_frames)
    frozen = evaluate(frozen_interior_prediction(recordings), recordings, given_frames=given_frames)
    return {
        "l1_all": float(scores["l1_all"]),
        "interior_mean_m": float(scores["interior_mean_m"]),
        "recordings": int(recordings.num_recordings),
        "frozen_interior_l1_all": float(frozen["l1_all"]),
        "frozen_interior_interior_mean_m": float(frozen["interior_mean_m"]),
    }


def plot_overlays(predicted: np.ndarray, recordings: CableRecordings, path: Path, *, recordings_shown: int = 3,
                  frames_shown: int = 5) -> Path:
    """Side (x-z) and top (x-y) views of simulated vs recorded markers at a few frames."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = min(recordings_shown, recordings.num_recordings)
    frames = np.linspace(0, recordings.num_frames - 1, frames_shown).round().astype(int)
    fig, axes = plt.subplots(2 * shown, frames_shown, figsize=(3.2 * frames_shown, 3.0 * 2 * shown), squeeze=False)
    for r in range(shown):
        for c, f in enumerate(frames):
            rec, sim = recordings.positions[r, f], predicted[r, f]
            for row, (axis, label) in enumerate(((2, "z"), (1, "y"))):
                ax = axes[2 * r + row, c]
                ax.plot(rec[:, 0], rec[:, axis], "k.-", label="recorded")
                ax.plot(sim[:, 0], sim[:, axis], "r.-", label="simulated")
                ax.set_aspect("equal", adjustable="datalim")
                ax.set_title(f"rec {recordings.ids[r]}, t = {f / recordings.fps:.2f} s", fontsize=8)
                ax.set_xlabel("x [m]", fontsize=7)
                ax.set_ylabel(f"{label} [m]", fontsize=7)
                ax.tick_params(labelsize=6)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_error_curve(predicted: dict, recordings: dict, path: Path) -> Path:
    """Mean absolute coordinate error per frame, one line per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for split, pred in predicted.items():
        rec = recordings[split]
        error = np.abs(pred - rec.positions).mean(axis=(0, 2, 3))
        ax.plot(np.arange(rec.num_frames) / rec.fps, error * 1000, label=split)
    ax.set_xlabel("time [s]")
    ax.set_ylabel("mean |error| per coordinate [mm]")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_loss(history: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([h["iteration"] for h in history], [h["loss_m"] * 1000 for h in history], "o-", ms=3)
    ax.set_xlabel("iteration")
    ax.set_ylabel("train loss: interior |error| [mm]")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def calibrate_rod(train, eval_, out_dir, *, options: FitOptions | None = None,
                  initial: CableParameters | None = None, device: str | None = None, progress: bool = True,
                  resume: bool = True, log=print) -> dict:
    """Fit on ``train`` (path or recordings), score train and eval, write results into ``out_dir``.

    Writes ``params.json``, ``metrics.json`` (``l1_all`` and ``interior_mean_m`` per split, scored
    after the ``given_frames`` that ``options.initial_velocity`` reads, and under ``starts`` the
    same for both of the data set's protocols, one frame and two),
    ``overlay_eval.png``, ``overlay_train.png``, ``error_per_frame.png``, ``loss.png`` and
    ``fit_state.json`` (the fit resumes from it when run again with ``resume``).
    """
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_rec = train if isinstance(train, CableRecordings) else load_recordings(train)
    eval_rec = eval_ if isinstance(eval_, CableRecordings) else load_recordings(eval_)
    log(f"train: {train_rec.num_recordings} recordings x {train_rec.num_frames} frames x "
        f"{train_rec.num_markers} markers; eval: {eval_rec.num_recordings} recordings")
    options = options or FitOptions()
    state_path = out / "fit_state.json"
    if not resume and state_path.exists():
        state_path.unlink()
    result = fit_cable(train_rec, initial, options=options, device=device, state_path=state_path,
                       progress=progress)
    params = result.parameters
    params.save(out / "params.json")
    left_out = sum(1 for step in result.history if step.get("recordings_left_out"))
    if left_out:
        log(f"{left_out} of {len(result.history)} steps left out recordings whose gradient overflowed "
            f"(see recordings_left_out in metrics.json)")
    if result.best_iteration is not None:
        log(f"kept step {result.best_iteration + 1} of {len(result.history)}, the best of the last stage: "
            f"train loss {result.history[result.best_iteration]['loss_m']:.4f} m")
    log(f"fitted in {result.seconds:.0f} s: bend {params.bend_stiffness:.3g} N m^2, "
        f"twist {params.twist_stiffness:.3g} N m^2, bend damping {params.bend_damping:.3g} N m^2 s, "
        f"damping {params.linear_damping:.3g} 1/s, drag {params.air_drag:.3g} kg/m^2, "
        f"shape memory {params.shape_memory:.2f}")
    given = GIVEN_FRAMES[options.initial_velocity]
    if given > 1:
        log(f"initial velocity {options.initial_velocity!r}: each prediction reads the first {given} frames "
            f"of every marker, so scoring starts at frame {given}")
    predicted, metrics = {}, {"initial_velocity": options.initial_velocity, "given_frames": given}
    for split, rec in (("train", train_rec), ("eval", eval_rec)):
        predicted[split] = simulate_recordings(rec, params, subdivisions=options.subdivisions, device=device,
                                               initial_velocity=options.initial_velocity)
        metrics[split] = _score(predicted[split], rec, given)
        m = metrics[split]
        log(f"{split}: l1_all {m['l1_all']:.4f} m, interior_mean_m {m['interior_mean_m']:.4f} m "
            f"(interior frozen: {m['frozen_interior_l1_all']:.4f} / {m['frozen_interior_interior_mean_m']:.4f})")
        # the data set's two protocols, whichever the fit used: rolled out from one frame (the ends
        # replayed, the interior at rest) and from two (DEFORM's: the interior's recorded velocity)
        m["starts"] = {}
        for start_name, velocity in (("one_frame", "ends"), ("two_frames", "recorded")):
            trajectory = predicted[split] if velocity == options.initial_velocity else simulate_recordings(
                rec, params, subdivisions=options.subdivisions, device=device, initial_velocity=velocity)
            score = _score(trajectory, rec, GIVEN_FRAMES[velocity])
            m["starts"][start_name] = {"initial_velocity": velocity, "given_frames": GIVEN_FRAMES[velocity],
                                       "l1_all": score["l1_all"], "interior_mean_m": score["interior_mean_m"]}
        log(f"{split}: " + ", ".join(f"{k} start l1_all {v['l1_all']:.4f} m" for k, v in m["starts"].items()))
    metrics["fit"] = {"schedule": [list(stage) for stage in options.schedule],
                      "seconds": time.perf_counter() - start, "history": result.history}
    write_json_atomic(out / "metrics.json", metrics)
    plot_overlays(predicted["eval"], eval_rec, out / "overlay_eval.png")
    plot_overlays(predicted["train"], train_rec, out / "overlay_train.png")
    plot_error_curve(predicted, {"train": train_rec, "eval": eval_rec}, out / "error_per_frame.png")
    if result.history:
        plot_loss(result.history, out / "loss.png")
    log(f"wrote {out}/params.json, metrics.json and plots in {time.perf_counter() - start:.0f} s")
    return metrics
