"""Logging set-up: INFO on rank 0 only, warnings everywhere, optional log file."""

from __future__ import annotations

import contextlib
import logging
import sys

_FMT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: the process-wide progress switch: set once by the CLI (``--quiet``), read by every
#: trainer and loop (:func:`quiet`, :func:`progress`).
_QUIET = False


def set_quiet(flag: bool) -> None:
    """Turn progress output (bars, per-iteration INFO lines) off or on for this process."""
    global _QUIET
    _QUIET = bool(flag)


def quiet() -> bool:
    """True when the user asked for no progress output (``glymph --quiet``)."""
    return _QUIET


def setup_logging(rank: int = 0, verbose: bool = False, quiet: bool = False) -> None:
    set_quiet(quiet)
    root = logging.getLogger("glymphmpi")
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    if rank != 0:
        level = max(level, logging.WARNING)
    root.setLevel(logging.DEBUG)
    for h in list(root.handlers):
        if getattr(h, "_glymph_console", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter((f"[rank {rank}] " if rank else "") + "%(message)s"))
    handler._glymph_console = True
    root.addHandler(handler)
    root.propagate = False


def add_file_log(path, rank: int = 0) -> logging.Handler | None:
    """Also log (rank 0 only) to ``path`` (the run's log.txt)."""
    if rank != 0:
        return None
    handler = logging.FileHandler(path, mode="a")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(_FMT))
    logging.getLogger("glymphmpi").addHandler(handler)
    return handler


@contextlib.contextmanager
def file_log(path, rank: int = 0):
    """:func:`add_file_log` for the duration of a ``with`` block (the handler is removed and closed)."""
    handler = add_file_log(path, rank)
    try:
        yield handler
    finally:
        if handler is not None:
            logging.getLogger("glymphmpi").removeHandler(handler)
            handler.close()


def progress(iterable=None, quiet: bool | None = None, **kw):
    """tqdm progress bar, off under ``--quiet`` (the process switch), when ``quiet`` or when
    stderr is not a TTY."""
    from tqdm import tqdm

    if quiet is None:
        quiet = not sys.stderr.isatty()
    return tqdm(iterable, disable=bool(quiet) or _QUIET, **kw)
