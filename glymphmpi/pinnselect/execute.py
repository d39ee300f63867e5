"""Run the grid: local processes or a SLURM job array; collect run records.

Each run is ``glymph pinn SUBJECT --out OUT/runs/<setup>/seed<k> --set ...``.
A run whose summary.json says complete is never trained again (resume); a
failed one is retried up to ``max_retries`` times; a preempted one (exit 75,
checkpoint written) resumes on the next attempt.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from glymphmpi.errors import MissingDependency, Preempted
from glymphmpi.io import atomic_write_bytes
from glymphmpi.pinnselect.grid import Run, run_overrides
from glymphmpi.pinnselect.select import RunRecord
from glymphmpi.store import StopFlag, read_summary

log = logging.getLogger(__name__)


def run_command(subject: Path, out: Path, run: Run, python: str = sys.executable) -> list[str]:
    cmd = [python, "-m", "glymphmpi", "--quiet", "pinn", str(subject), "--out", str(out / run.rel_dir)]
    for s in run_overrides(run):
        cmd += ["--set", s]
    return cmd


def record(out: Path, run: Run) -> RunRecord:
    """The record of one run from its summary.json (pending when there is none)."""
    s = read_summary(out / run.rel_dir)
    rec = RunRecord(setup=run.setup.name, seed=run.seed, status="pending", out=str(out / run.rel_dir))
    if not s:
        return rec
    if s.get("status") == "complete":
        rec.D = float(s.get("D_mm2_per_h", float("nan")))
        rec.residual_norm = float(s.get("residual_norm", float("nan")))
        rec.misfit = float(s.get("final_loss_data", float("nan")))
        rec.runtime_s = float(s.get("runtime_s", float("nan")))
        if s.get("early_stopped"):
            rec.status, rec.reason = "early_stopped", str(s.get("early_stop_reason", ""))
        else:
            rec.status = "complete"
    else:
        rec.status = s.get("status", "failed")
        rec.reason = str(s.get("error", ""))
    return rec


def _env(threads: int) -> dict:
    env = dict(os.environ)
    for k in list(env):  # children are independent single-process runs
        if k.startswith(("OMPI_COMM_WORLD", "PMIX_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_")):
            env.pop(k)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    return env


def run_local(subject: Path, out: Path, runs: list[Run], parallel: int, threads: int,
              max_retries: int, quiet: bool = True) -> None:
    """Train the pending runs with up to ``parallel`` local processes.

    SIGTERM/SIGUSR1 to this process is passed on to the children (they
    checkpoint and exit 75), then :class:`Preempted` is raised.
    """
    todo = [r for r in runs if record(out, r).status not in ("complete", "early_stopped")]
    if not todo:
        return
    workers = parallel or os.cpu_count() or 1
    log.info("training %d run(s), %d at a time", len(todo), workers)
    procs: dict[int, subprocess.Popen] = {}
    lock = threading.Lock()
    stopping = threading.Event()

    def one(idx_run):
        idx, run = idx_run
        for attempt in range(max_retries + 1):
            if stopping.is_set():
                return
            cmd = run_command(subject, out, run)
            logf = out / run.rel_dir / "stderr.txt"
            logf.parent.mkdir(parents=True, exist_ok=True)
            with open(logf, "a") as err:
                p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=_env(threads))
                with lock:
                    procs[idx] = p
                rc = p.wait()
                with lock:
                    procs.pop(idx, None)
            rec = record(out, run)
            if rc == 0 and rec.status in ("complete", "early_stopped"):
                log.info("%s seed %d: D = %.4g, residual %.3g", run.setup.name, run.seed, rec.D,
                         rec.residual_norm)
                return
            if stopping.is_set():
                return
            log.warning("%s seed %d: exit %d (%s), attempt %d of %d", run.setup.name, run.seed, rc,
                        rec.reason or "no summary", attempt + 1, max_retries + 1)

    def watch():
        while not done.is_set():
            if StopFlag.requested():
                stopping.set()
                with lock:
                    for p in procs.values():
                        p.send_signal(signal.SIGTERM)
                return
            time.sleep(0.2)

    done = threading.Event()
    w = threading.Thread(target=watch, daemon=True)
    w.start()
    try:
        with ThreadPoolExecutor(max_workers=workers) as ex:
            list(ex.map(one, enumerate(todo)))
    finally:
        done.set()
    if stopping.is_set():
        raise Preempted("pinn-select stopped by a signal; runs checkpointed, re-run to resume")


ARRAY_TEMPLATE = """#!/bin/bash
#SBATCH --job-name={job_name}
#SBATCH --array=0-{last}{throttle}
#SBATCH --ntasks=1
#SBATCH --cpus-per-task={cpus}
#SBATCH --mem={mem}
#SBATCH --time={time}
#SBATCH --output={logdir}/%A_%a.out
#SBATCH --signal=B:TERM@60
#SBATCH --requeue
{extra}
# One PINN training per array task; the task's command is line TASK+1 of tasks.txt.
export OMP_NUM_THREADS={threads}
cmd=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {tasks})
eval "$cmd" &
child=$!
trap 'kill -TERM $child; wait $child; rc=$?; [ $rc = 75 ] && scontrol requeue $SLURM_JOB_ID; exit $rc' TERM
wait $child
"""


def render_array(out: Path, cmds: list[list[str]], cfg, job_name: str) -> Path:
    """Write tasks.txt and the array script; returns the script path."""
    sel = out / "slurm"
    (sel / "logs").mkdir(parents=True, exist_ok=True)
    tasks = sel / "tasks.txt"
    atomic_write_bytes(tasks, ("\n".join(shlex.join(c) for c in cmds) + "\n").encode())
    extra = "\n".join(f"#SBATCH --{k}={v}" for k, v in (("partition", cfg.partition), ("account", cfg.account),
                                                         ("qos", cfg.qos)) if v)
    text = ARRAY_TEMPLATE.format(job_name=job_name, last=len(cmds) - 1,
                                 throttle=f"%{cfg.parallel}" if cfg.parallel else "",
                                 cpus=cfg.cpus_per_task, mem=cfg.mem, time=cfg.time, logdir=sel / "logs",
                                 extra=extra, threads=cfg.threads_per_run, tasks=shlex.quote(str(tasks)))
    script = sel / "array.sbatch"
    atomic_write_bytes(script, text.encode())
    return script


def run_slurm(subject: Path, out: Path, runs: list[Run], cfg, job_name: str) -> str | None:
    """Submit the pending runs as one job array and wait for it; returns the job id."""
    if shutil.which("sbatch") is None:
        raise MissingDependency("--scheduler slurm: sbatch is not on PATH (no SLURM here)")
    todo = [r for r in runs if record(out, r).status not in ("complete", "early_stopped")]
    if not todo:
        return None
    cmds = [run_command(subject, out, r) for r in todo]
    script = render_array(out, cmds, cfg, job_name)
    atomic_write_bytes(out / "slurm" / "tasks.json", json.dumps([r.rel_dir for r in todo]).encode())
    res = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if res.returncode != 0:
        why = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"
        raise MissingDependency(f"sbatch failed: {why}")
    job = res.stdout.strip().split(";")[0]
    log.info("submitted job array %s (%d tasks)", job, len(cmds))
    while True:
        q = subprocess.run(["squeue", "-h", "-j", job, "-o", "%i %T"], capture_output=True, text=True)
        if q.returncode != 0 or not q.stdout.strip():
            break
        if StopFlag.requested():
            subprocess.run(["scancel", "--signal=TERM", job], capture_output=True)
            raise Preempted(f"pinn-select stopped by a signal; job array {job} signalled")
        time.sleep(cfg.poll_s)
    return job
