"""Default ``glymph fem`` on brain phantoms it was not tuned on: error of D and interval coverage.

Usage::

    python benchmarks/fem_auto.py [--noisy 10] [--clean 3] [--blocks 24 36] [--seed 2026] [--out DIR]
                                  [--ranks 1] [--times 0,4,8,12] [--only K ...] [--replicates N] [--twin]

Each phantom (``glymphmpi.synth.brain_diffusion``) gets a fresh random D
(uniform in [0.4, 1.0] mm^2/h), a random block edge in [--blocks] mm (the
smaller ones run first), a random block centre in dense left-hemisphere white
matter and a random noise seed; ``--noisy`` phantoms have 5% noise (of the
peak), ``--clean`` ones none. Every phantom is fitted by ``glymph fem`` with
the default settings (regularization "auto" with the default rule, interval
for D, time-step check; see glymphmpi/fem/README.md). Prints, per phantom,
the true D, the estimate, its error, the 95% interval, whether the truth lies
inside, the wall and the CPU time (children's user + system: the machine is
shared, so wall time alone says little), and writes ``fem_auto.json`` after
every phantom (a partial run keeps what finished). Targets (issue 16): |error| <= 3%
noise-free, <= 7% at 5% noise, truth inside the interval in >= 9 of 10
noisy phantoms.

Scan times: every 4 h, 0, 4, 8, 12 h, by default (since 2026-11-30; the
figures in glymphmpi/fem/README.md were measured so). The phantom generator's
own default, 0, 7, 24, 46 h (a human protocol: ``--times 0,7,24,46``), does
not determine D on these blocks, noise-free or noisy: the boundary
concentration peaks at 6-12 h, between two scans, the unobserved boundary
history is free in the model and is what D would have to explain, and the
corrected equation is flat in D there (fem_auto seed 1129 p01: slope -3e-4
against 0.14-20 with scans every 4 h). A run on those scans says so (the
interval is the whole range of D, with a warning), which is the right answer
for those data, not an estimate to score: no estimator recovers D from them
without a prior on the boundary history.

Bias or noise: ``--replicates N`` refits each selected noisy phantom with N
further noise seeds (ids ``pKKrJ``: same D, block and centre), and ``--twin``
adds its noise-free copy (``pKKnf``). The summary then prints, per phantom, the
mean and standard deviation of the error over its noisy copies beside the
noise sd the runs reported: a mean far from 0 against that sd is a bias of the
method, an error of one copy within it is the noise.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def draw(n_noisy: int, n_clean: int, blocks, seed: int) -> list[dict]:
    """The phantoms' random settings (reproducible from ``seed``), smaller blocks first."""
    from scipy import ndimage

    from glymphmpi.synth import brain_diffusion as bd

    prob, aff = bd.load_wm_template(1)
    rng = np.random.default_rng(seed)
    dens = ndimage.uniform_filter((prob > 0.5).astype(np.float64), size=15, mode="constant")
    dens[prob.shape[0] // 2:] = 0.0
    cand = np.argwhere(dens > 0.55)
    out = []
    for k in range(n_noisy + n_clean):
        edge = int(rng.integers(blocks[0], blocks[1] + 1))
        ijk = cand[int(rng.integers(cand.shape[0]))]
        centre = (aff[:3, :3] @ ijk + aff[:3, 3]).tolist()
        out.append({"id": f"p{k:02d}", "D": round(float(rng.uniform(0.4, 1.0)), 4), "block": edge,
                    "centre_mm": centre, "noise": 0.05 if k < n_noisy else 0.0,
                    "seed": int(rng.integers(1, 2**31 - 1))})
    return sorted(out, key=lambda p: (p["block"], p["id"]))


def copies(p: dict, replicates: int, twin: bool) -> list[dict]:
    """``p`` with further noise seeds (reproducible from its own seed) and, with ``twin``, its noise-free copy."""
    out = [p]
    if p["noise"] > 0:
        rng = np.random.default_rng(p["seed"])
        out += [{**p, "id": f"{p['id']}r{j}", "seed": int(rng.integers(1, 2**31 - 1)), "of": p["id"]}
                for j in range(1, replicates + 1)]
        if twin:
            out.append({**p, "id": f"{p['id']}nf", "noise": 0.0, "of": p["id"]})
    return out


def make(p: dict, out: Path, times=None) -> Path:
    from glymphmpi.synth import brain_diffusion as bd

    d = out / p["id"]
    if not (d / "subject.toml").exists():
        spec = bd.PhantomSpec(block=(p["block"],) * 3, centre_mm=tuple(p["centre_mm"]), D_mm2_per_h=p["D"],
                              noise=p["noise"], seed=p["seed"], times_h=tuple(times or bd.DEFAULT_TIMES_H))
        bd.write(d, spec, sid=p["id"])
    return d / "subject.toml"


def fit(subject: Path, run: Path, ranks: int) -> dict:
    cmd = [sys.executable, "-m", "glymphmpi", "--quiet", "fem", str(subject), "--out", str(run), "--force"]
    if ranks > 1:
        cmd = ["mpirun", "-n", str(ranks), *cmd]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", OMP_NUM_THREADS="1")
    t = time.time()
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu0 = ru.ru_utime + ru.ru_stime
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = ru.ru_utime + ru.ru_stime - cpu0
    if r.returncode != 0:
        return {"failed": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}",
                "wall_s": time.time() - t}
    s = json.loads((run / "summary.json").read_text())
    return {"D_est": s["D_mm2_per_h"], "ci95": s.get("D_ci95_mm2_per_h"), "converged": s.get("converged"),
            "warnings": s.get("warnings", []), "rule": s.get("regularization", {}).get("rule"),
            "scale": s.get("regularization", {}).get("scale"), "wall_s": time.time() - t, "cpu_s": cpu,
            "D_sd_noise": s.get("regularization", {}).get("D_sd_noise"),
            "D_half_dt": s.get("regularization", {}).get("D_half_dt")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--noisy", type=int, default=10)
    ap.add_argument("--clean", type=int, default=3)
    ap.add_argument("--blocks", type=int, nargs=2, default=[24, 36])
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--only", nargs="*", help="phantom ids to run (default: all, smaller blocks first); a copy's "
                                               "id (pKKrJ, pKKnf) runs that copy alone")
    ap.add_argument("--times", default="0,4,8,12", help="scan times in hours, comma-separated (default every 4 h: "
                                                        "0,4,8,12); the draws do not depend on it")
    ap.add_argument("--replicates", type=int, default=0, help="further noise seeds per selected noisy phantom")
    ap.add_argument("--twin", action="store_true", help="also fit each selected noisy phantom without noise")
    ap.add_argument("--out", default="benchmark-output/fem_auto")
    args = ap.parse_args()
    if args.replicates < 0:
        ap.error("--replicates must be >= 0")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    phantoms = draw(args.noisy, args.clean, args.blocks, args.seed)
    phantoms = [c for p in phantoms for c in copies(p, args.replicates, args.twin)]
    if args.only:  # a phantom's id selects it with its copies; a copy's id selects that copy alone
        phantoms = [p for p in phantoms if p["id"] in args.only or p.get("of") in args.only]
    rows = []
    print(f"{'id':>4} {'block':>5} {'noise':>5} {'D true':>7} {'D est':>7} {'error':>7} {'95% interval':>17} "
          f"{'inside':>6} {'conv':>5} {'min':>5} {'cpu min':>7}", flush=True)
    times = [float(t) for t in args.times.split(",")]
    print(f"scan times {times} h", flush=True)
    for p in phantoms:
        subj = make(p, out, times)
        r = {**p, **fit(subj, out / f"run_{p['id']}", args.ranks)}
        if "D_est" in r:
            r["error"] = r["D_est"] / p["D"] - 1.0
            ci = r["ci95"]
            r["inside"] = bool(ci is not None and ci[0] <= p["D"] <= ci[1])
            print(f"{p['id']:>4} {p['block']:>5} {p['noise']:>5.2f} {p['D']:>7.4f} {r['D_est']:>7.4f} "
                  f"{100 * r['error']:>+6.1f}% [{ci[0]:.4f}, {ci[1]:.4f}] {str(r['inside']):>6} "
                  f"{str(r['converged']):>5} {r['wall_s'] / 60:>5.1f} {r['cpu_s'] / 60:>7.1f}", flush=True)
        else:
            print(f"{p['id']:>4} {p['block']:>5} {p['noise']:>5.2f} {p['D']:>7.4f} failed: {r['failed']}", flush=True)
        rows.append(r)
        (out / "fem_auto.json").write_text(json.dumps(rows, indent=2))
    for base in sorted({r["of"] for r in rows if "of" in r}):
        group = [r for r in rows if "D_est" in r and r["noise"] > 0 and base in (r["id"], r.get("of"))]
        err = np.array([r["error"] for r in group])
        sd = [r["D_sd_noise"] / r["D"] for r in group if r.get("D_sd_noise") is not None]
        twin_row = [r for r in rows if r["id"] == f"{base}nf" and "D_est" in r]
        parts = [f"{len(err)} noisy copies"]
        if len(err):  # a twin run alone has no noisy copy to average
            parts[0] += (f", error mean {100 * err.mean():+.1f}% sd "
                         f"{100 * err.std(ddof=1) if len(err) > 1 else float('nan'):.1f}% (reported noise sd "
                         f"{100 * float(np.mean(sd)) if sd else float('nan'):.1f}% of D); inside "
                         f"{sum(r['inside'] for r in group)}/{len(group)}")
        if twin_row:
            parts.append(f"noise-free copy {100 * twin_row[0]['error']:+.1f}%")
        print(f"{base}: " + "; ".join(parts))
    noisy = [r for r in rows if r["noise"] > 0 and "D_est" in r and "of" not in r]
    clean = [r for r in rows if r["noise"] == 0 and "D_est" in r and "of" not in r]
    if noisy:
        print(f"noisy: {sum(abs(r['error']) <= 0.07 for r in noisy)}/{len(noisy)} within 7%, truth inside the "
              f"interval in {sum(r['inside'] for r in noisy)}/{len(noisy)}")
    if clean:
        print(f"noise-free: {sum(abs(r['error']) <= 0.03 for r in clean)}/{len(clean)} within 3%, inside "
              f"{sum(r['inside'] for r in clean)}/{len(clean)}")
    print(f"written {out / 'fem_auto.json'}")


if __name__ == "__main__":
    main()
