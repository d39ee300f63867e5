"""rOMT backends side by side: one loop of the paper's Gaussian spheres with numpy and with torch.

Usage::

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python benchmarks/romt_backend.py [--n 50]
        [--threads 1] [--backends numpy torch-cpu torch-cuda] [--set romt.KEY=VALUE ...]

Loop 0 (image 1 -> image 2) of ``glymph synth gaussian-spheres`` (the default settings:
nt 10, dt 0.4, sigma 0.002, beta 5000, gamma 80; velocities on the whole box), solved by
:func:`glymphmpi.romt.loop.solve_loop` in this process with each backend: ``numpy`` (the
scipy/numba kernels), ``torch-cpu`` (float64 tensors on the CPU) and, when torch sees a
GPU, ``torch-cuda`` twice (determinism: the two velocity fields must be identical bit for
bit). Prints wall and CPU seconds (CPU time is the figure to read on a shared machine),
Gauss-Newton and PCG iterations, the final objective and misfit, and the largest velocity
difference from the numpy solve relative to the largest velocity.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def run(images, cfg, act):
    from glymphmpi.romt.loop import solve_loop

    t0, c0 = time.perf_counter(), time.process_time()
    res = solve_loop(images[0], images[1], cfg, act)
    if cfg.backend == "torch" and cfg.device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    return res, time.perf_counter() - t0, time.process_time() - c0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1, help="scipy.fft / torch CPU threads")
    ap.add_argument("--backends", nargs="+", default=["numpy", "torch-cpu", "torch-cuda"],
                    choices=("numpy", "torch-cpu", "torch-cuda"))
    ap.add_argument("--set", action="append", default=[], metavar="romt.KEY=VALUE")
    args = ap.parse_args(argv)
    import dataclasses

    import torch

    from glymphmpi.log import setup_logging
    from glymphmpi.methods import load_config
    from glymphmpi.synth.gaussian_spheres import gaussian_spheres

    setup_logging(0, quiet=True)
    base = load_config("romt", None, [*args.set, f"romt.fft_workers={args.threads}"])
    images, _ = gaussian_spheres(args.n, 2)
    act = np.ones(images.shape[1:], bool)
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    print(f"rOMT backends, Gaussian spheres n = {args.n} ({args.n ** 3} voxels), loop 0, model {base.model}, "
          f"nt {base.nt}, {args.threads} thread(s); torch {torch.__version__}, "
          f"CUDA: {torch.cuda.get_device_name(0) if cuda else 'none'}")
    print(" backend      wall_s   cpu_s  GN  PCG  objective      misfit    max|dv|/max|v| vs numpy")
    ref = None
    gpu_runs = []
    for be in args.backends:
        if be == "torch-cuda" and not cuda:
            print(" torch-cuda   (no CUDA device: not measured)")
            continue
        if be == "numpy":
            cfg = dataclasses.replace(base, backend="numpy")
        else:
            cfg = dataclasses.replace(base, backend="torch", device=be.split("-")[1])
        for _ in range(2 if be == "torch-cuda" else 1):
            res, wall, cpu = run(images, cfg, act)
            v = res["velocity"].astype(np.float64)
            if ref is None:
                ref = v
            dv = float(np.abs(v - ref).max() / max(np.abs(ref).max(), 1e-300))
            print(f" {be:11s} {wall:7.1f} {cpu:7.1f} {res['gn_iterations']:3d} {res['pcg_iterations']:4d}  "
                  f"{res['objective']:.6e}  {res['misfit_rel']:.3e}  {dv:.1e}")
            if be == "torch-cuda":
                gpu_runs.append(res)
    if len(gpu_runs) == 2:
        same = all(np.array_equal(gpu_runs[0][k], gpu_runs[1][k]) for k in ("velocity", "rho_end"))
        print(f" GPU determinism: two identical runs {'bit-identical' if same else 'DIFFER'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
