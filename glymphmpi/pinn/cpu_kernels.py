"""Fused CPU kernels (numba) for the elementwise work of a hidden tanh layer of the PINN's
one-pass training step (:class:`glymphmpi.pinn.network._FusedTanhLayer`).

A hidden layer of :meth:`~glymphmpi.pinn.network.PinnNet.fused_data_residual` works on the
stacked rows ``[values (m = n + n_d) | d/dx, d/dy, d/dz (n each) | R = d/dt - D lap (n)]`` of
width W. Around its matrix products (``Z = S W^T`` forward; ``dS = dZ W`` and ``dW = dZ^T S``
backward) PyTorch's eager formulation makes about 8 passes over memory forward and 15 backward,
one per elementwise operation, each over an (n, W) or (4 n, W) array. These kernels make one:

* :func:`pde_rows_forward`: from ``a = tanh z`` at the PDE points (computed by PyTorch's
  vectorised sigmoid, which numba without Intel's SVML cannot match) and the stream rows of Z,
  the layer's output streams ``a1 grad_x z`` and ``R' = a1 R_z + 2 D a a1 |grad_x z|^2``;
* :func:`rows_backward`: ``dZ`` of all rows and ``dD`` from the incoming gradient G, with
  ``a1 = 1 - a^2`` and ``Q = |grad_x z|^2`` recomputed from a and Z instead of stored.

The formulas are those of :class:`~glymphmpi.pinn.network._FusedTanhLayer` (checked there against
autograd; here against the eager formulation in ``tests/test_pinn.py``). numba rather than
``torch.compile``: inductor needs a C++ compiler at run time and its CPU kernels computed wrong
gradients in a process that had imported PETSc/DOLFINx; numba ships its own LLVM. The kernels run
in numba's thread pool with as many threads as PyTorch uses (:func:`set_threads`); ``cache=True``
keeps the compiled code beside this file or in ``NUMBA_CACHE_DIR``.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

_JIT = dict(cache=True, nogil=True, boundscheck=False, parallel=True)


@numba.njit(**_JIT)
def pde_rows_forward(Z, out, n, m, D2):  # pragma: no cover - compiled
    """Write the stream rows ``out[m:]`` (4 n, W) from ``out[:n]`` (a at the PDE points) and
    ``Z[m:]`` (the stream rows of S W^T); ``D2`` = 2 D."""
    W = Z.shape[1]
    for j in prange(n):
        for c in range(W):
            a = out[j, c]
            a1 = 1.0 - a * a
            gx = Z[m + j, c]
            gy = Z[m + n + j, c]
            gz = Z[m + 2 * n + j, c]
            q = gx * gx + gy * gy + gz * gz
            out[m + j, c] = a1 * gx
            out[m + n + j, c] = a1 * gy
            out[m + 2 * n + j, c] = a1 * gz
            out[m + 3 * n + j, c] = a1 * Z[m + 3 * n + j, c] + D2 * a * a1 * q


@numba.njit(**_JIT)
def rows_backward(G, Z, out, dZ, n, m, D):  # pragma: no cover - compiled
    """dZ (m + 4 n, W) of the layer from the incoming gradient G; returns dD.

    PDE row j (a, a1 = 1 - a^2, Q = |grad_x z|^2, P = <G_gx, grad_x z> + G_R R_z):
    ``dz = a1 (G_a - 2 a P + 2 D (3 a1 - 2) Q G_R)``, ``d grad_x z = a1 (G_gx + 4 D a G_R grad_x z)``,
    ``d R_z = a1 G_R``; data rows: ``dz = a1 G_a``; ``dD = 2 sum G_R a a1 Q``."""
    W = Z.shape[1]
    gd = 0.0
    for j in prange(n):
        acc = 0.0
        for c in range(W):
            a = out[j, c]
            a1 = 1.0 - a * a
            gx = Z[m + j, c]
            gy = Z[m + n + j, c]
            gz = Z[m + 2 * n + j, c]
            zr = Z[m + 3 * n + j, c]
            Gx = G[m + j, c]
            Gy = G[m + n + j, c]
            Gz = G[m + 2 * n + j, c]
            GR = G[m + 3 * n + j, c]
            q = gx * gx + gy * gy + gz * gz
            p = Gx * gx + Gy * gy + Gz * gz + GR * zr
            mg = 4.0 * D * a * GR
            dZ[m + j, c] = a1 * (Gx + gx * mg)
            dZ[m + n + j, c] = a1 * (Gy + gy * mg)
            dZ[m + 2 * n + j, c] = a1 * (Gz + gz * mg)
            dZ[m + 3 * n + j, c] = a1 * GR
            u = GR * q
            dZ[j, c] = a1 * (G[j, c] - 2.0 * a * p + 2.0 * D * (3.0 * a1 - 2.0) * u)
            acc += u * a * a1
        gd += acc
    for i in prange(n, m):
        for c in range(W):
            a = out[i, c]
            dZ[i, c] = (1.0 - a * a) * G[i, c]
    return 2.0 * gd


_THREADS = [0]


def set_threads(k: int) -> None:
    """numba's thread count for these kernels (at most the pool's size, at least 1)."""
    k = max(1, min(int(k), numba.config.NUMBA_NUM_THREADS))
    if _THREADS[0] != k:
        numba.set_num_threads(k)
        _THREADS[0] = k


def warm_up() -> None:
    """Compile (or load from the cache) both kernels for float32 and float64."""
    for dt in (np.float32, np.float64):
        Z = np.zeros((5, 2), dt)
        out = np.zeros((5, 2), dt)
        pde_rows_forward(Z, out, 1, 1, dt(0.0))
        rows_backward(Z, Z, out, np.zeros_like(Z), 1, 1, dt(0.0))
