"""MPM material calibration: a material's parameters fitted to tracked points of its recorded
motion (particles of the simulated specimen here; tracked markers in an experiment).

A recording file (``.npz``) holds one experiment repeated on several specimens, each a block of
one material released onto a floor (dropped, left to slump or to collapse):

- ``material``: the constitutive model, ``"elastic"`` (fixed corotated), ``"von_mises"``
  (plasticine) or ``"drucker_prager"`` (sand); ``density`` [kg/m^3], ``poisson_ratio`` and every
  parameter of :data:`PARAMETERS` (``young_modulus`` [Pa], ``yield_stress`` [Pa],
  ``friction_angle`` [rad]); ``fit``: the names of those to fit, whose values in the file are only
  the fit's initial guess;
- the scene: ``grid_res``, ``domain_size`` [m] (the domain's lower corner at the origin),
  ``floor_height`` [m], ``floor_friction``, ``frame_dt`` [s], ``spacing`` [m] (the particle
  lattice; no jitter);
- per specimen: ``centers`` (R, 3) [m], ``half_extents`` (R, 3) [m], ``velocities`` (R, 3) [m/s];
  ``tracked`` (R, K): indices of the tracked particles in the specimen's lattice (the order
  :meth:`MPMBuilder.add_box` fills it); ``positions`` (R, F, K, 3) [m]: their recorded positions,
  frame 0 the initial one; optionally ``true_<name>``, the values that made a synthetic recording.

Specimens are simulated together as worlds. The loss of a specimen is the mean squared distance
of its tracked points to their recorded positions over the frames [m^2]; its gradient with
respect to the fitted parameters comes from the MPM tape (the checkpointed rollout), one backward
pass for every specimen. :func:`synthesize` makes recordings with known parameters and noise.
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

__all__ = ["EXPERIMENTS", "INITIAL_GUESS", "PARAMETERS", "MPMFamily", "MaterialRecordings", "load_material_recordings",
           "synthesize"]

#: fitted parameters: bounds, unit and whether they are fitted through their logarithm
PARAMETERS = {
    "young_modulus": dict(lower=1e3, upper=1e7, unit="Pa", log=True, doc="Young's modulus"),
    "yield_stress": dict(lower=10.0, upper=1e5, unit="Pa", log=True, doc="von Mises yield stress"),
    "friction_angle": dict(lower=math.radians(10.0), upper=math.radians(50.0), unit="rad", log=False,
                           scale=math.radians(10.0), doc="Drucker-Prager friction angle"),
}
#: the starting guess :func:`synthesize` writes for a fitted parameter (3.3x, 2.5x and +10 degrees
#: off its experiment's truth)
INITIAL_GUESS = {"young_modulus": 1e5, "yield_stress": 1e3, "friction_angle": math.radians(40.0)}
_MODELS = {"elastic": "FIXED_COROTATED", "von_mises": "VON_MISES", "drucker_prager": "DRUCKER_PRAGER"}
_SCALARS = ("density", "young_modulus", "poisson_ratio", "yield_stress", "friction_angle", "grid_res",
            "domain_size", "floor_height", "floor_friction", "frame_dt", "spacing")


@dataclass
class MaterialRecordings:
    """Specimens of one material with their tracked points (see the module docstring)."""

    material: str
    known: dict  #: every scalar of the file (material parameters and scene)
    fit: tuple[str, ...]
    centers: np.ndarray
    half_extents: np.ndarray
    velocities: np.ndarray
    tracked: np.ndarray  #: (R, K) int
    positions: np.ndarray  #: (R, F, K, 3) [m]
    truth: dict = dataclasses.field(default_factory=dict)
    source: str = ""

    def __len__(self) -> int:
        return len(self.centers)

    def select(self, index) -> MaterialRecordings:
        picked = np.arange(len(self))[index]
        return dataclasses.replace(self, centers=self.centers[picked], half_extents=self.half_extents[picked],
                                   velocities=self.velocities[picked], tracked=self.tracked[picked],
                                   positions=self.positions[picked])

    @property
    def frames(self) -> int:
        return self.positions.shape[1]

    def save(self, path: str | Path) -> None:
        np.savez(path, material=self.material, fit=np.array(self.fit), centers=self.centers,
                 half_extents=self.half_extents, velocities=self.velocities, tracked=self.tracked,
                 positions=self.positions, **{k: np.float64(v) for k, v in self.known.items()},
                 **{f"true_{k}": np.float64(v) for k, v in self.truth.items()})


def load_material_recordings(spec: str | Path) -> MaterialRecordings:
    """Specimens from an ``.npz`` (format in the module docstring), optionally a slice of them
    after ``@``: ``FILE.npz@0::2``."""
    fields = ("material", "fit", "centers", "half_extents", "velocities", "tracked", "positions", *_SCALARS)
    data, path, selection = open_recordings(
        spec, "MPM material recordings", fields,
        "material, fit, the scene's scalars, and per specimen centers, half_extents, velocities (R, 3), "
        "tracked (R, K) and positions (R, F, K, 3) [m] (see diffsim.calibrate.mpm)")
    material = str(data["material"])
    if material not in _MODELS:
        raise ConfigError(f"{path}: field 'material' is {material!r}; expected one of {sorted(_MODELS)}")
    fit = tuple(str(n) for n in np.atleast_1d(data["fit"]))
    unknown = [n for n in fit if n not in PARAMETERS]
    if not fit or unknown:
        raise ConfigError(f"{path}: field 'fit' names {unknown or 'nothing'}; expected some of {sorted(PARAMETERS)}")
    positions = np.asarray(data["positions"], dtype=np.float64)
    r = len(np.atleast_2d(data["centers"]))
    if positions.ndim != 4 or positions.shape[0] != r or positions.shape[3] != 3 or positions.shape[1] < 2:
        raise ConfigError(f"{path}: field 'positions' has shape {positions.shape}; expected (R={r}, F>=2, K, 3) "
                          "positions in metres")
    if not np.all(np.isfinite(positions)):
        specimen, frame = np.argwhere(~np.all(np.isfinite(positions), axis=(2, 3)))[0]
        raise ConfigError(f"{path}: field 'positions' has NaN or inf at specimen {specimen}, frame {frame}; "
                          "expected finite positions in metres (drop or fill lost markers)")
    if np.abs(positions).max() > 100.0:
        raise ConfigError(f"{path}: field 'positions' reaches {np.abs(positions).max():.3g}; expected metres "
                          "(millimetres? divide by 1000)")
    tracked = np.asarray(data["tracked"], dtype=np.int64)
    if tracked.shape != (r, positions.shape[2]):
        raise ConfigError(f"{path}: field 'tracked' has shape {tracked.shape}; "
                          f"expected (R={r}, K={positions.shape[2]})")
    known = {k: float(data[k]) for k in _SCALARS}
    truth = {k[5:]: float(data[k]) for k in data.files if k.startswith("true_")}
    recordings = MaterialRecordings(material, known, fit, np.atleast_2d(data["centers"]).astype(np.float64),
                                    np.atleast_2d(data["half_extents"]).astype(np.float64),
                                    np.atleast_2d(data["velocities"]).astype(np.float64), tracked, positions,
                                    truth, str(path))
    return select_recordings(recordings, spec, selection, "specimens")


# ---------------------------------------------------------------------------------- simulation
@wp.kernel
def _tracking_loss(x: wp.array(dtype=wp.vec3), index: wp.array(dtype=int), target: wp.array(dtype=wp.vec3),
                   scale: float, loss: wp.array(dtype=float)):
    i = wp.tid()
    d = x[index[i]] - target[i]
    wp.atomic_add(loss, 0, scale * wp.dot(d, d))


@wp.kernel
def _specimen_loss(x: wp.array(dtype=wp.vec3), index: wp.array(dtype=int), target: wp.array(dtype=wp.vec3),
                   scale: float, per_specimen: int, loss: wp.array(dtype=float)):
    i = wp.tid()
    d = x[index[i]] - target[i]
    wp.atomic_add(loss, i / per_specimen, scale * wp.dot(d, d))


class _Simulation:
    """The specimens of a recording set as worlds of one MPM scene, re-run for each parameter set."""

    def __init__(self, recordings: MaterialRecordings, device=None):
        from diffsim.geometry import collider_plane
        from diffsim.materials import Material, MaterialModel
        from diffsim.mpm import MPMBuilder, MPMSolver

        k = recordings.known
        self.recordings = recordings
        r = len(recordings)
        builder = MPMBuilder(grid_res=int(k["grid_res"]), domain_size=k["domain_size"], num_worlds=r)
        material = Material(model=MaterialModel[_MODELS[recordings.material]], density=k["density"],
                            young_modulus=k["young_modulus"], poisson_ratio=k["poisson_ratio"],
                            yield_stress=k["yield_stress"], friction_angle=k["friction_angle"])
        builder.add_collider(collider_plane(position=(0, 0, k["floor_height"]), friction=k["floor_friction"]))
        blocks = [builder.add_box(tuple(recordings.centers[w]), tuple(recordings.half_extents[w]), material,
                                  spacing=k["spacing"], velocity=tuple(recordings.velocities[w]), world=w)
                  for w in range(r)]
        #: particles of each specimen (the lattice add_box filled)
        self.counts = np.array([b.stop - b.start for b in blocks])
        self._starts = np.array([b.start for b in blocks])
        self.model = builder.finalize(device, requires_grad=True)
        self.solver = MPMSolver(self.model)
        self.world = self.model.particle_world.numpy()
        self._index = None

    @property
    def index(self) -> wp.array:
        """Global particle index of every tracked point, specimen after specimen."""
        if self._index is None:
            tracked = self.recordings.tracked
            if tracked.min() < 0 or np.any(tracked.max(axis=1) >= self.counts):
                raise ConfigError(f"{self.recordings.source}: field 'tracked' names particles the specimens do not "
                                  f"have (their lattices hold {self.counts.tolist()} particles)")
            self._index = wp.array((self._starts[:, None] + tracked).reshape(-1).astype(np.int32), dtype=int,
                                   device=self.model.device)
        return self._index

    #: solver steps per frame, or None: see :meth:`substeps`
    fixed_substeps: int | None = None

    def substeps(self) -> int:
        """Solver steps per frame: the fewest stable ones for the current parameters (90% of the CFL
        step) rounded up to a power of two. The loss jumps by the step's O(dt) error wherever the
        count changes; powers of two make that happen only at every fourfold change of E (the
        fewest stable ones would change it every few percent, and finite differences across such
        a jump were 3x off the tape's gradient)."""
        stable = max(1, math.ceil(self.recordings.known["frame_dt"] / (0.9 * self.solver.max_stable_dt(self.model))))
        if self.fixed_substeps is None:
            return 2 ** math.ceil(math.log2(stable))
        if self.fixed_substeps < stable:
            raise ConfigError(f"{self.fixed_substeps} substeps per frame are unstable at these parameters; "
                              f"they need {stable}.")
        return self.fixed_substeps

    def _set(self, values: dict) -> None:
        for name, value in values.items():
            arr = getattr(self.model, f"particle_{name}")
            arr.assign(np.full(arr.shape[0], value, dtype=np.float32))

    def rollout(self, values: dict):
        from diffsim.core import Rollout

        self._set(values)
        rec = self.recordings
        frame_dt = rec.known["frame_dt"]
        substeps = self.substeps()
        frames = rec.frames - 1
        targets = [wp.array(rec.positions[:, f + 1].reshape(-1, 3).astype(np.float32), dtype=wp.vec3,
                            device=self.model.device) for f in range(frames)]
        scale = 1.0 / (frames * rec.positions.shape[2])

        per_point = rec.positions.shape[2]
        self.specimen_loss = wp.zeros(len(rec), dtype=float, device=self.model.device)

        def frame_loss(model, state, frame, loss):
            wp.launch(_tracking_loss, dim=self.index.shape[0], inputs=[state.particle_x, self.index, targets[frame],
                                                                       scale], outputs=[loss], device=model.device)
            # each specimen's share, off the tape (read it after forward: backward re-simulates)
            wp.launch(_specimen_loss, dim=self.index.shape[0],
                      inputs=[state.particle_x, self.index, targets[frame], scale, per_point],
                      outputs=[self.specimen_loss], device=model.device, record_tape=False)

        controls = [self.model.control(requires_grad=True) for _ in range(frames)]
        state0 = self.model.state(requires_grad=True)
        return Rollout(self.solver, self.model, state0, controls, frame_dt=frame_dt, substeps=substeps,
                       frame_loss=frame_loss)

    def trajectories(self, values: dict) -> np.ndarray:
        """Simulated positions of the tracked points, (R, F, K, 3) [m] (frame 0 the initial)."""
        self._set(values)
        rec = self.recordings
        frame_dt = rec.known["frame_dt"]
        substeps = self.substeps()
        from diffsim.core import Scene

        scene = Scene(self.model, self.solver, frame_dt=frame_dt, substeps=substeps)
        state, nxt, control = scene.state(), scene.state(), scene.control()
        index = self.index.numpy()
        out = [state.particle_x.numpy()[index]]
        for _ in range(rec.frames - 1):
            scene.advance(state, nxt, control)
            state, nxt = nxt, state
            out.append(state.particle_x.numpy()[index])
        r, k = len(rec), rec.positions.shape[2]
        return np.stack(out).reshape(rec.frames, r, k, 3).transpose(1, 0, 2, 3).astype(np.float64)


def _squared_errors(simulated: np.ndarray, recorded: np.ndarray) -> np.ndarray:
    """Mean squared distance per specimen over the frames after the first [m^2]."""
    return np.mean(np.sum((simulated[:, 1:] - recorded[:, 1:]) ** 2, axis=-1), axis=(1, 2))


class MPMFamily(Family):
    """The calibration family of an MPM material (see the module docstring). Its parameters are the
    file's ``fit`` names, started at ``initial`` values (default: the file's known values)."""

    name = "mpm"
    loss_unit = "m^2"

    def __init__(self, fit: tuple[str, ...], initial: dict | None = None, *, device=None):
        self.fit = tuple(fit)
        self.device = device
        initial = initial or {}
        self.parameters = [Parameter(n, initial.get(n, INITIAL_GUESS[n]), **PARAMETERS[n]) for n in self.fit]
        self._simulations: dict[int, _Simulation] = {}

    @classmethod
    def for_recordings(cls, recordings: MaterialRecordings, *, device=None) -> MPMFamily:
        return cls(recordings.fit, {n: recordings.known[n] for n in recordings.fit}, device=device)

    def _simulation(self, recordings: MaterialRecordings) -> _Simulation:
        key = id(recordings)
        if key not in self._simulations:
            self._simulations[key] = _Simulation(recordings, self.device)
            self._kept = [*getattr(self, "_kept", []), recordings]  # an id stays unique while it is cached
        return self._simulations[key]

    def losses(self, values, recordings: MaterialRecordings) -> np.ndarray:
        simulated = self._simulation(recordings).trajectories(values)
        return _squared_errors(simulated, recordings.positions)

    def residuals(self, values, recordings: MaterialRecordings) -> list[np.ndarray]:
        simulated = self._simulation(recordings).trajectories(values)
        count = (recordings.frames - 1) * recordings.positions.shape[2]
        return [((simulated[w, 1:] - recordings.positions[w, 1:]) / math.sqrt(count)).reshape(-1)
                for w in range(len(recordings))]

    def loss_gradients(self, values, recordings: MaterialRecordings):
        sim = self._simulation(recordings)
        rollout = sim.rollout(values)
        rollout.forward()
        losses = sim.specimen_loss.numpy().astype(np.float64)  # the tape's loss is their sum
        rollout.backward()
        grads = np.zeros((len(recordings), len(self.fit)))
        for j, name in enumerate(self.fit):
            g = getattr(sim.model, f"particle_{name}").grad.numpy().astype(np.float64)
            # the rollout's loss is the sum over specimens; each specimen's is its own world's share
            grads[:, j] = np.bincount(sim.world, weights=g, minlength=len(recordings))
        return losses, grads

    def metrics(self, values, recordings: MaterialRecordings) -> dict:
        errors = _squared_errors(self._simulation(recordings).trajectories(values), recordings.positions)
        out = {"position_rmse_m": float(math.sqrt(np.mean(errors))), "specimens": len(recordings),
               **{name: float(values[name]) for name in self.fit}}
        for name in self.fit:
            if name in recordings.truth:
                out[f"{name}_relative_error"] = float(abs(values[name] / recordings.truth[name] - 1.0))
        return out

    def plot(self, values, recordings: MaterialRecordings, path: Path, shown: int = 3) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        simulated = self._simulation(recordings).trajectories(values)
        n = min(shown, len(recordings))
        fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.0), squeeze=False)
        for w in range(n):
            ax = axes[0, w]
            for f, alpha in ((0, 0.25), (recordings.frames - 1, 1.0)):
                ax.plot(recordings.positions[w, f, :, 0], recordings.positions[w, f, :, 2], "k.", ms=3, alpha=alpha)
                ax.plot(simulated[w, f, :, 0], simulated[w, f, :, 2], "r+", ms=4, alpha=alpha)
            ax.set_title(f"specimen {w} (x-z): black recorded, red fitted", fontsize=7)
            ax.set_aspect("equal")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


# ---------------------------------------------------------------------------------- synthetic data
#: the experiments of :func:`synthesize`: material, fitted names, known parameters and scene
EXPERIMENTS = {
    # a soft elastic block dropped onto the floor: it squashes and rings at a rate set by E
    "elastic": dict(material="elastic", fit=("young_modulus",), density=1100.0, young_modulus=3e4,
                    poisson_ratio=0.3, yield_stress=1e3, friction_angle=math.radians(30.0),
                    half_extents=(0.025, 0.025, 0.025), drop=0.02, frames=25),
    # a tall plasticine block slumps under its own weight as far as its yield stress lets it
    "von_mises": dict(material="von_mises", fit=("yield_stress",), density=1500.0, young_modulus=5e4,
                      poisson_ratio=0.3, yield_stress=400.0, friction_angle=math.radians(30.0),
                      half_extents=(0.02, 0.02, 0.04), drop=0.0, frames=25),
    # a sand column (aspect ratio 2) collapses and runs out as far as its friction angle lets it
    "drucker_prager": dict(material="drucker_prager", fit=("friction_angle",), density=1600.0, young_modulus=5e4,
                           poisson_ratio=0.3, yield_stress=1e3, friction_angle=math.radians(30.0),
                           half_extents=(0.02, 0.02, 0.04), drop=0.0, frames=25),
}


def synthesize(experiment: str, path: str | Path, *, specimens: int = 3, values: dict | None = None,
               noise: float = 5e-4, tracked: int = 40, grid_res: int = 24, frames: int | None = None,
               substep_factor: int = 1, seed: int = 0, device=None) -> MaterialRecordings:
    """Simulate ``specimens`` blocks of :data:`EXPERIMENTS` ``[experiment]`` (sizes and drops varied by
    +-20% per specimen) with the true ``values`` (default: the experiment's), track ``tracked`` of
    each block's particles, add Gaussian noise of ``noise`` [m] per coordinate, and save them.
    ``substep_factor`` > 1 records with that many times the substeps a fit takes (a finer
    simulation standing in for the real material, to measure the bias of the fit's time step)."""
    if experiment not in EXPERIMENTS:
        raise ConfigError(f"unknown MPM experiment {experiment!r}; the experiments are {sorted(EXPERIMENTS)}.")
    spec = dict(EXPERIMENTS[experiment])
    spec.update(values or {})
    rng = np.random.default_rng(seed)
    domain = 0.24
    dx = domain / grid_res
    floor = 3 * dx + 0.5 * dx
    half = np.array(spec["half_extents"]) * rng.uniform(0.8, 1.2, (specimens, 1))
    drop = spec["drop"] * rng.uniform(0.8, 1.2, specimens)
    centers = np.stack([np.full(specimens, 0.5 * domain), np.full(specimens, 0.5 * domain),
                        floor + half[:, 2] + drop + 0.25 * dx], axis=1)
    known = {k: float(spec[k]) for k in ("density", "young_modulus", "poisson_ratio", "yield_stress", "friction_angle")}
    known.update(grid_res=float(grid_res), domain_size=domain, floor_height=floor, floor_friction=0.5,
                 frame_dt=1.0 / 60.0, spacing=0.5 * dx)
    n_frames = int(frames or spec["frames"])
    truth = {n: known[n] for n in spec["fit"]}
    recordings = MaterialRecordings(spec["material"], known, tuple(spec["fit"]), centers, half,
                                    np.zeros((specimens, 3)), np.zeros((specimens, tracked), np.int64),
                                    np.zeros((specimens, n_frames, tracked, 3)), truth, str(path))
    sim = _Simulation(recordings, device)
    if sim.counts.min() < tracked:
        raise ConfigError(f"a specimen has {sim.counts.min()} particles, fewer than the {tracked} to track.")
    recordings.tracked = np.stack([np.sort(rng.choice(c, size=tracked, replace=False)) for c in sim.counts])
    if substep_factor != 1:
        sim._set(truth)
        sim.fixed_substeps = int(substep_factor) * sim.substeps()
    clean = sim.trajectories(truth)
    recordings.positions = clean + rng.normal(0.0, noise, clean.shape) * (np.arange(n_frames) > 0)[None, :, None, None]
    # the file's values of the fitted parameters are the fit's starting guess, not the truth
    recordings.known.update({n: INITIAL_GUESS[n] for n in spec["fit"]})
    recordings.save(path)
    return recordings
