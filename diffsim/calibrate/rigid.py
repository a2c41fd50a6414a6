"""Rigid-body contact calibration: a tossed cube landing on a table, simulated by MuJoCo, fitted
to tracked tosses (the ContactNets recordings, or any of the same format).

A recording is one toss: the cube's state per frame from release on (position [m], quaternion
w, x, y, z, linear velocity [m/s], angular velocity [rad/s] in the body frame). The model rolls
each toss out open-loop from its first state with MuJoCo (``substeps`` steps per frame, all tosses
of a batch as one multi-threaded ``mujoco.rollout`` call) and is scored as the data set scores
it: the mean over frames of the centre's distance to the recorded one (``position_error_m``, and
over the cube's width, ``position_error_rel``) and of the rotation angle between the orientations
(``angle_error_deg``), averaged over tosses.

Fitted: the cube-table friction, the contact's softness (MuJoCo's solref time constant) and
damping ratio, and the cube's rotational inertia as a fraction of a uniform cube's (the tracked
body is hollow acrylic: a thin-walled shell has 5/3 of it). Gradients are central finite
differences in these four coordinates: the rollout is piecewise smooth with contact events, and
a finite difference over hundreds of tosses averages over the events a derivative of one
trajectory would jump at (MuJoCo's own derivatives, ``mjd_transitionFD``, are finite differences
too, per step).

The friction cone is elliptic: MuJoCo's default pyramidal approximation makes the same friction
coefficient act differently with the direction of sliding, and with the data set's own friction
(0.18) it scores 29 mm on the odd tosses where the elliptic cone scores 15 mm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffsim.calibrate.engine import Family, Parameter, open_recordings, select_recordings
from diffsim.errors import ConfigError

__all__ = ["CubeFamily", "CubeTosses", "load_tosses", "simulate_tosses"]


@dataclass
class CubeTosses:
    """A batch of tosses of one cube: ``states[offsets[k]:offsets[k+1]]`` is toss k."""

    states: np.ndarray  #: (frames, 13) float64
    offsets: np.ndarray  #: (tosses + 1,) int64
    dt: float  #: seconds between frames
    half_width: float  #: [m]
    mass: float  #: [kg]
    ids: np.ndarray  #: each toss's identifier
    source: str = ""

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def toss(self, k: int) -> np.ndarray:
        return self.states[self.offsets[k]:self.offsets[k + 1]]

    def select(self, index) -> CubeTosses:
        """The tosses ``index`` picks (a slice or a sequence of positions)."""
        picked = np.arange(len(self))[index]
        parts = [self.toss(k) for k in picked]
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        return CubeTosses(np.concatenate(parts) if parts else np.zeros((0, 13)), offsets, self.dt, self.half_width,
                          self.mass, self.ids[picked], self.source)

    def save(self, path: str | Path) -> None:
        np.savez(path, states=self.states, offsets=self.offsets, dt=self.dt, half_width=self.half_width,
                 mass=self.mass, ids=self.ids)


def load_tosses(spec: str | Path) -> CubeTosses:
    """Tosses from an ``.npz`` (the format of ``contactnets/cube_tosses.npz``), optionally with a
    selection after ``@`` in Python's slice syntax over tosses: ``cube_tosses.npz@0::2``."""
    data, path, selection = open_recordings(
        spec, "tosses", ("states", "offsets", "dt", "half_width", "mass"),
        "states (N, 13) [m, quaternion w x y z, m/s, rad/s in the body frame], offsets (tosses + 1), dt [s], "
        "half_width [m], mass [kg]")
    states, offsets = np.asarray(data["states"], dtype=np.float64), np.asarray(data["offsets"], dtype=np.int64)
    if states.ndim != 2 or states.shape[1] != 13:
        raise ConfigError(f"{path}: field 'states' has shape {states.shape}; expected (frames, 13)")
    if offsets.ndim != 1 or offsets.size < 2 or offsets[0] != 0 or offsets[-1] != len(states) \
            or np.any(np.diff(offsets) < 2):
        raise ConfigError(f"{path}: field 'offsets' must rise from 0 to {len(states)} (the frame count) with at "
                          "least 2 frames per toss")
    bad = np.flatnonzero(~np.all(np.isfinite(states), axis=1))
    if bad.size:
        toss = int(np.searchsorted(offsets, bad[0], side="right") - 1)
        raise ConfigError(f"{path}: field 'states' has a non-finite value at frame {int(bad[0])} (toss {toss}); "
                          "drop or repair that toss")
    norms = np.linalg.norm(states[:, 3:7], axis=1)
    if np.any(np.abs(norms - 1.0) > 1e-3):
        frame = int(np.argmax(np.abs(norms - 1.0)))
        raise ConfigError(f"{path}: field 'states' columns 3-6 are not a unit quaternion at frame {frame} "
                          f"(norm {norms[frame]:.4f}); expected w, x, y, z")
    dt, half_width, mass = float(data["dt"]), float(data["half_width"]), float(data["mass"])
    for name, value, unit in (("dt", dt, "s"), ("half_width", half_width, "m"), ("mass", mass, "kg")):
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"{path}: field '{name}' is {value}; expected a positive number in {unit}")
    if half_width > 1.0:
        raise ConfigError(f"{path}: field 'half_width' is {half_width}, over 1 m: expected metres (not mm)")
    ids = np.asarray(data["ids"]) if "ids" in data else np.arange(len(offsets) - 1)
    tosses = CubeTosses(states, offsets, dt, half_width, mass, ids, source=path)
    return select_recordings(tosses, spec, selection, "toss")


def cube_model_xml(tosses: CubeTosses, values: dict[str, float], substeps: int, cone: str = "elliptic") -> str:
    """The MJCF of the cube and the table for ``values`` (see :class:`CubeFamily`)."""
    hw, mass = tosses.half_width, tosses.mass
    inertia = values["inertia_fraction"] * mass * (2 * hw) ** 2 / 6.0  # a uniform cube: m a^2 / 6
    contact = (f'friction="{values["friction"]} 0.005 0.0001" '
               f'solref="{values["time_constant"]} {values["damping_ratio"]}"')
    return f"""<mujoco model="cube toss">
  <option timestep="{tosses.dt / substeps}" gravity="0 0 -9.81" cone="{cone}"/>
  <worldbody>
    <geom name="table" type="plane" size="5 5 0.1" {contact}/>
    <body name="cube">
      <freejoint/>
      <inertial pos="0 0 0" mass="{mass}" diaginertia="{inertia} {inertia} {inertia}"/>
      <geom name="cube" type="box" size="{hw} {hw} {hw}" {contact}/>
    </body>
  </worldbody>
</mujoco>"""


def simulate_tosses(tosses: CubeTosses, values: dict[str, float], *, substeps: int = 10,
                    threads: int = 2, cone: str = "elliptic") -> list[np.ndarray]:
    """Each toss rolled out from its first state: per toss, (frames, 7) positions and quaternions."""
    import mujoco
    from mujoco import rollout

    model = mujoco.MjModel.from_xml_string(cube_model_xml(tosses, values, substeps, cone))
    datas = [mujoco.MjData(model) for _ in range(max(1, threads))]
    spec = mujoco.mjtState.mjSTATE_FULLPHYSICS
    initial = np.zeros((len(tosses), mujoco.mj_stateSize(model, spec)))
    data = datas[0]
    for k in range(len(tosses)):
        first = tosses.toss(k)[0]
        mujoco.mj_resetData(model, data)
        data.qpos[:7] = first[:7]
        data.qvel[:3] = first[7:10]
        data.qvel[3:6] = first[10:13]  # a free joint's angular velocity is in the body frame, as recorded
        mujoco.mj_getState(model, data, initial[k], spec)
    lengths = np.diff(tosses.offsets)
    order = np.argsort(lengths, kind="stable")
    out: list[np.ndarray | None] = [None] * len(tosses)
    # tosses of similar length roll out together (a batch runs to its longest)
    for chunk in np.array_split(order, max(1, len(order) // 24)):
        steps = int(lengths[chunk].max() - 1) * substeps
        states, _ = rollout.rollout(model, datas, initial[chunk], nstep=steps)
        for row, k in enumerate(chunk):
            frames = states[row, substeps - 1::substeps][: lengths[k] - 1, 1:8]  # time, then qpos
            out[k] = np.concatenate([tosses.toss(k)[:1, :7], frames])
    return out


def toss_errors(tosses: CubeTosses, simulated: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per toss: mean centre distance [m] and mean rotation angle [deg] to the recording."""
    position, angle = np.zeros(len(tosses)), np.zeros(len(tosses))
    for k, sim in enumerate(simulated):
        rec = tosses.toss(k)
        position[k] = np.linalg.norm(sim[:, :3] - rec[:, :3], axis=1).mean()
        dots = np.clip(np.abs(np.sum(sim[:, 3:7] * rec[:, 3:7], axis=1)), 0.0, 1.0)
        angle[k] = np.degrees(2.0 * np.arccos(dots)).mean()
    return position, angle


class CubeFamily(Family):
    """The ``rigid`` family: a cube tossed onto a table (see the module header)."""

    name = "rigid"
    loss_unit = "m"
    parameters = (
        Parameter("friction", 0.5, 0.02, 1.5, doc="cube-table Coulomb friction (elliptic cone)"),
        Parameter("time_constant", 0.02, 0.002, 0.2, "s", doc="contact softness: MuJoCo solref time constant"),
        Parameter("damping_ratio", 1.0, 0.1, 5.0, doc="contact damping: MuJoCo solref damping ratio"),
        # a thin-walled hollow cube has 5/3 of a solid one's (5 m a^2 / 18)
        Parameter("inertia_fraction", 1.0, 0.5, 2.5,
                  doc="rotational inertia over a uniform solid cube's (m a^2 / 6) of the recorded mass and width"),
    )

    #: friction decides where a cube slides to; fitted alone first, from the initial 0.5 (15
    #: iterations left it 25% high, and the joint stage then dragged the others off first)
    warmup = ((25, ("friction",)),)

    def __init__(self, *, substeps: int = 10, threads: int = 2):
        self.substeps, self.threads = int(substeps), int(threads)

    def losses(self, values, recordings: CubeTosses) -> np.ndarray:
        return toss_errors(recordings, simulate_tosses(recordings, values, substeps=self.substeps,
                                                       threads=self.threads))[0]

    def metrics(self, values, recordings: CubeTosses) -> dict:
        position, angle = toss_errors(recordings, simulate_tosses(recordings, values, substeps=self.substeps,
                                                                  threads=self.threads))
        return {"position_error_m": float(position.mean()),
                "position_error_rel": float(position.mean() / (2.0 * recordings.half_width)),
                "angle_error_deg": float(angle.mean()), "tosses": len(recordings)}

    def plot(self, values, recordings: CubeTosses, path: Path, shown: int = 4) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        picked = np.linspace(0, len(recordings) - 1, min(shown, len(recordings))).round().astype(int)
        simulated = simulate_tosses(recordings.select(picked), values, substeps=self.substeps, threads=self.threads)
        fig, axes = plt.subplots(2, len(picked), figsize=(3.2 * len(picked), 5.6), squeeze=False)
        for col, (k, sim) in enumerate(zip(picked, simulated, strict=True)):
            rec = recordings.toss(k)
            t = np.arange(len(rec)) * recordings.dt
            axes[0, col].plot(t, rec[:, 2] * 1e3, "k-", label="recorded")
            axes[0, col].plot(t, sim[:, 2] * 1e3, "r--", label="simulated")
            axes[0, col].set_title(f"toss {recordings.ids[k]}", fontsize=8)
            axes[0, col].set_xlabel("t [s]", fontsize=7)
            axes[0, col].set_ylabel("height [mm]", fontsize=7)
            axes[1, col].plot(rec[:, 0] * 1e3, rec[:, 1] * 1e3, "k-")
            axes[1, col].plot(sim[:, 0] * 1e3, sim[:, 1] * 1e3, "r--")
            axes[1, col].set_aspect("equal", adjustable="datalim")
            axes[1, col].set_xlabel("x [mm]", fontsize=7)
            axes[1, col].set_ylabel("y [mm]", fontsize=7)
        axes[0, 0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)
        return path

    def count(self, recordings: CubeTosses) -> int:
        return len(recordings)
