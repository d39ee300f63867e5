"""rOMT on the rOMT authors' real rat DCE-MRI series (urOMT repository, C1217), frames 7..19 every 2nd.

Usage::

    .venv/bin/python benchmarks/romt_rat.py /path/to/urOMT [--ranks 2] [--modes sequential parallel coupled]
        [--models balanced unbalanced] [--set romt.KEY=VALUE ...] [--out DIR]

Converts ``data/RatBrainsCAA3M/C1217/C1217_psnrv<k>.mat`` (k = 7, 9, ..., 19; variable ``rho_n``),
``mask1.mat`` and ``C1217_anatomy.mat`` into a subject (0.1 mm voxels and 5 min per frame assumed,
so 10 min between the frames used; :func:`glymphmpi.romt.matlab.init_from_mat`), then runs
``mpirun -n RANKS glymph romt --no-post`` for every mode x model and prints per loop: relative
misfit, Gauss-Newton iterations (and whether the limit was hit), the measured mass change between
the two scans against the model's, the wall time and the peak memory (max RSS of the largest
rank), and for coupled mode its sweeps and the relative L2 difference of its velocities from
sequential mode (same model). Frames 20-35 are never read (kept for acceptance). The data are
not copied into this repository.

The authors' run of these frames (getParams.m, case C1217): sigma 2e-3, dt 0.4, nt 10, beta 50,
alpha 1e4 in their scaling, smoothing on, consecutive loops, closed boundary; about 2,300 s per
loop on their machine (RatBrainsCAA3M/C1217/diff_2e3_.../record.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FRAMES = list(range(7, 20, 2))
RUN = """import resource, subprocess, sys
rc = subprocess.call(sys.argv[1:])
print("PEAK_RSS_MIB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0, flush=True)
sys.exit(rc)
"""


def convert(uromt: Path, out: Path) -> Path:
    from glymphmpi.romt.matlab import init_from_mat

    d = uromt / "data" / "RatBrainsCAA3M" / "C1217"
    assert max(FRAMES) <= 19, "frames 20-35 are kept for acceptance"
    toml = out / "subject.toml"
    if toml.exists():
        return toml
    return init_from_mat([d / f"C1217_psnrv{k}.mat" for k in FRAMES], out, "C1217", 0.1, 10 / 60,
                         d / "mask1.mat", anatomy_path=d / "C1217_anatomy.mat")


def run(subject: Path, out: Path, ranks: int, mode: str, model: str, sets: list[str]) -> dict:
    cmd = [sys.executable, "-m", "glymphmpi", "--quiet", "romt", str(subject), "--out", str(out), "--fresh",
           "--no-post", "--set", f"romt.mode={mode}", "--set", f"romt.model={model}"]
    for s in sets:
        cmd += ["--set", s]
    if ranks > 1:
        cmd = ["mpirun", "-n", str(ranks), *cmd]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", RUN, *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    peak = [float(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("PEAK_RSS_MIB")]
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    if r.returncode != 0 or summary.get("status") != "complete":
        print(f"  {mode}/{model}: exit {r.returncode}: {r.stderr.strip().splitlines()[-1:] }")
    return {"wall_s": wall, "peak_mib": peak[0] if peak else float("nan"), "summary": summary, "rc": r.returncode}


def velocities(out: Path) -> list[np.ndarray]:
    import h5py

    with h5py.File(out / "results.h5", "r") as fh:
        return [fh[f"loops/{k}/velocity"][()].astype(np.float64) for k in sorted(fh["loops"].keys())]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("uromt", type=Path, help="a local checkout of github.com/xinan-nancy-chen/urOMT")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=["sequential", "parallel", "coupled"])
    ap.add_argument("--models", nargs="+", default=["unbalanced", "balanced"])
    ap.add_argument("--set", action="append", default=[], metavar="romt.KEY=VALUE")
    ap.add_argument("--out", type=Path, default=Path("/tmp/romt_rat"))
    args = ap.parse_args(argv)
    subject = convert(args.uromt, args.out / "subject")
    from glymphmpi.subject import load_subject

    s = load_subject(subject)
    masses = [float((sc * s.mask).sum()) for sc in s.scans]
    print(f"rat C1217 frames {FRAMES}: grid {s.shape}, mask {int(s.mask.sum())} voxels, {len(FRAMES) - 1} loops, "
          f"{args.ranks} rank(s); settings {args.set or 'default'}")
    print("mass inside the mask per scan: " + ", ".join(f"{m:.4g}" for m in masses))
    done = {}
    for model in args.models:
        for mode in args.modes:
            out = args.out / f"{mode}-{model}"
            res = run(subject, out, args.ranks, mode, model, args.set)
            done[(mode, model)] = out
            sm = res["summary"]
            print(f"\n{mode} / {model}: wall {res['wall_s']:.1f} s, peak memory {res['peak_mib']:.0f} MiB per rank"
                  f", solve {sm.get('solve_s', float('nan'))} s")
            if not sm:
                continue
            print(" loop  misfit   GN  limit  mass change (scans / model)  seconds")
            for k, mis in enumerate(sm["final_misfit_rel"]):
                meas = masses[k + 1] / masses[k] - 1
                lim = "yes" if not sm["converged"][k] else "no"
                print(f" {k:4d}  {mis:.4f}  {sm['gn_iterations'][k]:3d}  {lim:>5s}  {100 * meas:+7.1f}% / "
                      f"{100 * sm['mass_error'][k]:+7.1f}%        {sm['seconds_per_loop'][k]:.1f}")
            worst = max(sm["final_misfit_rel"])
            print(f" worst misfit {worst:.4f}; loops on the iteration limit: "
                  f"{sum(not c for c in sm['converged'])}; warnings: {len(sm.get('warnings', []))}")
            if "source_rate_per_h_per_loop" in sm:
                rates = sm["source_rate_per_h_per_loop"]
                print(" source rate (1/h) per loop: " + ", ".join(f"{r:+.3f}" for r in rates))
            if mode == "coupled" and "coupled_sweeps" in sm:
                print(" sweeps: " + "; ".join(f"{w['sweep']}: {w['seconds']:.0f} s, change {w['max_change']:.1e}"
                                              for w in sm["coupled_sweeps"]))
                seq = done.get(("sequential", model))
                if seq is not None and (seq / "results.h5").exists():
                    d = [np.linalg.norm(a - b) / np.linalg.norm(b) for a, b in zip(velocities(out), velocities(seq))]
                    print(" velocity vs sequential (rel. L2) per loop: " + ", ".join(f"{x:.4f}" for x in d))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
