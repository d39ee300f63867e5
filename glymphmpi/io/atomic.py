"""Atomic file writes.

Every write goes to a temporary file in the same directory, is flushed and
fsync'ed, then renamed over the target: a kill at any instant leaves either
the old or the new file, never a partial one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from pathlib import Path

import numpy as np

from glymphmpi.errors import InputError


def fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename in it is durable."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - platform without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def tmp_name(path: Path) -> Path:
    """A hidden temporary name next to ``path`` (same suffix, unique per process and call)."""
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{time.monotonic_ns() % 10**9}{suffix}")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to ``path``; on success fsync and rename it over ``path``.

    On an exception the temporary file is removed and ``path`` is untouched.

    Raises:
        WriteError: (an InputError, exit 2) the disk is full, over quota, read-only or
            not writable, while creating or filling the file: one line naming ``path``.
    """
    path = Path(path)
    tmp = tmp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        with open(tmp, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        if storage_errno(exc) is None:
            raise
        raise WriteError(os_error_line(exc, path, "write this file")) from None
    finally:
        with contextlib.suppress(OSError):
            if tmp.exists():
                tmp.unlink()


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def json_default(o):
    """``json.dumps`` default for numpy scalars/arrays and paths."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_write_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n").encode())


# what the file system, not the program, is to blame for
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


class WriteError(InputError):
    """A file could not be written for a reason of the file system (full, read-only, permissions)."""


def storage_errno(exc: OSError) -> int | None:
    """The errno of ``exc`` if it is one of :data:`STORAGE_ERRNOS` (also when only HDF5's text names it)."""
    if exc.errno in STORAGE_ERRNOS:
        return exc.errno
    for code in STORAGE_ERRNOS:  # h5py puts the errno in the text
        if f"errno = {code}," in str(exc):
            return code
    return None


def os_error_line(exc: OSError, path, doing: str) -> str:
    """One line for an OSError met while ``doing`` something with ``path`` (full disk, permissions...)."""
    code = storage_errno(exc)
    reason = os.strerror(code) if code is not None and exc.errno is None else \
        (exc.strerror or str(exc).splitlines()[0] or type(exc).__name__)
    return f"{path}: cannot {doing} ({reason})"
