"""One run per output directory at a time: an exclusive lock file.

``OUT/.glymph.lock`` is created with ``O_CREAT | O_EXCL`` (atomic, also on NFS) and holds
the holder's pid, host, process start time and start date (JSON). A second process
finds it and stops with one line naming the holder. A lock left by a process that died
(same host, pid gone or reused by another process) is stale: it is taken over with a
warning. A lock held on another host cannot be checked from here: the message says
which host and pid hold it and to remove the file if that run is gone.

Under MPI, rank 0 takes the lock for the whole run (:meth:`DirLock.acquire` with a
communicator is collective).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import json
import logging
import os
import socket
import time
from pathlib import Path

from glymphmpi.errors import InputError
from glymphmpi.io.atomic import os_error_line

log = logging.getLogger(__name__)

LOCK_NAME = ".glymph.lock"


def _proc_start(pid: int) -> str | None:
    """Start time of a process in clock ticks since boot (Linux /proc), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    now = _proc_start(pid)
    return start is None or now is None or now == start  # same pid, other process: dead holder


class DirLock:
    """An exclusive lock on a directory (see the module docstring).

    Args:
        directory: the directory to lock (created when missing).
        what: what holds it, for messages ("run", "cohort").
    """

    def __init__(self, directory, what: str = "run"):
        self.dir = Path(directory)
        self.path = self.dir / LOCK_NAME
        self.what = what
        self.held = False

    def _record(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": _proc_start(os.getpid()),
                "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "what": self.what}

    def holder(self) -> dict | None:
        """The record of the current holder, {} for an unreadable lock file, None when unlocked."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(self._record()) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return True

    def _acquire_local(self) -> None:
        for parent in (self.dir, *self.dir.parents):
            if parent.exists():
                if not parent.is_dir():
                    raise InputError("exists and is not a directory" if parent == self.dir else
                                     f"cannot create it: {parent} is a file, not a directory", self.dir)
                break
        self.dir.mkdir(parents=True, exist_ok=True)
        for _ in range(30):
            if self._try_create():
                self.held = True
                atexit.register(self.release)
                return
            h = self.holder()
            if h is None:  # released in between
                continue
            host, pid = h.get("host"), h.get("pid")
            if not h and self._young():  # being written right now by another process
                time.sleep(0.1)
                continue
            if host == socket.gethostname() and pid == os.getpid() and h.get("proc_start") == _proc_start(pid):
                self.held = True  # this process holds it already (re-entrant; the first release frees it)
                return
            stale = (not h) or (host == socket.gethostname() and isinstance(pid, int)
                                and not _alive(pid, h.get("proc_start")))
            if not stale:
                raise InputError(f"busy: another {h.get('what', 'run')} holds {self.path.name} (pid {pid} on "
                                 f"{host}, since {h.get('started', '?')}); wait for it, or remove the lock "
                                 "file if that process is gone", self.dir)
            log.warning("%s: taking over a stale lock (%s)", self.dir,
                        f"pid {pid} on {host} is gone" if h else "unreadable lock file")
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        raise InputError(f"could not take the lock {self.path.name} (contended)", self.dir)

    def _young(self) -> bool:
        try:
            return time.time() - self.path.stat().st_mtime < 2.0
        except OSError:
            return False

    def acquire(self, comm=None) -> DirLock:
        """Take the lock (rank 0 of ``comm``; collective). Raises InputError when busy."""
        err = None
        if comm is None or comm.rank == 0:
            try:
                self._acquire_local()
            except InputError as exc:
                err = str(exc)
            except OSError as exc:
                err = os_error_line(exc, self.dir, f"use it as the {self.what}'s output directory")
        if comm is not None and comm.size > 1:
            err = comm.bcast(err, root=0)
        if err:
            raise InputError(err)
        return self

    def release(self) -> None:
        """Remove the lock file if this process holds it (idempotent)."""
        if not self.held:
            return
        self.held = False
        atexit.unregister(self.release)
        h = self.holder()
        if h and h.get("pid") == os.getpid() and h.get("host") == socket.gethostname():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> DirLock:
        return self.acquire() if not self.held else self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_dir(directory, what: str = "run", comm=None) -> DirLock:
    """Lock ``directory`` for one run or cohort (see :class:`DirLock`); release with ``.release()``
    or use as a context manager. Raises InputError (one line naming the holder) when busy."""
    return DirLock(directory, what).acquire(comm)
