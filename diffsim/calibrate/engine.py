"""One calibration engine for every solver family: named, bounded parameters fitted to batched
recordings, with resume, best-iterate selection and held-out scoring.

A family (:class:`Family`) says what a recording is and how a parameter set is scored; the
engine does the rest:

- **Parameters** (:class:`Parameter`) carry a name, a unit, bounds and an initial value. Positive
  ones are fitted through their logarithm (they span decades), the others linearly; the optimiser
  works on those unconstrained coordinates and clamps them to the bounds.
- **Gradients** come from the family when it can differentiate its rollout
  (:meth:`Family.loss_gradients`); otherwise the engine takes central finite differences in the
  fitted coordinates, one batched evaluation of every recording per probe. Either way the
  gradient is per recording, and each recording's is clipped to ``clip`` times the median norm
  before they are averaged, so one recording whose rollout diverges cannot throw the fit.
- **Adam** on the mean loss, keeping the best iterate (the training loss of every iterate is
  evaluated anyway: it is the centre of the probes), after optional warm-up stages on the
  dominant parameters alone (a family's ``warmup``).
- **Resume**: the optimiser's state is rewritten atomically after every iteration
  (``fit_state.json``); a run killed at any moment continues from the last iteration.
- :func:`calibrate` fits on the train recordings, scores both splits with the family's metrics and
  writes ``params.json``, ``metrics.json`` (``{"train": {...}, "eval": {...}, "fit": {...}}``), the
  fit curve ``loss.png`` and the family's overlay plots.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from diffsim.core.files import write_json_atomic
from diffsim.core.implicit import NotConverged
from diffsim.errors import ConfigError, InvalidParameter, SimulationDiverged

__all__ = ["Family", "FitResult", "FitSettings", "Parameter", "calibrate", "fit", "open_recordings",
           "select_recordings"]


def open_recordings(spec: str | Path, what: str, fields: Sequence[str], expected: str):
    """A recording file named as ``FILE.npz`` or ``FILE.npz@SLICE``: (its arrays, the path, the
    selection text). Refuses a missing or unreadable file, or one without ``fields``, in a
    sentence naming the file and field and saying what was ``expected``."""
    path, _, selection = str(spec).partition("@")
    if not Path(path).exists():
        raise ConfigError(f"{path}: no such recording file")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path}: not a readable .npz of {what} ({error})") from error
    for key in fields:
        if key not in data:
            raise ConfigError(f"{path}: field '{key}' is missing; expected {expected}")
    return data, path, selection


def select_recordings(recordings, spec: str | Path, selection: str, what: str):
    """``recordings.select`` of the slice ``selection`` (Python's syntax, e.g. ``0::2``; a single
    index picks one), refusing a malformed or empty selection."""
    if not selection:
        return recordings
    if not re.fullmatch(r"-?\d*(:-?\d*){0,2}", selection):
        raise ConfigError(f"{spec}: the selection after '@' must be a slice such as 0::2 or 10:50")
    parts = [int(p) if p else None for p in selection.split(":")]
    if len(parts) == 1 and parts[0] is None:
        raise ConfigError(f"{spec}: the selection after '@' is empty; give a slice such as 0::2")
    picked = recordings.select(slice(*parts) if len(parts) > 1 else slice(parts[0], parts[0] + 1))
    if not len(picked):
        raise ConfigError(f"{spec}: the selection picks no {what} (the file has {len(recordings)})")
    return picked


@dataclass(frozen=True)
class Parameter:
    """A fitted physical parameter: ``initial`` within [``lower``, ``upper``] (in ``unit``),
    fitted through its logarithm if ``log`` (positive parameters)."""

    name: str
    initial: float
    lower: float
    upper: float
    unit: str = ""
    log: bool = True
    doc: str = ""
    #: a linear parameter's typical size: it is fitted in these units, so that one learning rate
    #: suits parameters in radians and in intensity levels alike
    scale: float = 1.0

    def __post_init__(self):
        if not (math.isfinite(self.lower) and math.isfinite(self.upper) and self.lower < self.upper):
            raise InvalidParameter(f"{self.name} bounds", (self.lower, self.upper), "finite, lower < upper")
        if self.log and self.lower <= 0:
            raise InvalidParameter(f"{self.name} lower bound", self.lower, "(0, inf) for a log-fitted parameter")
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise InvalidParameter(f"{self.name} scale", self.scale, "(0, inf)")
        if not self.lower <= self.initial <= self.upper:
            raise InvalidParameter(self.name, self.initial, f"[{self.lower:g}, {self.upper:g}] {self.unit}".strip())

    def encode(self, value: float) -> float:
        """The fitted coordinate of ``value``."""
        return math.log(value) if self.log else float(value) / self.scale

    def decode(self, u: float) -> float:
        return math.exp(u) if self.log else float(u) * self.scale

    @property
    def bounds(self) -> tuple[float, float]:
        """The bounds in the fitted coordinate."""
        return self.encode(self.lower), self.encode(self.upper)


class Family:
    """What the engine needs from a solver family (subclass it).

    ``parameters`` lists the fitted parameters; :meth:`losses` scores a parameter set on every
    recording of a batch; :meth:`metrics` gives the family's metric keys for a split;
    :meth:`plot` draws overlays of simulated against recorded motion. A family that can
    differentiate its rollout overrides :meth:`loss_gradients`."""

    name = "family"
    parameters: Sequence[Parameter] = ()
    #: default stages fitted before all parameters together: ((iterations, (names, ...)), ...); a
    #: stage may add a third entry, a dict of options handed to :meth:`begin_stage`
    warmup: tuple = ()
    #: the options of the last stage (the one on all parameters), for :meth:`begin_stage`
    final_stage_options: dict = {}
    #: False when stages score differently (a shorter horizon first): the best iterate is then
    #: taken from the last stage only
    stages_share_loss: bool = True
    #: False to carry Adam's moments from one stage into the next
    fresh_adam_per_stage: bool = True
    #: per fitted coordinate, a weight of the gradient norm that per-recording clipping compares
    #: (None: the plain norm in the fitted coordinates)
    clip_weights: np.ndarray | None = None
    #: the loss's unit, for logs and plots (e.g. "m")
    loss_unit = ""

    def losses(self, values: dict[str, float], recordings) -> np.ndarray:
        """The loss of each recording under ``values`` (one entry per recording)."""
        raise NotImplementedError

    def begin_stage(self, options: dict) -> None:  # noqa: B027 -- optional hook, a no-op by default
        """Called before every iteration with the options of its stage (e.g. a horizon)."""

    def loss_gradients(self, values: dict[str, float], recordings) -> tuple[np.ndarray, np.ndarray] | None:
        """(losses, d loss / d parameter value per recording and parameter, in the parameters'
        order), or None to have the engine take finite differences."""
        return None

    def residuals(self, values: dict[str, float], recordings) -> list[np.ndarray] | None:
        """Each recording's residual vector r_k, with loss_k = sum(r_k^2), for the Levenberg-
        Marquardt method; None if the family has none."""
        return None

    def metrics(self, values: dict[str, float], recordings) -> dict:
        raise NotImplementedError

    def plot(self, values: dict[str, float], recordings, path: Path) -> Path | None:
        return None

    def count(self, recordings) -> int:
        """How many recordings a batch holds."""
        return len(recordings)


@dataclass
class FitSettings:
    """Settings of :func:`fit`."""

    iterations: int = 25  #: Adam iterations on all parameters
    learning_rate: float = 0.05  #: Adam's step in the fitted coordinates (log-parameters: ~5% per step)
    fd_step: float = 0.01  #: central-difference step in the fitted coordinates (1% for a log-parameter)
    clip: float = 5.0  #: each recording's gradient is clipped to this many times the median norm
    #: stages before the one on all parameters, as (iterations, parameter names); None: the
    #: family's own (:attr:`Family.warmup`). Adam, normalising each coordinate's step, moves a
    #: weakly seen parameter as fast as the dominant one: fitted together from far off, the cube's
    #: inertia ran to its bound while the friction was still 40% high.
    warmup: tuple | None = None
    #: the learning rate falls geometrically over the run, from ``learning_rate`` at the first
    #: iteration to ``decay_to`` times it at the last (1: constant). Adam's steps keep their size
    #: while the gradient's sign holds, so at a constant rate it overshoots a sharp minimum by
    #: several steps (an elastic block's modulus: 24% past, from 3.3x off).
    decay_to: float = 1.0
    #: "adam" (on the families' gradients), or "lm": Levenberg-Marquardt on the residuals
    #: (:meth:`Family.residuals`), their Jacobian by central differences in the fitted coordinates.
    #: Small fits whose parameters trade off against each other (a gel's E against its Poisson
    #: ratio) converge in a few LM steps where Adam circles for hundreds.
    method: str = "adam"
    #: Levenberg-Marquardt stops once a step moves every fitted coordinate less than this (1e-4:
    #: 0.01% of a log-fitted parameter)
    lm_step_tolerance: float = 1e-4

    def __post_init__(self):
        if self.method not in ("adam", "lm"):
            raise InvalidParameter("method", self.method, "'adam' or 'lm'")
        if not (isinstance(self.iterations, int) and self.iterations >= 1):
            raise InvalidParameter("iterations", self.iterations, "positive integers")
        if not (0 < self.decay_to <= 1):
            raise InvalidParameter("decay_to", self.decay_to, "(0, 1]")
        for name in ("learning_rate", "fd_step", "clip"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise InvalidParameter(name, value, "(0, inf)")


@dataclass
class FitResult:
    values: dict[str, float]  #: the best iterate's parameters
    initial_values: dict[str, float]
    history: list[dict] = field(default_factory=list)  #: per iteration: loss, values, gradient norm, seconds
    best_iteration: int = 0
    seconds: float = 0.0
    evaluations: int = 0  #: batched evaluations of the training recordings


def _values(parameters: Sequence[Parameter], u: np.ndarray) -> dict[str, float]:
    return {p.name: p.decode(float(x)) for p, x in zip(parameters, u, strict=True)}


def _gradients(family: Family, u: np.ndarray, recordings, step: float,
               active: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(losses at u, per-recording gradient in the fitted coordinates over the ``active``
    parameters (zero for the others), evaluations used)."""
    parameters = family.parameters
    values = _values(parameters, u)
    exact = family.loss_gradients(values, recordings)
    if exact is not None:
        losses, grads = exact
        # chain rule to the fitted coordinates: d value / d u is the value (log) or the scale
        jacobian = np.array([values[p.name] if p.log else p.scale for p in parameters])
        return np.asarray(losses, dtype=np.float64), np.asarray(grads, dtype=np.float64) * jacobian * active, 1
    centre = np.asarray(family.losses(_values(parameters, u), recordings), dtype=np.float64)
    grads = np.zeros((centre.size, len(parameters)))
    for j, p in enumerate(parameters):
        if not active[j]:
            continue
        lower, upper = p.bounds
        # a probe stays inside the bounds: one-sided at a bound
        up, down = min(u[j] + step, upper), max(u[j] - step, lower)
        probe = u.copy()
        probe[j] = up
        plus = np.asarray(family.losses(_values(parameters, probe), recordings), dtype=np.float64)
        probe[j] = down
        minus = np.asarray(family.losses(_values(parameters, probe), recordings), dtype=np.float64)
        grads[:, j] = (plus - minus) / (up - down)
    return centre, grads, 1 + 2 * int(np.sum(active))


def _clipped_mean(grads: np.ndarray, clip: float, weights: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """The mean of per-recording gradients, each clipped to ``clip`` x the median norm (of the
    rows times ``weights``, when given); and how many were clipped. Non-finite rows (a diverged
    rollout) are left out."""
    finite = np.all(np.isfinite(grads), axis=1)
    if not finite.any():
        raise ConfigError("every recording's gradient is non-finite at the current parameters: "
                          "the simulation diverges there; narrow the bounds or change the initial values.")
    rows = grads[finite]
    norms = np.linalg.norm(rows if weights is None else rows * weights, axis=1)
    limit = clip * max(float(np.median(norms)), 1e-300)
    scale = np.minimum(1.0, limit / np.maximum(norms, 1e-300))
    return (rows * scale[:, None]).mean(axis=0), int(np.sum(scale < 1.0) + np.sum(~finite))


def _start_values(parameters: Sequence[Parameter], initial: dict[str, float] | None) -> dict[str, float]:
    names = [p.name for p in parameters]
    start_values = {p.name: p.initial for p in parameters}
    by_name = {p.name: p for p in parameters}
    for name, value in (initial or {}).items():
        if name not in start_values:
            raise InvalidParameter("initial", name, ", ".join(names))
        p = by_name[name]
        if not (math.isfinite(value) and p.lower <= value <= p.upper):
            raise InvalidParameter(name, value, f"[{p.lower:g}, {p.upper:g}] {p.unit}".strip())
        start_values[name] = float(value)
    return start_values


def _fit_lm(family: Family, recordings, *, settings: FitSettings, state_path: Path | None,
            initial: dict[str, float] | None, progress: bool) -> FitResult:
    """Levenberg-Marquardt on the mean of the recordings' sums of squared residuals, in the fitted
    coordinates (clamped to the bounds); each iteration takes one Jacobian (2 evaluations per
    parameter) and tries damped Gauss-Newton steps until one lowers the loss (at most 8)."""
    parameters = list(family.parameters)
    names = [p.name for p in parameters]
    lower = np.array([p.bounds[0] for p in parameters])
    upper = np.array([p.bounds[1] for p in parameters])
    start_values = _start_values(parameters, initial)
    u = np.array([p.encode(start_values[p.name]) for p in parameters])
    damping, history, evaluations, seconds = 1e-3, [], 0, 0.0
    if state_path is not None and Path(state_path).exists():
        saved = json.loads(Path(state_path).read_text())
        if saved.get("family") != family.name or saved.get("parameters") != names or saved.get("method") != "lm":
            raise ConfigError(f"{state_path} holds a {saved.get('family')} fit of {saved.get('parameters')} "
                              f"({saved.get('method', 'adam')}), not an lm {family.name} fit of {names}; "
                              "choose another --out or restart.")
        u, damping = np.array(saved["u"]), saved["damping"]
        history, evaluations, seconds = saved["history"], saved["evaluations"], saved["seconds"]

    def residual(x):
        parts = family.residuals(_values(parameters, x), recordings)
        if parts is None:
            raise ConfigError(f"the {family.name} family has no residuals; use method='adam'.")
        r = np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1) for p in parts])
        return r / math.sqrt(len(parts))  # the loss is the mean over recordings of sum(r_k^2)

    r = residual(u)
    evaluations += 1
    bar = tqdm(total=settings.iterations, initial=min(len(history), settings.iterations), disable=not progress,
               desc=f"calibrate {family.name} (lm)", unit="it")
    for it in range(len(history), settings.iterations):
        tick = time.perf_counter()
        loss = float(r @ r)
        jac = np.zeros((r.size, len(u)))
        for j in range(len(u)):
            up, down = min(u[j] + settings.fd_step, upper[j]), max(u[j] - settings.fd_step, lower[j])
            probe = u.copy()
            probe[j] = up
            plus = residual(probe)
            probe[j] = down
            jac[:, j] = (plus - residual(probe)) / (up - down)
        evaluations += 2 * len(u)
        gradient, normal = jac.T @ r, jac.T @ jac
        record = {"iteration": it, "loss": loss, "values": _values(parameters, u), "fitted": names,
                  "grad_norm": float(np.linalg.norm(2 * gradient))}
        accepted = False
        for _ in range(8):
            system = normal + damping * np.diag(np.maximum(np.diag(normal), 1e-12))
            trial = np.clip(u - np.linalg.solve(system, gradient), lower, upper)
            try:
                r_trial = residual(trial)
            except (SimulationDiverged, NotConverged):  # a step too far (a solver stalls there): shorten it
                r_trial = np.full_like(r, np.inf)
            evaluations += 1
            if np.all(np.isfinite(r_trial)) and float(r_trial @ r_trial) < loss:
                moved = float(np.max(np.abs(trial - u)))
                u, r, damping, accepted = trial, r_trial, max(damping / 3.0, 1e-9), True
                break
            damping *= 4.0
        seconds += time.perf_counter() - tick
        record.update(damping=damping, accepted=accepted, loss_after=float(r @ r), seconds=seconds)
        history.append(record)
        if state_path is not None:
            write_json_atomic(Path(state_path), {
                "family": family.name, "parameters": names, "method": "lm", "u": u.tolist(), "damping": damping,
                "history": history, "evaluations": evaluations, "seconds": seconds})
        bar.update(1)
        bar.set_postfix(loss=f"{float(r @ r):.4g}{family.loss_unit}")
        if (not accepted and damping > 1e8) or (accepted and moved < settings.lm_step_tolerance):
            break  # converged: no damped step lowers the loss, or the last one moved the parameters < 0.01%
    bar.close()
    # every accepted step lowers the loss: the last point is the best
    best = max([h["iteration"] for h in history if h["accepted"]], default=-1) + 1
    return FitResult(values=_values(parameters, u), initial_values=dict(start_values), history=history,
                     best_iteration=best, seconds=seconds, evaluations=evaluations)


def fit(family: Family, recordings, *, settings: FitSettings | None = None, state_path: Path | None = None,
        initial: dict[str, float] | None = None, progress: bool = True) -> FitResult:
    """Adam on the mean training loss over ``family.parameters``; resumes from ``state_path``."""
    settings = settings or FitSettings()
    if settings.method == "lm":
        return _fit_lm(family, recordings, settings=settings, state_path=state_path, initial=initial,
                       progress=progress)
    parameters = list(family.parameters)
    names = [p.name for p in parameters]
    start_values = _start_values(parameters, initial)
    u = np.array([p.encode(start_values[p.name]) for p in parameters])
    lower = np.array([p.bounds[0] for p in parameters])
    upper = np.array([p.bounds[1] for p in parameters])
    m, v = np.zeros_like(u), np.zeros_like(u)
    history: list[dict] = []
    best = (math.inf, u.copy(), 0)
    evaluations, seconds = 0, 0.0
    if state_path is not None and Path(state_path).exists():
        saved = json.loads(Path(state_path).read_text())
        if saved.get("family") != family.name or saved.get("parameters") != names:
            raise ConfigError(f"{state_path} holds a {saved.get('family')} fit of {saved.get('parameters')}, not a "
                              f"{family.name} fit of {names}; choose another --out or restart.")
        u, m, v = (np.array(saved[k], dtype=np.float64) for k in ("u", "m", "v"))
        history, evaluations, seconds = saved["history"], saved["evaluations"], saved["seconds"]
        best = (saved["best_loss"], np.array(saved["best_u"]), saved["best_iteration"])
    warmup = family.warmup if settings.warmup is None else settings.warmup
    stages = []  # (first iteration, mask of the parameters it fits, the family's options for it)
    first = 0
    for stage in (*warmup, (settings.iterations, tuple(names), family.final_stage_options)):
        count, stage_names, options = (*stage, {})[:3] if len(stage) == 2 else stage
        unknown = [n for n in stage_names if n not in names]
        if unknown or not (isinstance(count, int) and count >= 0):
            raise InvalidParameter("warmup", (count, stage_names), f"(iterations >= 0, names among {names})")
        stages.append((first, np.array([n in stage_names for n in names]), dict(options)))
        first += count
    total = first
    final_start = stages[-1][0]
    beta1, beta2 = 0.9, 0.999
    bar = tqdm(total=total, initial=min(len(history), total), disable=not progress,
               desc=f"calibrate {family.name}", unit="it")
    for it in range(len(history), total):
        tick = time.perf_counter()
        stage_start, active, options = [stage for stage in stages if stage[0] <= it][-1]
        family.begin_stage(options)
        if it == stage_start and family.fresh_adam_per_stage:
            m, v = np.zeros_like(u), np.zeros_like(u)
        losses, grads, used = _gradients(family, u, recordings, settings.fd_step, active)
        evaluations += used
        loss = float(np.mean(losses[np.isfinite(losses)])) if np.isfinite(losses).any() else math.inf
        if loss < best[0] and (family.stages_share_loss or it >= final_start):
            best = (loss, u.copy(), it)
        g, clipped = _clipped_mean(grads, settings.clip, family.clip_weights)
        t = it - stage_start + 1 if family.fresh_adam_per_stage else it + 1
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        rate = settings.learning_rate * settings.decay_to ** (it / max(1, total - 1))
        step = rate * (m / (1 - beta1**t)) / (np.sqrt(v / (1 - beta2**t)) + 1e-12)
        record = {"iteration": it, "loss": loss, "values": _values(parameters, u),
                  "fitted": [n for n, a in zip(names, active, strict=True) if a],
                  "grad_norm": float(np.linalg.norm(g)), "learning_rate": rate, "recordings_clipped": clipped}
        u = np.clip(u - step, lower, upper)
        seconds += time.perf_counter() - tick
        record["seconds"] = seconds
        history.append(record)
        if state_path is not None:
            write_json_atomic(Path(state_path), {
                "family": family.name, "parameters": names, "u": u.tolist(), "m": m.tolist(), "v": v.tolist(),
                "history": history, "evaluations": evaluations, "seconds": seconds, "best_loss": best[0],
                "best_u": best[1].tolist(), "best_iteration": best[2]})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4g}{family.loss_unit}")
    bar.close()
    return FitResult(values=_values(parameters, best[1]), initial_values=dict(start_values), history=history,
                     best_iteration=int(best[2]), seconds=seconds, evaluations=evaluations)


def plot_fit_curve(history: list[dict], path: Path, unit: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([h["iteration"] for h in history], [h["loss"] for h in history], "o-", ms=3)
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"train loss [{unit}]" if unit else "train loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def calibrate(family: Family, train, eval_, out_dir, *, settings: FitSettings | None = None,
              initial: dict[str, float] | None = None, resume: bool = True, progress: bool = True,
              log: Callable[[str], None] = print) -> dict:
    """Fit ``family`` on ``train``, score ``train`` and ``eval_`` at the initial and fitted
    parameters, and write ``params.json``, ``metrics.json``, ``loss.png`` and the overlays into
    ``out_dir``. Returns the metrics."""
    settings = settings or FitSettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "fit_state.json"
    if not resume and state_path.exists():
        state_path.unlink()
    start = time.perf_counter()
    log(f"{family.name}: {family.count(train)} train and {family.count(eval_)} eval recordings, "
        f"fitting {', '.join(p.name for p in family.parameters)}")
    result = fit(family, train, settings=settings, state_path=state_path, initial=initial, progress=progress)
    log(f"kept iteration {result.best_iteration} of {len(result.history)}: "
        + ", ".join(f"{k} {v:.4g}" for k, v in result.values.items()) + f" ({result.seconds:.0f} s fitting)")
    parameters = {p.name: {"value": result.values[p.name], "unit": p.unit, "initial": result.initial_values[p.name],
                           "bounds": [p.lower, p.upper], "doc": p.doc} for p in family.parameters}
    write_json_atomic(out / "params.json", {"family": family.name, "parameters": parameters})
    metrics: dict = {}
    for split, recordings in (("train", train), ("eval", eval_)):
        metrics[split] = family.metrics(result.values, recordings)
        metrics[split]["initial"] = family.metrics(result.initial_values, recordings)
        log(f"{split}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics[split].items() if isinstance(v, float))
            + " (initial: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics[split]["initial"].items()
                                         if isinstance(v, float)) + ")")
        family.plot(result.values, recordings, out / f"overlay_{split}.png")
    metrics["fit"] = {"settings": asdict(settings), "iterations": len(result.history),
                      "best_iteration": result.best_iteration, "evaluations": result.evaluations,
                      "fit_seconds": result.seconds, "wall_s": time.perf_counter() - start,
                      "history": result.history}
    write_json_atomic(out / "metrics.json", metrics)
    if result.history:
        plot_fit_curve(result.history, out / "loss.png", family.loss_unit)
    log(f"wrote {out}/params.json, metrics.json and plots")
    return metrics
