"""Grid operators on the cell-centred voxel grid (index space, unit spacing).

* :class:`DiffusionSolver`: ``L^{-1}`` with ``L = I - dt sigma Lap`` and the
  zero-flux (Neumann) 7-point Laplacian, by its Neumann series (small dt sigma)
  or the orthonormal DCT-II that diagonalises it exactly (both symmetric to round-off).
* :func:`active_laplacian`: the graph Laplacian ``G^T G`` of the forward
  differences of the full grid, restricted to a set of active voxels
  (velocity is zero outside it): ``||grad v||^2 = v^T (G^T G) v``.
* :func:`neumann_laplacian`: the 7-point Neumann Laplacian of a full array.
"""

from __future__ import annotations

import os

import numpy as np
import scipy.fft
import scipy.sparse as sp
from scipy import ndimage

from glymphmpi.romt import kernels


def neumann_eigenvalues(n: int) -> np.ndarray:
    """Eigenvalues of the 1D Neumann second difference (cell-centred), (n,), <= 0.

    The DCT-II vector m has eigenvalue ``-4 sin^2(pi m / (2 n))``.
    """
    m = np.arange(n, dtype=np.float64)
    return -4.0 * np.sin(np.pi * m / (2.0 * n)) ** 2


class DiffusionSolver:
    """Applies ``(I - dt sigma Lap_N)^{-1}`` to 3D arrays.

    Two exact-to-round-off methods, chosen by cost (``method``):

    * ``"series"`` when ``a = dt sigma`` is small (the default 0.4 x 0.002 = 8e-4 voxel^2):
      the Neumann series ``sum_{k<=K} (a Lap_N)^k`` by Horner, K fused stencil passes
      (:func:`glymphmpi.romt.kernels.neumann_series`) with K the fewest terms whose truncation
      is below 1e-12 in the 2-norm (:func:`~glymphmpi.romt.kernels.series_terms`: K = 5 at
      8e-4); a polynomial in the symmetric Lap_N, so the operator stays symmetric (the
      dot-product tests hold to round-off). 6.4x cheaper than a DCT pair on the rat's crop
      (benchmarks/romt_kernels.py).
    * ``"dct"`` otherwise (K would exceed 16: 12 a above about 0.19): the orthonormal DCT-II
      diagonalises Lap_N exactly.

    Args:
        shape: (ni, nj, nk) grid.
        dt_sigma: dt * sigma in voxel^2 (0 gives the identity).
        workers: scipy.fft threads.
        method: ``"auto"`` (as above), ``"series"`` or ``"dct"``.
    """

    def __init__(self, shape, dt_sigma: float, workers: int = 1, method: str = "auto"):
        self.shape = tuple(int(s) for s in shape)
        self.dt_sigma = float(dt_sigma)
        self.workers = max(1, int(workers))
        self.terms = kernels.series_terms(self.dt_sigma)
        if method not in ("auto", "series", "dct"):
            raise ValueError(f"method must be auto, series or dct, got {method!r}")
        if method == "series" and self.terms < 0:
            raise ValueError(f"dt*sigma = {self.dt_sigma:g} voxel^2 is too large for the series (12 a >= 1 "
                             "or more than 16 terms)")
        self.method = "series" if (method == "series" or (method == "auto" and self.terms >= 0)) else "dct"
        self._work = None
        if self.method == "dct":
            lam = sum(np.meshgrid(*[neumann_eigenvalues(n) for n in self.shape], indexing="ij",
                                  sparse=True))
            self.inv_symbol = 1.0 / (1.0 - self.dt_sigma * lam)  # (ni, nj, nk) in (0, 1]

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``L^{-1} x`` for x of shape (N,) or (ni, nj, nk); returns the same shape (new array)."""
        if self.dt_sigma == 0.0:
            return np.array(x, copy=True)
        flat = x.ndim == 1
        a = np.ascontiguousarray(x, dtype=np.float64).reshape(self.shape)
        if self.method == "series":
            if self._work is None:
                self._work = np.empty(self.shape)
            out = np.empty(self.shape)
            kernels.neumann_series(a, self.dt_sigma, self.terms, out, self._work)
        else:
            c = scipy.fft.dctn(a, type=2, norm="ortho", workers=self.workers)
            c *= self.inv_symbol
            out = scipy.fft.idctn(c, type=2, norm="ortho", workers=self.workers, overwrite_x=True)
        return out.ravel() if flat else out

    def matrix_free_L(self, x: np.ndarray) -> np.ndarray:
        """``L x`` by finite differences (for tests): x (ni, nj, nk)."""
        return x - self.dt_sigma * neumann_laplacian(x)


def neumann_laplacian(x: np.ndarray) -> np.ndarray:
    """7-point Laplacian with zero-flux boundaries, ``-G^T G x``, x (ni, nj, nk)."""
    return ndimage.laplace(x, mode="nearest")


def active_laplacian(shape, active_flat: np.ndarray) -> sp.csr_matrix:
    """``G^T G`` restricted to the active voxels (M x M CSR, symmetric, PSD).

    Row i: ``deg(i) v_i - sum_{j active neighbour} v_j``, where deg counts all
    grid neighbours (inactive ones hold v = 0), i.e. the full-grid Neumann
    Dirichlet-energy of a field that vanishes outside the active set.

    Args:
        shape: (ni, nj, nk).
        active_flat: (M,) sorted flat indices of the active voxels.
    """
    shape = tuple(shape)
    n = int(np.prod(shape))
    pos = np.full(n, -1, dtype=np.int64)
    pos[active_flat] = np.arange(active_flat.size)
    ijk = np.unravel_index(active_flat, shape)
    strides = np.array([shape[1] * shape[2], shape[2], 1])
    deg = np.zeros(active_flat.size)
    rows, cols = [], []
    for d in range(3):
        for s in (-1, 1):
            nb = ijk[d] + s
            inside = (nb >= 0) & (nb < shape[d])
            deg += inside
            j = np.where(inside, active_flat + s * strides[d], 0)
            pj = np.where(inside, pos[j], -1)
            ok = pj >= 0
            rows.append(np.nonzero(ok)[0])
            cols.append(pj[ok])
    r = np.concatenate(rows)
    c = np.concatenate(cols)
    off = sp.csr_matrix((-np.ones(r.size), (r, c)), shape=(active_flat.size,) * 2)
    return (off + sp.diags(deg)).tocsr()


def default_workers(ranks_on_node: int = 1) -> int:
    """Threads for scipy.fft: the cores divided among the ranks on this node."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, n // max(1, ranks_on_node))


class ActiveLaplacian:
    """``G^T G`` on the active set: this rank's rows of :func:`active_laplacian`.

    Applied to all components at once by a fused kernel over a neighbour table
    (:func:`glymphmpi.romt.kernels.graph_laplacian_rows`; a CSR matvec per component
    before, 17% of a Gauss-Newton loop on the 50^3 spheres).

    Args:
        shape: (ni, nj, nk).
        active_flat: (M,) sorted flat indices of the active voxels.
        lo, hi: the rows (active positions) this rank owns.
    """

    def __init__(self, shape, active_flat: np.ndarray, lo: int = 0, hi: int | None = None):
        shape = tuple(int(s) for s in shape)
        active_flat = np.asarray(active_flat, dtype=np.int64)
        self.lo = int(lo)
        self.hi = active_flat.size if hi is None else int(hi)
        n = int(np.prod(shape))
        pos = np.full(n, -1, dtype=np.int64)
        pos[active_flat] = np.arange(active_flat.size)
        mine = active_flat[self.lo:self.hi]
        ijk = np.unravel_index(mine, shape)
        strides = (shape[1] * shape[2], shape[2], 1)
        nb = np.full((mine.size, 6), -1, dtype=np.int64)
        deg = np.zeros(mine.size)
        e = 0
        for d in range(3):
            for s in (-1, 1):
                inside = (ijk[d] + s >= 0) & (ijk[d] + s < shape[d])
                deg += inside
                nb[inside, e] = pos[mine[inside] + s * strides[d]]
                e += 1
        self.nb = nb
        self.diagonal = deg

    def apply(self, full: np.ndarray) -> np.ndarray:
        """(R, M) values on all active voxels -> (R, hi - lo) ``G^T G`` rows of this rank."""
        full = np.ascontiguousarray(full, dtype=np.float64)
        out = np.empty((full.shape[0], self.hi - self.lo))
        kernels.graph_laplacian_rows(full, self.lo, self.nb, self.diagonal, out)
        return out
