"""Implicit steps differentiated by the implicit function theorem, not by taping their iterations.

A step defined by a condition ``r(x*, theta) = 0`` (the gradient of an incremental potential for
backward Euler, of the elastic energy for a quasi-static equilibrium) is solved by Newton's method
with a matrix-free conjugate-gradient solve per iteration. Its backward pass needs no record of
those iterations: differentiating ``r(x*(theta), theta) = 0`` gives

    dr/dx . dx*/dtheta = -dr/dtheta,   so   theta_bar = -(dr/dtheta)^T lambda,   (dr/dx)^T lambda = x_bar,

one adjoint linear system with the converged Jacobian, solved by the same CG, then one
vector-Jacobian product of ``r`` (Blondel et al. 2022, "Efficient and Modular Implicit
Differentiation"). Memory is that of ``x`` and a few CG vectors, whatever the iteration count.

The mechanism asks for one thing: ``residual(x, out)``, a function that launches Warp kernels
writing ``r(x, theta)`` into ``out`` and reads ``theta`` from arrays of its own. Jacobian-vector
products are taken by Warp's reverse mode (``(dr/dx)^T v`` from one taped residual), so the
Jacobian must be symmetric, as it is when ``r`` is the gradient of an energy; CG further needs it
positive definite near the solution (a stable equilibrium). The Jacobian products of the solve
run under tapes of their own; every other array with gradients that ``residual``'s launches touch
(found on the first probe's tape, struct fields included) has its gradient restored after each,
so only the backward pass adds to them.

A solver that knows more gives more, each optional: an analytic ``jacobian_product`` (Newton may
take a positive-definite approximation, the adjoint needs the exact one), a ``linearize`` hook that
computes a product's per-iterate factors once per Newton iteration, a diagonal for Jacobi
preconditioning, and a :class:`~diffsim.core.cholesky.SparseCholesky` with an ``assemble``
function for a factored preconditioner that lives across solves, with ``local_blocks`` for the
fast-changing block-diagonal terms (contact) that its solves add exactly instead of factoring.

Newton may linearise an approximation of the Jacobian (it converges linearly then) and switches
to the exact product once a line search takes the full step; for a residual with branches
(penalty contact) an :class:`ActiveSetPrediction` lets Newton's model take the branch a step
would enter, not the one at the iterate. Both change Newton's path only, never its solution.

``ImplicitSolve.solve`` records itself on an active ``wp.Tape`` as a single entry whose backward
is the adjoint solve, so an implicit step sits inside a taped rollout like any kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import warp as wp

from diffsim.core.launch import LaunchCache
from diffsim.errors import DiffsimError

__all__ = ["ActiveSetPrediction", "ImplicitSolve", "NewtonReport", "NotConverged"]


class NotConverged(DiffsimError, RuntimeError):
    """An implicit solve stopped before its residual met the tolerance."""

    def __init__(self, what: str, iterations: int, residual: float, tolerance: float, hint: str = ""):
        self.iterations, self.residual, self.tolerance = iterations, residual, tolerance
        message = (f"{what} did not converge: residual {residual:.3g} after {iterations} iterations, "
                   f"tolerance {tolerance:.3g}.")
        super().__init__(message + (f" {hint}" if hint else ""))


@dataclass
class NewtonReport:
    """What one solve took: Newton iterations, CG iterations in all, the final residual (largest
    absolute entry, in the residual's own unit), its Jacobi-scaled size and the last step."""

    newton_iterations: int = 0
    cg_iterations: int = 0
    residual: float = math.inf
    scaled_residual: float = math.inf  #: max |r_i / J_ii| (x's unit), with a preconditioner
    step: float = math.inf  #: largest change of an entry of x in the last Newton step (x's unit)
    adjoint_cg_iterations: int = 0
    #: Newton iterations whose exact Jacobian had negative curvature (the approximation was used)
    indefinite_steps: int = 0


@wp.kernel
def _axpy(x: wp.array(dtype=float), y: wp.array(dtype=float), a: float, out: wp.array(dtype=float)):
    i = wp.tid()
    out[i] = x[i] + a * y[i]


@wp.kernel
def _scale_by(x: wp.array(dtype=float), d: wp.array(dtype=float), out: wp.array(dtype=float)):
    i = wp.tid()
    out[i] = x[i] * d[i]


class ActiveSetPrediction:
    """Newton's prediction of a residual's branches (a contact that is open at x but that the
    step would close), for :class:`ImplicitSolve`'s ``active_set``.

    Linearised at x, a branch that is inactive there is invisible to the step: a node just off an
    indenter, pushed towards it, is driven deep inside in one step, and the line search can only
    shorten the step for every unknown. A prediction makes ``jacobian_product`` linearise the
    branch the step would enter instead and corrects the right-hand side by that branch's value
    at x. Only Newton's model changes: the residual that decides convergence and the line search
    stay exact, and Newton drops the prediction for a step that fails to descend.
    """

    def predict(self, x: wp.array, r: wp.array, step: wp.array | None, rhs: wp.array) -> bool:
        """Update the prediction at x (residual r) and correct ``rhs`` (-r, the linear solve's
        right-hand side, same dtype as x) for it. Called with ``step=None`` first, then with a
        preview of the step and with the solved step; returns True if a step call changed the
        prediction (the step is then solved again)."""
        raise NotImplementedError

    def clear(self) -> None:
        """Forget the prediction: the plain linearisation at x (also called after each solve)."""
        raise NotImplementedError


def _flat(array: wp.array) -> wp.array:
    """A float view of all scalar components of ``array`` (vec3 arrays become 3 floats per item)."""
    if array.dtype is float:
        return array
    view = wp.array(ptr=array.ptr, dtype=float, shape=(array.size * _components(array),), device=array.device)
    view._keepalive = array  # a view does not own its memory
    return view


def _components(array: wp.array) -> int:
    length = getattr(array.dtype, "_length_", None)
    return int(length) if length else 1


class ImplicitSolve:
    """Newton-CG for ``r(x, theta) = 0`` with a symmetric Jacobian, differentiated implicitly.

    Args:
        residual: ``residual(x, out)`` writes r(x, theta) into ``out`` (same shape and dtype as x)
            by Warp launches; it must not write ``x``.
        params: arrays with gradients that ``residual`` reads besides ``x``, if known; the ones
            its launches touch are found in any case.
        energy: optional ``energy(x)``, the potential whose gradient is ``r``, as a float or as
            (value, rounding): when given, the line search asks for a decrease of it (Armijo), else
            of ``|r|^2``; within ``rounding`` (default 1e-6 of the value) a decrease of the
            residual is accepted instead.
        preconditioner: optional ``preconditioner(x, out)`` writing a positive estimate of the
            Jacobian's diagonal: Jacobi preconditioning, and the scale of the step tolerance.
        factorization: optional :class:`~diffsim.core.cholesky.SparseCholesky` that preconditions
            CG instead of the diagonal, with ``assemble(x, values)`` writing the entries of an SPD
            approximation of the Jacobian at ``x`` into its ``values``. It is factored at the first
            Newton iteration and again at a Newton iteration once it has gone stale (see that
            class); it may outlive the solve (kept across time steps).
        local_blocks: optional ``local_blocks(x) -> (rows, blocks)``, with ``factorization``: the
            fast-changing diagonal blocks of the approximate Jacobian at ``x`` ((m, k) row indices
            and (m, k, k) symmetric positive semi-definite values, e.g. contact), which
            ``assemble`` leaves out of the factored matrix; before each linear solve they are
            added to the factor's solves exactly (:meth:`~diffsim.core.cholesky.SparseCholesky.set_blocks`),
            so the factor does not go stale as they change.
        linearize: optional ``linearize(x)``, called once per Newton iteration before the linear
            solve (and before ``assemble``): where ``jacobian_product``'s x-dependent factors are
            computed once instead of in every product.
        jacobian_product: optional ``jacobian_product(x, v, out, exact)`` writing ``J(x) v``.
            Newton's solves call it with ``exact=False``, where a positive semi-definite
            approximation will do (projected element Hessians, Gauss-Newton contact): the residual
            stays exact, so Newton still lands on r = 0. The adjoint solve calls it with
            ``exact=True`` and needs the exact product then (return False instead to have the
            taped Jacobian used), so gradients are exact too. An approximation alone makes Newton
            converge linearly; ``exact_tail`` (default) has Newton ask for the exact product once a
            line search took the full step (the quadratic basin), and fall back to the
            approximation in any iteration where the exact Jacobian shows negative curvature.
        active_set: optional :class:`ActiveSetPrediction` for a residual with branches
            (contact): Newton's model may then linearise a branch other than the one at x.
        tolerance: Newton stops when ``max |r| <= tolerance`` (the residual's unit, e.g. N).
        step_tolerance: with a preconditioner, Newton also stops once the Jacobi-scaled residual
            ``max |r_i / J_ii|`` (about the remaining correction, in x's unit, e.g. m) is at most
            this and the last two iterations no longer halved the residual, or the line search
            finds no step that lowers the energy or the residual (it has reached
            float32's floor: positions rounded by an ulp move each of a node's ~20 element forces,
            so a 10 cm part with a 3 kN/m nodal stiffness floors near 1e-5 N). Default: 2^-18 of
            ``max |x|`` (about 32 float32 ulps; 40 nm for a 1 cm part). With a preconditioner,
            Newton also stops once the scaled residual is within one ulp of ``max |x|``: that
            much residual is what rounding the positions to float32 leaves.
        max_iterations: Newton iterations before :class:`NotConverged` is raised.
        cg_tolerance: the tightest relative residual of Newton's CG solves (each stops at
            min(0.1, max(cg_tolerance, |r| / |r_0|)), a forcing term of inexact Newton); the
            adjoint solve stops at ``adjoint_tolerance``.
        adjoint_tolerance: relative residual of the adjoint CG solve of the backward pass: the
            gradient's relative accuracy is about this times the Jacobian's condition number.
        cg_max_iterations: CG iterations per linear solve.
        name: how errors name the solve.
    """

    def __init__(self, residual: Callable[[wp.array, wp.array], None], *, params: Sequence[wp.array] = (),
                 energy: Callable[[wp.array], float] | None = None,
                 preconditioner: Callable[[wp.array, wp.array], None] | None = None,
                 factorization=None, assemble: Callable[[wp.array, wp.array], None] | None = None,
                 local_blocks: Callable[[wp.array], tuple[np.ndarray, np.ndarray]] | None = None,
                 linearize: Callable[[wp.array], None] | None = None,
                 jacobian_product: Callable[[wp.array, wp.array, wp.array], None] | None = None,
                 active_set: ActiveSetPrediction | None = None, exact_tail: bool = True,
                 tolerance: float = 1e-6, step_tolerance: float | None = None, max_iterations: int = 30,
                 cg_tolerance: float = 1e-4, cg_max_iterations: int = 200, adjoint_tolerance: float = 1e-6,
                 name: str = "implicit solve"):
        self.residual = residual
        self.params = list(params)
        self.energy = energy
        self.preconditioner = preconditioner
        if (factorization is None) != (assemble is None):
            raise ValueError("factorization and assemble come together")
        self.factorization = factorization
        self.assemble = assemble
        if local_blocks is not None and factorization is None:
            raise ValueError("local_blocks correct a factorization: give one")
        self.local_blocks = local_blocks
        self.linearize = linearize
        self.jacobian_product = jacobian_product
        self.active_set = active_set
        self.exact_tail = bool(exact_tail)
        self.tolerance = float(tolerance)
        self.step_tolerance = step_tolerance
        self.max_iterations = int(max_iterations)
        self.cg_tolerance = float(cg_tolerance)
        self.adjoint_tolerance = float(adjoint_tolerance)
        self.cg_max_iterations = int(cg_max_iterations)
        self.name = name
        self.report = NewtonReport()
        self._launches = LaunchCache()
        self._linearized = False  # linearize has run at the current iterate

    # -- Jacobian products -----------------------------------------------------------------
    def _jacobian_transpose_product(self, x: wp.array, v: wp.array, out: wp.array) -> None:
        """out = (dr/dx)^T v at x (= dr/dx v for a symmetric Jacobian); other gradients untouched."""
        probe = wp.clone(x, requires_grad=True)
        r = wp.zeros_like(x, requires_grad=True)
        tape = wp.Tape()
        with tape:
            self.residual(probe, r)
        touched = arrays_with_gradients(tape, exclude=(probe, r)) + [p for p in self.params if p.grad is not None]
        unique = list({id(a): a for a in touched}.values())
        saved = [wp.clone(a.grad) for a in unique]
        tape.backward(grads={r: _unflat(v, x)})
        wp.copy(out, _flat(probe.grad))
        for a, g in zip(unique, saved, strict=True):
            wp.copy(a.grad, g)

    def _evaluate(self, x: wp.array) -> wp.array:
        out = wp.zeros_like(x)
        with _no_tape():
            self.residual(x, out)
        return out

    # -- linear solve ----------------------------------------------------------------------
    def _cg(self, x: wp.array, b: wp.array, diag: wp.array | None, *, exact: bool = False,
            tolerance: float | None = None) -> tuple[wp.array, int, bool]:
        """Solve J s = b (flat float arrays) by preconditioned CG: (s, iterations, whether it
        stopped at negative curvature, returning the iterate so far or, if there is none, the
        preconditioned b). ``jacobian_product``, when given, is asked for the exact product if
        ``exact``, else for its approximation; without one the taped Jacobian is used."""
        product = self._jacobian_transpose_product
        if self.jacobian_product is not None:
            views: dict[int, wp.array] = {}  # p and Ap keep their buffers: view each once

            def product(x, v, out):
                for a in (v, out):
                    if a.ptr not in views:
                        views[a.ptr] = _unflat(a, x)
                with _no_tape():
                    done = self.jacobian_product(x, views[v.ptr], views[out.ptr], exact)
                if done is False:
                    self._jacobian_transpose_product(x, v, out)
        n = b.shape[0]
        device = b.device
        launch = self._launches.launch  # the loop's arrays stay the same objects: cached commands
        s = wp.zeros(n, dtype=float, device=device)
        r = wp.clone(b)
        z = wp.zeros_like(r)
        self._precondition(r, diag, z)
        p = wp.clone(z)
        Ap = wp.zeros_like(r)
        rz = _dot(r, z)
        b_norm = math.sqrt(max(_dot(b, b), 0.0))
        if b_norm == 0.0:
            return s, 0, False
        for k in range(1, self.cg_max_iterations + 1):
            product(x, p, Ap)
            curvature = _dot(p, Ap)
            if not curvature > 0.0:
                if k == 1:
                    wp.copy(s, z)  # no curvature information: a preconditioned gradient step
                return s, k, True
            alpha = rz / curvature
            launch("cg_s", _axpy, n, [s, p, alpha], [s], device)
            launch("cg_r", _axpy, n, [r, Ap, -alpha], [r], device)
            if math.sqrt(max(_dot(r, r), 0.0)) <= (tolerance or self.cg_tolerance) * b_norm:
                return s, k, False
            self._precondition(r, diag, z)
            rz_new = _dot(r, z)
            launch("cg_p", _axpy, n, [z, p, rz_new / rz], [p], device)
            rz = rz_new
        return s, self.cg_max_iterations, False

    def _direction(self, x: wp.array, r: wp.array, inverse_diagonal: wp.array | None, forcing: float, *,
                   exact: bool, report: NewtonReport, predict: bool) -> wp.array:
        """Newton's step from x, with the active-set prediction if ``predict``: the prediction sees
        the state, then a preview of the step (the preconditioned right-hand side, one application),
        so that most branch changes are known before the solve; if the solved step still crosses
        one, it is solved again. A predicted step that does not descend is dropped for the plain one."""
        n = _flat(x).shape[0]
        minus_r = wp.zeros(n, dtype=float, device=x.device)
        wp.launch(_axpy, n, [minus_r, _flat(r), -1.0], [minus_r], device=x.device)
        if predict:
            preview = wp.zeros_like(minus_r)
            with _no_tape():
                self.active_set.predict(x, r, None, _unflat(minus_r, x))
                self._set_local_blocks(x)
                self._precondition(minus_r, inverse_diagonal, preview)
                self.active_set.predict(x, r, _unflat(preview, x), _unflat(minus_r, x))
        step = self._newton_step(x, minus_r, inverse_diagonal, forcing, exact=exact, report=report)
        if predict:
            with _no_tape():
                changed = self.active_set.predict(x, r, _unflat(step, x), _unflat(minus_r, x))
            if changed:
                step = self._newton_step(x, minus_r, inverse_diagonal, forcing, exact=exact, report=report)
            if self.energy is not None and _dot(_flat(r), step) >= 0.0:
                self.active_set.clear()
                return self._direction(x, r, inverse_diagonal, forcing, exact=exact, report=report, predict=False)
        return step

    def _line_search(self, x: wp.array, r: wp.array, step: wp.array, trial: wp.array,
                     merit_x: tuple[float, float] | None = None):
        """Backtracking from the full step (Armijo on the energy, else on |r|^2/2): (accepted, t,
        residual at the trial point, its merit). ``step`` descends either, since J is positive
        definite along it (CG stops at negative curvature). ``merit_x``: the merit at x if known."""
        flat_x, flat_trial, n = _flat(x), _flat(trial), _flat(x).shape[0]
        merit0, rounding = merit_x if merit_x is not None else self._merit(x, r)
        residual_norm = _norm(_flat(r))
        slope = _dot(_flat(r), step)  # d merit / d t at t = 0 along step (energy: r is its gradient)
        if self.energy is None:
            jr = wp.zeros(n, dtype=float, device=x.device)
            self._jacobian_transpose_product(x, _flat(r), jr)
            slope = _dot(jr, step)
        t = 1.0
        r_trial = None
        for _ in range(30):
            wp.launch(_axpy, n, [flat_x, step, t], [flat_trial], device=x.device)
            r_trial = self._evaluate(trial)
            merit, merit_rounding = self._merit(trial, r_trial)
            # Near the solution a float32 energy stops resolving the decrease (~r^2/k below its
            # rounding). Within that rounding the energy says nothing either way, and a step is
            # accepted if it shrinks the residual instead (comparing energies there let Newton
            # cycle between two points, one "lower" in energy, one in residual).
            if math.isfinite(merit):
                if abs(merit - merit0) > rounding:
                    accepted = merit <= merit0 + 1e-4 * t * min(slope, 0.0)
                else:
                    accepted = _norm(_flat(r_trial)) < (1.0 - 1e-4 * t) * residual_norm
                if accepted:
                    return True, t, r_trial, (merit, merit_rounding)
            t *= 0.5
        return False, t, r_trial, None

    def _newton_step(self, x: wp.array, minus_r: wp.array, inverse_diagonal: wp.array | None, forcing: float, *,
                     exact: bool, report: NewtonReport) -> wp.array:
        """Newton's direction from J s = -r, with the exact Jacobian product if ``exact`` and one
        is given (falling back to the approximation where the exact one has negative curvature)."""
        exact = exact and self.jacobian_product is not None
        self._set_local_blocks(x)
        if not exact:
            self._linearize(x, approximate=True)
        step, its, negative = self._cg(x, minus_r, inverse_diagonal, exact=exact, tolerance=forcing)
        report.cg_iterations += its
        if exact and negative:
            report.indefinite_steps += 1
            self._linearize(x, approximate=True)
            step, more, _ = self._cg(x, minus_r, inverse_diagonal, tolerance=forcing)
            report.cg_iterations += more
            its += more
        if self.factorization is not None:
            self.factorization.note_iterations(its, -math.log10(forcing))
        return step

    def _set_local_blocks(self, x: wp.array) -> None:
        if self.local_blocks is not None:
            with _no_tape():
                rows, blocks = self.local_blocks(x)
            self.factorization.set_blocks(rows, blocks)

    def _precondition(self, r: wp.array, diag: wp.array | None, out: wp.array) -> None:
        if self.factorization is not None:
            self.factorization.solve(r, out)
        elif diag is None:
            wp.copy(out, r)
        else:
            self._launches.launch("precondition", _scale_by, r.shape[0], [r, diag], [out], r.device)

    def _inverse_diagonal(self, x: wp.array) -> wp.array | None:
        if self.preconditioner is None:
            return None
        d = wp.zeros_like(x)
        with _no_tape():
            self.preconditioner(x, d)
        values = _flat(d).numpy().astype(np.float64)
        safe = np.where(values > 0, 1.0 / np.maximum(values, 1e-30), 1.0)
        return wp.array(safe.astype(np.float32), dtype=float, device=x.device)

    # -- Newton ----------------------------------------------------------------------------
    def _merit(self, x: wp.array, r: wp.array | None = None) -> tuple[float, float]:
        """(merit, its rounding): the energy if given, else |r|^2 / 2."""
        if self.energy is not None:
            with _no_tape():
                value = self.energy(x)
            if isinstance(value, tuple):
                return float(value[0]), float(value[1])
            return float(value), 1e-6 * abs(float(value))
        r = self._evaluate(x) if r is None else r
        merit = 0.5 * _dot(_flat(r), _flat(r))
        return merit, 1e-6 * merit

    def _newton(self, x: wp.array) -> None:
        report = NewtonReport()
        flat_x = _flat(x)
        trial = wp.zeros_like(x)
        plain_trial = wp.zeros_like(x)
        r = self._evaluate(x)
        history = [math.inf, math.inf]
        merit_x = None  # the merit at x, carried over from the line search that chose x
        full_step = False  # the last line search took the full step: Newton is in its quadratic basin
        for it in range(self.max_iterations + 1):
            values = _flat(r).numpy().astype(np.float64)
            report.residual = float(np.abs(values).max()) if values.size else 0.0
            if not math.isfinite(report.residual):
                raise NotConverged(self.name, it, report.residual, self.tolerance,
                                   hint="The residual is not finite: an element inverted or a step diverged.")
            inverse_diagonal = self._inverse_diagonal(x)
            converged = report.residual <= self.tolerance
            near_floor = False  # within the step tolerance of float32's floor (see the line search)
            if inverse_diagonal is not None and values.size:
                report.scaled_residual = float(np.abs(values * inverse_diagonal.numpy()).max())
                largest = _max_abs(flat_x)
                limit = self.step_tolerance if self.step_tolerance is not None else 2.0**-18 * largest
                stalled = report.residual > 0.5 * history[-1] and history[-1] > 0.5 * history[-2]
                near_floor = report.scaled_residual <= limit
                converged |= near_floor and stalled
                # at the floor itself: every |r_i| within its node's stiffness times one float32
                # ulp of the largest coordinate, which rounding alone leaves
                converged |= report.scaled_residual <= 2.0**-23 * largest
            history.append(report.residual)
            if converged:
                report.newton_iterations = it
                self.report = report
                return
            if it == self.max_iterations:
                break
            # inexact Newton (Eisenstat and Walker's forcing terms): far from the solution a rough
            # linear solve does as well; the tolerance tightens with the residual's decrease
            if it == 0:
                initial = report.residual
            forcing = min(0.1, max(self.cg_tolerance, report.residual / max(initial, 1e-30)))
            self._linearized = False
            self._set_local_blocks(x)  # (before a refactorisation, which may factor them in)
            self._linearize(x)
            predicted = self.active_set is not None
            step = self._direction(x, r, inverse_diagonal, forcing, exact=full_step, report=report,
                                   predict=predicted)
            if merit_x is None:
                merit_x = self._merit(x, r)
            accepted, t, r_trial, merit_trial = self._line_search(x, r, step, trial, merit_x)
            if predicted and (not accepted or t < 0.5):
                # the predicted branches misled the step (a node held apart by the pad, pulled to
                # the indenter by the model): the plain linearisation, if its step does better
                self.active_set.clear()
                plain = self._direction(x, r, inverse_diagonal, forcing, exact=full_step, report=report,
                                        predict=False)
                plain_result = self._line_search(x, r, plain, plain_trial, merit_x)
                if plain_result[0] and (not accepted or plain_result[1] > t):
                    step, (accepted, t, r_trial, merit_trial) = plain, plain_result
                    wp.copy(trial, plain_trial)
            if not accepted and near_floor:
                # no float32 step lowers the energy or the residual, and every node's residual over
                # its stiffness is within the step tolerance: rounding is all that is left (a stall
                # one iteration early). Seen on a 768-tet pad tilting across a sphere: scaled
                # residuals of 2-5e-9 m against a floor of 1.3-1.5e-9 m and a tolerance of 4e-8 m.
                report.newton_iterations = it
                self.report = report
                return
            if not accepted:
                report.newton_iterations = it + 1
                self.report = report
                raise NotConverged(self.name, report.newton_iterations, report.residual, self.tolerance,
                                   hint="The line search found no step that lowers the energy or the residual: "
                                        "the problem may be non-smooth at this scale (e.g. friction regularised "
                                        "over less than the step's motion); take a smaller step.")
            wp.copy(x, trial)
            r, merit_x = r_trial, merit_trial
            report.step = t * _max_abs(step)
            full_step = t == 1.0 and self.exact_tail
        report.newton_iterations = self.max_iterations
        self.report = report
        raise NotConverged(self.name, report.newton_iterations, report.residual, self.tolerance,
                           hint="Raise max_iterations, start closer to the solution, or take a smaller step.")

    # -- public ----------------------------------------------------------------------------
    def solve(self, x: wp.array) -> NewtonReport:
        """Solve r(x, theta) = 0 in place, starting from ``x``'s contents; returns the report.

        Under an active ``wp.Tape`` the solve is recorded as one entry: backward reads
        ``x.grad`` (d loss / d x*), solves the adjoint system and adds -(dr/dtheta)^T lambda to the
        gradients of ``params`` (and of any other array ``residual`` reads with gradients).
        """
        from diffsim.core.scratch import taping

        tape = _active_tape() if taping() else None
        try:
            with _no_tape():
                self._newton(x)
        finally:
            if self.active_set is not None:
                self.active_set.clear()  # the adjoint solve takes the exact Jacobian
        if tape is not None:
            solution = wp.clone(x)  # the tape's x may be overwritten later by the caller
            tape.record_func(lambda: self._backward(solution, x),
                             [a for a in (x, *self.params) if a.grad is not None])
        return self.report

    def _backward(self, solution: wp.array, x: wp.array) -> None:
        if x.grad is None:
            return
        x_bar = wp.clone(_flat(x.grad))
        lam, its = self._adjoint_cg(solution, x_bar)
        self.report.adjoint_cg_iterations = its
        # theta_bar += -(dr/dtheta)^T lambda: one taped residual with -lambda as its adjoint
        probe = wp.clone(solution, requires_grad=False)
        r = wp.zeros_like(solution, requires_grad=True)
        tape = wp.Tape()
        with tape:
            self.residual(probe, r)
        minus_lam = wp.zeros_like(lam)
        wp.launch(_axpy, lam.shape[0], [minus_lam, lam, -1.0], [minus_lam], device=lam.device)
        tape.backward(grads={r: _unflat(minus_lam, solution)})
        # (no tape.reset(): it would zero the gradients just accumulated)
        x.grad.zero_()  # x* was produced here: its adjoint is consumed, not passed further back

    def _linearize(self, x: wp.array, *, approximate: bool = False) -> None:
        """Per-iterate factors of the approximate products, computed once per iterate and only
        when they are used (an approximate solve, or a factorisation), then a new factor if the kept
        one is stale. ``self._linearized`` is cleared whenever x moves."""
        f = self.factorization
        refactor = f is not None and f.stale
        if self.linearize is not None and (approximate or refactor) and not self._linearized:
            with _no_tape():
                self.linearize(x)
            self._linearized = True
        if refactor:
            with _no_tape():
                self.assemble(x, f.values)
            try:
                f.factor()
            except DiffsimError as error:
                raise DiffsimError(f"{self.name}: {error}") from error

    def _adjoint_cg(self, solution: wp.array, x_bar: wp.array) -> tuple[wp.array, int]:
        # a backward pass runs the steps in reverse: the factor kept from the last forward solve
        # drifts as it goes, so it is renewed by the same rule as in Newton
        self._linearized = False
        self._set_local_blocks(solution)
        self._linearize(solution)
        lam, its, _ = self._cg(solution, x_bar, self._inverse_diagonal(solution), exact=True,
                               tolerance=self.adjoint_tolerance)
        if self.factorization is not None:
            self.factorization.note_iterations(its, -math.log10(self.adjoint_tolerance))
        return lam, its


def _unflat(v: wp.array, like: wp.array) -> wp.array:
    """``v`` (flat floats) viewed with the dtype and shape of ``like``."""
    if like.dtype is float:
        return v
    view = wp.array(ptr=v.ptr, dtype=like.dtype, shape=like.shape, device=like.device)
    view._keepalive = v
    return view


def arrays_with_gradients(tape, exclude=()) -> list:
    """Arrays with gradients among the arguments of the tape's launches (struct fields included)."""
    skip = {id(a) for a in exclude}
    found = []

    def visit(value):
        if isinstance(value, wp.array):
            if value.grad is not None and id(value) not in skip:
                found.append(value)
        elif hasattr(getattr(value, "_cls", None), "vars"):  # a wp.struct instance
            for name in value._cls.vars:
                visit(getattr(value, name))

    for entry in tape.launches:
        if isinstance(entry, list):  # [kernel, dim, max_blocks, inputs, outputs, ...]
            for value in (*entry[3], *entry[4]):
                visit(value)
    return found


def _dot(a: wp.array, b: wp.array) -> float:
    return float(np.dot(a.numpy().astype(np.float64), b.numpy().astype(np.float64)))


def _norm(a: wp.array) -> float:
    return math.sqrt(max(_dot(a, a), 0.0))


def _max_abs(a: wp.array) -> float:
    values = a.numpy()
    return float(np.abs(values).max()) if values.size else 0.0


def _active_tape():
    from warp._src.context import runtime

    return runtime.tape


class _no_tape:
    """Suspend the active tape: the solve's own launches are not the outer tape's business."""

    def __enter__(self):
        from warp._src.context import runtime

        self._tape = runtime.tape
        runtime.tape = None

    def __exit__(self, *exc):
        from warp._src.context import runtime

        runtime.tape = self._tape
