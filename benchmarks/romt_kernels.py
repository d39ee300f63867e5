"""rOMT kernels, before and after fusing: one transport step's operators on a real-sized grid.

Usage::

    .venv/bin/python benchmarks/romt_kernels.py [--shape 68 106 64] [--active 0.35] [--repeat 20]

Times (ms, median of ``--repeat``, one thread) every operator of a Gauss-Newton step on a
grid of the rat's cropped size (68 x 106 x 64, 35% of it active, particles moved by a smooth
random velocity of up to 2 voxels per step), in the numpy formulation that the solver used
until 2026-11-29 (per-axis factor arrays, an (8, Ml) weight array, ``np.bincount``, fancy
gathers, a DCT pair for the diffusion; reproduced here as the reference) and in the fused
numba kernels of :mod:`glymphmpi.romt.kernels` that replaced it, and checks that both give
the same numbers (max relative difference printed). A PCG iteration costs nt tangent steps and
nt adjoint steps (each: one push or gather plus one diffusion solve).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import scipy.fft  # noqa: E402

from glymphmpi.romt.grid import DiffusionSolver  # noqa: E402
from glymphmpi.romt.transport import Transport  # noqa: E402


def median_ms(f, repeat: int) -> float:
    f()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(ts))


def numpy_reference(sd, n):
    """The pre-numba operators (numpy), from the factors of a StepData."""
    idx, b, s = sd.factors()

    def weights(r):
        return ((b[0] * r)[:, None, None, :] * b[1][None, :, None, :] * b[2][None, None, :, :]).reshape(-1)

    def tangent_weights(r, q, x):
        bx = [s[d] * (q * x[d]) for d in range(3)]
        p01 = (b[0] * r + bx[0])[:, None, :] * b[1][None, :, :] + b[0][:, None, :] * bx[1][None, :, :]
        q01 = b[0][:, None, :] * b[1][None, :, :]
        w = p01[:, :, None, :] * b[2][None, None, :, :] + q01[:, :, None, :] * bx[2][None, None, :, :]
        return w.reshape(-1)

    def gather(mu, q):
        g = mu[idx].reshape(2, 2, 2, -1)
        gb = g[:, :, 0] * b[2][0] + g[:, :, 1] * b[2][1]
        gbb = gb[:, 0] * b[1][0] + gb[:, 1] * b[1][1]
        st = gbb[0] * b[0][0] + gbb[1] * b[0][1]
        gs = g[:, :, 0] * s[2][0] + g[:, :, 1] * s[2][1]
        gsb = gb[:, 0] * s[1][0] + gb[:, 1] * s[1][1]
        gbs = gs[:, 0] * b[1][0] + gs[:, 1] * b[1][1]
        dv = np.empty((3,) + st.shape)
        dv[0] = (gbb[0] * s[0][0] + gbb[1] * s[0][1]) * q
        dv[1] = (gsb[0] * b[0][0] + gsb[1] * b[0][1]) * q
        dv[2] = (gbs[0] * b[0][0] + gbs[1] * b[0][1]) * q
        return st, dv

    return {
        "push": lambda r: np.bincount(idx, weights=weights(r), minlength=n),
        "tangent": lambda r, q, x: np.bincount(idx, weights=tangent_weights(r, q, x), minlength=n),
        "gather": gather,
        "factors": lambda: sd.factors(),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[68, 106, 64])
    ap.add_argument("--active", type=float, default=0.35, help="fraction of the grid that moves")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--dt-sigma", type=float, default=0.4 * 0.002)
    a = ap.parse_args(argv)
    shape = tuple(a.shape)
    n = int(np.prod(shape))
    rng = np.random.default_rng(0)
    ii = np.indices(shape).astype(float)
    c = np.array(shape) / 2.0
    ell = ((ii - c[:, None, None, None]) ** 2 / (0.35 * np.array(shape)[:, None, None, None]) ** 2).sum(0)
    act = np.flatnonzero(ell.ravel() <= np.quantile(ell, a.active))
    tr = Transport(shape, act, dt=0.4, sigma=a.dt_sigma / 0.4, boundary="closed")
    v = np.stack([2.5 * np.sin(ii[d].ravel()[act] / 7.0 + d) for d in range(3)])  # <= 1 voxel per step
    sd = tr.linearize(v)
    rho = rng.random(n)
    mu = rng.random(n)
    r = rho[tr.local]
    q = 0.4 * r
    x = rng.standard_normal((3, act.size))
    ref = numpy_reference(sd, n)
    print(f"grid {shape} ({n} voxels), {act.size} particles ({act.size / n:.0%}), dt*sigma {a.dt_sigma:g}, "
          f"1 thread, median of {a.repeat}")
    rows = []

    def fused_push():
        out = np.zeros(n)
        return sd.push(r, out)

    def fused_tangent():
        out = np.zeros(n)
        return sd.push_tangent(r, q, x, out)

    rows.append(("push (scatter)", median_ms(lambda: ref["push"](r), a.repeat), median_ms(fused_push, a.repeat),
                 np.abs(ref["push"](r) - fused_push()).max() / np.abs(fused_push()).max()))
    rows.append(("tangent scatter", median_ms(lambda: ref["tangent"](r, q, x), a.repeat),
                 median_ms(fused_tangent, a.repeat),
                 np.abs(ref["tangent"](r, q, x) - fused_tangent()).max() / np.abs(fused_tangent()).max()))
    g_ref = ref["gather"](mu, q)
    g_new = sd.gather(mu, q)
    rows.append(("adjoint gather", median_ms(lambda: ref["gather"](mu, q), a.repeat),
                 median_ms(lambda: sd.gather(mu, q), a.repeat),
                 max(np.abs(g_ref[0] - g_new[0]).max() / np.abs(g_new[0]).max(),
                     np.abs(g_ref[1] - g_new[1]).max() / np.abs(g_new[1]).max())))
    rows.append(("linearize", median_ms(ref["factors"], a.repeat), median_ms(lambda: tr.linearize(v), a.repeat),
                 0.0))
    dct = DiffusionSolver(shape, a.dt_sigma, method="dct")
    ser = DiffusionSolver(shape, a.dt_sigma, method="auto")

    def dct_pair():
        cc = scipy.fft.dctn(rho.reshape(shape), type=2, norm="ortho")
        cc *= dct.inv_symbol
        return scipy.fft.idctn(cc, type=2, norm="ortho", overwrite_x=True)

    rows.append((f"diffusion ({ser.method}, K={ser.terms})", median_ms(dct_pair, a.repeat),
                 median_ms(lambda: ser.apply(rho), a.repeat),
                 np.abs(dct_pair().ravel() - ser.apply(rho)).max() / np.abs(rho).max()))
    print(f"{'operator':28s} {'numpy ms':>10s} {'fused ms':>10s} {'speed-up':>9s} {'max rel diff':>13s}")
    for name, t_old, t_new, diff in rows:
        print(f"{name:28s} {t_old:10.2f} {t_new:10.2f} {t_old / t_new:8.1f}x {diff:13.1e}")
    step_old = rows[1][1] + rows[2][1] + 2 * rows[4][1]
    step_new = rows[1][2] + rows[2][2] + 2 * rows[4][2]
    print(f"one tangent + one adjoint step (PCG's unit): numpy {step_old:.1f} ms, fused {step_new:.1f} ms "
          f"({step_old / step_new:.1f}x)")


if __name__ == "__main__":
    main()
