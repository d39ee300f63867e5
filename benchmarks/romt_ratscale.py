"""rOMT at rat-brain scale: 100 x 106 x 100 voxels, 12 images (11 loops).

Usage (parallel mode on 2 ranks, the issue's target: <= 20 min, <= 4 GB per loop)::

    mpirun -n 2 .venv/bin/python benchmarks/romt_ratscale.py --mode parallel
    .venv/bin/python benchmarks/romt_ratscale.py --images 3          # 2 loops, serial

The synthetic series: an ellipsoidal "brain" mask filling about 40% of the
box; inside it three Gaussian tracer boluses that translate with different
constant velocities (0.8 - 1.6 voxels per model time) and diffuse with sigma,
an exact solution of the model per bolus, then masked. Velocities are
unknowns on the mask dilated by ``romt.mask_dilation`` voxels. Prints seconds
per loop, GN and PCG iterations, final objective terms, mass error and the
peak memory (max RSS) of each rank, which holds one loop at a time.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np


def synthetic_series(shape=(100, 106, 100), n_images=12, T=4.0, sigma=0.002):
    """(images (p, *shape), mask) of the moving-bolus phantom."""
    g = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    c = np.array(shape) / 2.0
    semi = np.array(shape) * np.array([0.42, 0.40, 0.36])
    mask = sum(((gi - ci) / si) ** 2 for gi, ci, si in zip(g, c, semi)) <= 1.0
    boluses = [  # start centre (relative to the box centre), velocity (voxels per model time), std
        (np.array([-18.0, -10.0, 0.0]), np.array([1.2, 0.5, 0.3]), 5.0),
        (np.array([10.0, 15.0, -8.0]), np.array([-0.4, -1.3, 0.6]), 4.0),
        (np.array([5.0, -20.0, 10.0]), np.array([0.5, 0.9, -0.8]), 6.0),
    ]
    images = np.zeros((n_images, *shape))
    for p in range(n_images):
        t = p * T
        for m0, v, s0 in boluses:
            m = c + m0 + v * t * 0.5  # keep the boluses inside over 11 loops
            var = s0 ** 2 + 2 * sigma * t
            r2 = sum((gi - mi) ** 2 for gi, mi in zip(g, m))
            images[p] += 40.0 * (s0 ** 2 / var) ** 1.5 * np.exp(-r2 / (2 * var))
    images *= mask
    return images, mask


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[100, 106, 100])
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--mode", default="parallel", choices=("sequential", "parallel"))
    ap.add_argument("--set", action="append", default=[], metavar="romt.KEY=VALUE")
    ap.add_argument("--verbose", action="store_true", help="log every Gauss-Newton iteration (rank 0)")
    args = ap.parse_args(argv)

    from mpi4py import MPI

    from glymphmpi.methods import load_config
    from glymphmpi.romt.loop import active_set
    from glymphmpi.romt.schedule import solve_series

    comm = MPI.COMM_WORLD
    from glymphmpi.log import setup_logging

    setup_logging(comm.rank, quiet=not args.verbose)
    cfg = load_config("romt", None, [*args.set, f"romt.mode={args.mode}"])
    t0 = time.perf_counter()
    images, mask = synthetic_series(tuple(args.shape), args.images, cfg.nt * cfg.dt, cfg.sigma)
    act = active_set(mask, cfg.mask_dilation)
    if comm.rank == 0:
        print(f"rOMT rat scale: grid {tuple(args.shape)}, {args.images} images ({args.images - 1} loops), "
              f"mask {mask.sum()} voxels ({100 * mask.mean():.0f}%), active {act.sum()}, "
              f"mode {cfg.mode}, {comm.size} rank(s); series made in {time.perf_counter() - t0:.1f} s",
              flush=True)
    comm.Barrier()
    t1 = time.perf_counter()
    loops, info = solve_series(images, cfg, act, comm=comm, keep_arrays=False)
    total = time.perf_counter() - t1
    peak = comm.gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, root=0)
    if comm.rank == 0:
        print(f"total {total:.1f} s ({total / 60:.2f} min) for {len(loops)} loops on {comm.size} rank(s), "
              f"{info['n_groups']} group(s)")
        print(" loop  wall_s  cpu_s  GN  PCG   kinetic      fit         smooth      misfit    mass_err  stop")
        for k, r in enumerate(loops):
            print(f" {k:3d} {r['runtime_s']:7.1f} {r['cpu_s']:6.1f} {r['gn_iterations']:3d} {r['pcg_iterations']:4d}  "
                  f"{r['kinetic']:.4e}  {r['fit']:.4e}  {r['smooth']:.4e}  {r['misfit_rel']:.2e}  "
                  f"{r['mass_error']:+.1e}  {r['stop_reason']}")
        print(f" mean {np.mean([r['runtime_s'] for r in loops]):.1f} s per loop; peak memory (max RSS) per rank: "
              + ", ".join(f"{p:.0f} MiB" for p in peak))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
