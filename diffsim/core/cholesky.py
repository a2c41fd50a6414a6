"""A lagged sparse Cholesky factorisation, the preconditioner of :class:`~diffsim.core.implicit.ImplicitSolve`.

Jacobi-preconditioned CG on an elastic body needs a number of iterations that grows with the mesh's
resolution (about 100 per Newton iteration on an 8k-tet tactile pad). The factor of an SPD
approximation of the Jacobian, assembled from element matrices (projected element Hessians, the
Gauss-Newton contact blocks), solves the linear system to the accuracy of that approximation in one
application; as a CG preconditioner it leaves the few iterations that the difference between the
approximation and the current Jacobian needs. A factorisation costs as much as tens of CG
iterations, so it is kept across Newton iterations and steps (the Jacobian of a tactile pad moves
little between frames) and refreshed only once a linear solve needs more than ``refresh_iterations``.

When to refactor is a rent-or-buy choice: a stale factor costs extra CG iterations in every solve
until the next factorisation, which costs a fixed time. The factor is renewed once the iterations
beyond the rate of the first solve after the last factorisation (iterations per decade of
residual reduction) add up to ``refresh_iterations``, which should be about what one factorisation
costs in CG iterations (never more than twice the best choice in hindsight). Counting iterations
rather than seconds keeps a rerun identical.

Two factorisations, chosen per matrix (``backend="auto"``):

- **banded** (CPU devices): the unknowns reordered by reverse Cuthill-McKee, which gives an FEM
  body a band about as wide as its thinnest cross-section, then LAPACK's banded Cholesky
  (``pbtrf``/``pbtrs``, on the BLAS scipy ships with). Tactile pads are thin, so their band is
  narrow: on the 8k-tet benchmark pad (5,292 unknowns, band 341) a factorisation takes 25-45 ms
  and a solve 0.6-1 ms (single precision), against 120-200 ms and 1.2-1.6 ms through CHOLMOD; on
  a 10 x 10 x 10 cube of 3,993 unknowns 14 ms against 121 ms (2-core CPU). Chosen while the band,
  in double precision, needs at most :data:`BANDED_MAX_BYTES`.
- **cholmod**: CHOLMOD's supernodal Cholesky through ``cholespy``, whose solves read Warp arrays
  directly (DLPack) on the CPU and on CUDA devices; the only choice on a GPU, and the choice for
  bodies whose band would be too wide to store.

The sparsity pattern is fixed when the preconditioner is made: entries are given in coordinate
form with duplicates, summed on the host into the compressed pattern before each factorisation
(entries listed as structurally zero are dropped from it, which keeps them out of the factor's
fill and the band).
"""

from __future__ import annotations

import time

import numpy as np
import scipy.linalg
import scipy.sparse
import scipy.sparse.csgraph
import warp as wp

from diffsim.errors import DiffsimError, InvalidParameter

__all__ = ["BACKENDS", "BANDED_MAX_BYTES", "CholeskyPattern", "SparseCholesky"]

BACKENDS = ("auto", "banded", "cholmod")
#: ``backend="auto"`` factors banded while the band's storage in double precision (the fallback)
#: stays under this [bytes]
BANDED_MAX_BYTES = 512 * 2**20
#: extra CG iterations after which a stale factor is renewed, per backend, when not given: about
#: what one factorisation costs in preconditioned CG iterations on a 2-core CPU (8k-tet pad)
REFRESH_ITERATIONS = {"banded": 20, "cholmod": 60}


class CholeskyPattern:
    """The symbolic half of a :class:`SparseCholesky`: the compressed pattern, where each given
    entry adds into it, the backend and (banded) the reordering. It depends on the structure only,
    so a model analyses it once and every solver of that model shares it.

    Args:
        size: rows (= columns) of the matrix.
        rows, columns: the pattern in coordinate form (duplicates allowed: their values add up).
        structural: optional mask of the entries that can be nonzero (the others are left out).
        device: where the solves run.
        backend: "banded", "cholmod" or "auto" (see the module header).
    """

    def __init__(self, size: int, rows: np.ndarray, columns: np.ndarray, *, structural: np.ndarray | None = None,
                 device=None, backend: str = "auto"):
        if backend not in BACKENDS:
            raise InvalidParameter("backend", backend, ", ".join(f"'{b}'" for b in BACKENDS))
        self.size = int(size)
        self.device = wp.get_device(device)
        if backend == "banded" and not self.device.is_cpu:
            raise InvalidParameter("backend", backend, "'cholmod' or 'auto' on a CUDA device (banded factors on CPUs)")
        rows = np.asarray(rows, dtype=np.int64)
        columns = np.asarray(columns, dtype=np.int64)
        self.entries = rows.shape[0]  #: entries given (the length of the values array)
        keep = np.ones(rows.shape, dtype=bool) if structural is None else np.asarray(structural, dtype=bool)
        # compressed sparse rows of the summed matrix (scipy merges the duplicates), and where each
        # kept entry adds into it: its rank among the pattern's keys, row-major (a sort of the
        # ~100 entries per row an 8k-tet mesh lists would cost three times as long)
        kept_rows, kept_columns = rows[keep], columns[keep]
        pattern = scipy.sparse.csr_matrix((np.ones(kept_rows.size, dtype=np.int32), (kept_rows, kept_columns)),
                                          shape=(self.size, self.size))
        pattern.sort_indices()
        keys = np.repeat(np.arange(self.size, dtype=np.int64), np.diff(pattern.indptr)) * self.size + pattern.indices
        self.slot = np.searchsorted(keys, kept_rows * self.size + kept_columns)
        self.keep = keep
        self.indptr = pattern.indptr.astype(np.int32)
        self.indices = pattern.indices.astype(np.int32)
        if backend != "cholmod" and self.device.is_cpu:
            self._band_layout(pattern)
            if backend == "auto" and 8 * (self.bandwidth + 1) * self.size > BANDED_MAX_BYTES:
                backend = "cholmod"
        self.backend = "banded" if backend != "cholmod" and self.device.is_cpu else "cholmod"  #: the one in use

    def _band_layout(self, pattern: scipy.sparse.csr_matrix) -> None:
        """The reordering and where each compressed entry of the upper triangle lands in LAPACK's
        upper band storage (``band[w + i - j, j] = A[i, j]`` for i <= j, w the bandwidth)."""
        order = scipy.sparse.csgraph.reverse_cuthill_mckee(pattern, symmetric_mode=True).astype(np.int64)
        rank = np.empty_like(order)
        rank[order] = np.arange(self.size)
        i = rank[np.repeat(np.arange(self.size, dtype=np.int64), np.diff(pattern.indptr))]
        j = rank[pattern.indices.astype(np.int64)]
        upper = i <= j
        self.bandwidth = int(np.max(j[upper] - i[upper])) if upper.any() else 0  #: (banded) of the reordered matrix
        self.order = order  # reordered unknown k is unknown order[k]
        self.band_entries = np.flatnonzero(upper)
        self.band_slots = (self.bandwidth + i[upper] - j[upper]) * self.size + j[upper]


class SparseCholesky:
    """The Cholesky factor of a symmetric positive-definite matrix of fixed sparsity pattern.

    Args:
        pattern: a :class:`CholeskyPattern`, or the ``size`` of the matrix followed by ``rows``,
            ``columns`` and the keywords of :class:`CholeskyPattern`, which analyse one here.
        refresh_iterations: extra CG iterations (see the module header) after which the factor is
            renewed (default: :data:`REFRESH_ITERATIONS` of the backend).
    """

    def __init__(self, pattern: CholeskyPattern | int, rows: np.ndarray | None = None,
                 columns: np.ndarray | None = None, *, refresh_iterations: int | None = None, **analysis):
        if not isinstance(pattern, CholeskyPattern):
            pattern = CholeskyPattern(pattern, rows, columns, **analysis)
        self.pattern = pattern  #: the symbolic analysis (shareable between factors of one structure)
        self.size = pattern.size
        self.device = pattern.device
        self.backend = pattern.backend  #: "banded" or "cholmod"
        if self.backend == "cholmod":
            try:
                import cholespy
            except ImportError as error:  # a dependency of the package: only a broken install lands here
                raise DiffsimError("the Cholesky preconditioner needs the 'cholespy' package (pip install cholespy), "
                                   "or choose preconditioner='jacobi'.") from error
            self._cholespy = cholespy
        #: the entries of the next matrix to factor, one per pattern entry (float64, on ``device``)
        self.values = wp.zeros(pattern.entries, dtype=wp.float64, device=self.device)
        self.refresh_iterations = int(REFRESH_ITERATIONS[self.backend] if refresh_iterations is None
                                      else refresh_iterations)
        self._solver = None
        self.stale = True  #: factor again before the next solve
        self.factorizations = 0  #: how often it was factored
        self.factor_seconds = 0.0  #: wall time spent factoring [s]
        self._baseline = None  # CG iterations per decade of the first solve after a factorisation
        self._extra = 0.0  # iterations beyond that rate since

    def factor(self) -> None:
        """Factor the matrix whose entries are now in ``values`` (float64, one per pattern entry)."""
        start = time.perf_counter()
        p = self.pattern
        summed = np.bincount(p.slot, weights=self.values.numpy()[p.keep], minlength=p.indices.size)
        if self.backend == "banded":
            # single precision first: the solves read the whole band, and half the bytes is half
            # their time; a matrix too ill-conditioned for it is factored again in double
            for dtype in (np.float32, np.float64):
                band = np.zeros((p.bandwidth + 1) * self.size, dtype=dtype)
                band[p.band_slots] = summed[p.band_entries]
                band = band.reshape(p.bandwidth + 1, self.size)
                pbtrf, self._pbtrs = scipy.linalg.get_lapack_funcs(("pbtrf", "pbtrs"), (band,))
                self._band, info = pbtrf(band, lower=0, overwrite_ab=1)
                if info == 0:
                    break
            if info != 0:
                raise DiffsimError(f"the Cholesky preconditioner's matrix ({self.size} rows) is not positive definite "
                                   f"(LAPACK pbtrf: leading minor {info} of the reordered matrix); "
                                   f"choose preconditioner='jacobi'.")
        else:
            device = self.device
            indptr = wp.array(p.indptr, dtype=wp.int32, device=device)
            indices = wp.array(p.indices, dtype=wp.int32, device=device)
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
        if self.backend == "banded":  # CPU arrays: numpy() is a view of the same memory
            order = self.pattern.order
            x, _ = self._pbtrs(self._band, b.numpy()[order], lower=0)
            out.numpy()[order] = x
        else:
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
