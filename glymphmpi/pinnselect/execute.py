"""Run the grid as tasks of the cohort backend; read each run's record.

Each run is ``glymph pinn SUBJECT --out OUT/runs/<setup>/seed<k> --set ...``, one task of the
cohort's launchers (:mod:`glymphmpi.cohort.local`, :mod:`glymphmpi.cohort.slurm`): the same
resources, job templates (``jobs/pinn.sbatch``), requeue-on-75 protocol and status table as a
cohort. The launch's own records live in ``OUT/grid`` (state.json, logs/, jobs/). A run whose
summary.json says complete is never trained again (resume); a failed one is started again up
to ``max_retries`` times; a preempted one (exit 75, checkpoint written) resumes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from glymphmpi.cohort.config import CohortConfig
from glymphmpi.cohort.methods import get_method
from glymphmpi.cohort.resources import Resources
from glymphmpi.cohort.tasks import LaunchSpec, Task
from glymphmpi.errors import EXIT_PREEMPTED, InputError, Preempted
from glymphmpi.io import atomic_write_bytes
from glymphmpi.pinnselect.grid import Run, run_overrides
from glymphmpi.pinnselect.select import RunRecord
from glymphmpi.store import read_summary

log = logging.getLogger(__name__)


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


def resources(cfg, scheduler: str) -> Resources:
    """One training run's resources: locally ``threads_per_run`` threads; on SLURM the
    ``[pinn_select]`` job settings, checked like a cohort's ``[resources]``."""
    if scheduler == "local":
        res = Resources(ranks=1, cpus_per_task=cfg.threads_per_run)
    else:
        res = Resources(ranks=1, cpus_per_task=cfg.cpus_per_task, mem=cfg.mem, time=cfg.time,
                        partition=cfg.partition, account=cfg.account, qos=cfg.qos)
    try:
        res.validate()
    except ValueError as exc:
        raise InputError(f"pinn_select.{exc}") from None
    return res


def grid_tasks(subject: Path, out: Path, runs: list[Run], res: Resources) -> list[Task]:
    pinn = get_method("pinn")
    tasks = []
    for r in runs:
        args: list[str] = []
        for s in run_overrides(r):
            args += ["--set", s]
        tasks.append(Task(r.setup.name, f"seed{r.seed}", Path(subject), pinn, out / r.rel_dir, res, tuple(args)))
    return tasks


def run_grid(subject: Path, out: Path, runs: list[Run], cfg, scheduler: str, quiet: bool = True) -> str | None:
    """Train the runs that are not complete; returns the SLURM job ids used (None locally).

    Raises:
        Preempted: the launch was stopped by a signal (runs checkpointed; run again to resume).
    """
    out = Path(out).resolve()
    res = resources(cfg, scheduler)
    tasks = grid_tasks(subject, out, runs, res)
    opts = CohortConfig(max_attempts=cfg.max_retries + 1, poll_s=cfg.poll_s,
                        local_cores=cfg.parallel or os.cpu_count() or 1, job_prefix="pinnsel")
    spec = LaunchSpec(workdir=out / "grid", options=opts, title="pinn-select grid", rows_noun="set-ups",
                      rerun=f"glymph pinn-select {subject} --out {out}", retries=cfg.max_retries,
                      throttle=cfg.parallel if scheduler == "slurm" else 0)
    if scheduler == "slurm":
        from glymphmpi.cohort.sbatch import available
        from glymphmpi.cohort.slurm import SlurmLauncher

        if not available():
            raise InputError("pinn_select.scheduler = slurm: no SLURM controller answers (sinfo)")
        la = SlurmLauncher(tasks, spec, quiet=quiet)
    else:
        from glymphmpi.cohort.local import LocalLauncher

        la = LocalLauncher(tasks, spec, quiet=quiet)
    la.ledger.forget_failures()  # every invocation gives failed runs max_retries new attempts
    rc = la.run()
    from glymphmpi.cohort.state import format_status, status_table

    table = format_status(status_table(tasks, spec.workdir, title=spec.title, out=out, row_name="set-up"))
    atomic_write_bytes(spec.workdir / "status.txt", (table + "\n").encode())
    log.info("grid status (%s):\n%s", spec.workdir / "status.txt", table)
    if rc == EXIT_PREEMPTED:
        raise Preempted("pinn-select stopped by a signal; runs checkpointed, re-run to resume")
    if scheduler != "slurm":
        return None
    ids = {j.split("_")[0] for t in tasks for j in la.ledger.get(t.key).get("jobs", [])}
    return ",".join(sorted(ids)) or None
