"""Where every run of a launch stands, from its files and (optionally) the scheduler.

The launcher keeps ``WORKDIR/state.json`` (attempts, job ids, last reason; ``OUT/cohort`` for
a cohort); the truth about a run is its run directory (``summary.json`` written by the method,
a checkpoint) and, while it is queued or running, the scheduler, seen through a
:class:`JobView` (this module knows no scheduler: SLURM's table provides the views).
:func:`task_status` combines the three.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from glymphmpi.io import atomic_write_json
from glymphmpi.store import read_summary

STATES = ("pending", "queued", "running", "complete", "failed", "resumable")


@dataclasses.dataclass(frozen=True)
class JobView:
    """A scheduler job as the status needs it."""

    state: str  # the scheduler's word (e.g. PENDING, RUNNING, CANCELLED)
    active: bool  # queued or running
    running: bool
    cancelled: bool
    reason: str = ""
    exit_code: int | None = None


def run_dir(out: Path, sid: str, method: str) -> Path:
    """A cohort run's directory: ``OUT/<subject>/<method>``."""
    return Path(out) / sid / method


def task_key(row: str, col: str) -> str:
    return f"{row}/{col}"


class CohortState:
    """The launcher's record, ``WORKDIR/state.json`` (written atomically)."""

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / "state.json"
        self.data: dict = {"tasks": {}, "launches": []}
        if self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError):  # unreadable: start over, files stay the truth
                pass
        self.data.setdefault("tasks", {})
        self.data.setdefault("launches", [])

    def task(self, key: str) -> dict:
        return self.data["tasks"].setdefault(key, {"attempts": 0, "requeues": 0, "jobs": []})

    def save(self) -> None:
        atomic_write_json(self.path, self.data)


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (OSError, ValueError, TypeError):
        return False


def task_status(rd: Path, rec: dict | None, jobs=None) -> dict:
    """Status of one run.

    Args:
        rd: its run directory.
        rec: its record in state.json (or None).
        jobs: an object with ``view(job_id) -> JobView | None`` (a scheduler snapshot), or None.

    Returns:
        ``{"state": one of STATES, "job": id or None, "reason": str, "exit_code": int|None,
        "resumable": bool, "attempts": int, "runtime_s": float|None}``
    """
    rec = rec or {}
    rd = Path(rd)
    summ = read_summary(rd) or {}
    ckpt = any(rd.glob("checkpoint*.h5")) if rd.is_dir() else False
    st = {"state": "pending", "job": rec.get("job"), "reason": "", "exit_code": None,
          "resumable": ckpt, "attempts": int(rec.get("attempts", 0)), "runtime_s": summ.get("runtime_s")}
    if summ.get("status") == "complete":
        st.update(state="complete", resumable=False, exit_code=0)
        return st
    job = rec.get("job")
    if rec.get("scheduler") == "slurm" and job and jobs is not None:
        view = jobs.view(job)
        if view is not None and view.active:
            st["state"] = "running" if view.running else "queued"
            st["reason"] = view.reason if st["state"] == "queued" else ""
            return st
        if view is not None and view.cancelled:
            st.update(state="failed", reason=f"SLURM job {job} cancelled", exit_code=view.exit_code)
            return st
    if rec.get("scheduler") == "slurm" and job and jobs is None and rec.get("state") in ("submitted", "running"):
        st["state"] = "running" if rec["state"] == "running" else "queued"
        st["reason"] = "last seen by the launcher (SLURM not queried)"
        return st
    if rec.get("scheduler") == "local" and rec.get("state") == "running" and _pid_alive(rec.get("pid")):
        st["state"] = "running"
        return st
    if rec.get("state") == "failed" and rec.get("reason"):
        st.update(state="failed", reason=rec["reason"], exit_code=rec.get("exit_code"))
        return st
    if summ.get("status") in ("failed", "preempted"):
        st["exit_code"] = summ.get("exit_code")
        st["reason"] = str(summ.get("error", ""))
        st["state"] = "resumable" if (summ.get("status") == "preempted" and ckpt) else "failed"
        return st
    if ckpt:
        st.update(state="resumable", reason="checkpoint without a summary (killed)")
    elif rec.get("state") in ("failed",):
        st.update(state="failed", reason=rec.get("reason", ""), exit_code=rec.get("exit_code"))
    return st


def status_table(tasks, workdir: Path, jobs=None, title: str = "", out: Path | None = None,
                 row_name: str = "subject") -> dict:
    """Status of every task (objects with ``row``, ``col``, ``key``, ``outdir``).

    Returns:
        ``{"subjects": rows, "methods": cols, "counts": {...}, "runs": {row: {col: status}}, ...}``
        (the names of a cohort: rows are subjects, columns methods).
    """
    state = CohortState(workdir)
    rows: list[str] = []
    cols: list[str] = []
    runs: dict = {}
    for t in tasks:
        if t.row not in runs:
            rows.append(t.row)
            runs[t.row] = {}
        if t.col not in cols:
            cols.append(t.col)
        runs[t.row][t.col] = task_status(t.outdir, state.data["tasks"].get(t.key), jobs)
    counts = {k: 0 for k in STATES}
    for row in runs.values():
        for st in row.values():
            counts[st["state"]] += 1
    return {"cohort": title, "out": str(Path(out or workdir).resolve()), "time": time.time(),
            "subjects": rows, "methods": cols, "counts": counts, "runs": runs,
            "slurm_queried": jobs is not None, "row_name": row_name}


def uses_slurm(workdir: Path) -> bool:
    """True when some run of this launch directory was submitted to SLURM."""
    return any(r.get("scheduler") == "slurm" for r in CohortState(workdir).data["tasks"].values())


def format_status(st: dict) -> str:
    """A plain-text table, rows (subjects, set-ups) x columns (methods, seeds)."""
    methods = st["methods"]

    def cell(x: dict) -> str:
        s = x["state"]
        if s in ("running", "queued") and x.get("job"):
            return f"{s} (job {x['job']})"
        if s == "failed":
            r = x.get("reason") or "?"
            code = x.get("exit_code")
            return f"failed{f' [{code}]' if code is not None else ''}: {r}"
        if s == "resumable":
            return "resumable (checkpoint)"
        if s == "complete" and x.get("runtime_s") is not None:
            return f"complete ({x['runtime_s']:.0f} s)"
        return s

    rows = [[st.get("row_name", "subject"), *methods]]
    rows += [[sid, *(cell(st["runs"][sid][m]) if m in st["runs"][sid] else "-" for m in methods)]
             for sid in st["subjects"]]
    widths = [min(max(len(r[i]) for r in rows), 60) for i in range(len(rows[0]))]
    lines = ["  ".join(c[:60].ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    c = st["counts"]
    lines.append(", ".join(f"{v} {k}" for k, v in c.items() if v))
    return "\n".join(lines)
