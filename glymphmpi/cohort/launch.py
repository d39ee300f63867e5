"""Cohort launchers: the same job logic on a dask ``LocalCluster`` or on SLURM.

Both walk the same plan: every (subject, method) run that is not complete and has attempts
left is started; a run that stops after a checkpoint (exit 75: SIGTERM, time limit,
preemption) is resumed, at most ``max_requeues`` times per launch; one run failing never
stops the others; when a subject's runs have ended its report is written (a dask task that
depends on them); at the end the cohort report is written.

* :class:`LocalLauncher` - a dask ``LocalCluster`` whose tasks start ``mpirun``/``torchrun``
  (or plain) processes; dask resources keep the ranks within the machine's cores.
* :class:`SlurmLauncher` - every method run is an sbatch job rendered from ``jobs/`` (one
  array per method where several subjects share its resources); a requeued job keeps its id
  and is released at once; a job that ended with a checkpoint is resubmitted; the
  per-subject reports run on dask-jobqueue ``SLURMCluster`` workers (single-task jobs).
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from glymphmpi.errors import EXIT_PREEMPTED
from glymphmpi.io import atomic_write_bytes
from glymphmpi.store import StopFlag, read_summary

from .manifest import Cohort
from .methods import MethodSpec
from .state import CohortState, run_dir, task_key, task_status

log = logging.getLogger(__name__)


def cohort_dir(out: Path) -> Path:
    return Path(out) / "cohort"


def write_settings(cohort: Cohort, out: Path) -> Path | None:
    """The cohort's settings as ``OUT/cohort/config.toml`` (None when there are none)."""
    if not cohort.settings:
        return None
    p = cohort_dir(out) / "config.toml"
    text = "# settings of cohort " + str(cohort.path) + "\n" + cohort.settings_toml()
    if not p.exists() or p.read_text() != text:
        atomic_write_bytes(p, text.encode())
    return p


def plan(cohort: Cohort, out: Path, state: CohortState) -> tuple[list, list, list]:
    """Split the runs into (to run, complete, given up)."""
    todo, done, gave_up = [], [], []
    for s, m in cohort.tasks():
        rec = state.task(s.id, m.name)
        st = task_status(out, s.id, m.name, {k: v for k, v in rec.items() if k != "state"})
        if st["state"] == "complete":
            done.append((s, m))
        elif rec.get("failures", 0) >= cohort.options.max_attempts:
            gave_up.append((s, m))
        else:
            todo.append((s, m))
    return todo, done, gave_up


def failure_reason(rd: Path, rc: int | None) -> str:
    summ = read_summary(rd) or {}
    if summ.get("error"):
        return str(summ["error"]).splitlines()[0]
    if rc is not None and rc > 128:
        return f"killed by signal {rc - 128}"
    return f"exit code {rc}"


class BaseLauncher:
    """Shared bookkeeping of both launchers."""

    scheduler = "?"

    def __init__(self, cohort: Cohort, out: Path, quiet: bool = False):
        self.cohort = cohort
        self.out = Path(out).resolve()
        self.quiet = quiet
        self.opts = cohort.options
        self.state = CohortState(self.out)
        self.lock = threading.Lock()
        self.config_path: Path | None = None
        self.t0 = time.time()

    def say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)
        log.debug(msg)

    def prepare(self) -> tuple[list, list, list]:
        for d in (cohort_dir(self.out) / "logs", cohort_dir(self.out) / "jobs"):
            d.mkdir(parents=True, exist_ok=True)
        self.config_path = write_settings(self.cohort, self.out)
        return plan(self.cohort, self.out, self.state)

    def save(self) -> None:
        with self.lock:
            self.state.save()

    def record_end(self, sid: str, m: MethodSpec, rc: int | None, reason: str | None = None) -> str:
        """Record how a run ended; returns its state (complete / resumable / failed)."""
        rd = run_dir(self.out, sid, m.name)
        summ = read_summary(rd) or {}
        with self.lock:
            rec = self.state.task(sid, m.name)
            rec["exit_code"] = rc
            rec["ended"] = time.time()
            if summ.get("status") == "complete":
                rec.update(state="complete", reason="")
            elif reason is None and (rc == EXIT_PREEMPTED or summ.get("status") == "preempted"):
                rec.update(state="resumable", reason=failure_reason(rd, rc))
            else:
                self.fail(rec, reason or failure_reason(rd, rc))
            return rec["state"]

    @staticmethod
    def fail(rec: dict, reason: str) -> None:
        """Mark a run failed; failures (not checkpointed stops) count against max_attempts."""
        rec.update(state="failed", reason=reason)
        rec["failures"] = rec.get("failures", 0) + 1

    def subject_done(self, sid: str) -> bool:
        s = self.cohort.subject(sid)
        return all(self.state.task(sid, m.name).get("state") in ("complete", "failed")
                   for m in self.cohort.methods if self.cohort.runs(s, m.name))

    def finish(self, report_futures=None) -> int:
        from glymphmpi.report.cohort import cohort_report

        paths = cohort_report(self.cohort, self.out)
        self.save()
        counts: dict[str, int] = {}
        for s, m in self.cohort.tasks():
            st = task_status(self.out, s.id, m.name, self.state.task(s.id, m.name))
            counts[st["state"]] = counts.get(st["state"], 0) + 1
        self.say(f"cohort: {', '.join(f'{v} {k}' for k, v in sorted(counts.items()))} "
                 f"in {time.time() - self.t0:.1f} s")
        self.say(f"report: {paths['html']}")
        return 0 if counts.get("complete", 0) == len(self.cohort.tasks()) else 1

    def begin(self, scheduler: str, where: str) -> tuple[list | None, int | None]:
        """Prepare a launch: (runs to do, None), or (None, exit code) when there is nothing to do.

        Announces the launch and records it in the state (``scheduler``: "local" or "slurm").
        """
        todo, done, gave_up = self.prepare()
        rc = self.nothing_to_do(done, gave_up)
        if rc is not None:
            return None, rc
        self.say(f"cohort {self.cohort.path.name}: {len(self.cohort.subjects)} subjects x "
                 f"{len(self.cohort.methods)} methods; {len(done)} complete, {len(todo)} to run ({where})")
        self.state.data["launches"].append({"scheduler": scheduler, "time": time.time(), "pid": os.getpid()})
        return todo, None

    def nothing_to_do(self, done, gave_up) -> int | None:
        if gave_up and not self.quiet:
            for s, m in gave_up:
                rec = self.state.task(s.id, m.name)
                self.say(f"{s.id}/{m.name}: not retried after {rec.get('failures')} failed attempts "
                         f"(cohort.max_attempts = {self.opts.max_attempts}): {rec.get('reason', '')}")
        if len(done) == len(self.cohort.tasks()):
            from glymphmpi.report.cohort import report_paths

            rep = report_paths(self.out)
            if not rep["html"].exists():
                from glymphmpi.report.cohort import cohort_report

                cohort_report(self.cohort, self.out)
            self.say(f"nothing to do: all {len(done)} runs of {len(self.cohort.subjects)} subjects "
                     f"are complete in {self.out}")
            self.say(f"report: {rep['html']}")
            return 0
        if len(done) + len(gave_up) == len(self.cohort.tasks()):
            self.say(f"nothing to run: {len(done)} runs complete, {len(gave_up)} failed with no attempts "
                     "left (--retry-failed or a larger cohort.max_attempts retries them)")
            return 1
        return None


# =================================================================== local
#: launchers by token: dask graphs are serialised even for in-process workers, so tasks
#: name their launcher instead of carrying it (it holds locks and process handles)
_LOCAL: dict[str, LocalLauncher] = {}


def _local_task(token: str, sid: str, toml: Path, m: MethodSpec) -> dict:
    return _LOCAL[token].run_task(sid, toml, m)


class LocalLauncher(BaseLauncher):
    """Runs on this machine: dask ``LocalCluster`` tasks that start the method processes."""

    scheduler = "local"

    def __init__(self, cohort: Cohort, out: Path, quiet: bool = False):
        super().__init__(cohort, out, quiet)
        self.cores = self.opts.local_cores or os.cpu_count() or 1
        self.children: dict[str, subprocess.Popen] = {}
        self.stopping = threading.Event()

    def command(self, sid_toml: Path, m: MethodSpec, rd: Path) -> list[str]:
        """The process to start: the method's CLI under mpirun/torchrun when it has ranks."""
        n = min(self.cohort.resources[m.name].processes(m), self.cores * 4)
        argv = m.argv(sid_toml, rd, self.config_path)
        if n <= 1:
            return argv
        if m.kind == "mpi":
            return ["mpirun", "-n", str(n), "--oversubscribe", *argv]
        if m.kind == "torch":
            cli = argv[: len(m.cli())]
            rest = argv[len(m.cli()):]
            if cli[:3] == [sys.executable, "-m", "glymphmpi"] or m.command is None:
                script = ["-m", "glymphmpi"]
            elif len(cli) >= 2 and Path(cli[0]).name.startswith("python"):
                script = cli[1:]
            else:
                script = ["--no-python", *cli]
            return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={n}", *script, *rest]
        return argv

    def run_task(self, sid: str, toml: Path, m: MethodSpec) -> dict:
        """One run until complete, failed, or out of resumptions (executes on a dask worker)."""
        rd = run_dir(self.out, sid, m.name)
        logf = cohort_dir(self.out) / "logs" / f"{sid}.{m.name}.log"
        env = dict(os.environ)
        for k in list(env):  # the child must not inherit an MPI rank from us
            if k.startswith(("OMPI_COMM_WORLD", "PMIX_", "OMPI_MCA_ess", "OMPI_MCA_orte")):
                env.pop(k)
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                   OMPI_MCA_rmaps_base_oversubscribe="1", OMPI_MCA_mpi_yield_when_idle="1",
                   OMP_NUM_THREADS=str(
                       self.cohort.resources[m.name].cpus_per_task), MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
        key = task_key(sid, m.name)
        if self.stopping.is_set():  # the launcher is stopping: do not start new runs
            return {"subject": sid, "method": m.name, "state": "pending", "exit_code": None}
        with self.lock:
            rec = self.state.task(sid, m.name)
            rec.update(attempts=rec.get("attempts", 0) + 1, requeues=0, scheduler="local",
                       state="running", pid=os.getpid(), job=None, submitted=time.time())
        self.save()
        while True:
            cmd = self.command(toml, m, rd)
            t_start = time.time()
            with open(logf, "a") as fh:
                fh.write(f"[glymph] start {t_start:.3f}: {' '.join(cmd)}\n")
                fh.flush()
                proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
                with self.lock:
                    self.children[key] = proc
                    rec["started"] = t_start
                if self.stopping.is_set():
                    self._signal(proc)
                rc = proc.wait()
                with self.lock:
                    self.children.pop(key, None)
                fh.write(f"[glymph] end {time.time():.3f} rc {rc}\n")
            if self.stopping.is_set() and rc != 0 and rc != EXIT_PREEMPTED:
                # stopped by us before it could checkpoint: not a failure of the run
                with self.lock:
                    rec.update(state="stopped", reason=f"stopped by the launcher (exit {rc})", exit_code=rc)
                break
            state = self.record_end(sid, m, rc)
            if state == "resumable" and not self.stopping.is_set():
                with self.lock:
                    rec["requeues"] = rec.get("requeues", 0) + 1
                    again = rec["requeues"] <= self.opts.max_requeues
                    if not again:
                        self.fail(rec, f"still stopping after {self.opts.max_requeues} resumptions: "
                                  f"{rec.get('reason', '')}")
                if again:
                    self.say(f"{key}: stopped after a checkpoint (exit {rc}); resuming")
                    continue
            break
        self.save()
        self.say(f"{key}: {rec['state']}" + (f" ({rec.get('reason')})" if rec["state"] != "complete" else ""))
        return {"subject": sid, "method": m.name, "state": rec["state"], "exit_code": rc}

    @staticmethod
    def _signal(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass

    def run(self) -> int:
        todo, rc = self.begin("local", f"local, {self.cores} cores")
        if todo is None:
            return rc
        from dask.distributed import Client, LocalCluster, wait

        from glymphmpi.report.cohort import subject_report

        self.save()
        token = f"{os.getpid()}-{id(self)}"
        _LOCAL[token] = self
        cluster = LocalCluster(n_workers=1, threads_per_worker=max(self.cores, len(todo) + 1), processes=False,
                               resources={"cores": self.cores}, dashboard_address=None)
        client = Client(cluster)
        stopped = False
        try:
            futs = []
            todo_by = {}
            for s, m in todo:
                todo_by.setdefault(s.id, []).append((s, m))
            for s in self.cohort.subjects:
                runs = []
                for _, m in todo_by.get(s.id, []):
                    n = min(self.cohort.resources[m.name].processes(m), self.cores)
                    runs.append(client.submit(_local_task, token, s.id, s.toml, m, key=f"run-{s.id}-{m.name}",
                                              resources={"cores": n}, pure=False))
                if runs or not (self.out / s.id / "report" / "summary.json").exists():
                    futs.append(client.submit(subject_report, self.cohort, self.out, s.id, *runs,
                                              key=f"report-{s.id}", pure=False))
                futs.extend(runs)
            pending = set(futs)
            while pending:
                try:
                    res = wait(list(pending), timeout=self.opts.poll_s, return_when="FIRST_COMPLETED")
                    pending = set(res.not_done)
                except TimeoutError:  # nothing finished within poll_s
                    pass
                if StopFlag.requested() and not self.stopping.is_set():
                    self.say("stop requested: stopping the runs (they checkpoint), then exiting 75")
                    self.stopping.set()
                    with self.lock:
                        procs = list(self.children.values())
                    for p in procs:
                        self._signal(p)
            for f in futs:
                if f.status == "error":  # an internal failure of the launcher's own task
                    raise f.exception()
            stopped = self.stopping.is_set()
        except KeyboardInterrupt:
            self.stopping.set()
            with self.lock:
                procs = list(self.children.values())
            for p in procs:
                self._signal(p)
            for p in procs:
                p.wait()
            stopped = True
        finally:
            client.close()
            cluster.close()
            _LOCAL.pop(token, None)
            self.save()
        if stopped:
            self.say(f"stopped; run `glymph cohort run {self.cohort.path} --out {self.out}` again to resume")
            return EXIT_PREEMPTED
        return self.finish()


# =================================================================== SLURM
class SlurmLauncher(BaseLauncher):
    """Submits every run as an sbatch job and watches them; subject reports on dask-jobqueue."""

    scheduler = "slurm"

    def __init__(self, cohort: Cohort, out: Path, quiet: bool = False, cluster_factory=None,
                 site: bool = False):
        super().__init__(cohort, out, quiet)
        self.cluster_factory = cluster_factory
        self.site = site
        self.cluster = None
        self.client = None
        self.launch_no = 0

    # ---------------------------------------------------------------- rendering
    def job_env(self, m: MethodSpec) -> dict[str, str]:
        res = self.cohort.resources[m.name]
        env = {"GLYMPH": shlex.join(m.cli()), "GLYMPH_MPI": self.opts.mpi_launcher,
               "GLYMPH_SRUN_MPI": self.opts.srun_mpi, "GLYMPH_MAX_REQUEUE": str(self.opts.max_requeues),
               "GLYMPH_GPUS": str(res.gpus)}
        args = []
        if self.config_path is not None:
            args += ["--config", str(self.config_path)]
        args += list(m.args)
        env["GLYMPH_ARGS"] = shlex.join(args)
        if res.image:
            env["GLYMPH_IMAGE"] = res.image
            env["GLYMPH_BIND"] = res.bind or ",".join(sorted({str(self.out), str(self.cohort.path.parent)}))
        return env

    def render_job(self, m: MethodSpec, subjects: list, tag: str) -> tuple[Path, str | None]:
        """Write the job script (and for arrays the task list) of ``m`` on ``subjects``.

        Returns:
            (script path, array spec or None).
        """
        from .sbatch import directives, render, template_path

        jobs = cohort_dir(self.out) / "jobs"
        logs = cohort_dir(self.out) / "logs"
        env = self.job_env(m)
        name = f"{self.opts.job_prefix}-{m.name}"
        if len(subjects) > 1:
            tasks = jobs / f"{m.name}-{tag}.tsv"
            atomic_write_bytes(tasks, "".join(f"{s.toml}\t{run_dir(self.out, s.id, m.name)}\n"
                                              for s in subjects).encode())
            env["GLYMPH_TASKS"] = str(tasks)
            array = f"0-{len(subjects) - 1}"
            output = str(logs / f"{m.name}.%A_%a.log")
        else:
            s = subjects[0]
            env.update(SUBJECT=str(s.toml), OUTDIR=str(run_dir(self.out, s.id, m.name)))
            name += f"-{s.id}"
            array = None
            output = str(logs / f"{s.id}.{m.name}.%j.log")
        lines = directives(self.cohort.resources[m.name], m, name, array=array, output=output)
        overrides = None
        if m.template is None and m.name not in ("romt", "fem", "pinn"):
            overrides = {"METHOD": m.name, "KIND": m.kind}
        text = render(template_path(m.template_name), lines, env, overrides)
        script = jobs / f"{m.name}-{tag}.sbatch"
        atomic_write_bytes(script, text.encode())
        return script, array

    def submit(self, m: MethodSpec, subjects: list) -> None:
        from .sbatch import submit

        self.launch_no += 1
        tag = f"{time.strftime('%Y%m%d-%H%M%S')}-{self.launch_no}"
        if len(subjects) > 1 and not self.opts.array:
            for s in subjects:
                self.submit(m, [s])
            return
        script, array = self.render_job(m, subjects, tag if len(subjects) > 1 else f"{subjects[0].id}-{tag}")
        t = time.time()
        jid = submit(script)
        ids = [f"{jid}_{i}" for i in range(len(subjects))] if array else [jid]
        with self.lock:
            for s, j in zip(subjects, ids):
                rec = self.state.task(s.id, m.name)
                rec.update(scheduler="slurm", job=j, state="submitted", submitted=t, reason="",
                           script=str(script))
                rec.setdefault("jobs", []).append(j)
        self.save()
        self.say(f"{m.name}: submitted {'array ' + jid + ' [' + array + ']' if array else 'job ' + jid}"
                 f" for {', '.join(s.id for s in subjects)}")

    # ---------------------------------------------------------------- dask-jobqueue
    def dask_client(self):
        if self.client is None:
            from dask.distributed import Client

            if self.cluster_factory is not None:
                self.cluster = self.cluster_factory()
            else:
                from dask_jobqueue import SLURMCluster

                kw = {"log_directory": str(cohort_dir(self.out) / "dask")}
                if not self.site:  # a site profile (--site) configures the workers itself
                    kw.update(cores=self.opts.dask_cores, processes=1, memory=self.opts.dask_memory,
                              walltime=self.opts.dask_walltime, job_name=f"{self.opts.job_prefix}-dask",
                              python=sys.executable)
                    part = self.cohort.resources[self.cohort.methods[0].name].partition
                    if part:
                        kw["queue"] = part
                if self.opts.interface:
                    kw.update(interface=self.opts.interface,
                              scheduler_options={"interface": self.opts.interface})
                self.cluster = SLURMCluster(**kw)
                self.cluster.adapt(minimum=0, maximum=self.opts.dask_max_jobs)
            self.client = Client(self.cluster)
        return self.client

    def close_dask(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()
        self.client = self.cluster = None

    # ---------------------------------------------------------------- loop
    def poll(self, active: dict) -> None:
        """Update the runs in ``active`` (key -> (subject, method)) from the controller."""
        from .sbatch import ACTIVE, JobTable, exit_code, release, submit  # noqa: F401

        jobs = JobTable.query()
        for key, (s, m) in list(active.items()):
            rec = self.state.task(s.id, m.name)
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
            reason = None
            if st == "CANCELLED":
                reason = f"SLURM job {rec['job']} cancelled"
            state = self.record_end(s.id, m, rc, reason)
            if state != "complete" and st in ("TIMEOUT", "PREEMPTED", "NODE_FAIL") and any(
                    run_dir(self.out, s.id, m.name).glob("checkpoint*.h5")):
                rec["state"] = state = "resumable"
            if state == "resumable":
                rec["requeues"] = rec.get("requeues", 0) + 1
                if rec["requeues"] <= self.opts.max_requeues:
                    self.say(f"{key}: job {rec['job']} ended after a checkpoint ({st}, exit {rc}); resubmitting")
                    self.submit(m, [s])
                    continue
                self.fail(rec, f"still stopping after {self.opts.max_requeues} resumptions: "
                          f"{rec.get('reason', '')}")
            self.say(f"{key}: {rec['state']}" + (f" ({rec.get('reason')})" if rec["state"] != "complete" else "")
                     + f" [job {rec['job']} {st}]")
            active.pop(key)
        self.save()

    def run(self) -> int:
        from .sbatch import ACTIVE, JobTable

        todo, rc = self.begin("slurm", "SLURM")
        if todo is None:
            return rc
        from glymphmpi.report.cohort import subject_report

        # adopt runs that a previous launcher submitted and that are still queued or running
        jobs = JobTable.query()
        active: dict = {}
        fresh: dict[str, list] = {}
        for s, m in todo:
            rec = self.state.task(s.id, m.name)
            info = jobs.get(rec["job"]) if rec.get("scheduler") == "slurm" and rec.get("job") else None
            if info is not None and info.get("JobState") in ACTIVE:
                self.say(f"{s.id}/{m.name}: job {rec['job']} still {info['JobState'].lower()}: watching it")
            else:
                rec["attempts"] = rec.get("attempts", 0) + 1
                rec["requeues"] = 0
                rec.pop("seen_restarts", None)
                fresh.setdefault(m.name, []).append(s)
            active[task_key(s.id, m.name)] = (s, m)
        for m in self.cohort.methods:
            if m.name in fresh:
                self.submit(m, fresh[m.name])
        reports: dict = {}
        todo_sids = {s.id for s, _ in todo}
        for s in self.cohort.subjects:  # subjects with nothing to run but no report yet
            if s.id not in todo_sids and not (self.out / s.id / "report" / "summary.json").exists():
                reports[s.id] = self.dask_client().submit(subject_report, self.cohort, self.out, s.id,
                                                          key=f"report-{s.id}", pure=False)
        stopped = False
        try:
            while active or any(not f.done() for f in reports.values()):
                if StopFlag.requested():
                    stopped = True
                    break
                if active:
                    self.poll(active)
                for s in self.cohort.subjects:
                    if s.id in todo_sids and s.id not in reports and self.subject_done(s.id):
                        reports[s.id] = self.dask_client().submit(subject_report, self.cohort, self.out, s.id,
                                                                  key=f"report-{s.id}", pure=False)
                if active or any(not f.done() for f in reports.values()):
                    time.sleep(self.opts.poll_s)
            for sid, f in reports.items():
                if f.status == "error":
                    log.warning("report of %s failed: %s", sid, f.exception())
        except KeyboardInterrupt:
            stopped = True
        finally:
            self.save()
            self.close_dask()
        if stopped:
            self.say("launcher stopped; submitted jobs keep running. Run it again to watch them and resume.")
            return EXIT_PREEMPTED
        return self.finish()
