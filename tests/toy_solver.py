"""A small nonlinear particle solver that exercises the core protocol in tests.

Each particle feels a cubic spring to the origin and a per-step control force; the force is
computed into a scratch buffer the solver reuses, like the MPM grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import warp as wp

from diffsim.core import Control, Model, Solver, State


@dataclass
class ToyModel(Model):
    stiffness: wp.array  # float per particle [N/m]
    mass: wp.array  # float per particle [kg]
    device: str = "cpu"


@dataclass
class ToyState(State):
    x: wp.array
    v: wp.array


@dataclass
class ToyControl(Control):
    force: wp.array


@wp.kernel
def _force(x: wp.array(dtype=wp.vec3), stiffness: wp.array(dtype=float), f_ext: wp.array(dtype=wp.vec3),
           force: wp.array(dtype=wp.vec3)):
    i = wp.tid()
    p = x[i]
    force[i] = -stiffness[i] * (p + 0.5 * wp.dot(p, p) * p) + f_ext[i]


@wp.kernel
def _integrate(x: wp.array(dtype=wp.vec3), v: wp.array(dtype=wp.vec3), force: wp.array(dtype=wp.vec3),
               mass: wp.array(dtype=float), dt: float, x_out: wp.array(dtype=wp.vec3),
               v_out: wp.array(dtype=wp.vec3)):
    i = wp.tid()
    vn = v[i] + dt * force[i] / mass[i]
    v_out[i] = vn
    x_out[i] = x[i] + dt * vn


class ToySolver(Solver):
    """With ``fresh_scratch`` each step allocates its force buffer, so a tape may span steps."""

    def __init__(self, n: int, device: str = "cpu"):
        self.force = wp.zeros(n, dtype=wp.vec3, device=device, requires_grad=True)
        self.n = n
        self.fresh_scratch = False

    @property
    def tape_spans_steps(self):
        return self.fresh_scratch

    def new_state(self, model, *, requires_grad=False):
        return ToyState(x=wp.zeros(self.n, dtype=wp.vec3, requires_grad=requires_grad),
                        v=wp.zeros(self.n, dtype=wp.vec3, requires_grad=requires_grad))

    def scratch_arrays(self):
        return [self.force]

    def step(self, model, state_in, state_out, control, dt):
        force = wp.zeros_like(self.force, requires_grad=True) if self.fresh_scratch else self.force
        wp.launch(_force, self.n, inputs=[state_in.x, model.stiffness, control.force], outputs=[force])
        wp.launch(_integrate, self.n, inputs=[state_in.x, state_in.v, force, model.mass, dt],
                  outputs=[state_out.x, state_out.v])


def make_toy(n: int = 4, frames: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    model = ToyModel(stiffness=wp.array(rng.uniform(5, 10, n).astype(np.float32), requires_grad=True),
                     mass=wp.array(rng.uniform(0.5, 1.5, n).astype(np.float32), requires_grad=True))
    solver = ToySolver(n)
    state0 = solver.new_state(model, requires_grad=True)
    state0.x.assign(rng.uniform(-0.5, 0.5, (n, 3)).astype(np.float32))
    state0.v.assign(rng.uniform(-0.5, 0.5, (n, 3)).astype(np.float32))
    controls = [ToyControl(force=wp.array(rng.uniform(-1, 1, (n, 3)).astype(np.float32), dtype=wp.vec3,
                                          requires_grad=True)) for _ in range(frames)]
    return model, solver, state0, controls
