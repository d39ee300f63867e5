"""Talk to SLURM: sbatch, scontrol (job table, release), sinfo.

The job scripts themselves are rendered by :mod:`glymphmpi.cohort.jobscript`; the generic
run status (:mod:`glymphmpi.cohort.state`) sees a job only through :meth:`JobTable.view`.
"""

from __future__ import annotations

import logging
import re
import subprocess
from pathlib import Path

from glymphmpi.errors import GlymphError, MissingDependency

from .state import JobView

log = logging.getLogger(__name__)

#: SLURM job states in which a job is still queued or running
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
          "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED"}


class SlurmError(GlymphError):
    """A SLURM command failed (message: the command and its error line)."""


# ------------------------------------------------------------------ SLURM commands
def _run(cmd: list[str], timeout: float = 60) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise MissingDependency(f"{cmd[0]} not found: SLURM is not installed here "
                                "(hpc/install.sh --slurm, then hpc/slurm/up.sh for a local one)") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{' '.join(cmd[:2])}: no answer in {timeout:g} s") from None
    if out.returncode != 0:
        err = (out.stderr.strip() or out.stdout.strip() or f"exit {out.returncode}").splitlines()[0]
        raise SlurmError(f"{' '.join(cmd[:2])}: {err}")
    return out.stdout


def available() -> bool:
    """True when a SLURM controller answers here."""
    try:
        _run(["sinfo", "-h", "-o", "%P"], timeout=10)
        return True
    except GlymphError:
        return False


def submit(script: Path, extra: list[str] | None = None) -> str:
    """``sbatch --parsable [extra] script`` -> job id (array jobs: the array's id)."""
    out = _run(["sbatch", "--parsable", *(extra or []), str(script)])
    return out.strip().split(";")[0]


def release(job: str) -> None:
    """Make a requeued job eligible now (SLURM holds it about two minutes otherwise)."""
    _run(["scontrol", "update", f"JobId={job}", "StartTime=now"])


def _task_ids(expr: str) -> set[int]:
    """``"0-3,7%2"`` -> {0, 1, 2, 3, 7}."""
    ids: set[int] = set()
    for part in expr.split("%")[0].split(","):
        part = part.strip()
        if not part:
            continue
        step = 1
        if ":" in part:
            part, s = part.split(":", 1)
            step = int(s)
        if "-" in part:
            a, b = part.split("-", 1)
            ids.update(range(int(a), int(b) + 1, step))
        else:
            ids.add(int(part))
    return ids


def parse_show_job(text: str) -> list[dict[str, str]]:
    """``scontrol show job -o`` output -> one dict per line (Key=Value pairs)."""
    recs = []
    for line in text.splitlines():
        line = line.strip()
        if not line or "JobId=" not in line:
            continue
        rec = {}
        for m in re.finditer(r"(\w[\w/:]*)=(\S*)", line):
            rec.setdefault(m.group(1), m.group(2))
        recs.append(rec)
    return recs


class JobTable:
    """A snapshot of the controller's jobs, looked up by ``ID`` or ``ARRAYID_TASK``."""

    def __init__(self, records: list[dict[str, str]]):
        self.by_id: dict[str, dict] = {}
        self.pending_arrays: list[tuple[str, set[int], dict]] = []
        for r in records:
            self.by_id[r["JobId"]] = r
            aid, tid = r.get("ArrayJobId"), r.get("ArrayTaskId")
            if aid and tid:
                if tid.isdigit():
                    self.by_id[f"{aid}_{tid}"] = r
                else:
                    try:
                        self.pending_arrays.append((aid, _task_ids(tid), r))
                    except ValueError:
                        pass

    @classmethod
    def query(cls) -> JobTable:
        try:
            text = _run(["scontrol", "show", "job", "-o"], timeout=30)
        except SlurmError as exc:
            if "No jobs in the system" in str(exc):
                return cls([])
            raise
        return cls(parse_show_job(text))

    def get(self, job: str) -> dict | None:
        if job in self.by_id:
            return self.by_id[job]
        if "_" in job:
            aid, tid = job.split("_", 1)
            for a, ids, r in self.pending_arrays:
                if a == aid and tid.isdigit() and int(tid) in ids:
                    return r
        return None

    def view(self, job: str) -> JobView | None:
        """The scheduler-neutral view of one job (None: the controller does not know it)."""
        info = self.get(job)
        if info is None:
            return None
        st = info.get("JobState", "")
        return JobView(state=st, active=st in ACTIVE,
                       running=st in ("RUNNING", "COMPLETING", "CONFIGURING"),
                       cancelled=st == "CANCELLED", reason=info.get("Reason", ""), exit_code=exit_code(info))


def exit_code(rec: dict) -> int | None:
    """SLURM's ``ExitCode=rc:signal`` -> rc (or 128+signal when killed by a signal)."""
    ec = rec.get("ExitCode", "")
    try:
        rc, sig = (int(x) for x in ec.split(":"))
    except ValueError:
        return None
    return rc if rc or not sig else 128 + sig
