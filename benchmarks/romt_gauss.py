"""rOMT runtime and accuracy on the paper's Gaussian spheres (Chen et al., Table of runtimes).

Usage::

    .venv/bin/python benchmarks/romt_gauss.py [--n 25 50] [--loops 4] [--mode sequential]
        [--set romt.max_iterations=6 ...]

For each grid size n: the 5-image series of ``glymph synth gaussian-spheres``
(4 loops), solved with the paper's parameters (nt = 10, dt = 0.4,
sigma = 0.002, beta = 5000, gamma = 80). Prints seconds per loop, GN and
PCG iterations, final objective terms, mass error, peak memory (max RSS of
this process), and the accuracy figures of the issue:

* flux-direction cosine: mean over voxels with density > 10% of the step's
  max of cos(rho v, true direction) (also the density-weighted mean);
* core speed: mean speed over voxels with density >= 50% of the step's max,
  against the ideal 1.414 voxels per model time (ideal centre displacement
  per loop / T, T = nt dt = 4).

Reference (rOMT_spdup): 2048 s upgraded, 509 s parallel (cluster CPU) at
50^3; its flux cosine 0.90 and core speed ~9% above 1.414.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np


def flux_metrics(velocity: np.ndarray, density: np.ndarray, direction: np.ndarray) -> dict:
    """Direction and speed figures of one loop (velocity (nt,3,...), density (nt+1,...))."""
    v = velocity.astype(np.float64)
    rho = density[:-1].astype(np.float64)
    mx = rho.reshape(rho.shape[0], -1).max(axis=1).reshape(-1, 1, 1, 1)
    sel = rho > 0.1 * mx
    flux = v * rho[:, None]
    fn = np.sqrt((flux ** 2).sum(axis=1))
    cos = np.einsum("kd...,d->k...", flux, direction) / np.maximum(fn, 1e-300)
    core = rho >= 0.5 * mx
    speed = np.sqrt((v ** 2).sum(axis=1))
    return {
        "flux_cos_mean": float(cos[sel].mean()),
        "flux_cos_weighted": float((cos[sel] * rho[sel]).sum() / rho[sel].sum()),
        "core_speed_mean": float(speed[core].mean()),
        "core_speed_weighted": float((speed[core] * rho[core]).sum() / rho[core].sum()),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[25, 50])
    ap.add_argument("--loops", type=int, default=4)
    ap.add_argument("--mode", default="sequential", choices=("sequential", "parallel"))
    ap.add_argument("--set", action="append", default=[], metavar="romt.KEY=VALUE")
    ap.add_argument("--verbose", action="store_true", help="log every Gauss-Newton iteration")
    args = ap.parse_args(argv)
    from glymphmpi.log import setup_logging

    setup_logging(0, quiet=not args.verbose)

    from glymphmpi.methods import load_config
    from glymphmpi.romt.schedule import solve_series
    from glymphmpi.synth.gaussian_spheres import gaussian_spheres

    cfg = load_config("romt", None, [*args.set, f"romt.mode={args.mode}"])
    print(f"rOMT Gaussian spheres: nt={cfg.nt} dt={cfg.dt} sigma={cfg.sigma} beta={cfg.beta} "
          f"gamma={cfg.gamma} mode={cfg.mode} boundary={cfg.boundary} init={cfg.init}")
    for n in args.n:
        images, truth = gaussian_spheres(n, args.loops + 1)
        direction = np.asarray(truth["direction"])
        ideal = truth["speed_voxel_per_model_time"]
        t0 = time.perf_counter()
        loops, info = solve_series(images, cfg, np.ones(images.shape[1:], bool))
        total = time.perf_counter() - t0
        print(f"\nn = {n} ({n ** 3} voxels), {args.loops} loops: total {total:.1f} s "
              f"({total / args.loops:.1f} s per loop)")
        print(" loop wall_s cpu_s  GN  PCG   kinetic      fit         smooth      misfit   mass_err   "
              "flux_cos (w)     core speed (w)")
        for k, res in enumerate(loops):
            m = flux_metrics(res["velocity"], res["density"], direction)
            print(f" {k:3d} {res['runtime_s']:6.1f} {res['cpu_s']:5.1f} {res['gn_iterations']:3d} "
                  f"{res['pcg_iterations']:4d}  "
                  f"{res['kinetic']:.4e}  {res['fit']:.4e}  {res['smooth']:.4e}  {res['misfit_rel']:.2e}  "
                  f"{res['mass_error']:+.1e}   {m['flux_cos_mean']:.4f} ({m['flux_cos_weighted']:.4f})  "
                  f"{m['core_speed_mean']:.3f} ({m['core_speed_weighted']:.3f})")
        ms = [flux_metrics(r["velocity"], r["density"], direction) for r in loops]
        print(f" mean flux cosine {np.mean([m['flux_cos_mean'] for m in ms]):.4f} "
              f"(density-weighted {np.mean([m['flux_cos_weighted'] for m in ms]):.4f}); "
              f"core speed {np.mean([m['core_speed_mean'] for m in ms]):.3f} voxels/model time "
              f"vs ideal {ideal:.3f} "
              f"({100 * (np.mean([m['core_speed_mean'] for m in ms]) / ideal - 1):+.1f}%)")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        print(f" peak memory (max RSS) {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
