"""Fused CPU kernels (numba) for the elementwise work of the tanh layers of the PINN's one-pass
training step (:class:`glymphmpi.pinn.network._FusedTanhLayer`, and the first hidden layer's
:class:`~glymphmpi.pinn.network._FirstTanhLayer` by :func:`first_rows_forward` and
:func:`first_rows_backward`).

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
in numba's thread pool with as many threads as PyTorch uses, serially when that is one thread or the
rows are few (no idle pool threads spinning beside PyTorch's: with the parallel kernels on one thread
an epoch cost 45% more CPU time than wall time); ``cache=True``
keeps the compiled code beside this file or in ``NUMBA_CACHE_DIR``. Constants are made in the
arrays' dtype (``Z.dtype.type``): a float64 literal would promote every float32 operation to float64
(half the SIMD lanes; the backward kernel took 3.2 ms instead of 2.5 ms on 8,192 points x 64).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

if numba.config.THREADING_LAYER == "default":
    # numba's own thread pool, not its OpenMP layer: that one runs on the system's libgomp beside
    # PyTorch's bundled libgomp, and after one of its parallel regions PyTorch's own parallel
    # operations ran 1.7x slower (a 6 x 64 MLP's forward and double backward, 2 threads; measured
    # 0.38 -> 0.65 s, with the workqueue pool unchanged). An explicit NUMBA_THREADING_LAYER wins.
    numba.config.THREADING_LAYER = "workqueue"

_JIT = dict(cache=True, nogil=True, boundscheck=False)
# Each kernel has a parallel and a serial twin with the same loop: numba's on-disk cache does not key
# on ``parallel=``, so one Python function jitted both ways could load the other's code.
PARALLEL_MIN_ELEMENTS = 1 << 16
"""Below this many elements per stream (rows x width) the kernels run serially: a parallel launch
costs more than it saves on a minibatch of a few hundred points."""


@numba.njit(**_JIT)
def _forward_row(Z, out, n, m, j, one, d2):  # pragma: no cover - compiled
    for c in range(Z.shape[1]):
        a = out[j, c]
        a1 = one - a * a
        gx = Z[m + j, c]
        gy = Z[m + n + j, c]
        gz = Z[m + 2 * n + j, c]
        q = gx * gx + gy * gy + gz * gz
        out[m + j, c] = a1 * gx
        out[m + n + j, c] = a1 * gy
        out[m + 2 * n + j, c] = a1 * gz
        out[m + 3 * n + j, c] = a1 * Z[m + 3 * n + j, c] + d2 * a * a1 * q


@numba.njit(**_JIT)
def _backward_row(G, Z, out, dZ, n, m, j, one, two, d2, d4):  # pragma: no cover - compiled
    acc = Z.dtype.type(0.0)
    for c in range(Z.shape[1]):
        a = out[j, c]
        a1 = one - a * a
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
        mg = d4 * a * GR
        dZ[m + j, c] = a1 * (Gx + gx * mg)
        dZ[m + n + j, c] = a1 * (Gy + gy * mg)
        dZ[m + 2 * n + j, c] = a1 * (Gz + gz * mg)
        dZ[m + 3 * n + j, c] = a1 * GR
        u = GR * q
        dZ[j, c] = a1 * (G[j, c] - two * a * p + d2 * (two * a1 + a1 - two) * u)
        acc += u * a * a1
    return acc


@numba.njit(**_JIT)
def _data_row_backward(G, out, dZ, i, one):  # pragma: no cover - compiled
    for c in range(G.shape[1]):
        a = out[i, c]
        dZ[i, c] = (one - a * a) * G[i, c]


@numba.njit(parallel=True, **_JIT)
def _forward_parallel(Z, out, n, m, D2):  # pragma: no cover - compiled
    one, d2 = Z.dtype.type(1.0), Z.dtype.type(D2)
    for j in prange(n):
        _forward_row(Z, out, n, m, j, one, d2)


@numba.njit(**_JIT)
def _forward_serial(Z, out, n, m, D2):  # pragma: no cover - compiled
    one, d2 = Z.dtype.type(1.0), Z.dtype.type(D2)
    for j in range(n):
        _forward_row(Z, out, n, m, j, one, d2)


@numba.njit(**_JIT)
def _constants(Z, D):  # pragma: no cover - compiled
    """(1, 2, 2 D, 4 D) in Z's dtype."""
    one = Z.dtype.type(1.0)
    two = one + one
    d2 = Z.dtype.type(D) * two
    return one, two, d2, d2 * two


@numba.njit(parallel=True, **_JIT)
def _backward_parallel(G, Z, out, dZ, n, m, D):  # pragma: no cover - compiled
    one, two, d2, d4 = _constants(Z, D)
    gd = 0.0
    for j in prange(n):
        gd += _backward_row(G, Z, out, dZ, n, m, j, one, two, d2, d4)
    for i in prange(n, m):
        _data_row_backward(G, out, dZ, i, one)
    return 2.0 * gd


@numba.njit(**_JIT)
def _backward_serial(G, Z, out, dZ, n, m, D):  # pragma: no cover - compiled
    one, two, d2, d4 = _constants(Z, D)
    gd = 0.0
    for j in range(n):
        gd += _backward_row(G, Z, out, dZ, n, m, j, one, two, d2, d4)
    for i in range(n, m):
        _data_row_backward(G, out, dZ, i, one)
    return 2.0 * gd


@numba.njit(**_JIT)
def _first_forward_row(out, w0T, q, n, m, j, one, d2):  # pragma: no cover - compiled
    for c in range(out.shape[1]):
        a = out[j, c]
        a1 = one - a * a
        out[m + j, c] = a1 * w0T[0, c]
        out[m + n + j, c] = a1 * w0T[1, c]
        out[m + 2 * n + j, c] = a1 * w0T[2, c]
        out[m + 3 * n + j, c] = a1 * w0T[3, c] + d2 * a * a1 * q[c]


@numba.njit(**_JIT)
def _first_backward_row(G, out, dz, w0T, q, n, m, j, acc, one, two, d2):  # pragma: no cover - compiled
    for c in range(out.shape[1]):
        a = out[j, c]
        a1 = one - a * a
        Gx = G[m + j, c]
        Gy = G[m + n + j, c]
        Gz = G[m + 2 * n + j, c]
        GR = G[m + 3 * n + j, c]
        p = Gx * w0T[0, c] + Gy * w0T[1, c] + Gz * w0T[2, c] + GR * w0T[3, c]
        u = GR * q[c]
        dz[j, c] = a1 * (G[j, c] - two * a * p + d2 * (two * a1 + a1 - two) * u)
        acc[0, c] += Gx * a1
        acc[1, c] += Gy * a1
        acc[2, c] += Gz * a1
        acc[3, c] += GR * a1
        acc[4, c] += GR * a * a1


@numba.njit(parallel=True, **_JIT)
def _first_forward_parallel(out, w0T, q, n, m, D2):  # pragma: no cover - compiled
    one, d2 = out.dtype.type(1.0), out.dtype.type(D2)
    for j in prange(n):
        _first_forward_row(out, w0T, q, n, m, j, one, d2)


@numba.njit(**_JIT)
def _first_forward_serial(out, w0T, q, n, m, D2):  # pragma: no cover - compiled
    one, d2 = out.dtype.type(1.0), out.dtype.type(D2)
    for j in range(n):
        _first_forward_row(out, w0T, q, n, m, j, one, d2)


@numba.njit(parallel=True, **_JIT)
def _first_backward_parallel(G, out, dz, w0T, q, n, m, D, blocks):  # pragma: no cover - compiled
    one, two, d2, _ = _constants(out, D)
    part = np.zeros((blocks, 5, out.shape[1]))  # column sums in float64
    for b in prange(blocks):
        for j in range(b * n // blocks, (b + 1) * n // blocks):
            _first_backward_row(G, out, dz, w0T, q, n, m, j, part[b], one, two, d2)
    for i in prange(n, m):
        _data_row_backward(G, out, dz, i, one)
    return part.sum(axis=0)


@numba.njit(**_JIT)
def _first_backward_serial(G, out, dz, w0T, q, n, m, D):  # pragma: no cover - compiled
    one, two, d2, _ = _constants(out, D)
    acc = np.zeros((5, out.shape[1]))  # column sums in float64
    for j in range(n):
        _first_backward_row(G, out, dz, w0T, q, n, m, j, acc, one, two, d2)
    for i in range(n, m):
        _data_row_backward(G, out, dz, i, one)
    return acc


def first_rows_forward(out: np.ndarray, w0T: np.ndarray, q: np.ndarray, n: int, m: int, D2: float,
                       threads: int) -> None:
    """The first hidden layer's stream rows ``out[m:]`` from ``out[:n]`` (a at the PDE points):
    ``a1 w0_j`` (j = x, y, z) and ``a1 w0_t + D2 a a1 q``; w0T (4, W) = (W diag(s))^T, q (W,) =
    sum_j w0_j^2, ``D2`` = 2 D."""
    if _parallel(n, out.shape[1], threads):
        _first_forward_parallel(out, w0T, q, n, m, D2)
    else:
        _first_forward_serial(out, w0T, q, n, m, D2)


def first_rows_backward(G: np.ndarray, out: np.ndarray, dz: np.ndarray, w0T: np.ndarray, q: np.ndarray,
                        n: int, m: int, D: float, threads: int) -> np.ndarray:
    """dz (m, W) of the first hidden layer from the incoming gradient G (m + 4 n, W), and the column
    sums (5, W), float64: ``sum_rows G_k a1`` (k = x, y, z, R) and ``sum_rows G_R a a1`` over the PDE rows.

    PDE row j: ``dz = a1 (G_a - 2 a P + 2 D (3 a1 - 2) q G_R)``, P = sum_k G_k w0_k; data rows
    ``dz = a1 G_a``."""
    if _parallel(n, out.shape[1], threads):
        return _first_backward_parallel(G, out, dz, w0T, q, n, m, D, 4 * _THREADS[0])
    return _first_backward_serial(G, out, dz, w0T, q, n, m, D)


def _parallel(rows: int, width: int, threads: int) -> bool:
    if threads <= 1 or rows * width < PARALLEL_MIN_ELEMENTS:
        return False
    k = min(int(threads), numba.config.NUMBA_NUM_THREADS)
    if _THREADS[0] != k:
        numba.set_num_threads(k)
        _THREADS[0] = k
    return True


_THREADS = [0]


def pde_rows_forward(Z: np.ndarray, out: np.ndarray, n: int, m: int, D2: float, threads: int) -> None:
    """Write the stream rows ``out[m:]`` (4 n, W) from ``out[:n]`` (a = tanh z at the PDE points) and
    ``Z[m:]`` (the stream rows of S W^T): ``a1 grad_x z`` and ``a1 R_z + D2 a a1 |grad_x z|^2``,
    a1 = 1 - a^2, ``D2`` = 2 D; on up to ``threads`` threads."""
    if _parallel(n, Z.shape[1], threads):
        _forward_parallel(Z, out, n, m, D2)
    else:
        _forward_serial(Z, out, n, m, D2)


def rows_backward(G: np.ndarray, Z: np.ndarray, out: np.ndarray, dZ: np.ndarray, n: int, m: int, D: float,
                  threads: int) -> float:
    """dZ (m + 4 n, W) of the layer from the incoming gradient G; returns dD.

    PDE row j (a, a1 = 1 - a^2, Q = |grad_x z|^2, P = <G_gx, grad_x z> + G_R R_z):
    ``dz = a1 (G_a - 2 a P + 2 D (3 a1 - 2) Q G_R)``, ``d grad_x z = a1 (G_gx + 4 D a G_R grad_x z)``,
    ``d R_z = a1 G_R``; data rows: ``dz = a1 G_a``; ``dD = 2 sum G_R a a1 Q``."""
    if _parallel(n, Z.shape[1], threads):
        return float(_backward_parallel(G, Z, out, dZ, n, m, D))
    return float(_backward_serial(G, Z, out, dZ, n, m, D))


