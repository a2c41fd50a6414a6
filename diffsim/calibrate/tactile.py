"""Tactile mechanics calibration: the elastomer's Young's modulus, Poisson's ratio and its
friction against an indenter, fitted to the marker fields and contact forces of recorded presses
(a sphere pressed into the gel and dragged across it).

A recording file (``.npz``) holds presses on one sensor pad:

- the pad: ``pad_size`` (3,) [m] (a box on a rigid backing), ``pad_cells`` (3,) (tet cells per
  axis), ``density`` [kg/m^3], ``marker_grid`` (2,) (rows, cols over 90% of the top face),
  ``contact_stiffness`` [Pa/m] (the penalty contact's pressure per depth: a model constant, kept
  apart from E so that the fit does not move it);
- the indenter: a sphere of ``indenter_radius`` [m];
- ``young_modulus`` [Pa], ``poisson_ratio``, ``friction``; ``fit``: the names to fit (their
  values in the file are only the fit's initial guess);
- ``frame_dt`` [s]: one quasi-static frame; ``marker_scale`` [m] and ``force_scale`` [N]: the
  measurement noise the loss divides by;
- per press: ``start`` (R, 3) [m], the indenter's initial centre; ``velocity`` (R, F - 1, 3)
  [m/s], its velocity over each frame; ``markers`` (R, F, M, 3) [m], marker positions in the sensor
  frame; ``force`` (R, F, 3) [N], the contact force on the sensor; frame 0 before the motion;
  optionally ``true_<name>``.

Each press is simulated with quasi-static FEM steps (:class:`~diffsim.fem.FEMSolver`,
``integrator="quasistatic"``), whose gradients come from the implicit function theorem (one
adjoint solve per frame). The loss of a press is the mean over frames of its marker error
(mean squared, over ``marker_scale``^2) plus its force error (squared, over ``force_scale``^2).
:func:`synthesize` makes presses with known parameters and noise.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import warp as wp

from diffsim.calibrate.engine import Family, Parameter, open_recordings, select_recordings
from diffsim.errors import ConfigError

__all__ = ["PARAMETERS", "Presses", "TactileMechanicsFamily", "load_tactile_presses", "synthesize"]

PARAMETERS = {
    "young_modulus": dict(lower=1e4, upper=1e7, unit="Pa", log=True, doc="elastomer Young's modulus"),
    "poisson_ratio": dict(lower=0.05, upper=0.49, unit="", log=False, scale=0.1, doc="elastomer Poisson's ratio"),
    "friction": dict(lower=0.05, upper=2.0, unit="", log=True, doc="indenter-elastomer Coulomb friction"),
}
#: the starting guess :func:`synthesize` writes for a fitted parameter
INITIAL_GUESS = {"young_modulus": 1e5, "poisson_ratio": 0.3, "friction": 0.3}
_SCALARS = ("density", "indenter_radius", "young_modulus", "poisson_ratio", "friction", "frame_dt", "marker_scale",
            "force_scale", "contact_stiffness")


@dataclass
class Presses:
    """Indenter presses on one pad with their marker fields and forces (module docstring)."""

    known: dict
    fit: tuple[str, ...]
    pad_size: np.ndarray
    pad_cells: np.ndarray
    marker_grid: tuple[int, int]
    start: np.ndarray  #: (R, 3) [m]
    velocity: np.ndarray  #: (R, F - 1, 3) [m/s]
    markers: np.ndarray  #: (R, F, M, 3) [m]
    force: np.ndarray  #: (R, F, 3) [N]
    truth: dict = dataclasses.field(default_factory=dict)
    source: str = ""

    def __len__(self) -> int:
        return len(self.start)

    def select(self, index) -> Presses:
        picked = np.arange(len(self))[index]
        return dataclasses.replace(self, start=self.start[picked], velocity=self.velocity[picked],
                                   markers=self.markers[picked], force=self.force[picked])

    def save(self, path: str | Path) -> None:
        np.savez(path, fit=np.array(self.fit), pad_size=self.pad_size, pad_cells=self.pad_cells,
                 marker_grid=np.array(self.marker_grid), start=self.start, velocity=self.velocity,
                 markers=self.markers, force=self.force, **{k: np.float64(v) for k, v in self.known.items()},
                 **{f"true_{k}": np.float64(v) for k, v in self.truth.items()})


def load_tactile_presses(spec: str | Path) -> Presses:
    """Presses from an ``.npz`` (format in the module docstring), optionally a slice of them after
    ``@``: ``FILE.npz@0::2``."""
    fields = ("fit", "pad_size", "pad_cells", "marker_grid", "start", "velocity", "markers", "force", *_SCALARS)
    data, path, selection = open_recordings(
        spec, "tactile presses", fields,
        "the pad, the indenter, fit, and per press start (R, 3) [m], velocity (R, F-1, 3) [m/s], markers "
        "(R, F, M, 3) [m] and force (R, F, 3) [N] (see diffsim.calibrate.tactile)")
    fit = tuple(str(n) for n in np.atleast_1d(data["fit"]))
    unknown = [n for n in fit if n not in PARAMETERS]
    if not fit or unknown:
        raise ConfigError(f"{path}: field 'fit' names {unknown or 'nothing'}; expected some of {sorted(PARAMETERS)}")
    markers, force = np.asarray(data["markers"], np.float64), np.asarray(data["force"], np.float64)
    start, velocity = np.atleast_2d(data["start"]).astype(np.float64), np.asarray(data["velocity"], np.float64)
    r = len(start)
    grid = tuple(int(n) for n in data["marker_grid"])
    if markers.ndim != 4 or markers.shape[:1] != (r,) or markers.shape[2:] != (grid[0] * grid[1], 3):
        raise ConfigError(f"{path}: field 'markers' has shape {markers.shape}; expected (R={r}, F, "
                          f"M={grid[0] * grid[1]}, 3) marker positions in metres")
    frames = markers.shape[1]
    if force.shape != (r, frames, 3):
        raise ConfigError(f"{path}: field 'force' has shape {force.shape}; expected (R={r}, F={frames}, 3) [N]")
    if velocity.shape != (r, frames - 1, 3):
        raise ConfigError(f"{path}: field 'velocity' has shape {velocity.shape}; expected (R={r}, F-1={frames - 1}, "
                          "3) [m/s]")
    for name, values in (("markers", markers), ("force", force), ("velocity", velocity)):
        if not np.all(np.isfinite(values)):
            press = int(np.argwhere(~np.isfinite(values))[0][0])
            raise ConfigError(f"{path}: field '{name}' has NaN or inf in press {press}; expected finite values")
    if np.abs(markers).max() > 1.0:
        raise ConfigError(f"{path}: field 'markers' reaches {np.abs(markers).max():.3g}; expected metres "
                          "(millimetres? divide by 1000)")
    presses = Presses({k: float(data[k]) for k in _SCALARS}, fit, np.asarray(data["pad_size"], np.float64),
                      np.asarray(data["pad_cells"], np.int64), grid, start, velocity, markers, force,
                      {k[5:]: float(data[k]) for k in data.files if k.startswith("true_")}, str(path))
    return select_recordings(presses, spec, selection, "presses")


# ---------------------------------------------------------------------------------- simulation
@wp.kernel
def _marker_loss(x: wp.array(dtype=wp.vec3), target: wp.array(dtype=wp.vec3), scale: float,
                 loss: wp.array(dtype=float)):
    i = wp.tid()
    d = x[i] - target[i]
    wp.atomic_add(loss, 0, scale * wp.dot(d, d))


class _Press:
    """One press as a one-world FEM scene, re-run for each parameter set."""

    def __init__(self, presses: Presses, k: int, device=None):
        from diffsim.core import Scene
        from diffsim.fem import FEMBuilder, FEMSolver, TactileSensor
        from diffsim.geometry import collider_sphere
        from diffsim.geometry.tetmesh import tet_mesh_pad

        known = presses.known
        mesh = tet_mesh_pad(tuple(presses.pad_size), tuple(int(n) for n in presses.pad_cells))
        builder = FEMBuilder(gravity=(0.0, 0.0, 0.0))
        builder.add_body(mesh, young_modulus=known["young_modulus"], poisson_ratio=known["poisson_ratio"],
                         density=known["density"], contact_stiffness=known["contact_stiffness"],
                         fixed_nodes=mesh.vertices[:, 2] < 1e-12)
        builder.add_collider(collider_sphere(known["indenter_radius"], position=tuple(presses.start[k]),
                                             friction=known["friction"]))
        self.model = builder.finalize(device, requires_grad=True)
        # Newton to 50 uN (the forces are ~0.3 N, their noise ~2 mN): at 10 uN some parameter sets
        # stalled at the float32 floor of the residual
        solver = FEMSolver(self.model, integrator="quasistatic", contact_smoothing=2e-5, friction_velocity=5e-3,
                           newton_tolerance=5e-5)
        self.scene = Scene(self.model, solver, frame_dt=known["frame_dt"], substeps=1)
        self.sensor = TactileSensor(self.model, 0, marker_grid=presses.marker_grid, image_shape=(2, 2))
        self.presses, self.k = presses, k

    def _controls(self, values: dict) -> list:
        m = self.model
        for name, value in values.items():
            arr = {"young_modulus": m.tet_young_modulus, "poisson_ratio": m.tet_poisson_ratio,
                   "friction": m.collider_friction}[name]
            arr.assign(np.full(arr.shape[0], value, dtype=np.float32))
        controls = []
        for v in self.presses.velocity[self.k]:
            c = m.control(requires_grad=True)
            c.collider_velocity.assign(np.asarray([v], dtype=np.float32))
            controls.append(c)
        return controls

    def readings(self, values: dict) -> tuple[np.ndarray, np.ndarray]:
        """Simulated (markers (F, M, 3), force (F, 3)) under ``values``."""
        controls = self._controls(values)
        state, nxt = self.model.state(), self.model.state()
        markers, force = [], []
        for f in range(len(controls) + 1):
            reading = self.sensor.read(self.model, state).numpy()
            markers.append(reading["marker_position"].reshape(-1, 3))
            force.append(reading["force"][0])
            if f < len(controls):
                self.scene.advance(state, nxt, controls[f])
                state, nxt = nxt, state
        return np.array(markers, np.float64), np.array(force, np.float64)

    def gradient(self, values: dict, fit: tuple[str, ...]) -> tuple[float, np.ndarray]:
        """(the loss, d(loss) / d(each fitted parameter)) by the tape (implicit differentiation per
        frame); the rollout's loss is this press's :func:`_loss`."""
        controls = self._controls(values)
        p, k = self.presses, self.k
        frames = len(controls) + 1  # the loss skips frame 0 (before any motion), as _loss does
        markers = [wp.array(p.markers[k, f].astype(np.float32), dtype=wp.vec3, device=self.model.device)
                   for f in range(frames)]
        forces = [wp.array(p.force[k, f:f + 1].astype(np.float32), dtype=wp.vec3, device=self.model.device)
                  for f in range(frames)]
        m_scale = 1.0 / ((frames - 1) * markers[0].shape[0] * p.known["marker_scale"] ** 2)
        f_scale = 1.0 / ((frames - 1) * p.known["force_scale"] ** 2)

        def frame_loss(model, state, frame, loss):
            reading = self.sensor.read(model, state)
            wp.launch(_marker_loss, dim=markers[0].shape[0], inputs=[reading.marker_position, markers[frame + 1],
                                                                     m_scale], outputs=[loss], device=model.device)
            wp.launch(_marker_loss, dim=1, inputs=[reading.force, forces[frame + 1], f_scale], outputs=[loss],
                      device=model.device)

        rollout = self.scene.rollout(self.model.state(requires_grad=True), controls, frame_loss=frame_loss)
        loss = float(rollout.forward())
        rollout.backward()
        m = self.model
        arrays = {"young_modulus": m.tet_young_modulus, "poisson_ratio": m.tet_poisson_ratio,
                  "friction": m.collider_friction}
        return loss, np.array([float(arrays[n].grad.numpy().astype(np.float64).sum()) for n in fit])


def _residual(presses: Presses, k: int, markers: np.ndarray, force: np.ndarray) -> np.ndarray:
    """Residuals of press ``k`` for simulated readings, scaled so that their squares sum to its
    loss (frame 0, before any motion, excluded)."""
    known = presses.known
    frames, count = markers.shape[0] - 1, markers.shape[1]
    m = (markers[1:] - presses.markers[k, 1:]) / (known["marker_scale"] * math.sqrt(frames * count))
    f = (force[1:] - presses.force[k, 1:]) / (known["force_scale"] * math.sqrt(frames))
    return np.concatenate([m.reshape(-1), f.reshape(-1)])


def _loss(presses: Presses, k: int, markers: np.ndarray, force: np.ndarray) -> float:
    r = _residual(presses, k, markers, force)
    return float(r @ r)


class TactileMechanicsFamily(Family):
    """The calibration family of a tactile elastomer's mechanics (module docstring)."""

    name = "tactile"
    loss_unit = ""

    def __init__(self, fit: tuple[str, ...], initial: dict | None = None, *, device=None):
        self.fit = tuple(fit)
        self.device = device
        initial = initial or {}
        self.parameters = [Parameter(n, initial.get(n, INITIAL_GUESS[n]), **PARAMETERS[n]) for n in self.fit]
        self._scenes: dict[tuple[int, int], _Press] = {}
        self._kept: list = []

    @classmethod
    def for_recordings(cls, presses: Presses, *, device=None) -> TactileMechanicsFamily:
        return cls(presses.fit, {n: presses.known[n] for n in presses.fit}, device=device)

    def _press(self, presses: Presses, k: int) -> _Press:
        key = (id(presses), k)
        if key not in self._scenes:
            self._scenes[key] = _Press(presses, k, self.device)
            self._kept.append(presses)  # an id stays unique while it is cached
        return self._scenes[key]

    def _readings(self, values, presses):
        return [self._press(presses, k).readings(values) for k in range(len(presses))]

    def losses(self, values, recordings: Presses) -> np.ndarray:
        return np.array([_loss(recordings, k, *r) for k, r in enumerate(self._readings(values, recordings))])

    def residuals(self, values, recordings: Presses) -> list[np.ndarray]:
        return [_residual(recordings, k, *r) for k, r in enumerate(self._readings(values, recordings))]

    def loss_gradients(self, values, recordings: Presses):
        results = [self._press(recordings, k).gradient(values, self.fit) for k in range(len(recordings))]
        return np.array([loss for loss, _ in results]), np.stack([grad for _, grad in results])

    def metrics(self, values, recordings: Presses) -> dict:
        readings = self._readings(values, recordings)
        marker = np.concatenate([(r[0][1:] - recordings.markers[k, 1:]).reshape(-1, 3) for k, r in enumerate(readings)])
        force = np.concatenate([r[1][1:] - recordings.force[k, 1:] for k, r in enumerate(readings)])
        out = {"marker_rmse_m": float(np.sqrt(np.mean(np.sum(marker**2, axis=-1)))),
               "force_rmse_n": float(np.sqrt(np.mean(np.sum(force**2, axis=-1)))), "presses": len(recordings),
               **{n: float(values[n]) for n in self.fit}}
        for n in self.fit:
            if n in recordings.truth:
                out[f"{n}_relative_error"] = float(abs(values[n] / recordings.truth[n] - 1.0))
        return out

    def plot(self, values, recordings: Presses, path: Path, shown: int = 3) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = min(shown, len(recordings))
        fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3.0), squeeze=False)
        for k, (_, force) in enumerate(self._readings(values, recordings)[:n]):
            ax = axes[0, k]
            for axis, color in ((0, "C0"), (2, "C3")):
                ax.plot(recordings.force[k, :, axis], "o", color=color, ms=3, label=f"recorded F{'xyz'[axis]}")
                ax.plot(force[:, axis], "-", color=color, label=f"fitted F{'xyz'[axis]}")
            ax.set_xlabel("frame")
            ax.set_ylabel("force on the sensor [N]")
            ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


# ---------------------------------------------------------------------------------- synthetic data
def synthesize(path: str | Path, *, presses: int = 3, values: dict | None = None, fit=("young_modulus",
               "poisson_ratio", "friction"), marker_noise: float = 2e-6, force_noise: float = 2e-3,
               press_frames: int = 4, slide_frames: int = 4, cells=(6, 6, 2), seed: int = 0,
               device=None) -> Presses:
    """Simulate ``presses`` presses of a 4 mm sphere into a 12 x 12 x 3 mm pad (0.3-0.5 mm deep, then
    dragged 0.4-0.8 mm sideways in a random direction, at random spots near the centre) with the
    true ``values`` (default E 200 kPa, nu 0.45, friction 0.6), add Gaussian noise to the markers
    [m] and forces [N], and save them."""
    rng = np.random.default_rng(seed)
    truth = {"young_modulus": 2e5, "poisson_ratio": 0.45, "friction": 0.6, **(values or {})}
    pad = np.array([12e-3, 12e-3, 3e-3])
    radius, frame_dt = 4e-3, 1e-3
    frames = press_frames + slide_frames + 1
    start = np.zeros((presses, 3))
    velocity = np.zeros((presses, frames - 1, 3))
    for k in range(presses):
        start[k] = [*rng.uniform(-1e-3, 1e-3, 2), pad[2] + radius + 0.05e-3]
        depth = rng.uniform(0.3e-3, 0.5e-3) + 0.05e-3
        angle = rng.uniform(0, 2 * math.pi)
        slide = rng.uniform(0.4e-3, 0.8e-3)
        velocity[k, :press_frames, 2] = -depth / (press_frames * frame_dt)
        direction = np.array([math.cos(angle), math.sin(angle)])
        velocity[k, press_frames:, :2] = slide / (slide_frames * frame_dt) * direction
    known = {"density": 1100.0, "indenter_radius": radius, **truth, "frame_dt": frame_dt,
             "marker_scale": marker_noise, "force_scale": force_noise, "contact_stiffness": 1e10}
    grid = (5, 5)
    out = Presses(known, tuple(fit), pad, np.array(cells), grid, start, velocity,
                  np.zeros((presses, frames, grid[0] * grid[1], 3)), np.zeros((presses, frames, 3)),
                  {n: truth[n] for n in fit}, str(path))
    for k in range(presses):
        markers, force = _Press(out, k, device).readings(truth)
        out.markers[k] = markers + rng.normal(0.0, marker_noise, markers.shape) * (np.arange(frames) > 0)[:, None, None]
        out.force[k] = force + rng.normal(0.0, force_noise, force.shape) * (np.arange(frames) > 0)[:, None]
    out.known.update({n: INITIAL_GUESS[n] for n in fit})  # the file's fitted values are the starting guess
    out.save(path)
    return out
