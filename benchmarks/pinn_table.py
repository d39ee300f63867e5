"""A table like Table 1 of Zapf et al. 2022: relative error of D and residual norm per setting.

Rows: residual exponent p in {1, 2 -> 1, 2} times two learning-rate schedules
(Adam, exponential decay between the two rates), on the brain-diffusion
phantom (MNI152 white-matter block, true D = 0.72 mm^2/h) with 5% noise,
D started away from the truth (``--D0``), RAR on (the paper's best setting
uses it). Columns: D, relative error |D - D_true| / D_true, residual norm
(mean of r(t), the PDE residual over voxel centres on a 200-point time
grid), final data loss J, training time.

The paper trains for tens of thousands of epochs on a GPU; the defaults here
are a reduced version for about 4 CPU minutes per row on one core (16^3
block, the default 6 x 64 network, 400 epochs of 40 minibatches, faster
learning-rate schedules). Do not shrink the network to save time: a 4 x 32
network under-resolves the thin boundary layer of the early scans, which
looks like faster diffusion (p = 1: D +15% at 4 x 32, +7.6% at 4 x 64,
+7.5% at 4 x 128, +1.3% at 6 x 64 on phantom seed 0). delta is frozen for the first quarter of the epochs
(``--freeze``, PinnConfig.delta_freeze_epochs): without it D runs to its
upper bound while the network is still far from the data. Every reduction
is printed with the table.

Usage: ``python benchmarks/pinn_table.py [--block 16 16 16] [--epochs 400] [--threads 1] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block", type=int, nargs=3, default=[16, 16, 16])
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--D-true", type=float, default=0.72)
    ap.add_argument("--D0", type=float, default=0.35, help="initial D (mm^2/h)")
    ap.add_argument("--epochs", type=int, default=400)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--schedules", default="5e-3:5e-4,1e-2:1e-3",
                    help="two learning-rate schedules start:end, comma-separated")
    ap.add_argument("--rar-every", type=int, default=0, help="RAR every N epochs (0: at 1/3 and 2/3)")
    ap.add_argument("--freeze", type=float, default=0.25,
                    help="share of the epochs during which delta is frozen at D0 (delta_freeze_epochs)")
    ap.add_argument("--w-r", type=float, default=1.0, help="weight of the PDE loss")
    ap.add_argument("--p", default="1,2to1,2", help="residual exponent schedules, comma-separated")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0, help="seed of the phantom's noise and of the training")
    ap.add_argument("--json", help="write rows to this JSON file")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from glymphmpi.pinn.config import PinnConfig
    from glymphmpi.pinn.network import DiffusionCoefficient
    from glymphmpi.pinn.trainer import build_problem, fit
    from glymphmpi.synth import brain_diffusion as bd

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = bd.PhantomSpec(block=tuple(args.block), D_mm2_per_h=args.D_true, noise=args.noise, seed=args.seed,
                          dt_h=0.1)
    scans, _, mask, affine, truth = bd.make_phantom(spec)
    scans = np.clip(scans, 0, None)  # as subject loading does with noise below zero
    pb = build_problem(scans, mask, affine, spec.times_h)
    E = args.epochs
    rar = tuple(range(args.rar_every, E, args.rar_every)) if args.rar_every else (E // 3, 2 * E // 3)
    n_int = int(pb.interior.sum())
    freeze = int(args.freeze * E)
    delta0 = DiffusionCoefficient.delta_for(args.D0)
    rows = []
    print(f"phantom: block {tuple(args.block)}, {int(mask.sum())} mask voxels ({n_int} interior), "
          f"{len(spec.times_h)} scans at {spec.times_h} h, noise {args.noise:.0%} of the peak, "
          f"D_true = {args.D_true}, D0 = {args.D0}", flush=True)
    print(f"network {args.depth} x {args.width} tanh, {E} epochs x {args.batches} batches, "
          f"RAR at epochs {rar} (+{max(1, n_int // 2)} points from a pool of {8 * n_int}), w_r = {args.w_r:g}, "
          f"delta frozen for {freeze} epochs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    for sched in args.schedules.split(","):
        lr0, lr1 = (float(v) for v in sched.split(":"))
        for p in args.p.split(","):
            cfg = PinnConfig(depth=args.depth, width=args.width, epochs=E, batches=args.batches, lr_start=lr0,
                             lr_end=lr1, p_schedule=p, delta0=delta0, rar_epochs=rar, rar_add=max(1, n_int // 2),
                             rar_pool=8 * n_int, checkpoint_every=0, log_every=10**9, seed=args.seed,
                             residual_voxels=0, residual_times=200, delta_freeze_epochs=freeze, w_r=args.w_r,
                             maps=False, figures=False, ensemble=1)
            t0 = time.perf_counter()
            (res,) = fit(pb, cfg, quiet=True)
            row = {"p": {"1": "1", "2to1": "2->1", "2": "2"}[p], "lr": f"{lr0:g} -> {lr1:g}", "D": res.D,
                   "rel_error": abs(res.D - args.D_true) / args.D_true, "residual_norm": res.residual_norm,
                   "loss_data": res.history["loss_data"][-1], "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(f"  p = {row['p']:4s} lr {row['lr']:14s} D = {row['D']:.4f}  rel. error {row['rel_error']:6.1%}  "
                  f"residual norm {row['residual_norm']:.3e}  J {row['loss_data']:.3e}  ({row['seconds']:.0f} s)",
                  flush=True)
    print("\n| p | learning rate | D (mm^2/h) | relative error | residual norm | J |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['p']} | {r['lr']} | {r['D']:.4f} | {r['rel_error']:.1%} | {r['residual_norm']:.3e} | "
              f"{r['loss_data']:.3e} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows, "truth": truth}, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
