"""FEM and PINN side by side on the rOMT authors' real rat DCE-MRI series (urOMT repository, C1217).

Usage::

    .venv/bin/python benchmarks/rat_fem_pinn.py /path/to/urOMT [--first 1] [--last 19] [--step 2]
        [--ranks 2] [--methods fem pinn] [--coarsen 2] [--set SECTION.KEY=VALUE ...] [--out DIR]

Zapf et al. (2022) estimate the apparent diffusion coefficient of a tracer in the brain by both
methods and take their agreement, as the PINN's PDE residual falls, as the check of each (their
human data: 0.75 vs 0.72 mm^2/h). This runs both with default settings on frames FIRST..LAST
(every STEP-th; 5 min per frame, 0.1 mm voxels; frames 20-35 are kept for acceptance and are never
read) of ``data/RatBrainsCAA3M/C1217`` (``rho_n``: % signal change from baseline, used as the
concentration; ``mask1.mat``), converted by :func:`glymphmpi.romt.matlab.init_from_mat`:
``mpirun -n RANKS glymph fem`` and ``glymph pinn`` (one process, torch's threads), and prints each
method's D with its 95% interval (FEM) or ensemble spread (PINN), whether it converged, its warnings,
the PINN's residual norm, wall time and peak memory.

A diffusion-only model is a simplification here, as in the paper: in this series the tracer is
carried by CSF flow (the mass inside the mask grows 64% between frames 7 and 9; see
``benchmarks/romt_rat.py``), so D is an apparent, effective coefficient, not molecular diffusion.
The data are not copied into this repository.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from romt_rat import RUN  # the child-process wrapper that prints the peak memory (this folder)


def convert(uromt: Path, out: Path, frames: list[int], step_h: float) -> Path:
    from glymphmpi.romt.matlab import init_from_mat

    d = uromt / "data" / "RatBrainsCAA3M" / "C1217"
    toml = out / "subject.toml"
    if toml.exists():
        return toml
    return init_from_mat([d / f"C1217_psnrv{k}.mat" for k in frames], out, "C1217", 0.1, step_h,
                         d / "mask1.mat", anatomy_path=d / "C1217_anatomy.mat")


def coarsen(subject: Path, out: Path, f: int) -> Path:
    """The subject on an f-times coarser grid: f^3 blocks of voxels averaged (the scans as stored, before
    the loader's clipping of negatives), a block inside the mask when at least half its voxels are."""
    import tomllib

    import nibabel as nib
    import numpy as np

    from glymphmpi.subject import write_subject

    toml = out / "subject.toml"
    if toml.exists():
        return toml
    doc = tomllib.loads(subject.read_text())
    base = subject.parent

    def blocks(a):
        n = [s // f * f for s in a.shape]
        a = np.asarray(a[:n[0], :n[1], :n[2]], dtype=np.float64)
        return a.reshape(n[0] // f, f, n[1] // f, f, n[2] // f, f).mean(axis=(1, 3, 5))

    img = nib.load(base / doc["mask"])
    aff = img.affine.copy()
    mask = blocks(np.asarray(img.dataobj) > 0) >= 0.5
    new = aff.copy()
    new[:3, :3] = aff[:3, :3] * f
    new[:3, 3] = aff[:3, :3] @ np.full(3, (f - 1) / 2.0) + aff[:3, 3]
    scans = [blocks(np.asarray(nib.load(base / e["path"]).dataobj)) for e in doc["scans"]]
    anat = blocks(np.asarray(nib.load(base / doc["anatomy"]).dataobj)) if "anatomy" in doc else None
    return write_subject(out, doc["id"], [e["time_h"] for e in doc["scans"]], scans, mask, new, anatomy=anat,
                         description=f"{doc.get('description', '')}; coarsened {f}x (block means)")


def run(method: str, subject: Path, out: Path, ranks: int, sets: list[str]) -> dict:
    cmd = [sys.executable, "-m", "glymphmpi", "--quiet", method, str(subject), "--out", str(out), "--fresh",
           "--force"]
    for s in sets:
        if s.startswith(f"{method}."):
            cmd += ["--set", s]
    env = dict(os.environ)
    if method == "fem" and ranks > 1:
        cmd = ["mpirun", "-n", str(ranks), *cmd]
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                   OMPI_MCA_rmaps_base_oversubscribe="1", OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", RUN, *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    peak = [float(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("PEAK_RSS_MIB")]
    summary = {}
    if r.returncode == 0 and (out / "summary.json").exists():
        summary = json.loads((out / "summary.json").read_text())
    if r.returncode != 0:
        print(f"  {method}: exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}")
    return {"wall_s": wall, "peak_mib": peak[0] if peak else float("nan"), "summary": summary, "rc": r.returncode}


def describe(method: str, res: dict) -> str:
    s = res["summary"]
    if not s:
        return f"{method}: no summary (exit {res['rc']})"
    D = s.get("D_mm2_per_h")
    conv = "converged" if s.get("converged") else "NOT converged"
    if method == "fem":
        ci = s.get("D_ci95_mm2_per_h")
        extra = f"95% interval {ci[0]:.4g} - {ci[1]:.4g}" if ci else "no interval"
    else:
        est = "" if s.get("estimate", True) else f"; not an estimate: {s.get('estimate_reason')}"
        extra = (f"ensemble spread (std) {s.get('D_std_mm2_per_h', float('nan')):.3g}, "
                 f"residual norm {s.get('residual_norm', float('nan')):.3g}{est}")
    warn = s.get("warnings") or []
    lines = [f"{method}: D = {D:.4g} mm^2/h, {extra}; {conv}; {res['wall_s']:.0f} s wall, "
             f"peak {res['peak_mib']:.0f} MiB"]
    lines += [f"    warning: {w}" for w in warn]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("uromt", type=Path, help="a local checkout of github.com/xinan-nancy-chen/urOMT")
    ap.add_argument("--first", type=int, default=1)
    ap.add_argument("--last", type=int, default=19)
    ap.add_argument("--step", type=int, default=2)
    ap.add_argument("--ranks", type=int, default=2, help="MPI ranks of the FEM run")
    ap.add_argument("--methods", nargs="+", default=["fem", "pinn"], choices=["fem", "pinn"])
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--coarsen", type=int, default=1,
                    help="average f^3 blocks of voxels first (2: 0.2 mm voxels, 8x fewer nodes; the full 0.1 mm "
                         "FEM needs 1.5-3.5 min per outer iteration on 2 ranks)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/rat_fem_pinn"))
    args = ap.parse_args(argv)
    if not 1 <= args.first < args.last <= 19 or args.step < 1:
        print("frames: 1 <= --first < --last <= 19 (frames 20-35 are kept for acceptance), --step >= 1",
              file=sys.stderr)
        return 2
    frames = list(range(args.first, args.last + 1, args.step))
    subject = convert(args.uromt, args.out / f"subject-{args.first}-{args.last}-{args.step}", frames,
                      args.step * 5.0 / 60.0)
    if args.coarsen > 1:
        subject = coarsen(subject, args.out / f"subject-{args.first}-{args.last}-{args.step}-x{args.coarsen}",
                          args.coarsen)
    from glymphmpi.subject import load_subject

    s = load_subject(subject)
    print(f"rat C1217 frames {frames} ({args.step * 5} min apart): grid {s.shape} ({s.voxel_size_mm[0]:.2g} mm), "
          f"mask {int(s.mask.sum())} voxels; settings {args.set or 'default'}")
    for method in args.methods:
        res = run(method, subject, args.out / method, args.ranks, args.set)
        print(describe(method, res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
