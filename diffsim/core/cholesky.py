"""A lagged sparse Cholesky factorisation, the preconditioner of :class:`~diffsim.core.implicit.ImplicitSolve`.

Jacobi-preconditioned CG on an elastic body needs a number of iterations that grows with the mesh's
resolution (about 100 per Newton iteration on an 8k-tet tactile pad). The factor of an SPD
approximation of the Jacobian, assembled from element matrices (projected element Hessians, the
Gauss-Newton contact blocks), solves the linear system to the accuracy of that approximation in one
application; as a CG preconditioner it leaves the few iterations that the difference between the
approximation and the current Jacobian needs. A factorisation costs about as much as a hundred CG
iterations, so it is kept across Newton iterations and steps (the Jacobian of a tactile pad moves
little between frames) and refreshed only once a linear solve needs more than ``refresh_iterations``.

When to refactor is a rent-or-buy choice: a stale factor costs extra CG iterations in every solve
until the next factorisation, which costs a fixed time. The factor is renewed once the iterations
beyond the rate of the first solve after the last factorisation (iterations per decade of
residual reduction) add up to ``refresh_iterations``, which should be about what one factorisation
costs in CG iterations (never more than twice the best choice in hindsight). Counting iterations
rather than seconds keeps a rerun identical.

The factorisation is CHOLMOD's supernodal Cholesky through ``cholespy``, whose solves read Warp
arrays directly (DLPack) on the CPU and on CUDA devices. The sparsity pattern is fixed when the
preconditioner is made: entries are given in coordinate form with duplicates, summed on the host
into the compressed pattern before each factorisation (entries listed as structurally zero are
dropped from it, which keeps them out of the factor's fill).
"""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse
import warp as wp

from diffsim.errors import DiffsimError

__all__ = ["SparseCholesky"]


class SparseCholesky:
    """The Cholesky factor of a symmetric positive-definite matrix of fixed sparsity pattern.

    Args:
        size: rows (= columns) of the matrix.
        rows, columns: the pattern in coordinate form (duplicates allowed: their values add up).
        structural: optional mask of the entries that can be nonzero (the others are left out).
        device: where the solves run.
        refresh_iterations: extra CG iterations (see above) after which the factor is renewed.
    """

    def __init__(self, size: int, rows: np.ndarray, columns: np.ndarray, *, structural: np.ndarray | None = None,
                 device=None, refresh_iterations: int = 60):
        try:
            import cholespy
        except ImportError as error:  # a dependency of the package: only a broken install lands here
            raise DiffsimError("the Cholesky preconditioner needs the 'cholespy' package (pip install cholespy), "
                               "or choose preconditioner='jacobi'.") from error
        self._cholespy = cholespy
        self.size = int(size)
        self.device = wp.get_device(device)
        rows = np.asarray(rows, dtype=np.int64)
        columns = np.asarray(columns, dtype=np.int64)
        keep = np.ones(rows.shape, dtype=bool) if structural is None else np.asarray(structural, dtype=bool)
        # compressed sparse rows of the summed matrix (scipy merges the duplicates), and where each
        # kept entry adds into it: its rank among the pattern's keys, row-major (a sort of the
        # ~100 entries per row an 8k-tet mesh lists would cost three times as long)
        kept_rows, kept_columns = rows[keep], columns[keep]
        pattern = scipy.sparse.csr_matrix((np.ones(kept_rows.size, dtype=np.int32), (kept_rows, kept_columns)),
                                          shape=(self.size, self.size))
        pattern.sort_indices()
        keys = np.repeat(np.arange(self.size, dtype=np.int64), np.diff(pattern.indptr)) * self.size + pattern.indices
        self._slot = np.searchsorted(keys, kept_rows * self.size + kept_columns)
        self._keep = keep
        self._indptr = pattern.indptr.astype(np.int32)
        self._indices = pattern.indices.astype(np.int32)
        #: the entries of the next matrix to factor, one per pattern entry (float64, on ``device``)
        self.values = wp.zeros(rows.shape[0], dtype=wp.float64, device=self.device)
        self.refresh_iterations = int(refresh_iterations)
        self._solver = None
        self.stale = True  #: factor again before the next solve
        self.factorizations = 0  #: how often it was factored
        self.factor_seconds = 0.0  #: wall time spent factoring [s]
        self._baseline = None  # CG iterations per decade of the first solve after a factorisation
        self._extra = 0.0  # iterations beyond that rate since

    def factor(self) -> None:
        """Factor the matrix whose entries are now in ``values`` (float64, one per pattern entry)."""
        start = time.perf_counter()
        summed = np.bincount(self._slot, weights=self.values.numpy()[self._keep], minlength=self._indices.size)
        device = self.device
        indptr = wp.array(self._indptr, dtype=wp.int32, device=device)
        indices = wp.array(self._indices, dtype=wp.int32, device=device)
        data = wp.array(summed, dtype=wp.float64, device=device)
        try:
            self._solver = self._cholespy.CholeskySolverF(self.size, indptr, indices, data,
                                                          self._cholespy.MatrixType.CSR)
        except (RuntimeError, ValueError) as error:
            raise DiffsimError(f"the Cholesky preconditioner's matrix ({self.size} rows) is not positive definite "
                               f"({error}); choose preconditioner='jacobi'.") from error
        self.stale = False
        self.factorizations += 1
        self.factor_seconds += time.perf_counter() - start
        self._baseline = None
        self._extra = 0.0

    def solve(self, b: wp.array, out: wp.array) -> None:
        """out = A^-1 b for flat float32 arrays of ``size`` entries."""
        self._solver.solve(b, out)

    def note_iterations(self, iterations: int, decades: float = 1.0) -> None:
        """Told after each preconditioned linear solve: its CG iterations and the residual
        reduction it asked for (decades, -log10 of the relative tolerance)."""
        decades = max(float(decades), 1.0)
        if self._baseline is None:
            self._baseline = iterations / decades
        self._extra += max(0.0, iterations - self._baseline * decades)
        if self._extra >= self.refresh_iterations:
            self.stale = True
