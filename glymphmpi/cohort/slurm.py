"""The SLURM launcher: every run is an sbatch job rendered from ``jobs/``, watched until it ends.

Runs that share a method and its resources go into one job array. A job that stops after a
checkpoint (exit 75: ``--signal=B:USR1@120`` before the time limit, forwarded by the job script to
srun or mpirun; preemption) requeues itself
(``scontrol requeue`` in the template, keeping its id; the launcher releases it at once); one
that ended anyway with a checkpoint (time limit, node failure) is resubmitted; a failed one is
resubmitted only within ``retries``. Row reports (``group_done``) run on dask-jobqueue
``SLURMCluster`` workers (single-task jobs).
"""

from __future__ import annotations

import logging
import shlex
import sys
import time

from glymphmpi.errors import EXIT_PREEMPTED
from glymphmpi.io import atomic_write_bytes
from glymphmpi.store import StopFlag

from .jobscript import directives, log_pattern, render, sbatch_quote, template_path, write_task_files
from .launcher import Launcher
from .sbatch import ACTIVE, JobTable, exit_code, release, submit
from .tasks import LaunchSpec, Task

log = logging.getLogger(__name__)


class JobRenderer:
    """Writes the job script (and for arrays the task files) of a group of tasks."""

    def __init__(self, spec: LaunchSpec):
        self.spec = spec
        self.opts = spec.options

    def env(self, tasks: list[Task]) -> dict[str, str]:
        m, res = tasks[0].method, tasks[0].resources
        env = {"GLYMPH": shlex.join(m.cli()), "GLYMPH_MPI": self.opts.mpi_launcher,
               "GLYMPH_SRUN_MPI": self.opts.srun_mpi, "GLYMPH_MAX_REQUEUE": str(self.opts.max_requeues),
               "GLYMPH_GPUS": str(res.gpus)}
        args = []
        if self.spec.config_path is not None:
            args += ["--config", str(self.spec.config_path)]
        args += list(m.args)
        env["GLYMPH_ARGS"] = shlex.join(args)
        if res.image:
            env["GLYMPH_IMAGE"] = res.image
            env["GLYMPH_BIND"] = res.bind or ",".join(sorted({str(self.spec.workdir.parent)}
                                                             | {str(t.subject.parent) for t in tasks}))
        return env

    def render(self, tasks: list[Task], tag: str) -> tuple:
        """Returns (script path, array spec or None)."""
        jobs = self.spec.workdir / "jobs"
        logs = self.spec.workdir / "logs"
        first = tasks[0]
        m = first.method
        env = self.env(tasks)
        name = f"{self.opts.job_prefix}-{m.name}"
        if len(tasks) > 1 or first.args:
            folder = write_task_files(jobs / f"{m.name}-{tag}.tasks",
                                      [[str(t.subject), str(t.outdir), *t.args] for t in tasks])
            env["GLYMPH_TASKS"] = str(folder)
        if len(tasks) > 1:
            array = f"0-{len(tasks) - 1}" + (f"%{self.spec.throttle}" if self.spec.throttle else "")
            output = log_pattern(logs, f"{m.name}.%A_%a.log")
        else:
            if first.args:
                env["GLYMPH_TASK_INDEX"] = "0"
            else:
                env.update(SUBJECT=str(first.subject), OUTDIR=str(first.outdir))
            name += f"-{first.row}" + (f"-{first.col}" if first.col != m.name else "")
            array = None
            output = log_pattern(logs, f"{first.row}.{first.col}.%j.log")
        lines = directives(first.resources, m, name, array=array, output=output)
        text = render(template_path(m.template_name), lines, env, {"METHOD": m.name, "KIND": m.kind})
        script = jobs / f"{m.name}-{tag}.sbatch"
        atomic_write_bytes(script, text.encode())
        return script, array


class ReportWorkers:
    """dask-jobqueue workers (SLURM jobs) for the ``group_done`` hooks, started on first use."""

    def __init__(self, spec: LaunchSpec, site: bool, cluster_factory=None, partition: str = ""):
        self.spec = spec
        self.site = site
        self.cluster_factory = cluster_factory
        self.partition = partition
        self.cluster = None
        self.client = None

    def submit(self, fn, *args, key: str):
        if self.client is None:
            from dask.distributed import Client

            opts = self.spec.options
            if self.cluster_factory is not None:
                self.cluster = self.cluster_factory()
            else:
                import dask.config
                from dask_jobqueue import SLURMCluster

                # the log paths are data: quoted for sbatch here (dask-jobqueue would write them unquoted)
                logs = log_pattern(self.spec.workdir / "dask", f"{opts.job_prefix}-dask-%j")
                (self.spec.workdir / "dask").mkdir(parents=True, exist_ok=True)
                kw = {"job_extra_directives": [
                    *(dask.config.get("jobqueue.slurm.job-extra-directives", None) or []),
                    f"--error={sbatch_quote(logs + '.err')}", f"--output={sbatch_quote(logs + '.out')}"]}
                if not self.site:  # a site profile (--site) configures the workers itself
                    kw.update(cores=opts.dask_cores, processes=1, memory=opts.dask_memory,
                              walltime=opts.dask_walltime, job_name=f"{opts.job_prefix}-dask",
                              python=sys.executable)
                    if self.partition:
                        kw["queue"] = self.partition
                if opts.interface:
                    kw.update(interface=opts.interface, scheduler_options={"interface": opts.interface})
                self.cluster = SLURMCluster(**kw)
                self.cluster.adapt(minimum=0, maximum=opts.dask_max_jobs)
            self.client = Client(self.cluster)
        return self.client.submit(fn, *args, key=key, pure=False)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()
        self.client = self.cluster = None


class SlurmLauncher(Launcher):
    """Submits every run as an sbatch job and watches them; row reports on dask-jobqueue."""

    scheduler = "slurm"

    def __init__(self, tasks: list[Task], spec: LaunchSpec, quiet: bool = False, cluster_factory=None,
                 site: bool = False):
        super().__init__(tasks, spec, quiet)
        self.renderer = JobRenderer(spec)
        part = self.tasks[0].resources.partition if self.tasks else ""
        self.workers = ReportWorkers(spec, site, cluster_factory, part)
        self.launch_no = 0

    def render_job(self, tasks: list[Task], tag: str):
        return self.renderer.render(tasks, tag)

    def submit(self, tasks: list[Task]) -> None:
        """Submit ``tasks`` (one method, same resources): one array, or one job each."""
        self.launch_no += 1
        tag = f"{time.strftime('%Y%m%d-%H%M%S')}-{self.launch_no}"
        if len(tasks) > 1 and not self.opts.array:
            for t in tasks:
                self.submit([t])
            return
        if len(tasks) == 1:
            tag = f"{tasks[0].row}-{tasks[0].col}-{tag}" if tasks[0].col != tasks[0].method.name else \
                f"{tasks[0].row}-{tag}"
        script, array = self.render_job(tasks, tag)
        t = time.time()
        jid = submit(script)
        ids = [f"{jid}_{i}" for i in range(len(tasks))] if array else [jid]
        for task, j in zip(tasks, ids):
            rec = self.ledger.update(task.key, scheduler="slurm", job=j, state="submitted", submitted=t, reason="",
                                     script=str(script))
            rec.setdefault("jobs", []).append(j)
        self.ledger.save()
        self.say(f"{tasks[0].method.name}: submitted {'array ' + jid + ' [' + array + ']' if array else 'job ' + jid}"
                 f" for {', '.join(x.row if x.col == x.method.name else x.key for x in tasks)}")

    def poll(self, active: dict[str, Task]) -> None:
        """Update the runs in ``active`` (key -> task) from the controller."""
        jobs = JobTable.query()
        for key, task in list(active.items()):
            rec = self.ledger.get(key)
            info = jobs.get(rec["job"])
            st = info.get("JobState") if info else None
            if st in ACTIVE:
                if st == "RUNNING" and rec.get("state") != "running":
                    rec["state"] = "running"
                    rec.setdefault("started", time.time())
                restarts = int(info.get("Restarts", "0") or 0)
                if restarts > rec.get("seen_restarts", 0):
                    rec["seen_restarts"] = restarts
                    rec["requeues"] = rec.get("requeues", 0) + 1
                    self.say(f"{key}: job {rec['job']} requeued (restart {restarts})")
                if (st == "PENDING" and info.get("Reason") == "BeginTime" and restarts
                        and self.opts.release_requeued and rec.get("released") != restarts):
                    try:
                        release(rec["job"])
                        rec["released"] = restarts
                    except Exception as exc:  # released by someone else, or just started
                        log.debug("release %s: %s", rec["job"], exc)
                continue
            rc = exit_code(info) if info else None
            reason = f"SLURM job {rec['job']} cancelled" if st == "CANCELLED" else None
            state = self.ledger.record_end(task, rc, reason)
            if state != "complete" and st in ("TIMEOUT", "PREEMPTED", "NODE_FAIL") and any(
                    task.outdir.glob("checkpoint*.h5")):
                rec["state"] = state = "resumable"
            if state == "resumable":
                if self.ledger.count_requeue(key, self.opts.max_requeues):
                    self.say(f"{key}: job {rec['job']} ended after a checkpoint ({st}, exit {rc}); resubmitting")
                    self.submit([task])
                    continue
            elif state == "failed" and reason is None and self.ledger.retry_failed(key, self.spec.retries):
                self.say(f"{key}: job {rec['job']} failed ({rec.get('reason')}); submitting it again")
                rec["attempts"] = rec.get("attempts", 0) + 1
                self.submit([task])
                continue
            self.say(f"{key}: {rec['state']}" + (f" ({rec.get('reason')})" if rec["state"] != "complete" else "")
                     + f" [job {rec['job']} {st}]")
            active.pop(key)
        self.ledger.save()

    def run(self) -> int:
        todo, rc = self.begin("SLURM")
        if todo is None:
            return rc
        hooks = self.spec.hooks
        # adopt runs that a previous launcher submitted and that are still queued or running
        jobs = JobTable.query()
        active: dict[str, Task] = {}
        fresh: dict[tuple, list[Task]] = {}
        for t in todo:
            rec = self.ledger.get(t.key)
            info = jobs.get(rec["job"]) if rec.get("scheduler") == "slurm" and rec.get("job") else None
            if info is not None and info.get("JobState") in ACTIVE:
                self.say(f"{t.key}: job {rec['job']} still {info['JobState'].lower()}: watching it")
            else:
                rec["attempts"] = rec.get("attempts", 0) + 1
                rec["requeues"] = 0
                rec.pop("seen_restarts", None)
                fresh.setdefault((t.method.name, t.resources), []).append(t)
            active[t.key] = t
        for group in fresh.values():
            self.submit(group)
        reports: dict = {}
        todo_rows = {t.row for t in todo}
        for row in self.rows:  # rows with nothing to run but no report yet
            if row not in todo_rows and hooks.wants_group(row, False):
                reports[row] = self.workers.submit(hooks.group_done, row, key=f"report-{row}")
        stopped = False
        runs_ended = None
        try:
            while active or any(not f.done() for f in reports.values()):
                if not active and runs_ended is None:
                    runs_ended = time.time()
                if runs_ended is not None and time.time() - runs_ended > self.opts.report_wait_s:
                    late = [row for row, f in reports.items() if not f.done()]
                    self.say(f"report workers did not finish in {self.opts.report_wait_s:g} s "
                             f"(cohort.report_wait_s); writing the reports of {', '.join(late)} here")
                    for row in late:
                        reports[row].cancel()
                        hooks.group_done(row)
                    break
                if StopFlag.requested():
                    stopped = True
                    break
                if active:
                    self.poll(active)
                for row in self.rows:
                    if row in todo_rows and row not in reports and self.row_done(row) and \
                            hooks.wants_group(row, True):
                        reports[row] = self.workers.submit(hooks.group_done, row, key=f"report-{row}")
                if active or any(not f.done() for f in reports.values()):
                    time.sleep(self.opts.poll_s)
            for row, f in reports.items():
                if f.status == "error":
                    log.warning("report of %s failed: %s", row, f.exception())
        except KeyboardInterrupt:
            stopped = True
        finally:
            self.ledger.save()
            self.workers.close()
        if stopped:
            self.say("launcher stopped; submitted jobs keep running. Run it again to watch them and resume.")
            return EXIT_PREEMPTED
        return self.finish()
