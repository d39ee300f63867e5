"""What both launchers (local, SLURM) share: prepare, plan, announce, and the end of a launch.

* :class:`~glymphmpi.cohort.local.LocalLauncher` - dask ``LocalCluster`` tasks that start
  ``mpirun``/``torchrun`` (or plain) processes here.
* :class:`~glymphmpi.cohort.slurm.SlurmLauncher` - sbatch jobs rendered from ``jobs/``.

Both walk the same plan: every task that is not complete and has attempts left is started; a
run that stops after a checkpoint (exit 75: SIGTERM, time limit, preemption) is resumed, at
most ``max_requeues`` times per launch; one run failing never stops the others; when a row's
runs have ended its ``group_done`` hook runs (a cohort's subject report); at the end the
``finished`` hook (the cohort report).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from glymphmpi.io import atomic_write_bytes

from .ledger import Ledger
from .state import task_status
from .tasks import LaunchSpec, Task, plan

log = logging.getLogger(__name__)


class Launcher:
    """Shared bookkeeping of both launchers."""

    scheduler = "?"

    def __init__(self, tasks: list[Task], spec: LaunchSpec, quiet: bool = False):
        self.tasks = list(tasks)
        self.spec = spec
        self.opts = spec.options
        self.workdir = Path(spec.workdir).resolve()
        self.quiet = quiet
        self.ledger = Ledger(self.workdir)
        self.t0 = time.time()

    @property
    def rows(self) -> list[str]:
        return list(dict.fromkeys(t.row for t in self.tasks))

    def say(self, msg: str) -> None:
        """Progress: printed, or a log line when quiet (a launch inside a method's run)."""
        if self.quiet:
            log.info(msg)
        else:
            print(msg, flush=True)

    def row_done(self, row: str) -> bool:
        return all(self.ledger.get(t.key).get("state") in ("complete", "failed")
                   for t in self.tasks if t.row == row)

    def begin(self, where: str) -> tuple[list[Task] | None, int | None]:
        """Prepare a launch: (runs to do, None), or (None, exit code) when there is nothing to do."""
        for d in (self.workdir / "logs", self.workdir / "jobs"):
            d.mkdir(parents=True, exist_ok=True)
        todo, done, gave_up = plan(self.tasks, self.ledger, self.opts.max_attempts)
        rc = self.nothing_to_do(done, gave_up)
        if rc is not None:
            return None, rc
        cols = list(dict.fromkeys(t.col for t in self.tasks))
        self.say(f"{self.spec.title}: {len(self.rows)} {self.spec.rows_noun} x {len(cols)} methods; "
                 f"{len(done)} complete, {len(todo)} to run ({where})")
        self.ledger.record_launch(self.scheduler, os.getpid())
        return todo, None

    def nothing_to_do(self, done, gave_up) -> int | None:
        for t in gave_up:
            rec = self.ledger.get(t.key)
            self.say(f"{t.key}: not retried after {rec.get('failures')} failed attempts "
                     f"(cohort.max_attempts = {self.opts.max_attempts}): {rec.get('reason', '')}")
        if len(done) == len(self.tasks):
            lines = self.spec.hooks.finished(refresh=False)
            self.say(f"nothing to do: all {len(done)} runs of {len(self.rows)} {self.spec.rows_noun} "
                     f"are complete in {self.workdir.parent}")
            for line in lines:
                self.say(line)
            return 0
        if len(done) + len(gave_up) == len(self.tasks):
            self.say(f"nothing to run: {len(done)} runs complete, {len(gave_up)} failed with no attempts "
                     "left (--retry-failed or a larger cohort.max_attempts retries them)")
            return 1
        return None

    def counts(self, jobs=None) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tasks:
            st = task_status(t.outdir, self.ledger.get(t.key), jobs)["state"]
            counts[st] = counts.get(st, 0) + 1
        return counts

    def finish(self) -> int:
        """The end of a launch: the ``finished`` hook, one summary line; 0 when all complete."""
        lines = self.spec.hooks.finished(refresh=True)
        self.ledger.save()
        counts = self.counts()
        self.say(f"{self.spec.title.split()[0]}: {', '.join(f'{v} {k}' for k, v in sorted(counts.items()))} "
                 f"in {time.time() - self.t0:.1f} s")
        for line in lines:
            self.say(line)
        return 0 if counts.get("complete", 0) == len(self.tasks) else 1


def write_settings(settings_toml: str, source: str, workdir: Path) -> Path | None:
    """Settings handed to every run as ``WORKDIR/config.toml`` (None when there are none)."""
    if not settings_toml.strip():
        return None
    p = Path(workdir) / "config.toml"
    text = f"# settings of {source}\n" + settings_toml
    if not p.exists() or p.read_text() != text:
        atomic_write_bytes(p, text.encode())
    return p
