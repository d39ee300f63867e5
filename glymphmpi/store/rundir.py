"""Run output directories: layout, provenance, summary.json.

Layout of a run directory (docs/architecture.md, "Data contracts")::

    OUT/summary.json   written last, atomically; status "complete" when done
    OUT/results.h5     results; root attrs carry the provenance
    OUT/checkpoint.h5  restart state (with the run identity)
    OUT/identity.json  the run identity of the run that prepared the directory
    OUT/.glymph.lock   held while a run is using the directory
    OUT/maps/ figures/ vtk/ log.txt
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from glymphmpi import __version__
from glymphmpi.errors import InputError
from glymphmpi.io.atomic import atomic_write_json, os_error_line
from glymphmpi.io.h5 import write_h5_tree
from glymphmpi.io.nifti import write_nifti
from glymphmpi.parallel import mpi_comm
from glymphmpi.store.checkpoint import Checkpointer
from glymphmpi.store.identity import differences
from glymphmpi.store.lock import DirLock

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
    """One method's output directory for one subject and one run (see module docstring).

    :meth:`prepare` takes the directory's lock (:mod:`glymphmpi.store.lock`) and checks
    the run identity (:mod:`glymphmpi.store.identity`): an unfinished run there is resumed
    only when its recorded identity equals this run's; otherwise it is refused in one
    line naming what differs (``--fresh`` starts over). :meth:`release` gives the lock
    back (also at process exit).

    Args:
        out: directory path.
        comm: communicator (rank 0 creates and writes shared files); default
            ``COMM_SELF`` (this process alone).
        force: overwrite complete output.
        fresh: ignore (delete) an existing checkpoint instead of resuming.
    """

    SUBDIRS = ("maps", "figures", "vtk")
    IDENTITY = "identity.json"
    STATE_DIRS = ("romt_loops",)  # folders a method resumes from (besides checkpoint*.h5); --fresh removes them

    def __init__(self, out, comm=None, force: bool = False, fresh: bool = False):
        self.root = Path(out)
        self.comm = mpi_comm(serial=True) if comm is None else comm
        self.rank = self.comm.rank
        self.size = self.comm.size
        self.force = force
        self.fresh = fresh
        self.identity: dict | None = None
        self._lock: DirLock | None = None
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

    def _bcast_error(self, err: str | None) -> None:
        if self.size > 1:
            err = self.comm.bcast(err, root=0)
        if err:
            raise InputError(err)

    def prepare(self, identity: dict | None = None) -> RunDir:
        """Lock the directory, check the run identity, create the layout (collective).

        Args:
            identity: this run's :func:`glymphmpi.store.identity.run_identity`;
                None skips the identity check (tools that only read a run).
        Raises:
            InputError: complete output without ``force``; busy (another run
                holds the lock); an unfinished run of another identity (or of
                none recorded) without ``fresh``; ``out`` not creatable/writable.
        """
        self.identity = identity
        err = None
        if self.rank == 0:
            try:
                self._prepare_local()
            except InputError as exc:
                err = str(exc)
            except OSError as exc:
                err = os_error_line(exc, self.root, "use it as the output directory")
            if err:
                self.release()
        self._bcast_error(err)
        return self

    def _prepare_local(self) -> None:
        root = self.root
        self._lock = DirLock(root, "run").acquire()
        if not os.access(root, os.W_OK | os.X_OK):
            raise InputError("cannot write there (permission denied)", root)
        if self.is_complete():
            if not self.force:
                raise InputError("complete output exists (summary.json); use --force to overwrite", root)
            self.summary.unlink()
            if self.results.exists():
                self.results.unlink()
            self.fresh = True
        state = self.resumable_state()
        if self.fresh:
            for p in state:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        elif state and self.identity is not None:
            recorded = self.recorded_identity()
            names = ", ".join(sorted(p.name for p in state))
            if recorded is None:
                raise InputError(f"holds an unfinished run ({names}) of a different configuration or version (no "
                                 "run identity recorded); use --fresh to start over, or another --out", root)
            diffs = differences(recorded, self.identity)
            if diffs:
                raise InputError(f"holds an unfinished run of a different configuration: {'; '.join(diffs)}; use "
                                 "--fresh to start over, or another --out", root)
        for d in (root, *(root / s for s in self.SUBDIRS)):
            d.mkdir(parents=True, exist_ok=True)
        if self.summary.exists():  # a failed/unfinished marker from before
            self.summary.unlink()
        if self.identity is not None:
            atomic_write_json(root / self.IDENTITY, self.identity)

    def lock(self) -> RunDir:
        """Take only the directory's lock (collective; e.g. to re-process a finished run). Busy: InputError."""
        err = None
        if self.rank == 0:
            try:
                self._lock = DirLock(self.root, "run").acquire()
            except InputError as exc:
                err = str(exc)
        self._bcast_error(err)
        return self

    def resumable_state(self) -> list[Path]:
        """What a resume would continue from: checkpoint*.h5 and non-empty :attr:`STATE_DIRS`."""
        if not self.root.is_dir():
            return []
        out = []
        for p in sorted(self.root.iterdir()):
            if p.name.startswith("."):
                continue
            if p.is_file() and p.name.startswith("checkpoint") and p.suffix == ".h5":
                out.append(p)
            elif p.is_dir() and p.name in self.STATE_DIRS and any(p.iterdir()):
                out.append(p)
        return out

    def recorded_identity(self) -> dict | None:
        """The identity recorded by the run that last prepared this directory, or None."""
        try:
            d = json.loads((self.root / self.IDENTITY).read_text())
        except (OSError, ValueError):
            return None
        return d if isinstance(d, dict) else None

    def release(self) -> None:
        """Give the directory's lock back (rank 0; idempotent)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def checkpointer(self, every: int = 1, per_rank: bool = False, name: str = "checkpoint.h5",
                     comm=None, min_interval_s: float = 0.0) -> Checkpointer:
        """A :class:`Checkpointer` for ``OUT/name`` that records and checks this run's identity.

        Args:
            every, per_rank, min_interval_s: see :class:`Checkpointer`.
            name: file name (e.g. ``checkpoint.group0of2.h5`` for a group of ranks).
            comm: the communicator of the ranks sharing this file (default: the run's).
        """
        return Checkpointer(self.root / name, every=every, comm=self.comm if comm is None else comm,
                            per_rank=per_rank, identity=self.identity, min_interval_s=min_interval_s)

    def write_results(self, tree: dict, config=None, subject_id=None, extra_attrs=None,
                      node_attrs: dict | None = None) -> Path | None:
        """results.h5 (rank 0): ``tree`` with the provenance and ``extra_attrs`` on the root and
        ``node_attrs`` on nodes (e.g. ``{"loops/000/velocity": {"units": "mm/h"}}``)."""
        if self.rank != 0:
            return None
        attrs = provenance(config, subject_id, self.size)
        if self.identity is not None:
            attrs["identity"] = json.dumps(self.identity, sort_keys=True)
        attrs.update(extra_attrs or {})
        return write_h5_tree(self.results, tree, attrs, node_attrs)  # a full disk: WriteError, one line

    def write_map(self, name: str, data, affine) -> Path | None:
        if self.rank != 0:
            return None
        fname = name if name.endswith((".nii", ".nii.gz")) else name + ".nii.gz"
        return write_nifti(self.maps / fname, data, affine)

    def write_summary(self, method: str, subject_id: str, results: dict, status: str = "complete") -> dict:
        """Write summary.json last (atomically): marks the run complete (collective)."""
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
        if self.identity is not None:
            summary["identity"] = self.identity
        summary.update(results)
        err = None
        if self.rank == 0:
            try:
                atomic_write_json(self.summary, summary)
            except InputError as exc:  # WriteError: a full disk
                err = str(exc)
        self._bcast_error(err)
        return summary

    def write_failure(self, method: str, subject_id: str, reason: str, exit_code: int) -> None:
        """Record a failed or preempted run (status is then not "complete"); never raises for a full disk."""
        if self.rank != 0 or not self.root.is_dir():
            return
        status = "preempted" if exit_code == 75 else "failed"
        record = {
            "status": status, "method": method, "subject": subject_id, "error": reason,
            "exit_code": exit_code, "resumable": bool(self.resumable_state()),
            "version": __version__, "hostname": socket.gethostname(),
            "finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }
        if self.identity is not None:
            record["identity"] = self.identity
        try:
            atomic_write_json(self.summary, record)
        except (OSError, InputError) as exc:  # e.g. the disk is full: no summary already says "not complete"
            log.warning("could not record the failure: %s", exc)


def read_summary(out) -> dict | None:
    p = Path(out) / "summary.json"
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
