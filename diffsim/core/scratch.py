"""Per-step scratch arrays for solvers whose taped steps must not share buffers: untaped steps
reuse one set, each taped step takes its own set from a pool handed back under claims.
"""

from __future__ import annotations

from types import SimpleNamespace

import warp as wp


def taping() -> bool:
    """True while a ``wp.Tape`` is recording."""
    from warp._src.context import runtime

    return runtime.tape is not None


class ScratchPool:
    """Named scratch arrays of fixed shapes.

    A kernel recorded on a tape must find its inputs unchanged when the tape plays backward, so a
    taped step takes a fresh set (with gradients) and a tape may then record many steps; the sets
    go back to the pool when the claim they were taken under is released (see
    :class:`~diffsim.core.Solver`). Untaped steps share one set without gradients.

    Args:
        device: Warp device.
        fields: ``{name: (dtype, shape)}``.
    """

    def __init__(self, device, fields: dict[str, tuple]):
        self.device = device
        self.fields = dict(fields)
        self._untaped: SimpleNamespace | None = None
        self._free: list[SimpleNamespace] = []
        self._claims: list[list] = []
        self.sets_created = 0  # taped sets ever allocated (for memory tests)

    def _new_set(self, requires_grad: bool) -> SimpleNamespace:
        return SimpleNamespace(**{
            name: wp.zeros(shape, dtype=dtype, device=self.device, requires_grad=requires_grad)
            for name, (dtype, shape) in self.fields.items()
        })

    def take(self) -> SimpleNamespace:
        """The scratch of one step (contents unspecified; gradients zeroed when taping)."""
        if not taping():
            if self._untaped is None:
                self._untaped = self._new_set(False)
            return self._untaped
        if self._free:
            scratch = self._free.pop()
            for arr in vars(scratch).values():
                arr.grad.zero_()
        else:
            scratch = self._new_set(True)
            self.sets_created += 1
        if self._claims:
            self._claims[-1].append(scratch)
        # a set taken outside any claim is never reused: safe, at the cost of memory
        return scratch

    def begin_claim(self) -> list:
        claim: list = []
        self._claims.append(claim)
        return claim

    def end_claim(self, claim: list) -> None:
        # by identity: claims are lists, and two empty ones compare equal
        self._claims = [c for c in self._claims if c is not claim]

    def release(self, claim: list) -> None:
        self.end_claim(claim)
        self._free.extend(claim)
        claim.clear()


class PooledScratchSolver:
    """Mixin for a :class:`~diffsim.core.Solver` whose per-step scratch is a :class:`ScratchPool` in
    ``self._scratch``: taped steps own their scratch, so one tape may record many steps."""

    tape_spans_steps = True

    def begin_step_scratch(self):
        return self._scratch.begin_claim()

    def end_step_scratch(self, claim) -> None:
        self._scratch.end_claim(claim)

    def release_step_scratch(self, claim) -> None:
        self._scratch.release(claim)

    @property
    def scratch_sets_created(self) -> int:
        return self._scratch.sets_created
