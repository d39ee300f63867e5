"""rOMT on the rOMT authors' real rat DCE-MRI series (urOMT repository, C1217), frames 7..19 every 2nd.

Usage::

    .venv/bin/python benchmarks/romt_rat.py /path/to/urOMT [--ranks 2] [--modes sequential parallel coupled]
        [--models balanced unbalanced] [--set romt.KEY=VALUE ...] [--out DIR] [--post]
        [--last-frame 35 --acceptance] [--floor]

Converts ``data/RatBrainsCAA3M/C1217/C1217_psnrv<k>.mat`` (k = 7, 9, ..., 19; variable ``rho_n``),
``mask1.mat`` and ``C1217_anatomy.mat`` into a subject (0.1 mm voxels and 5 min per frame assumed,
so 10 min between the frames used; :func:`glymphmpi.romt.matlab.init_from_mat`), then runs
``mpirun -n RANKS glymph romt --no-post`` for every mode x model and prints per loop: relative
misfit, Gauss-Newton iterations (and whether the limit was hit), the measured mass change between
the two scans against the model's, the wall time and the peak memory (max RSS of the largest
rank), and for coupled mode its sweeps and the relative L2 difference of its velocities from
sequential mode (same model). ``--floor`` also runs sequential mode on one rank and prints how far
sequential and coupled mode on RANKS ranks are from it: sequential mode on 2 ranks differs from it by
round-off alone (its particles' sums in another order), amplified by Gauss-Newton, which bounds how
close any mode can be to "the" sequential chain. Frames 20-35 are read only with ``--last-frame N --acceptance``
(kept for acceptance; ``--last-frame 35``: the authors' 14 loops over frames 7..35). The data are
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
FRAMES = list(range(7, 20, 2))  # development frames; --last-frame 35 --acceptance: the authors' 14 loops
RUN = """import resource, subprocess, sys
rc = subprocess.call(sys.argv[1:])
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print("PEAK_RSS_MIB", ru.ru_maxrss / 1024.0, flush=True)
print("CPU_S", ru.ru_utime + ru.ru_stime, flush=True)
sys.exit(rc)
"""


def convert(uromt: Path, out: Path, frames: list[int] = FRAMES) -> Path:
    from glymphmpi.romt.matlab import init_from_mat

    d = uromt / "data" / "RatBrainsCAA3M" / "C1217"
    toml = out / "subject.toml"
    if toml.exists():
        return toml
    return init_from_mat([d / f"C1217_psnrv{k}.mat" for k in frames], out, "C1217", 0.1, 10 / 60,
                         d / "mask1.mat", anatomy_path=d / "C1217_anatomy.mat")


def run(subject: Path, out: Path, ranks: int, mode: str, model: str, sets: list[str], post: bool = False) -> dict:
    cmd = [sys.executable, "-m", "glymphmpi", "--quiet", "romt", str(subject), "--out", str(out), "--fresh",
           "--set", f"romt.mode={mode}", "--set", f"romt.model={model}"]
    if not post:
        cmd.append("--no-post")
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
    cpu = [float(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("CPU_S")]
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    if r.returncode != 0 or summary.get("status") != "complete":
        print(f"  {mode}/{model}: exit {r.returncode}: {r.stderr.strip().splitlines()[-1:] }")
    return {"wall_s": wall, "peak_mib": peak[0] if peak else float("nan"), "cpu_s": cpu[0] if cpu else float("nan"),
            "summary": summary, "rc": r.returncode}


AUTHORS = ("RatBrainsCAA3M/C1217/"
           "diff_2e3_tj_2_dt_0.4_nt_10_ti_7_tf_33_beta_50_alpha_10000_smooth1_dtri1_rreinit0_pcg60")
AUTHOR_PNGS = [("LPPA_set001_031623/Pathlines/C1217_LagSpdlines_E07_35.png", "authors: speed-lines, frames 7-35"),
               ("EULA_set001_031623/Speed/C1217_EulAveSpeed_E07_11.png", "authors: Eulerian speed, 7-11"),
               ("EULA_set001_031623/Speed/C1217_EulAveSpeed_E15_19.png", "authors: Eulerian speed, 15-19"),
               ("EULA_set001_031623/Speed/C1217_EulAveR_E07_11.png", "authors: relative source, 7-11")]
OURS = [("figures/pathlines_speed.png", "glymphmpi: speed-lines, frames 7-{last}"),
        ("figures/speed_map.png", "glymphmpi: speed map (pathline points), 7-{last}"),
        ("figures/relative_source.png", "glymphmpi: relative source (mean of loops), 7-{last}")]


def compare_figure(uromt: Path, run_dir: Path, path: Path, last_frame: int = 19) -> Path | None:
    """One PNG with the authors' published rat figures (their repository's README images) above ours
    (frames 7..``last_frame``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [[(uromt / AUTHORS / p, t) for p, t in AUTHOR_PNGS],
            [(run_dir / p, t.format(last=last_frame)) for p, t in OURS]]
    rows = [[(p, t) for p, t in r if p.exists()] for r in rows]
    if not rows[1]:
        return None
    ncol = max(len(r) for r in rows)
    fig, axes = plt.subplots(2, ncol, figsize=(5 * ncol, 9), squeeze=False)
    for i, r in enumerate(rows):
        for j in range(ncol):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(r):
                ax.imshow(plt.imread(str(r[j][0])))
                ax.set_title(r[j][1], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def velocities(out: Path, densities: bool = False) -> list:
    """Per loop: the velocity (nt, 3, ...) float64; with densities, (velocity, the densities
    at the steps' starts (nt, ...))."""
    import h5py

    with h5py.File(out / "results.h5", "r") as fh:
        keys = sorted(fh["loops"].keys())
        v = [fh[f"loops/{k}/velocity"][()].astype(np.float64) for k in keys]
        if not densities:
            return v
        return [(a, fh[f"loops/{k}/density"][:-1].astype(np.float64)) for a, k in zip(v, keys)]


def kinetic_difference(a: np.ndarray, b: np.ndarray, rho: np.ndarray) -> float:
    """``sqrt(sum rho |a - b|^2 / sum rho |b|^2)``: the difference in the kinetic metric (the
    velocity where there is mass; rOMT's velocities where there is none are set only by the
    smoothness term and move nothing)."""
    num = (rho[:, None] * (a - b) ** 2).sum()
    den = (rho[:, None] * b ** 2).sum()
    return float(np.sqrt(num / den)) if den > 0 else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("uromt", type=Path, help="a local checkout of github.com/xinan-nancy-chen/urOMT")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=["sequential", "parallel", "coupled"])
    ap.add_argument("--models", nargs="+", default=["unbalanced", "balanced"])
    ap.add_argument("--set", action="append", default=[], metavar="romt.KEY=VALUE")
    ap.add_argument("--out", type=Path, default=Path("/tmp/romt_rat"))
    ap.add_argument("--post", action="store_true",
                    help="post-process the first run (pathlines, maps, figures; pathlines seen from -x as in the "
                         "authors' lateral views) and draw the authors' published rat figures beside ours "
                         "(OUT/compare_authors.png)")
    ap.add_argument("--last-frame", type=int, default=19,
                    help="last frame (odd, 9-35; frames 7, 9, ..., this). Frames 20-35 are kept for acceptance: "
                         "above 19 only with --acceptance (35: the authors' 14 loops)")
    ap.add_argument("--acceptance", action="store_true", help="allow --last-frame above 19")
    ap.add_argument("--floor", action="store_true",
                    help="also run sequential mode on one rank: how far sequential mode on --ranks ranks is from it "
                         "(round-off alone: the particles' sums in another order) and how far coupled mode is")
    args = ap.parse_args(argv)
    if args.last_frame % 2 == 0 or not 9 <= args.last_frame <= 35:
        print(f"--last-frame: {args.last_frame} is not an odd frame number from 9 to 35", file=sys.stderr)
        return 2
    if args.last_frame > 19 and not args.acceptance:
        print("--last-frame: frames 20-35 are kept for acceptance; add --acceptance to use them", file=sys.stderr)
        return 2
    frames = list(range(7, args.last_frame + 1, 2))
    subject = convert(args.uromt, args.out / ("subject" if frames == FRAMES else f"subject-7-{args.last_frame}"),
                      frames)
    from glymphmpi.subject import load_subject

    s = load_subject(subject)
    masses = [float((sc * s.mask).sum()) for sc in s.scans]
    print(f"rat C1217 frames {frames}: grid {s.shape}, mask {int(s.mask.sum())} voxels, {len(frames) - 1} loops, "
          f"{args.ranks} rank(s); settings {args.set or 'default'}")
    print("mass inside the mask per scan: " + ", ".join(f"{m:.4g}" for m in masses))
    done, results = {}, {}
    for model in args.models:
        for mode in args.modes:
            out = args.out / f"{mode}-{model}"
            post = args.post and not done  # the first run: its pathlines beside the authors'
            sets = args.set + (["romt.post.figure_view=-x"] if post else [])  # the authors' lateral view
            res = run(subject, out, args.ranks, mode, model, sets, post=post)
            done[(mode, model)] = out
            sm = res["summary"]
            results[(mode, model)] = sm
            print(f"\n{mode} / {model}: wall {res['wall_s']:.1f} s, CPU {res['cpu_s']:.0f} s (all ranks; wall under "
                  f"load is longer than CPU / ranks), peak memory {res['peak_mib']:.0f} MiB per rank"
                  f", solve {sm.get('solve_s', float('nan'))} s", flush=True)
            if post:
                cmp = compare_figure(args.uromt, out, args.out / "compare_authors.png", args.last_frame)
                print(f" figures beside the authors': {cmp}")
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
                    vc, vs = velocities(out), velocities(seq, densities=True)
                    d = [np.linalg.norm(a - b) / np.linalg.norm(b) for a, (b, _) in zip(vc, vs)]
                    allv = np.linalg.norm(np.concatenate([(a - b).ravel() for a, (b, _) in zip(vc, vs)])) / \
                        np.linalg.norm(np.concatenate([b.ravel() for b, _ in vs]))
                    print(" velocity vs sequential (rel. L2) per loop: " + ", ".join(f"{x:.4f}" for x in d)
                          + f"; all loops {allv:.4f}")
                    dk = [kinetic_difference(a, b, r) for a, (b, r) in zip(vc, vs)]
                    print(" velocity vs sequential (kinetic metric, sequential densities) per loop: "
                          + ", ".join(f"{x:.4f}" for x in dk))
                    seq_s = results[("sequential", model)].get("solve_s")
                    if seq_s:
                        print(f" coupled vs sequential solve time: {seq_s / sm['solve_s']:.2f}x faster")
                    estimate_14(sm, results[("sequential", model)])
    if args.floor and args.ranks > 1:
        floor(args, subject, done)
    return 0


def floor(args, subject: Path, done: dict) -> None:
    """Sequential mode on one rank against sequential (and coupled) mode on ``--ranks`` ranks: the
    first difference is round-off alone (the particles' contributions summed in another order),
    amplified by each loop's Gauss-Newton iterations; no mode can be closer to "the" sequential chain."""
    for model in args.models:
        out = args.out / f"sequential-1rank-{model}"
        res = run(subject, out, 1, "sequential", model, args.set)
        sm = res["summary"]
        print(f"\nsequential / {model} on 1 rank: wall {res['wall_s']:.1f} s, "
              f"solve {sm.get('solve_s', float('nan'))} s, GN per loop {sm.get('gn_iterations')}", flush=True)
        if not (out / "results.h5").exists():
            continue
        one = velocities(out, densities=True)
        for mode in ("sequential", "coupled"):
            other = done.get((mode, model))
            if other is None or not (other / "results.h5").exists():
                continue
            v = velocities(other)
            d = [np.linalg.norm(a - b) / np.linalg.norm(b) for a, (b, _) in zip(v, one)]
            dk = [kinetic_difference(a, b, r) for a, (b, r) in zip(v, one)]
            print(f" {mode} on {args.ranks} ranks vs sequential on 1 rank, velocity rel. L2 per loop: "
                  + ", ".join(f"{x:.4f}" for x in d) + "; kinetic metric: " + ", ".join(f"{x:.4f}" for x in dk))


def estimate_14(coupled: dict, sequential: dict, loops: int = 14) -> None:
    """The authors' 14 loops on 14 ranks (one loop per group), from the measured per-loop costs.

    Coupled mode solves each loop as sequential mode does; after sweep s the first s + 1 loops are
    the chain. Where a loop's end density settles when its start moves a little (the spheres: one
    correction), two sweeps suffice: about 2 x the slowest loop. Where it does not (the rat: every
    re-solve moves the next start by 5e-3 or more, round-off amplified by Gauss-Newton), every sweep
    re-solves the loops after the last final one, and the wall time is the chain's: the sum of the
    loops' one-rank solves, i.e. sequential mode on one rank."""
    per = coupled.get("seconds_per_loop") or []
    if not per:
        return
    mean, slow = float(np.mean(per)), float(max(per))
    seq_mean = float(np.mean(sequential["seconds_per_loop"])) if sequential.get("seconds_per_loop") else None
    print(f" estimate, {loops} loops on {loops} ranks: coupled {2 * slow:.0f} s if the starts settle after one "
          f"correction, {loops * mean:.0f} s if they never do (the chain, one rank per loop: {mean:.0f} s per "
          f"loop measured)" + ("" if seq_mean is None else
                               f"; sequential mode here {seq_mean:.0f} s per loop, {loops * seq_mean:.0f} s"))


if __name__ == "__main__":
    raise SystemExit(main())
