"""The local launcher: a dask ``LocalCluster`` whose tasks start the runs' processes here.

dask resources (``cores``) keep the ranks of the runs running at once within the machine's
cores (``cohort.local_cores``); each run is ``mpirun``/``torchrun``/plain, in its own session
so that a stop reaches its whole process tree.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from glymphmpi.errors import EXIT_PREEMPTED
from glymphmpi.store import StopFlag

from .environment import child_env
from .launcher import Launcher
from .tasks import LaunchSpec, Task

#: launchers by token: dask graphs are serialised even for in-process workers, so tasks
#: name their launcher instead of carrying it (it holds locks and process handles)
_LOCAL: dict[str, LocalLauncher] = {}


def _local_task(token: str, task: Task) -> dict:
    return _LOCAL[token].runner.run(task)


def local_command(task: Task, config: Path | None, cores: int) -> list[str]:
    """The process of one run: the method's CLI under mpirun/torchrun when it has ranks."""
    m = task.method
    n = min(task.resources.processes(m), cores * 4)
    argv = task.argv(config)
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


class ProcessRunner:
    """Runs one task as a local process until it is complete, failed or out of resumptions."""

    def __init__(self, launcher: LocalLauncher):
        self.la = launcher
        self.children: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def stop_all(self, wait: bool = False) -> None:
        self.stopping.set()
        with self.lock:
            procs = list(self.children.values())
        for p in procs:
            _terminate(p)
        if wait:
            for p in procs:
                p.wait()

    def _once(self, task: Task, logf: Path, env: dict) -> int:
        cmd = local_command(task, self.la.spec.config_path, self.la.cores)
        t_start = time.time()
        with open(logf, "a") as fh:
            fh.write(f"[glymph] start {t_start:.3f}: {' '.join(cmd)}\n")
            fh.flush()
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            with self.lock:
                self.children[task.key] = proc
            self.la.ledger.update(task.key, started=t_start)
            if self.stopping.is_set():
                _terminate(proc)
            rc = proc.wait()
            with self.lock:
                self.children.pop(task.key, None)
            fh.write(f"[glymph] end {time.time():.3f} rc {rc}\n")
        return rc

    def run(self, task: Task) -> dict:
        """One run (executes on a dask worker thread)."""
        la = self.la
        if self.stopping.is_set():  # the launcher is stopping: do not start new runs
            return {"key": task.key, "state": "pending", "exit_code": None}
        logf = la.workdir / "logs" / f"{task.row}.{task.col}.log"
        env = child_env(task.resources.cpus_per_task)
        rec = la.ledger.update(task.key, requeues=0, scheduler="local", state="running", pid=os.getpid(),
                               job=None, submitted=time.time())
        rec["attempts"] = rec.get("attempts", 0) + 1
        la.ledger.save()
        rc = None
        while True:
            rc = self._once(task, logf, env)
            if self.stopping.is_set() and rc not in (0, EXIT_PREEMPTED):
                # stopped by us before it could checkpoint: not a failure of the run
                la.ledger.update(task.key, state="stopped", reason=f"stopped by the launcher (exit {rc})",
                                 exit_code=rc)
                break
            state = la.ledger.record_end(task, rc)
            if state == "resumable" and not self.stopping.is_set():
                if la.ledger.count_requeue(task.key, la.opts.max_requeues):
                    la.say(f"{task.key}: stopped after a checkpoint (exit {rc}); resuming")
                    continue
            elif state == "failed" and not self.stopping.is_set() and la.ledger.retry_failed(
                    task.key, la.spec.retries):
                la.say(f"{task.key}: failed ({rec.get('reason')}); starting it again")
                la.ledger.update(task.key, attempts=rec.get("attempts", 0) + 1)
                continue
            break
        la.ledger.save()
        la.say(f"{task.key}: {rec['state']}" + (f" ({rec.get('reason')})" if rec["state"] != "complete" else ""))
        return {"key": task.key, "state": rec["state"], "exit_code": rc}


def _terminate(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass


class LocalLauncher(Launcher):
    """Runs on this machine: dask ``LocalCluster`` tasks that start the method processes."""

    scheduler = "local"

    def __init__(self, tasks: list[Task], spec: LaunchSpec, quiet: bool = False):
        super().__init__(tasks, spec, quiet)
        self.cores = self.opts.local_cores or os.cpu_count() or 1
        self.runner = ProcessRunner(self)

    def command(self, task: Task) -> list[str]:
        return local_command(task, self.spec.config_path, self.cores)

    def run(self) -> int:
        todo, rc = self.begin(f"local, {self.cores} cores")
        if todo is None:
            return rc
        from dask.distributed import Client, LocalCluster, wait

        self.ledger.save()
        token = f"{os.getpid()}-{id(self)}"
        _LOCAL[token] = self
        cluster = LocalCluster(n_workers=1, threads_per_worker=max(self.cores, len(todo) + 1), processes=False,
                               resources={"cores": self.cores}, dashboard_address=":0")
        client = Client(cluster)
        hooks = self.spec.hooks
        stopped = False
        try:
            futs = []
            for row in self.rows:
                runs = [client.submit(_local_task, token, t, key=f"run-{t.key}",
                                      resources={"cores": min(t.resources.processes(t.method), self.cores)},
                                      pure=False) for t in todo if t.row == row]
                if hooks.wants_group(row, bool(runs)):
                    futs.append(client.submit(hooks.group_done, row, *runs, key=f"report-{row}", pure=False))
                futs.extend(runs)
            pending = set(futs)
            while pending:
                try:
                    res = wait(list(pending), timeout=self.opts.poll_s, return_when="FIRST_COMPLETED")
                    pending = set(res.not_done)
                except TimeoutError:  # nothing finished within poll_s
                    pass
                if StopFlag.requested() and not self.runner.stopping.is_set():
                    self.say("stop requested: stopping the runs (they checkpoint), then exiting 75")
                    self.runner.stop_all()
            for f in futs:
                if f.status == "error":  # an internal failure of the launcher's own task
                    raise f.exception()
            stopped = self.runner.stopping.is_set()
        except KeyboardInterrupt:
            self.runner.stop_all(wait=True)
            stopped = True
        finally:
            client.close()
            cluster.close()
            _LOCAL.pop(token, None)
            self.ledger.save()
        if stopped:
            self.say(f"stopped; run `{self.spec.rerun}` again to resume")
            return EXIT_PREEMPTED
        return self.finish()
