"""Benchmark of the rOMT pathline tracing (issue: 100,000 seeds over 110 model steps <= 30 s on 2 cores).

A 64^3 grid, 11 loops of 10 model steps, a swirling velocity field (solid
rotation about the k axis plus a drift along it) and a wide Gaussian density
diffusing with sigma = 0.002 (the rOMT default); the first 100,000 voxels
(evenly thinned) of the mask above 1% of the peak are seeds. Times the
tracing in memory and the whole post-processing from a results.h5 (seeds,
tracing, cleanup, maps, VTK; figures off), prints both, and checks a
conserved quantity: solid rotation keeps the distance to the axis.

Usage: .venv/bin/python benchmarks/romt_post_bench.py [--n 64] [--seeds 100000] [--full]
       mpirun -n 2 .venv/bin/python benchmarks/romt_post_bench.py   (seeds split over 2 ranks)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def fields(n: int, nt: int, dt: float, sigma: float):
    ii = np.indices((n, n, n)).astype(np.float64)
    c = (n - 1) / 2.0
    omega = 0.02  # rad per model time
    v = np.zeros((3, n, n, n), np.float32)
    v[0] = -omega * (ii[1] - c)
    v[1] = omega * (ii[0] - c)
    v[2] = 0.05
    vel = np.broadcast_to(v[None], (nt, 3, n, n, n))
    s0 = n / 4.0
    rho = []
    for k in range(nt + 1):
        s2 = s0 ** 2 + 2 * sigma * k * dt
        rho.append(np.exp(-sum((ii[d] - c) ** 2 for d in range(3)) / (2 * s2)))
    return vel, np.asarray(rho, np.float32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=100_000)
    ap.add_argument("--loops", type=int, default=11)
    ap.add_argument("--nt", type=int, default=10)
    ap.add_argument("--full", action="store_true", help="also time postprocess() from a results.h5")
    args = ap.parse_args()

    from glymphmpi.parallel import launcher_env, split_evenly
    from glymphmpi.romt import lagrangian as lg

    comm = None
    if launcher_env()["world_size"] > 1:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    rank, size = (0, 1) if comm is None else (comm.rank, comm.size)
    n, nt, dt, sigma = args.n, args.nt, 0.4, 0.002
    vel, rho = fields(n, nt, dt, sigma)
    mask = np.ones((n, n, n), bool)
    loops = [(vel, rho, float(3 * i), float(3 * (i + 1))) for i in range(args.loops)]
    seeds = lg.select_seeds(rho.max(0), rho.sum(0), mask, "max", 0.01, 0.0, 1, args.seeds)
    steps = lg.ArraySteps(loops, dt, sigma)
    mine = split_evenly(seeds.shape[0], size, rank)
    if comm is not None:
        comm.Barrier()
    t0 = time.perf_counter()
    lines = lg.trace(steps, seeds[mine[0]:mine[-1] + 1], mask, np.ones(3), lg.TraceSettings(stop_density_fraction=1e-4),
                     rho_max=float(rho.max()))
    if comm is not None:
        parts = comm.gather(lines, root=0)
        if rank != 0:
            return
        lines = lg.Pathlines.concatenate(parts)
    t_trace = time.perf_counter() - t0
    c = (n - 1) / 2.0
    r0 = np.hypot(lines.positions[0, :, 0] - c, lines.positions[0, :, 1] - c)
    e = lines.ends()
    r1 = np.hypot(e[:, 0] - c, e[:, 1] - c)
    full = lines.n_points == len(steps) + 1
    print(f"grid {n}^3, {seeds.shape[0]} seeds, {len(steps)} model steps (rk2), {size} rank(s): "
          f"trace {t_trace:.2f} s; "
          f"{int(full.sum())} lines ran to the end; max |r1 - r0| (rotation, sigma grad log rho is radial "
          f"in 3D so r may grow) = {np.abs(r1 - r0)[full].max():.4f} voxel")
    if args.full:
        from glymphmpi.romt import post
        from glymphmpi.romt.post_config import RomtPostConfig
        from glymphmpi.store import RunDir
        from glymphmpi.subject import write_subject

        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            times = [3.0 * i for i in range(args.loops + 1)]
            t0 = time.perf_counter()
            toml = write_subject(tmp / "subj", "bench", times, [rho[0]] + [rho[-1]] * args.loops, mask,
                                 np.eye(4))
            rd = RunDir(tmp / "run").prepare()
            post.write_romt_results(rd.results, nt=nt, dt=dt, sigma=sigma, mask=mask, affine=np.eye(4),
                                    times_h=times, loops=[(vel, rho)] * args.loops)
            t_write = time.perf_counter() - t0
            from glymphmpi.subject import load_subject

            subject = load_subject(toml)
            t0 = time.perf_counter()
            f = post.postprocess(rd, subject, RomtPostConfig(seed_max_fraction=0.01, max_seeds=args.seeds,
                                                             write_figures=False))
            t_post = time.perf_counter() - t0
            d = f["romt_post"]
            print(f"postprocess from results.h5 (writing it took {t_write:.1f} s): {t_post:.2f} s total "
                  f"(seeds {d['seed_s']:.2f} s, trace {d['trace_s']:.2f} s); {f['n_pathlines']} pathlines")


if __name__ == "__main__":
    main()
