"""Run output directories: layout, provenance, summary.json.

Layout of a run directory (/work/shared/DESIGN.md section 2, docs/architecture.md)::

    OUT/summary.json   written last, atomically; status "complete" when done
    OUT/results.h5     results; root attrs carry the provenance
    OUT/checkpoint.h5  restart state
    OUT/maps/ figures/ vtk/ log.txt
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import socket
import subprocess
import time
from pathlib import Path

from glymphmpi import __version__
from glymphmpi.errors import InputError
from glymphmpi.io.atomic import atomic_write_json
from glymphmpi.io.h5 import write_h5_tree
from glymphmpi.io.nifti import write_nifti
from glymphmpi.store.checkpoint import Checkpointer

log = logging.getLogger(__name__)


# ----------------------------------------------------------------- provenance
def git_sha() -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(config=None, subject_id: str | None = None, mpi_size: int = 1) -> dict:
    from glymphmpi.config import to_json

    return {
        "version": __version__,
        "git_sha": git_sha(),
        "config": to_json(config) if config is not None else "{}",
        "subject": subject_id or "",
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "mpi_size": int(mpi_size),
        "hostname": socket.gethostname(),
    }


# ----------------------------------------------------------------- run dirs
class RunDir:
    """One method's output directory for one subject (see module docstring).

    Args:
        out: directory path.
        comm: communicator (rank 0 creates and writes shared files).
        force: overwrite complete output.
        fresh: ignore (delete) an existing checkpoint instead of resuming.
    """

    SUBDIRS = ("maps", "figures", "vtk")

    def __init__(self, out, comm=None, force: bool = False, fresh: bool = False):
        self.root = Path(out)
        self.comm = comm
        self.rank = 0 if comm is None else comm.rank
        self.size = 1 if comm is None else comm.size
        self.force = force
        self.fresh = fresh
        self.t0 = time.time()

    summary = property(lambda self: self.root / "summary.json")
    results = property(lambda self: self.root / "results.h5")
    checkpoint = property(lambda self: self.root / "checkpoint.h5")
    maps = property(lambda self: self.root / "maps")
    figures = property(lambda self: self.root / "figures")
    vtk = property(lambda self: self.root / "vtk")
    log = property(lambda self: self.root / "log.txt")

    def status(self) -> dict | None:
        return read_summary(self.root)

    def is_complete(self) -> bool:
        s = self.status()
        return bool(s and s.get("status") == "complete")

    def prepare(self) -> RunDir:
        """Create the directory; refuse complete output without ``force``."""
        err = None
        if self.rank == 0:
            if self.root.exists() and not self.root.is_dir():
                err = f"{self.root}: exists and is not a directory"
            elif self.is_complete() and not self.force:
                err = f"{self.root}: complete output exists (summary.json); use --force to overwrite"
            else:
                if self.force and self.is_complete():
                    self.summary.unlink()
                    for name in ("results.h5",):
                        if (self.root / name).exists():
                            (self.root / name).unlink()
                    self.fresh = True
                if self.fresh:
                    for p in self.root.glob("checkpoint*.h5"):
                        p.unlink()
                for d in (self.root, *(self.root / s for s in self.SUBDIRS)):
                    d.mkdir(parents=True, exist_ok=True)
                if self.summary.exists():  # a failed/unfinished marker from before
                    self.summary.unlink()
        if self.comm is not None and self.size > 1:
            err = self.comm.bcast(err, root=0)
        if err:
            raise InputError(err)
        return self

    def checkpointer(self, every: int = 1, per_rank: bool = False) -> Checkpointer:
        return Checkpointer(self.checkpoint, every=every, comm=self.comm, per_rank=per_rank)

    def write_results(self, tree: dict, config=None, subject_id=None, extra_attrs=None) -> Path | None:
        if self.rank != 0:
            return None
        attrs = provenance(config, subject_id, self.size)
        attrs.update(extra_attrs or {})
        return write_h5_tree(self.results, tree, attrs)

    def write_map(self, name: str, data, affine) -> Path | None:
        if self.rank != 0:
            return None
        fname = name if name.endswith((".nii", ".nii.gz")) else name + ".nii.gz"
        return write_nifti(self.maps / fname, data, affine)

    def write_summary(self, method: str, subject_id: str, results: dict, status: str = "complete") -> dict:
        """Write summary.json last (atomically): marks the run complete."""
        summary = {
            "status": status,
            "method": method,
            "subject": subject_id,
            "runtime_s": round(time.time() - self.t0, 3),
            "mpi_ranks": self.size,
            "version": __version__,
            "git_sha": git_sha(),
            "finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "hostname": socket.gethostname(),
        }
        summary.update(results)
        if self.rank == 0:
            atomic_write_json(self.summary, summary)
        if self.comm is not None and self.size > 1:
            self.comm.Barrier()
        return summary

    def write_failure(self, method: str, subject_id: str, reason: str, exit_code: int) -> None:
        """Record a failed or preempted run (status is then not "complete")."""
        if self.rank != 0 or not self.root.is_dir():
            return
        status = "preempted" if exit_code == 75 else "failed"
        atomic_write_json(self.summary, {
            "status": status, "method": method, "subject": subject_id, "error": reason,
            "exit_code": exit_code, "resumable": self.checkpoint.exists(),
            "version": __version__, "hostname": socket.gethostname(),
            "finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        })


def read_summary(out) -> dict | None:
    p = Path(out) / "summary.json"
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
