"""Fused rOMT kernels (numba): the particle push, its tangent and adjoint, and the diffusion series.

Each kernel makes one pass over memory where the numpy formulation made many (per-axis
factor arrays, an (8, Ml) weight array, ``np.bincount``, fancy-index gathers, a DCT pair):
the trilinear factors of a particle are recomputed from its position ``y = x + dt v``
(three numbers) instead of being stored and re-read (20 numbers per particle).

Conventions (:mod:`glymphmpi.romt.transport`): cell-centred index space; particle i at
``y_i`` has, per axis d, the floor ``f_d`` and fraction ``w_d``; its corner on side
``o_d`` in {0, 1} has the factor ``b = 1 - w_d`` (o = 0) or ``w_d`` (o = 1), times 0 when
that corner lies outside the box (``open`` boundary); the derivative of the factor with
respect to ``w_d`` is ``-1`` or ``+1`` (0 outside). ``closed``: a particle with any
coordinate outside ``[0, n_d - 1]`` has all its factors and derivatives 0 (it leaves the
box with its mass). A corner's weight is the product of its three factors; the flat index
of a zero-weight corner is clipped into the box (its value is never used).

numba rather than numpy or torch: the operations are gathers and scatters with a few
flops each, memory-bound, and only a compiled loop fuses them (3.5-3.8x faster than the
numpy formulation per operator and 3.7x per tangent-plus-adjoint step on the rat's
68 x 106 x 64 crop, benchmarks/romt_kernels.py; one 50^3 spheres loop 7.95 s, was about
20 s). Kernels are serial
(one rank per core; ``cache=True`` stores the compiled code beside this file or in
``NUMBA_CACHE_DIR``).
"""

from __future__ import annotations

import math

import numba
import numpy as np

_JIT = dict(cache=True, nogil=True, boundscheck=False)


@numba.njit(**_JIT)
def _axis(yd, nd, stride):
    """(i0, i1, b0, b1, s0, s1) of one particle coordinate on one axis."""
    f = math.floor(yd)
    w = yd - f
    c0 = int(f)
    c1 = c0 + 1
    v0 = 1.0 if (c0 >= 0 and c0 < nd) else 0.0
    v1 = 1.0 if (c1 >= 0 and c1 < nd) else 0.0
    i0 = min(max(c0, 0), nd - 1) * stride
    i1 = min(max(c1, 0), nd - 1) * stride
    return i0, i1, (1.0 - w) * v0, w * v1, -v0, v1


@numba.njit(**_JIT)
def _inside(y, i, n0, n1, n2):
    return (y[0, i] >= 0.0 and y[0, i] <= n0 - 1 and y[1, i] >= 0.0 and y[1, i] <= n1 - 1
            and y[2, i] >= 0.0 and y[2, i] <= n2 - 1)


@numba.njit(**_JIT)
def push(y, n0, n1, n2, closed, r, out):
    """``out[corner] += W_o(y_i) r_i`` for every particle (out (N,) accumulated in place)."""
    s0, s1 = n1 * n2, n2
    for i in range(y.shape[1]):
        if closed and not _inside(y, i, n0, n1, n2):
            continue
        a0, a1, p0, p1, _, _ = _axis(y[0, i], n0, s0)
        c0, c1, q0, q1, _, _ = _axis(y[1, i], n1, s1)
        e0, e1, t0, t1, _, _ = _axis(y[2, i], n2, 1)
        ri = r[i]
        for oa in range(2):
            ia = a0 if oa == 0 else a1
            wa = (p0 if oa == 0 else p1) * ri
            for ob in range(2):
                ib = ia + (c0 if ob == 0 else c1)
                wb = wa * (q0 if ob == 0 else q1)
                out[ib + e0] += wb * t0
                out[ib + e1] += wb * t1


@numba.njit(**_JIT)
def tangent(y, n0, n1, n2, closed, r, q, x, out):
    """``out[corner] += W_o r_i + q_i sum_d x_{d,i} dW_o/dw_d`` (the push of the perturbation r
    plus the derivative of the push of the density along the velocity perturbation x,
    q = dt rho at the particles)."""
    s0, s1 = n1 * n2, n2
    for i in range(y.shape[1]):
        if closed and not _inside(y, i, n0, n1, n2):
            continue
        a0, a1, p0, p1, u0, u1 = _axis(y[0, i], n0, s0)
        c0, c1, q0, q1, v0, v1 = _axis(y[1, i], n1, s1)
        e0, e1, t0, t1, z0, z1 = _axis(y[2, i], n2, 1)
        ri = r[i]
        qx0 = q[i] * x[0, i]
        qx1 = q[i] * x[1, i]
        qx2 = q[i] * x[2, i]
        for oa in range(2):
            ia = a0 if oa == 0 else a1
            pa = p0 if oa == 0 else p1
            ua = u0 if oa == 0 else u1
            for ob in range(2):
                ib = ia + (c0 if ob == 0 else c1)
                qb = q0 if ob == 0 else q1
                vb = v0 if ob == 0 else v1
                for oc in range(2):
                    tc = t0 if oc == 0 else t1
                    zc = z0 if oc == 0 else z1
                    w = pa * qb * tc * ri + qx0 * ua * qb * tc + qx1 * pa * vb * tc + qx2 * pa * qb * zc
                    out[ib + (e0 if oc == 0 else e1)] += w


@numba.njit(**_JIT)
def gather(y, n0, n1, n2, closed, mu, q, st, dv, want_dv):
    """Adjoint of the push: ``st_i = sum_o W_o mu[c_o]`` and, when want_dv,
    ``dv[d, i] = q_i sum_o dW_o/dw_d mu[c_o]``."""
    s0, s1 = n1 * n2, n2
    for i in range(y.shape[1]):
        if closed and not _inside(y, i, n0, n1, n2):
            st[i] = 0.0
            if want_dv:
                dv[0, i] = 0.0
                dv[1, i] = 0.0
                dv[2, i] = 0.0
            continue
        a0, a1, p0, p1, u0, u1 = _axis(y[0, i], n0, s0)
        c0, c1, q0, q1, v0, v1 = _axis(y[1, i], n1, s1)
        e0, e1, t0, t1, z0, z1 = _axis(y[2, i], n2, 1)
        acc = 0.0
        d0 = 0.0
        d1 = 0.0
        d2 = 0.0
        for oa in range(2):
            ia = a0 if oa == 0 else a1
            pa = p0 if oa == 0 else p1
            ua = u0 if oa == 0 else u1
            for ob in range(2):
                ib = ia + (c0 if ob == 0 else c1)
                qb = q0 if ob == 0 else q1
                vb = v0 if ob == 0 else v1
                m0 = mu[ib + e0]
                m1 = mu[ib + e1]
                mt = m0 * t0 + m1 * t1  # sum over the third axis with its factors
                acc += pa * qb * mt
                if want_dv:
                    d0 += ua * qb * mt
                    d1 += pa * vb * mt
                    d2 += pa * qb * (m0 * z0 + m1 * z1)
        st[i] = acc
        if want_dv:
            dv[0, i] = d0 * q[i]
            dv[1, i] = d1 * q[i]
            dv[2, i] = d2 * q[i]


@numba.njit(**_JIT)
def factor_squares(y, n0, n1, n2, closed, out):
    """``out[d, i] = sum_o b_{d,o}^2`` (the preconditioner's per-axis sums)."""
    for i in range(y.shape[1]):
        if closed and not _inside(y, i, n0, n1, n2):
            out[0, i] = 0.0
            out[1, i] = 0.0
            out[2, i] = 0.0
            continue
        _, _, p0, p1, _, _ = _axis(y[0, i], n0, 1)
        _, _, q0, q1, _, _ = _axis(y[1, i], n1, 1)
        _, _, t0, t1, _, _ = _axis(y[2, i], n2, 1)
        out[0, i] = p0 * p0 + p1 * p1
        out[1, i] = q0 * q0 + q1 * q1
        out[2, i] = t0 * t0 + t1 * t1


@numba.njit(**_JIT)
def _lap_axpy(x, yin, a, yout):
    """``yout = x + a Lap_N(yin)`` (7-point Laplacian, zero-flux: a missing neighbour is the
    cell itself, so it adds nothing); the last axis runs branch-free (vectorised)."""
    n0, n1, n2 = x.shape
    for i in range(n0):
        im = i - 1 if i > 0 else i
        ip = i + 1 if i < n0 - 1 else i
        for j in range(n1):
            jm = j - 1 if j > 0 else j
            jp = j + 1 if j < n1 - 1 else j
            c = yin[i, j]
            s = yin[im, j]
            t = yin[ip, j]
            u = yin[i, jm]
            w = yin[i, jp]
            xo = x[i, j]
            o = yout[i, j]
            if n2 == 1:
                o[0] = xo[0] + a * (s[0] + t[0] + u[0] + w[0] - 4.0 * c[0])
                continue
            o[0] = xo[0] + a * (s[0] + t[0] + u[0] + w[0] + c[1] - 5.0 * c[0])
            for k in range(1, n2 - 1):
                o[k] = xo[k] + a * (s[k] + t[k] + u[k] + w[k] + c[k - 1] + c[k + 1] - 6.0 * c[k])
            e = n2 - 1
            o[e] = xo[e] + a * (s[e] + t[e] + u[e] + w[e] + c[e - 1] - 5.0 * c[e])


@numba.njit(**_JIT)
def neumann_series(x, a, terms, out, work):
    """``out = sum_{k=0}^{terms} (a Lap_N)^k x`` by Horner (``terms`` stencil passes); x, out,
    work (n0, n1, n2), out and work distinct from x. Returns out."""
    if terms == 0:
        out[:] = x
        return out
    # ping-pong so that the last pass writes into out
    src = x
    for t in range(terms):
        dst = out if (terms - 1 - t) % 2 == 0 else work
        _lap_axpy(x, src, a, dst)
        src = dst
    return out


@numba.njit(**_JIT)
def graph_laplacian_rows(full, lo, nb, deg, out):
    """``out[c, i] = deg[i] full[c, lo + i] - sum_{j in nb[i], j >= 0} full[c, j]``: rows lo..lo+Ml
    of the active-set graph Laplacian G^T G for every component c (full (R, M), nb (Ml, 6)
    neighbour positions or -1, deg (Ml,), out (R, Ml))."""
    for c in range(full.shape[0]):
        f = full[c]
        o = out[c]
        for i in range(nb.shape[0]):
            acc = deg[i] * f[lo + i]
            for e in range(6):
                j = nb[i, e]
                if j >= 0:
                    acc -= f[j]
            o[i] = acc


@numba.njit(**_JIT)
def hess_combine(out, x, rho, loc, lap, s, c, g):
    """``out[d, i] = s out[d, i] + c rho[loc[i]] x[d, i] + g lap[d, i]`` in place, one pass: the
    Gauss-Newton Hessian product of one time step from its data part ``out`` (J^T J x), the kinetic
    term (c = 2 dt, rho the step's density on the grid, loc the particles' voxels) and the smoothness
    term (lap = G^T G x, g = gamma dt); s = 2 beta. out, x, lap (ncomp, Ml)."""
    for d in range(out.shape[0]):
        for i in range(out.shape[1]):
            out[d, i] = s * out[d, i] + c * rho[loc[i]] * x[d, i] + g * lap[d, i]


@numba.njit(**_JIT)
def cg_step(s, r, p, hp, a):
    """PCG's update in one pass over flat arrays: ``s += a p``, ``r -= a hp``; returns r.r (local)."""
    rr = 0.0
    for i in range(s.size):
        s[i] += a * p[i]
        ri = r[i] - a * hp[i]
        r[i] = ri
        rr += ri * ri
    return rr


@numba.njit(**_JIT)
def cg_precondition(r, m, z):
    """``z = r / m`` in one pass; returns r.z (local)."""
    rz = 0.0
    for i in range(r.size):
        zi = r[i] / m[i]
        z[i] = zi
        rz += r[i] * zi
    return rz


@numba.njit(**_JIT)
def cg_direction(p, z, beta):
    """``p = z + beta p`` in place."""
    for i in range(p.size):
        p[i] = z[i] + beta * p[i]


@numba.njit(**_JIT)
def dot(a, b):
    """Local a.b of two flat arrays."""
    acc = 0.0
    for i in range(a.size):
        acc += a[i] * b[i]
    return acc


def series_terms(dt_sigma: float, tol: float = 1e-12, max_terms: int = 16) -> int:
    """Terms K of the Neumann series of ``(I - a Lap_N)^{-1}`` whose truncation is below
    ``tol`` in the 2-norm (relative): ``(12 a)^(K+1) / (1 - 12 a) <= tol`` (the 7-point
    Neumann Laplacian's spectrum lies in [-12, 0]); -1 when more than ``max_terms`` would be
    needed (then the DCT is cheaper)."""
    r = 12.0 * float(dt_sigma)
    if r == 0.0:
        return 0
    if r >= 1.0:
        return -1
    for k in range(max_terms + 1):
        if r ** (k + 1) / (1.0 - r) <= tol:
            return k
    return -1


def warm_up() -> None:
    """Compile (or load from the cache) every kernel on a tiny problem."""
    y = np.array([[0.5], [0.25], [1.75]])
    r = np.ones(1)
    out = np.zeros(27)
    for closed in (False, True):
        push(y, 3, 3, 3, closed, r, out)
        tangent(y, 3, 3, 3, closed, r, r, y, out)
        gather(y, 3, 3, 3, closed, out, r, np.zeros(1), np.zeros((3, 1)), True)
        factor_squares(y, 3, 3, 3, closed, np.zeros((3, 1)))
    graph_laplacian_rows(np.ones((1, 2)), 0, np.array([[1, -1, -1, -1, -1, -1]]), np.ones(1), np.empty((1, 1)))
    hess_combine(np.ones((3, 1)), np.ones((3, 1)), np.ones(2), np.zeros(1, dtype=np.int64), np.ones((3, 1)),
                 1.0, 1.0, 1.0)
    v = np.ones(4)
    cg_step(v.copy(), v.copy(), v, v, 0.5)
    cg_precondition(v, v, v.copy())
    cg_direction(v.copy(), v, 0.5)
    dot(v, v)
    x = np.ones((3, 3, 3))
    neumann_series(x, 0.01, 2, np.empty_like(x), np.empty_like(x))
