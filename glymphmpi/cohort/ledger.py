"""The launcher's bookkeeping of its runs (state.json), shared by its threads."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from glymphmpi.errors import EXIT_PREEMPTED
from glymphmpi.store import read_summary

from .state import CohortState


def failure_reason(rd: Path, rc: int | None) -> str:
    """Why a run ended without completing: its summary's error, the signal, or the exit code."""
    summ = read_summary(rd) or {}
    if summ.get("error"):
        return str(summ["error"]).splitlines()[0]
    if rc is not None and rc > 128:
        return f"killed by signal {rc - 128}"
    return f"exit code {rc}"


class Ledger:
    """Thread-safe records of the runs (``WORKDIR/state.json``): attempts, jobs, how they ended."""

    def __init__(self, workdir: Path):
        self.state = CohortState(workdir)
        self.lock = threading.RLock()

    def get(self, key: str) -> dict:
        with self.lock:
            return self.state.task(key)

    def update(self, key: str, **fields) -> dict:
        with self.lock:
            rec = self.state.task(key)
            rec.update(fields)
            return rec

    def save(self) -> None:
        with self.lock:
            self.state.save()

    def record_launch(self, scheduler: str, pid: int) -> None:
        with self.lock:
            self.state.data["launches"].append({"scheduler": scheduler, "time": time.time(), "pid": pid})

    def forget_failures(self) -> None:
        """``--retry-failed``: earlier failures no longer count against max_attempts."""
        with self.lock:
            for rec in self.state.data["tasks"].values():
                if rec.get("state") != "complete":
                    rec["failures"] = 0

    def record_end(self, task, rc: int | None, reason: str | None = None) -> str:
        """Record how a run ended; returns its state (complete / resumable / failed)."""
        summ = read_summary(task.outdir) or {}
        with self.lock:
            rec = self.state.task(task.key)
            rec["exit_code"] = rc
            rec["ended"] = time.time()
            if summ.get("status") == "complete":
                rec.update(state="complete", reason="")
            elif reason is None and (rc == EXIT_PREEMPTED or summ.get("status") == "preempted"):
                rec.update(state="resumable", reason=failure_reason(task.outdir, rc))
            else:
                self.fail(task.key, reason or failure_reason(task.outdir, rc))
            return rec["state"]

    def fail(self, key: str, reason: str) -> None:
        """Mark a run failed; failures (not checkpointed stops) count against max_attempts."""
        with self.lock:
            rec = self.state.task(key)
            rec.update(state="failed", reason=reason)
            rec["failures"] = rec.get("failures", 0) + 1

    def count_requeue(self, key: str, limit: int) -> bool:
        """One more resumption of ``key``; False (and the run failed) past ``limit``."""
        with self.lock:
            rec = self.state.task(key)
            rec["requeues"] = rec.get("requeues", 0) + 1
            if rec["requeues"] <= limit:
                return True
            self.fail(key, f"still stopping after {limit} resumptions: {rec.get('reason', '')}")
            return False

    def retry_failed(self, key: str, retries: int) -> bool:
        """Start a failed run again within this launch (at most ``retries`` failures)?"""
        with self.lock:
            rec = self.state.task(key)
            return rec.get("state") == "failed" and rec.get("failures", 0) <= retries
