"""Where every (subject, method) run of a cohort stands, from its files and the scheduler.

The launcher keeps ``OUT/cohort/state.json`` (attempts, job ids, last reason); the truth
about a run is its run directory (``summary.json`` written by the method, a checkpoint) and,
while it is queued or running, the scheduler. :func:`task_status` combines the three.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from glymphmpi.io import atomic_write_json
from glymphmpi.store import read_summary

STATES = ("pending", "queued", "running", "complete", "failed", "resumable")


def run_dir(out: Path, sid: str, method: str) -> Path:
    return Path(out) / sid / method


def task_key(sid: str, method: str) -> str:
    return f"{sid}/{method}"


class CohortState:
    """The launcher's record, ``OUT/cohort/state.json`` (written atomically)."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / "cohort" / "state.json"
        self.data: dict = {"tasks": {}, "launches": []}
        if self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError):  # unreadable: start over, files stay the truth
                pass
        self.data.setdefault("tasks", {})
        self.data.setdefault("launches", [])

    def task(self, sid: str, method: str) -> dict:
        return self.data["tasks"].setdefault(task_key(sid, method), {"attempts": 0, "requeues": 0, "jobs": []})

    def save(self) -> None:
        atomic_write_json(self.path, self.data)


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (OSError, ValueError, TypeError):
        return False


def task_status(out: Path, sid: str, method: str, rec: dict | None, jobs=None) -> dict:
    """Status of one run.

    Args:
        out: cohort output directory.
        sid, method: the run.
        rec: its record in state.json (or None).
        jobs: a :class:`~glymphmpi.cohort.sbatch.JobTable` snapshot (SLURM runs), or None.

    Returns:
        ``{"state": one of STATES, "job": id or None, "reason": str, "exit_code": int|None,
        "resumable": bool, "attempts": int, "runtime_s": float|None}``
    """
    from .sbatch import ACTIVE, exit_code

    rec = rec or {}
    rd = run_dir(out, sid, method)
    summ = read_summary(rd) or {}
    ckpt = any(rd.glob("checkpoint*.h5")) if rd.is_dir() else False
    st = {"state": "pending", "job": rec.get("job"), "reason": "", "exit_code": None,
          "resumable": ckpt, "attempts": int(rec.get("attempts", 0)), "runtime_s": summ.get("runtime_s")}
    if summ.get("status") == "complete":
        st.update(state="complete", resumable=False, exit_code=0)
        return st
    job = rec.get("job")
    if rec.get("scheduler") == "slurm" and job and jobs is not None:
        info = jobs.get(job)
        if info is not None and info.get("JobState") in ACTIVE:
            st["state"] = "running" if info["JobState"] in ("RUNNING", "COMPLETING", "CONFIGURING") else "queued"
            st["reason"] = info.get("Reason", "") if st["state"] == "queued" else ""
            return st
        if info is not None and info.get("JobState") == "CANCELLED":
            st.update(state="failed", reason=f"SLURM job {job} cancelled", exit_code=exit_code(info))
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


def cohort_status(cohort, out: Path, query_slurm: bool = True) -> dict:
    """Status of every run: ``{"subjects": [...], "methods": [...], "runs": {sid: {m: status}}}``."""
    state = CohortState(out)
    jobs = None
    uses_slurm = any(r.get("scheduler") == "slurm" for r in state.data["tasks"].values())
    if uses_slurm and query_slurm:
        from .sbatch import JobTable, available

        if available():
            jobs = JobTable.query()
    runs = {}
    for s in cohort.subjects:
        runs[s.id] = {m: task_status(out, s.id, m, state.data["tasks"].get(task_key(s.id, m)), jobs)
                      for m in cohort.method_names if cohort.runs(s, m)}
    counts = {k: 0 for k in STATES}
    for row in runs.values():
        for st in row.values():
            counts[st["state"]] += 1
    return {"cohort": str(cohort.path), "out": str(Path(out).resolve()), "time": time.time(),
            "subjects": [s.id for s in cohort.subjects], "methods": cohort.method_names,
            "counts": counts, "runs": runs, "slurm_queried": jobs is not None}


def format_status(st: dict) -> str:
    """A plain-text table, subjects x methods."""
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

    rows = [["subject", *methods]] + [[sid, *(cell(st["runs"][sid][m]) if m in st["runs"][sid] else "-"
                                             for m in methods)] for sid in st["subjects"]]
    widths = [min(max(len(r[i]) for r in rows), 60) for i in range(len(rows[0]))]
    lines = ["  ".join(c[:60].ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    c = st["counts"]
    lines.append(", ".join(f"{v} {k}" for k, v in c.items() if v))
    return "\n".join(lines)
