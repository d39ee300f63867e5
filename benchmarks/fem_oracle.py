"""How much of the FEM's error on the brain phantoms is discretisation, not regularisation.

Usage::

    python benchmarks/fem_oracle.py [--block 20] [--D 0.72] [--fem-dt 1.0] [--refine 1] [--centre-mm X Y Z]

The phantom (``glymphmpi.synth.brain_diffusion``: 7-point finite differences,
Crank-Nicolson) is solved, optionally on a grid ``--refine`` times finer
(odd, so that the voxel centres are sub-voxel centres; the Dirichlet layer is
then the fine grid's outer layer), and sampled at the voxel centres. Then the
FEM's discretisation (Q1 on the voxel-centre hexahedra, lumped mass, theta =
0.5, built here with SciPy to stay independent of DOLFINx) is given the
phantom's EXACT values on its boundary nodes at every time step (the "oracle"
g: no regularisation, no unknown control) and D is fitted to the interior
nodes at the scans (7, 24, 46 h) by a 1D minimisation. Its error is the
model mismatch alone (stencil, boundary placement, time step).

Measured (2026-11-29, load 8 on 2 cores): 20^3 block, D 0.72: +1.79% (dt 1 h),
+1.39% (dt 0.25 h); with the phantom on a 3x finer grid: +0.74% (phantom
233 s instead of 5 s). 26^3 block at the default (densest) centre, D 0.579:
+1.52%. So about 1% of the FEM-vs-phantom mismatch is the phantom's own
discretisation error at 1 mm.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from scipy.optimize import minimize_scalar


def q1_lumped(mask: np.ndarray, h: float = 1.0):
    """(stiffness, lumped mass per node, interior nodes, boundary nodes) of Q1 on the voxel-centre hexahedra."""
    sh = mask.shape
    m = mask
    cm = (m[:-1, :-1, :-1] & m[1:, :-1, :-1] & m[:-1, 1:, :-1] & m[:-1, :-1, 1:] & m[1:, 1:, :-1]
          & m[1:, :-1, 1:] & m[:-1, 1:, 1:] & m[1:, 1:, 1:])
    cells = np.argwhere(cm)
    corners = np.array(list(itertools.product([0, 1], [0, 1], [0, 1])))
    gp = (np.array([-1.0, 1.0]) / math.sqrt(3.0) + 1.0) / 2.0
    K = np.zeros((8, 8))
    for q in itertools.product(gp, gp, gp):
        q = np.array(q)
        grads = np.zeros((8, 3))
        for a, c in enumerate(corners):
            f = np.where(c == 1, q, 1 - q)
            df = np.where(c == 1, 1.0, -1.0)
            for d in range(3):
                grads[a, d] = df[d] * np.prod([f[e] for e in range(3) if e != d])
        K += grads @ grads.T / 8.0
    K *= h
    flat = np.ravel_multi_index((cells[:, None, :] + corners[None, :, :]).reshape(-1, 3).T, sh).reshape(-1, 8)
    n = mask.size
    A = sp.csr_matrix((np.tile(K.ravel(), len(cells)),
                       (np.repeat(flat, 8, axis=1).ravel(), np.tile(flat, (1, 8)).ravel())), shape=(n, n))
    cnt = np.bincount(flat.ravel(), minlength=n)
    return A, cnt / 8.0 * h ** 3, np.flatnonzero(cnt == 8), np.flatnonzero((cnt > 0) & (cnt < 8))


def theta_solve(A_ii, A_ib, M_i, D, gseq, tgrid, out_idx, theta=0.5):
    u = np.zeros(A_ii.shape[0])
    outs, cache = [], {}
    Mi = sp.diags(M_i)
    for k in range(1, len(tgrid)):
        tau = tgrid[k] - tgrid[k - 1]
        key = round(tau, 10)
        if key not in cache:
            cache[key] = (spla.factorized((Mi + theta * tau * D * A_ii).tocsc()),
                          (Mi - (1 - theta) * tau * D * A_ii).tocsr())
        f, R = cache[key]
        u = f(R @ u - tau * D * (A_ib @ (theta * gseq[k] + (1 - theta) * gseq[k - 1])))
        if k in out_idx:
            outs.append(u.copy())
    return outs


def run(block: int, D: float, fem_dt: float = 1.0, refine: int = 1, ph_dt: float = 0.1, centre=None) -> dict:
    from glymphmpi.synth import brain_diffusion as bd

    if refine < 1 or refine % 2 == 0:
        raise SystemExit("--refine must be odd (1, 3, 5)")
    spec = bd.PhantomSpec(block=(block,) * 3, D_mm2_per_h=D, centre_mm=centre)
    prob, aff = bd.load_wm_template(1)
    sl = bd.choose_block(prob, aff, spec)
    mask = bd.largest_component(prob[sl] > spec.threshold)
    a2 = aff.copy()
    a2[:3, 3] = aff[:3, 3] + aff[:3, :3] @ np.array([s.start for s in sl], float)
    r = refine
    fm = np.kron(mask, np.ones((r, r, r), bool))
    af = a2.copy()
    af[:3, :3] = a2[:3, :3] / r
    af[:3, 3] = a2[:3, 3] - a2[:3, :3] @ np.ones(3) * (r // 2) / r
    _, bnd = bd.boundary_interior(fm, "face")
    g = bd.boundary_function(fm, af, np.flatnonzero(bnd))
    tgrid = np.unique(np.concatenate([np.arange(0, 46 + 1e-9, fem_dt), [0, 7, 24, 46]]))
    t0 = time.time()
    ph = bd.solve_diffusion(fm, np.ones(3) / r, D, g, tgrid, ph_dt)[:, r // 2::r, r // 2::r, r // 2::r]
    t_ph = time.time() - t0
    A, M, interior, bndn = q1_lumped(mask)
    A_ii, A_ib = A[interior][:, interior], A[interior][:, bndn]
    flat = ph.reshape(len(tgrid), -1)
    out_idx = [int(np.argmin(abs(tgrid - t))) for t in (7, 24, 46)]
    data = [flat[k, interior] for k in out_idx]
    Mi = M[interior]

    def misfit(Dt):
        return sum(float(np.sum(Mi * (a - b) ** 2))
                   for a, b in zip(theta_solve(A_ii, A_ib, Mi, Dt, flat[:, bndn], tgrid, out_idx), data))

    res = minimize_scalar(misfit, bracket=(0.6 * D, D, 1.3 * D), tol=1e-5)
    return {"block": block, "refine": r, "fem_dt": fem_dt, "D": D, "D_oracle_fit": float(res.x),
            "error": float(res.x / D - 1), "phantom_s": t_ph, "total_s": time.time() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--block", type=int, default=20)
    ap.add_argument("--D", type=float, default=0.72)
    ap.add_argument("--fem-dt", type=float, default=1.0)
    ap.add_argument("--refine", type=int, default=1)
    ap.add_argument("--centre-mm", type=float, nargs=3)
    a = ap.parse_args()
    print(json.dumps(run(a.block, a.D, a.fem_dt, a.refine, centre=a.centre_mm)))


if __name__ == "__main__":
    main()
