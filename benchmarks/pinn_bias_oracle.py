"""Where the PINN's bias in D can come from, without a network: least-squares D with the phantom's own model.

The phantoms of ``benchmarks/pinn_defaults.py`` (same draws: MNI152 white-matter blocks, fresh D, position
and noise seed) are fitted by the forward model that made them (voxel finite differences, Crank-Nicolson,
Dirichlet concentration g(x, t) on the mask's boundary voxels): D minimises the squared misfit to the
interior voxels at the scans after the first (bounded scalar search). Two things are varied:

* the data: ``clean``, ``noisy`` (5% of the peak, Gaussian) or ``clipped`` (negative noise set to 0, as the
  subject loader does);
* the boundary history between the scans: ``true`` (the phantom's g(t)) or an interpolation of its values
  at the scan times (``linear``, ``pchip``), i.e. what a fit that sees the boundary only at the scans and
  prefers a smooth history in time ends up assuming.

With the true history the fit is unbiased on clean, noisy and clipped data (clipping is not the cause);
with an interpolated one it is not: the phantom's boundary reaches most of its peak within a few hours
while the first two scans are 7 h apart, so an interpolated boundary lags, and the interior must diffuse
faster to reach the same concentrations at 7 h: D comes out high. A PINN sees the boundary only at the
scans too; its network prefers histories smooth in time, which is the same bias.

Usage: ``nice -n 19 python benchmarks/pinn_bias_oracle.py [--seed 200] [--n 3] [--only K ...]
[--block 24] [--dt 0.1] [--histories true linear pchip] [--data clean clipped]``.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=200, help="seed of the phantom draws (as pinn_defaults.py)")
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--only", type=int, nargs="*")
    ap.add_argument("--block", type=int, default=24)
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--dt", type=float, default=0.1, help="time step of the fits (h; the phantoms are made with 0.1)")
    ap.add_argument("--histories", nargs="+", default=["true", "linear", "pchip"],
                    choices=("true", "linear", "pchip"))
    ap.add_argument("--data", nargs="+", default=["clean", "clipped"], choices=("clean", "noisy", "clipped"))
    args = ap.parse_args(argv)

    import numpy as np
    from scipy.interpolate import PchipInterpolator
    from scipy.optimize import minimize_scalar

    from glymphmpi.synth import brain_diffusion as bd

    rng = np.random.default_rng(args.seed)
    prob, taff = bd.load_wm_template(1)
    base = bd.choose_block(prob, taff, bd.PhantomSpec(block=(args.block,) * 3))
    centre_ijk = np.array([(s.start + s.stop) / 2 for s in base])
    print(f"phantoms of pinn_defaults.py --seed {args.seed} ({args.block} mm blocks, noise {args.noise:.0%}); "
          f"D by least squares with the phantom's FD model (dt {args.dt} h)", flush=True)
    for k in range(args.n):
        D_true = float(rng.uniform(0.4, 1.0))  # the draws of pinn_defaults.py, in its order
        shift = rng.integers(-8, 9, size=3)
        centre_mm = taff[:3, :3] @ (centre_ijk + shift) + taff[:3, 3]
        seed = int(rng.integers(0, 2**31 - 1))
        if args.only is not None and k not in args.only:
            continue
        t0 = time.process_time()
        spec = bd.PhantomSpec(block=(args.block,) * 3, centre_mm=tuple(float(c) for c in centre_mm),
                              D_mm2_per_h=D_true, noise=args.noise, seed=seed, dt_h=0.1)
        scans, clean, mask, affine, _ = bd.make_phantom(spec, prob, taff)
        interior, boundary = bd.boundary_interior(mask, spec.boundary)
        h = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        g = bd.boundary_function(mask, affine, np.flatnonzero(boundary))
        ts = np.asarray(spec.times_h, dtype=np.float64)
        G = np.stack([g(t) for t in ts])  # boundary values at the scans

        def linear(t, G=G, ts=ts):
            i = int(np.clip(np.searchsorted(ts, t, side="right") - 1, 0, ts.size - 2))
            w = (t - ts[i]) / (ts[i + 1] - ts[i])
            return (1.0 - w) * G[i] + w * G[i + 1]

        pchip = PchipInterpolator(ts, G, axis=0)
        histories = {"true": g, "linear": linear, "pchip": lambda t, p=pchip: p(t)}
        datas = {"clean": clean, "noisy": scans, "clipped": np.clip(scans, 0.0, None)}
        cells = []
        for hname in args.histories:
            for dname in args.data:
                d = datas[dname][1:, interior]

                def misfit(D, gf=histories[hname], d=d, mask=mask, h=h, spec=spec, interior=interior):
                    sim = bd.solve_diffusion(mask, h, D, gf, spec.times_h, args.dt, boundary=spec.boundary)
                    return float(((sim[1:, interior] - d) ** 2).sum())

                r = minimize_scalar(misfit, bounds=(0.1, 2.5), method="bounded", options={"xatol": 1e-4})
                cells.append(f"{hname}/{dname} {r.x:.4f} ({(r.x - D_true) / D_true:+.1%})")
        print(f"  ph{k}: D_true {D_true:.4f}, {int(mask.sum())} voxels: " + ", ".join(cells)
              + f"  [{time.process_time() - t0:.0f} CPU s]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
