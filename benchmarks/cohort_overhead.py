"""Launcher overhead per subject: submission to start, start to finish minus the method's own runtime.

Runs a small cohort of N subjects through the test method of tests/test_cohort_toymethod.py
(a fixed amount of work: ``steps`` x ``step_s`` seconds plus subject loading) with
``glymph cohort run`` on the local SLURM (hpc/slurm/up.sh) and/or the local scheduler, and
reads back per subject:

* queue: job start (the job script's first line) - submission (launcher, before sbatch);
* in-job: job script end - start - the method's own runtime_s (summary.json): srun/process
  start-up, Python imports, subject loading;
* notice: when the launcher recorded the end - the job script's end (polling);
* total: launcher's end record - submission - runtime_s.

The same numbers for a direct run (``python toy.py ...``, no launcher) separate Python's own
start-up from the launcher's. Prints a table and one JSON line.

    .venv/bin/python benchmarks/cohort_overhead.py --subjects 4 --scheduler both
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "tests" / "test_cohort_toymethod.py"


def make_cohort(tmp: Path, n: int, steps: int, step_s: float, scheduler: str) -> Path:
    from glymphmpi.synth import brain_diffusion as bd

    base = tmp / "phantom"
    if not (base / "subject.toml").exists():
        bd.write(base, bd.PhantomSpec(block=(12, 12, 12), dt_h=0.2), sid="ph")
    src = (base / "subject.toml").read_text()
    paths = []
    for i in range(n):
        d = tmp / "subjects" / f"s{i:02d}"
        d.mkdir(parents=True, exist_ok=True)
        txt = re.sub(r'(?m)^id = ".*"$', f'id = "s{i:02d}"', src)
        txt = re.sub(r'(path|mask) = "', lambda m: f'{m.group(1)} = "{base}/', txt)
        (d / "subject.toml").write_text(txt)
        paths.append(f'"subjects/s{i:02d}/subject.toml"')
    c = tmp / f"cohort-{scheduler}.toml"
    c.write_text(f'subjects = [{", ".join(paths)}]\nmethods = ["toy"]\n'
                 '[cohort]\ninterface = "lo"\npoll_s = 0.5\n[resources]\ntime = "00:10:00"\n'
                 f'[method.toy]\ncommand = ["{sys.executable}", "{TOY}"]\n'
                 f'args = ["--steps", "{steps}", "--step-s", "{step_s}"]\n')
    return c


def job_times(log: Path) -> tuple[float, float]:
    text = log.read_text()
    start = float(re.search(r"\[glymph\] start (\d+\.\d+)", text).group(1))
    end = float(re.findall(r"\[glymph\] end (\d+\.\d+)", text)[-1])
    return start, end


def measure(tmp: Path, n: int, steps: int, step_s: float, scheduler: str) -> dict:
    c = make_cohort(tmp, n, steps, step_s, scheduler)
    out = tmp / f"out-{scheduler}"
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "glymphmpi", "--quiet", "cohort", "run", str(c), "--out", str(out),
                        "--scheduler", scheduler], capture_output=True, text=True, cwd=ROOT)
    wall = time.time() - t0
    if r.returncode != 0:
        raise SystemExit(f"cohort run failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    state = json.loads((out / "cohort" / "state.json").read_text())["tasks"]
    rows = []
    for i in range(n):
        sid = f"s{i:02d}"
        rec = state[f"{sid}/toy"]
        summ = json.loads((out / sid / "toy" / "summary.json").read_text())
        if scheduler == "slurm":
            logs = sorted((out / "cohort" / "logs").glob(f"toy.*_{i}.log")) or \
                sorted((out / "cohort" / "logs").glob(f"{sid}.toy.*.log"))
            start, end = job_times(logs[-1])
        else:
            start, end = job_times(out / "cohort" / "logs" / f"{sid}.toy.log")
        rt = float(summ["runtime_s"])
        rows.append({"subject": sid, "queue_s": start - rec["submitted"], "in_job_s": end - start - rt,
                     "notice_s": rec["ended"] - end, "total_s": rec["ended"] - rec["submitted"] - rt,
                     "runtime_s": rt})
    return {"scheduler": scheduler, "subjects": n, "wall_s": wall, "rows": rows}


def direct(tmp: Path, steps: int, step_s: float) -> dict:
    toml = tmp / "subjects" / "s00" / "subject.toml"
    t0 = time.time()
    subprocess.run([sys.executable, str(TOY), "--quiet", "toy", str(toml), "--out", str(tmp / "direct"),
                    "--steps", str(steps), "--step-s", str(step_s), "--force"], check=True)
    wall = time.time() - t0
    rt = json.loads((tmp / "direct" / "summary.json").read_text())["runtime_s"]
    return {"wall_s": wall, "runtime_s": rt, "startup_s": wall - rt}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--step-s", type=float, default=0.1)
    ap.add_argument("--scheduler", choices=("slurm", "local", "both"), default="both")
    args = ap.parse_args()
    scheds = ["local", "slurm"] if args.scheduler == "both" else [args.scheduler]
    results = {}
    with tempfile.TemporaryDirectory(prefix="glymph-overhead-") as td:
        tmp = Path(td)
        for s in scheds:
            if s == "slurm":
                from glymphmpi.cohort.sbatch import available

                if not available():
                    print("no SLURM controller (hpc/slurm/up.sh): skipping slurm", file=sys.stderr)
                    continue
            results[s] = measure(tmp, args.subjects, args.steps, args.step_s, s)
        results["direct"] = direct(tmp, args.steps, args.step_s)
    print(f"{args.subjects} subjects, toy method {args.steps} x {args.step_s} s; medians (min-max) per subject, s")
    print(f"direct run (no launcher): wall {results['direct']['wall_s']:.2f}, own runtime "
          f"{results['direct']['runtime_s']:.2f}, Python start-up etc. {results['direct']['startup_s']:.2f}")
    for s in scheds:
        if s not in results:
            continue
        res = results[s]
        print(f"{s}: cohort wall {res['wall_s']:.1f} s")
        for k in ("queue_s", "in_job_s", "notice_s", "total_s", "runtime_s"):
            v = [r[k] for r in res["rows"]]
            print(f"  {k:10s} {statistics.median(v):7.2f}  ({min(v):.2f}-{max(v):.2f})")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
