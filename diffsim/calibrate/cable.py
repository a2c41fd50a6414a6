"""Cable recordings as rod simulations: a rod per recording initialised from its first frame, its
gripper-held end markers replayed as driven vertices, and the rollout read back at the markers.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from diffsim.calibrate.recordings import CableRecordings
from diffsim.core.scene import Scene
from diffsim.errors import ConfigError, InvalidParameter
from diffsim.rod import RodBuilder, RodModel, RodSolver, controls_from_driven_positions
from diffsim.rod.model import material_curvature, spatial_frames


@dataclass
class CableParameters:
    """Physical parameters of one cable, shared by all its recordings.

    The motion depends on stiffness, drag and mass only through their ratios, so the linear density
    is fixed and the others are fitted relative to it. The defaults are a typical light cable (the
    neighbourhood where fits on the DEFORM cables end), a starting point for fitting.
    """

    bend_stiffness: float = 3e-3  #: E I [N m^2]
    twist_stiffness: float = 6e-3  #: G J [N m^2]
    bend_damping: float = 5e-5  #: internal damping of the bending rate [N m^2 s]
    linear_damping: float = 0.1  #: mass-proportional damping rate [1/s]
    air_drag: float = 0.005  #: quadratic drag per length [kg/m^2]
    mass_per_length: float = 0.1  #: linear density [kg/m]
    contact_radius: float = 0.006  #: cable radius for contact with the floor [m]
    floor_friction: float = 0.5  #: Coulomb friction with the floor [-]
    floor_height: float = 0.0  #: height of the floor [m]
    #: fraction of the first frame's bends that the cable keeps as its natural shape [-], in [0, 1]:
    #: real cables take a set (plastic memory), so a cable laid in a curve does not spring straight
    shape_memory: float = 0.0
    #: rest material curvature at each rod vertex, shape (vertices, 2) [rad per vertex]; None: straight
    rest_curvature: list | None = field(default=None, repr=False)
    #: factor on ``bend_stiffness`` per rod edge (cables stiffen near connectors); None: uniform
    bend_profile: list | None = field(default=None, repr=False)
    #: rest length of each marker gap [m], a property of the cable (its markers stay put), measured
    #: on training recordings by :func:`measure_marker_gaps`; None: each recording's first frame
    marker_gaps: list | None = field(default=None, repr=False)

    def validate(self) -> None:
        for name in ("bend_stiffness", "twist_stiffness", "mass_per_length"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise InvalidParameter(name, value, "(0, inf)")
        for name in ("bend_damping", "linear_damping", "air_drag", "contact_radius", "floor_friction"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise InvalidParameter(name, value, "[0, inf)")
        if not (math.isfinite(self.shape_memory) and 0.0 <= self.shape_memory <= 1.0):
            raise InvalidParameter("shape_memory", self.shape_memory, "[0, 1]")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> CableParameters:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown cable parameter(s) {sorted(unknown)}; known: {sorted(known)}.")
        return cls(**data)

    def save(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=2)

    @classmethod
    def load(cls, path) -> CableParameters:
        with open(path) as f:
            return cls.from_json(json.load(f))


@dataclass
class CableLayout:
    """Where the markers of each recording sit in a batched rod model."""

    marker_vertex: np.ndarray  #: (recordings, markers) global vertex index of each marker
    driven_source: np.ndarray  #: (driven vertices, 2) marker pair each driven vertex lies between
    driven_weight: np.ndarray  #: (driven vertices,) interpolation weight towards the second marker
    driven_recording: np.ndarray  #: (driven vertices,) recording of each driven vertex
    subdivisions: int
    #: (vertices, 2) material curvature of each rod's first frame; ``shape_memory`` of it is rest shape
    first_frame_curvature: np.ndarray


def measure_marker_gaps(recordings: CableRecordings) -> list[float]:
    """Rest length of each marker gap [m]: the median distance between neighbouring markers over
    every frame of every recording (the cable does not stretch; the median ignores capture
    glitches)."""
    spacing = np.linalg.norm(np.diff(recordings.positions.astype(np.float64), axis=2), axis=-1)
    return np.median(spacing.reshape(-1, recordings.num_markers - 1), axis=0).tolist()


def rod_points(markers: np.ndarray, subdivisions: int) -> tuple[np.ndarray, np.ndarray]:
    """Rod vertices along a marker polyline, ``subdivisions`` edges per marker gap; returns the
    points and, per point, (marker index, weight towards the next marker)."""
    points, source = [], []
    for k in range(len(markers) - 1):
        for s in range(subdivisions):
            w = s / subdivisions
            points.append((1 - w) * markers[k] + w * markers[k + 1])
            source.append((k, w))
    points.append(markers[-1])
    source.append((len(markers) - 2, 1.0))
    return np.array(points), np.array(source)


#: frames of every recording a prediction reads, by how the interior's initial velocity is set;
#: the metrics score the frames after them (``evaluate(..., given_frames=...)``)
GIVEN_FRAMES = {"ends": 1, "rest": 1, "recorded": 2}


def build_cable_batch(recordings: CableRecordings, params: CableParameters, *, subdivisions: int = 1,
                      device: str | None = None, requires_grad: bool = False,
                      clamp_twist: bool = True, initial_velocity: str = "ends") -> tuple[RodModel, CableLayout]:
    """One rod per recording, in one model: vertices through the first frame's markers (each gap
    split in ``subdivisions``), the two gripper-held end segments (markers 0-1 and M-2 to M-1)
    driven, rest lengths from ``params.marker_gaps`` (else the first frame's). Of the interior
    markers only the first frame is read, as the data set's metrics demand. The rest curvature is
    ``params.rest_curvature`` (shared by the recordings) plus ``params.shape_memory`` times the
    curvature of the recording's first frame.

    ``initial_velocity``: "ends" starts the interior moving with the velocity of the two grippers
    over the first frame, blended along the cable (recordings start mid-motion, and the ends are
    inputs at every frame); "rest" starts it still; "recorded" takes every marker's velocity over
    the first frame of the recording. "recorded" reads frame 1 of the interior markers, which the
    data set's protocol does not give a model: it is the two-frame start of DEFORM's own
    evaluation, scored from frame 2 on (:data:`GIVEN_FRAMES`).
    """
    if initial_velocity not in GIVEN_FRAMES:
        raise InvalidParameter("initial_velocity", initial_velocity, "'ends', 'rest' or 'recorded'")
    params.validate()
    if not isinstance(subdivisions, int) or subdivisions < 1:
        raise InvalidParameter("subdivisions", subdivisions, "positive integers")
    M = recordings.num_markers
    builder = RodBuilder()
    first_gaps = np.linalg.norm(np.diff(recordings.positions[:, 0].astype(np.float64), axis=1), axis=-1)  # (N, M-1)
    if params.marker_gaps is None:
        rest_gap = first_gaps
    else:
        gaps = np.asarray(params.marker_gaps, dtype=np.float64)
        if gaps.shape != (M - 1,) or not np.all(np.isfinite(gaps) & (gaps > 0)):
            raise InvalidParameter("marker_gaps", f"an array of shape {gaps.shape}",
                                   f"{M - 1} positive lengths [m] (one per marker gap)")
        rest_gap = np.broadcast_to(gaps, first_gaps.shape)
    curvature = None if params.rest_curvature is None else np.asarray(params.rest_curvature, dtype=np.float64)
    marker_vertex, driven_source, driven_weight, driven_recording, first_curvature = [], [], [], [], []
    offset = 0
    for r in range(recordings.num_recordings):
        first = recordings.positions[r, 0].astype(np.float64)
        points, source = rod_points(first, subdivisions)
        # rest shape: the first frame's polyline with each marker gap at its median length
        rest = [first[0]]
        for k in range(M - 1):
            gap = first[k + 1] - first[k]
            direction = gap / np.linalg.norm(gap)
            rest.append(rest[-1] + direction * rest_gap[r, k])
        rest_points, _ = rod_points(np.array(rest), subdivisions)
        n = len(points)
        if curvature is not None and curvature.shape != (n, 2):
            raise InvalidParameter("rest_curvature", f"an array of shape {curvature.shape}", f"({n}, 2) for this cable")
        # rest_points keep the first frame's edge directions, so these frames are the builder's
        first_curvature.append(material_curvature(rest_points, spatial_frames(rest_points)))
        rest_shape = (np.zeros((n, 2)) if curvature is None else curvature) + params.shape_memory * first_curvature[-1]
        velocities = np.zeros_like(points)
        step = (recordings.positions[r, 1] - recordings.positions[r, 0]).astype(np.float64) * recordings.fps
        if initial_velocity == "ends":
            left, right = step[:2].mean(axis=0), step[-2:].mean(axis=0)
            arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
            u = (arc / arc[-1])[:, None]
            velocities = (1.0 - u) * left + u * right
        elif initial_velocity == "recorded":
            k, w = source[:, 0].astype(int), source[:, 1:2]
            velocities = (1.0 - w) * step[k] + w * step[k + 1]
        bend = params.bend_stiffness
        if params.bend_profile is not None:
            profile = np.asarray(params.bend_profile, dtype=np.float64)
            if profile.shape != (n - 1,) or not np.all(np.isfinite(profile) & (profile > 0)):
                raise InvalidParameter("bend_profile", f"an array of shape {profile.shape}",
                                       f"{n - 1} positive factors (one per rod edge)")
            bend = params.bend_stiffness * profile
        driven = [i for i in range(n) if source[i][0] == 0 or source[i][0] >= M - 2]
        driven = sorted(set(driven) | {subdivisions, n - 1 - subdivisions})
        builder.add_rod(
            points, rest_points=rest_points,
            rest_curvature=rest_shape,
            mass_per_length=params.mass_per_length, bend_stiffness=bend,
            twist_stiffness=params.twist_stiffness, bend_damping=params.bend_damping,
            linear_damping=params.linear_damping, air_drag=params.air_drag,
            contact_radius=params.contact_radius, driven_vertices=driven, velocities=velocities,
            clamp_twist=("first", "last") if clamp_twist else (),
        )
        marker_vertex.append(offset + np.arange(M) * subdivisions)
        for i in driven:
            k, w = source[i]
            driven_source.append((k, k + 1))
            driven_weight.append(w)
            driven_recording.append(r)
        offset += n
    builder.add_ground(height=params.floor_height, friction=params.floor_friction)
    model = builder.finalize(device, requires_grad=requires_grad)
    layout = CableLayout(np.array(marker_vertex), np.array(driven_source, dtype=np.int64), np.array(driven_weight),
                         np.array(driven_recording), subdivisions, np.concatenate(first_curvature))
    return model, layout


def cable_scene(recordings: CableRecordings, params: CableParameters, *, substeps: int | str = "auto",
                solver_options: dict | None = None, **batch_options) -> tuple[Scene, CableLayout]:
    """The :func:`build_cable_batch` model as a :class:`~diffsim.core.Scene`: one frame per
    recorded frame (1 / fps), a :class:`~diffsim.rod.RodSolver` with ``solver_options``, and
    ``substeps`` per frame. Returns (scene, layout)."""
    model, layout = build_cable_batch(recordings, params, **batch_options)
    solver = RodSolver(model, **(solver_options or {}))
    return Scene(model, solver, frame_dt=1.0 / recordings.fps, substeps=substeps), layout


def replay_controls(model: RodModel, layout: CableLayout, recordings: CableRecordings, *, frames: int | None = None,
                    requires_grad: bool = False):
    """Controls that move the driven vertices with the recorded end markers, frame by frame."""
    T = recordings.num_frames if frames is None else frames + 1
    pos = recordings.positions[:, :T].astype(np.float64)  # (N, T, M, 3)
    a = pos[layout.driven_recording, :, layout.driven_source[:, 0]]  # (D, T, 3)
    b = pos[layout.driven_recording, :, layout.driven_source[:, 1]]
    w = layout.driven_weight[:, None, None]
    driven = ((1 - w) * a + w * b).transpose(1, 0, 2)  # (T, D, 3)
    return controls_from_driven_positions(model, driven, 1.0 / recordings.fps, requires_grad=requires_grad)


def simulate_recordings(recordings: CableRecordings, params: CableParameters, *, subdivisions: int = 1,
                        device: str | None = None, substeps: int | str = "auto",
                        solver_options: dict | None = None, initial_velocity: str = "ends") -> np.ndarray:
    """Roll every recording out from its first frame with its ends replayed; returns the simulated
    marker positions, shape (recordings, frames, markers, 3) [m] (frame 0 = the recording's)."""
    scene, layout = cable_scene(recordings, params, substeps=substeps, solver_options=solver_options,
                                subdivisions=subdivisions, device=device, initial_velocity=initial_velocity)
    model = scene.model
    controls = replay_controls(model, layout, recordings)
    out = np.empty_like(recordings.positions)
    out[:, 0] = recordings.positions[:, 0]
    idx = layout.marker_vertex

    def record(frame, state):
        out[:, frame + 1] = state.vertex_x.numpy()[idx]

    scene.rollout(model.state(), controls, checkpoint_every=10**9).forward(on_frame=record)
    return out


def synthetic_recordings(num_recordings: int = 4, *, frames: int = 100, markers: int = 13, length: float = 1.0,
                         params: CableParameters | None = None, fps: float = 100.0, seed: int = 0,
                         device: str | None = None) -> CableRecordings:
    """Recordings made by the simulator itself: a cable hangs between two grippers that move on
    smooth random paths; the markers are the rod's vertices (end segments short, as on real
    grippers). For tests and benchmarks that must not depend on real data."""
    if not isinstance(num_recordings, int) or num_recordings < 1:
        raise InvalidParameter("num_recordings", num_recordings, "positive integers")
    if not isinstance(markers, int) or markers < 5:
        raise InvalidParameter("markers", markers, "integers >= 5")
    params = params or CableParameters()
    rng = np.random.default_rng(seed)
    # arc-length positions: 3 cm end segments held by the grippers, even spacing in between
    end = 0.03 * length
    s = np.concatenate([[0.0], np.linspace(end, length - end, markers - 2), [length]])
    first = []
    for _ in range(num_recordings):
        # a sagging arc between two raised ends, sampled at the markers' arc lengths
        span = length * rng.uniform(0.55, 0.75)
        u = np.linspace(0.0, 1.0, 2001)
        depth = length * rng.uniform(0.2, 0.35)
        curve = np.stack([u * span, 0.02 * rng.standard_normal() * np.sin(np.pi * u),
                          0.45 - depth * np.sin(np.pi * u)], axis=1)
        arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(curve, axis=0), axis=1))])
        curve *= length / arc[-1]  # scale the arc to the cable's length
        arc *= length / arc[-1]
        curve[:, 2] += 0.45 - curve[0, 2]
        first.append(np.stack([np.interp(s, arc, curve[:, k]) for k in range(3)], axis=1))
    positions = np.empty((num_recordings, frames + 1, markers, 3), dtype=np.float32)
    t = np.arange(frames + 1) / fps
    still = np.repeat(np.array(first, dtype=np.float32)[:, None], frames + 1, axis=1)
    # the rod is built from the still cable, so its rest lengths are the first frame's gaps
    # a reference cable that does not stretch: many more length sweeps than a replay uses
    scene, layout = cable_scene(CableRecordings(still, fps=fps), params, device=device,
                                solver_options={"projection_iterations": 16})
    model = scene.model
    moving = still.copy()
    # move the two grippers a few centimetres on smooth paths that start at rest (as the cable does)
    for r in range(num_recordings):
        for side in (0, 1):
            amp = rng.uniform(0.02, 0.08, size=3) * rng.choice([-1.0, 1.0], size=3)
            freq = rng.uniform(0.3, 1.2, size=3)
            shift = amp * (1.0 - np.cos(2 * np.pi * freq * t[:, None]))
            held = [0, 1] if side == 0 else [markers - 2, markers - 1]
            moving[r][:, held] += shift[:, None].astype(np.float32)
    controls = replay_controls(model, layout, CableRecordings(moving, fps=fps))
    positions[:, 0] = moving[:, 0]

    def record(frame, state):
        positions[:, frame + 1] = state.vertex_x.numpy()[layout.marker_vertex]

    scene.rollout(model.state(), controls, checkpoint_every=10**9).forward(on_frame=record)
    return CableRecordings(positions, fps=fps, ids=np.arange(num_recordings), name="synthetic")
