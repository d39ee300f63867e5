"""Default `glymph pinn` on fresh brain phantoms: D error, ensemble spread, residual norm, time.

Issue 16's acceptance run for the PINN defaults: ``--n`` brain-diffusion phantoms (MNI152 white
matter, 5% noise, 24 mm blocks) with a fresh random D (uniform in [0.4, 1.0] mm^2/h), block
position (the densest white-matter block moved by up to +-8 mm per axis) and noise seed each,
written as subjects and run through the command line exactly as a user would, with no settings
(``glymph pinn SUBJECT --out DIR``), one thread (``OMP_NUM_THREADS=1``), one run at a time. Prints,
per phantom: true D, estimated D, relative error, ensemble spread (D_std), whether the truth lies
within mean +- 2 std, residual norm, whether the run converged (and its warnings), wall time and
CPU time of the run (on a shared machine the CPU time is what a quiet core would have taken).

Usage: ``nice -n 10 python benchmarks/pinn_defaults.py [--n 3] [--seed 100] [--block 24] [--json OUT]
[--set pinn.key=value ...]`` (``--set`` only to try other settings; the acceptance run uses none).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3, help="number of phantoms")
    ap.add_argument("--seed", type=int, default=100, help="seed of the phantom draws (D, position, noise)")
    ap.add_argument("--block", type=int, default=24, help="block edge (voxels of 1 mm)")
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="extra pinn settings (default: none)")
    ap.add_argument("--json", help="write the rows to this JSON file")
    ap.add_argument("--out", help="keep the subjects and runs here (default: a temporary directory)")
    ap.add_argument("--only", type=int, nargs="*", help="run only these phantom indices (draws stay the same)")
    args = ap.parse_args(argv)

    import numpy as np

    from glymphmpi.subject import write_subject
    from glymphmpi.synth import brain_diffusion as bd

    rng = np.random.default_rng(args.seed)
    prob, taff = bd.load_wm_template(1)
    base = bd.choose_block(prob, taff, bd.PhantomSpec(block=(args.block,) * 3))
    centre_ijk = np.array([(s.start + s.stop) / 2 for s in base])
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="pinn_defaults_"))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    for k in list(env):
        if k.startswith(("OMPI_COMM_WORLD", "PMIX_", "SLURM_")) or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(k)
    rows = []
    print(f"{args.n} phantoms: {args.block} mm blocks, noise {args.noise:.0%} of the peak, D ~ U[0.4, 1.0], "
          f"{args.threads} thread(s), settings: {' '.join(args.set) or 'defaults'}; load average "
          f"{os.getloadavg()[0]:.1f} at the start (2-core machine shared)", flush=True)
    for k in range(args.n):
        D_true = float(rng.uniform(0.4, 1.0))
        shift = rng.integers(-8, 9, size=3)
        centre_mm = taff[:3, :3] @ (centre_ijk + shift) + taff[:3, 3]
        seed = int(rng.integers(0, 2**31 - 1))
        spec = bd.PhantomSpec(block=(args.block,) * 3, centre_mm=tuple(float(c) for c in centre_mm),
                              D_mm2_per_h=D_true, noise=args.noise, seed=seed, dt_h=0.1)
        scans, _, mask, affine, _truth = bd.make_phantom(spec, prob, taff)
        scans = np.clip(scans, 0, None)  # negative noise clipped, as subject loading does
        sid = f"ph{k}"
        if args.only is not None and k not in args.only:
            continue
        subj = write_subject(work / sid, sid, spec.times_h, scans, mask, affine)
        out = work / f"run_{sid}"
        cmd = [sys.executable, "-m", "glymphmpi", "--quiet", "pinn", str(subj), "--out", str(out), "--force"]
        for s in args.set:
            cmd += ["--set", s]
        load0 = os.getloadavg()[0]
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)  # what a quiet core would take
        summ = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
        if r.returncode != 0:
            print(f"  {sid}: exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}", flush=True)
        D, sd = summ.get("D_mm2_per_h", float("nan")), summ.get("D_std_mm2_per_h", float("nan"))
        row = {"phantom": sid, "D_true": D_true, "centre_mm": list(map(float, centre_mm)), "noise_seed": seed,
               "mask_voxels": int(mask.sum()), "D": D, "D_std": sd, "D_members": summ.get("D_members_mm2_per_h"),
               "rel_error": (D - D_true) / D_true, "within_2std": abs(D - D_true) <= 2 * sd,
               "residual_norm": summ.get("residual_norm"), "converged": summ.get("converged"),
               "estimate": summ.get("estimate"), "warnings": summ.get("warnings"), "epochs": summ.get("epochs"),
               "batches": summ.get("batches"), "train_s": summ.get("train_s"), "wall_s": wall, "cpu_s": cpu,
               "load_before": load0, "load_after": os.getloadavg()[0], "status": summ.get("status")}
        rows.append(row)
        print(f"  {sid}: {row['mask_voxels']} voxels, D_true {D_true:.4f}, D {D:.4f} +- {sd:.4f} "
              f"(members {', '.join(f'{x:.4f}' for x in row['D_members'] or [])}), error {row['rel_error']:+.1%}, "
              f"residual {row['residual_norm']}, converged {row['converged']}, {row['epochs']} epochs x "
              f"{row['batches']} batches, {wall:.0f} s wall, {cpu:.0f} s CPU "
              f"(load {load0:.1f} -> {row['load_after']:.1f})"
              + (f"; warnings: {row['warnings']}" if row["warnings"] else ""), flush=True)
    errs = np.array([abs(r["rel_error"]) for r in rows])
    print(f"\nmax |error| {errs.max():.1%}, mean |error| {errs.mean():.1%}, within 10%: "
          f"{int((errs <= 0.10).sum())}/{len(rows)}, truth within mean +- 2 std: "
          f"{sum(bool(r['within_2std']) for r in rows)}/{len(rows)}, wall {sum(r['wall_s'] for r in rows):.0f} s, "
          f"CPU {sum(r['cpu_s'] for r in rows):.0f} s")
    print("\n| phantom | D true | D | spread (std) | error | residual norm | converged | wall s | CPU s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['phantom']} | {r['D_true']:.4f} | {r['D']:.4f} | {r['D_std']:.4f} | {r['rel_error']:+.1%} | "
              f"{r['residual_norm']:.3e} | {r['converged']} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
