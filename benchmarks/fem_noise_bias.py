# ruff: noqa: E501, E702
"""Why D falls with the regularisation scale: profile D(s) and a one-step noise-corrected D on a brain phantom.

Usage (niced, 1 thread; ~1-2 CPU minutes per scale on a 14 mm block)::

    python benchmarks/fem_noise_bias.py --block 14 --noise 0.05 --scales 0.1 0.01
    python benchmarks/fem_noise_bias.py --block 14 --noise 0 --K 1 --scales 0.1

Prints per scale: the profile estimate D (variable projection), the curvature j'' of the reduced
functional, the probes' sigma^2 T' (slope of the expected noise part, see
glymphmpi.fem.projection.noise_gradient) and the one-step corrected D = D(delta + sigma^2 T' / j'').
The numbers in glymphmpi/fem/README.md ("Why D falls with the scale s") come from this script.
Phantoms are cached as .npz under /tmp/hfem.
"""
import argparse
import dataclasses
import json
import math
import os
import time

import numpy as np
from mpi4py import MPI

from glymphmpi.fem import auto as A
from glymphmpi.fem.config import FemConfig
from glymphmpi.fem.forward import DiffusionModel, TimeGrid
from glymphmpi.fem.mesh import build_mesh
from glymphmpi.fem.problem import ControlProblem
from glymphmpi.fem.projection import ReducedFunctional, run_projection
from glymphmpi.fem.transfer import sample
from glymphmpi.synth import brain_diffusion as bd

ap = argparse.ArgumentParser()
ap.add_argument("--block", type=int, default=14)
ap.add_argument("--D", type=float, default=0.72)
ap.add_argument("--noise", type=float, default=0.05)
ap.add_argument("--seed", type=int, default=1)
ap.add_argument("--centre", type=float, nargs=3, default=None)
ap.add_argument("--scales", type=float, nargs="*", default=[0.1, 0.01])
ap.add_argument("--dt", type=float, default=7/3)
ap.add_argument("--K", type=int, default=3)
ap.add_argument("--inner_rtol", type=float, default=1e-4)
ap.add_argument("--d_rtol", type=float, default=1e-3)
ap.add_argument("--variant", default="none")
ap.add_argument("--gen-dt", type=float, default=0.1, help="the phantom generator's time step (fem_auto.py: 0.05)")
ap.add_argument("--times", default=None, help="scan times (h), comma-separated (default: the phantom's)")
ap.add_argument("--solve", type=int, default=0, help="secant steps on j'(delta) - sigma^2 T'(delta) = 0 after the one-step")
a = ap.parse_args()
times = tuple(float(t) for t in a.times.split(",")) if a.times else bd.DEFAULT_TIMES_H
spec = bd.PhantomSpec(block=(a.block,) * 3, centre_mm=tuple(a.centre) if a.centre else None, D_mm2_per_h=a.D,
                      noise=a.noise, seed=a.seed, dt_h=a.gen_dt, times_h=times)
t0 = time.process_time()
os.makedirs("/tmp/hfem", exist_ok=True)
key = f"/tmp/hfem/ph_{a.block}_{a.D}_{a.noise}_{a.seed}_{a.centre}_{times}_{a.gen_dt}.npz"
if os.path.exists(key):
    z = np.load(key); scans, clean, mask, affine = z["scans"], z["clean"], z["mask"], z["affine"]
else:
    scans, clean, mask, affine, truth = bd.make_phantom(spec)
    np.savez(key, scans=scans, clean=clean, mask=mask, affine=affine)
if a.variant != "noclip":
    scans = np.maximum(scans, 0.0)
comm = MPI.COMM_SELF
vm = build_mesh(mask, affine, comm)
grid = TimeGrid.build(spec.times_h, a.dt)
scale = A.data_scale(scans, mask)
sigma, rule = A.noise_level(spec.times_h, scans, mask, None, scale)
model = DiffusionModel(vm, grid, 0.5, True, "x_", {"ksp_type": "cg", "pc_type": "jacobi", "ksp_rtol": 1e-9, "ksp_atol": 1e-14, "ksp_max_it": 1000})
data = sample(scans, vm.owned_voxel) / scale
print(f"nodes {vm.n_owned} bnd {model.nb_local} steps {grid.n_steps} sigma {sigma:.4g} (true {a.noise*clean.max()/scale:.4g}) setup {time.process_time()-t0:.1f}s", flush=True)
base = FemConfig(dt_h=a.dt, optimizer="projection", inner_rtol=a.inner_rtol, d_rtol=a.d_rtol, inner_max_iterations=3000)
problem = ControlProblem(model, data, base)
x = problem.initial()
rng = np.random.default_rng(7)
Z = [rng.standard_normal(data.shape) for _ in range(a.K)]

def noise_grad(cfg, delta):
    out = []
    for z in Z:
        pz = ControlProblem(model, z, cfg)
        if problem.g_extra is not None:
            pz.set_g_extra(problem.g_extra * problem.J_scale / pz.J_scale)
        xz = pz.initial()
        xz.array[pz.nd:] = 0.0
        rf = ReducedFunctional(pz, cfg, xz)
        f, dphi = rf(delta)
        out.append(dphi * pz.J_scale)
        rf.close(); xz.destroy()
    return np.array(out)

for s in a.scales:
    cfg = dataclasses.replace(base, alpha=base.alpha * s, beta=base.beta * s, gamma=base.gamma * s)
    problem.set_weights(cfg, x)
    t1 = time.process_time()
    out = run_projection(problem, cfg, x)
    delta, _ = problem.split(x)
    D = problem.D_of(delta)[0]
    tp = time.process_time() - t1
    h = 0.02
    rf = ReducedFunctional(problem, cfg, x)
    _, pp = rf(delta + h); _, pm = rf(delta - h); _, p0 = rf(delta)
    rf.close()
    jpp = (pp - pm) / (2 * h) * problem.J_scale
    t2 = time.process_time()
    ng = noise_grad(cfg, delta) * sigma ** 2
    phi_c = p0 * problem.J_scale - ng.mean()
    dc = delta - phi_c / jpp
    Dc = problem.D_of(dc)[0]
    sdD = problem.D_of(delta)[1] * math.sqrt(2 * sigma**2 * 1.0 / jpp)
    sd_corr = problem.D_of(delta)[1] * ng.std(ddof=1) / math.sqrt(len(ng)) / jpp if len(ng) > 1 else float('nan')
    print(json.dumps({"s": s, "D": round(D, 5), "err%": round(100 * (D / a.D - 1), 2), "Dc": round(Dc, 5),
                      "errc%": round(100 * (Dc / a.D - 1), 2), "sd_noise": round(sdD, 5), "sd_corr": round(sd_corr, 5),
                      "ng": [round(v, 6) for v in ng], "jpp": jpp, "outer": out["iterations"], "inner": out["inner_iterations"],
                      "cpu_path": round(tp, 1), "cpu_probe": round(time.process_time() - t2, 1)}), flush=True)
    # the corrected estimating equation solved by secant, the same probes at every step
    d0, F0, d1 = delta, phi_c, dc
    for it in range(a.solve):
        rf = ReducedFunctional(problem, cfg, x)
        _, p1 = rf(d1)
        rf.close()
        F1 = p1 * problem.J_scale - (noise_grad(cfg, d1) * sigma ** 2).mean()
        d2 = d1 - F1 * (d1 - d0) / (F1 - F0) if F1 != F0 else d1
        d0, F0, d1 = d1, F1, d2
        print(json.dumps({"s": s, "secant": it + 1, "D": round(problem.D_of(d1)[0], 5),
                          "err%": round(100 * (problem.D_of(d1)[0] / a.D - 1), 2), "F": F1,
                          "cpu": round(time.process_time() - t2, 1)}), flush=True)
        if abs(d1 - d0) < 1e-4:
            break
