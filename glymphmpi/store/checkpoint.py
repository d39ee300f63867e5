"""Checkpoints: restart state saved atomically every N iterations and on a stop signal."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from glymphmpi import __version__
from glymphmpi.errors import InputError, Preempted
from glymphmpi.io.atomic import fsync_dir, os_error_line, tmp_name
from glymphmpi.io.h5 import create_h5, read_h5_tree, tree_nbytes, write_node
from glymphmpi.parallel import mpi_comm
from glymphmpi.store.identity import differences
from glymphmpi.store.signals import StopFlag

log = logging.getLogger(__name__)


def check_identity(path, attrs: dict, identity: dict | None) -> None:
    """Refuse a checkpoint (root ``attrs``) whose recorded run identity is not ``identity`` (None: no check).

    Raises:
        InputError: one line naming ``path`` and what differs (or that none is recorded).
    """
    if identity is None:
        return
    try:
        recorded = json.loads(attrs["identity"])
    except (KeyError, TypeError, ValueError):
        raise InputError("checkpoint without a run identity (an older version or a foreign file); "
                         "use --fresh to start over", path) from None
    diffs = differences(recorded, identity)
    if diffs:
        raise InputError(f"checkpoint of another run: {'; '.join(diffs)}; use --fresh to start over", path)


class Checkpointer:
    """Save/load restart state every N iterations and on SIGTERM/SIGUSR1.

    State is a dict in the typed layout of :mod:`glymphmpi.io.h5` (arrays,
    numbers, strings, nested dicts, JSON-able lists; RNG states as dicts). Files: ``checkpoint.h5`` and the previous one
    ``checkpoint.prev.h5``; :meth:`load` returns the newest that loads.

    Args:
        path: checkpoint file (``OUT/checkpoint.h5``).
        every: save when ``iteration % every == 0`` (0 disables periodic saves).
        comm: communicator; only rank 0 writes unless ``per_rank``; default
            ``COMM_SELF`` (this process alone).
        per_rank: each rank keeps its own file ``checkpoint.rank{r}.h5``.
        identity: the run identity (:mod:`glymphmpi.store.identity`): saved with
            every checkpoint; :meth:`load` refuses a checkpoint of another
            identity, or of none, in one line naming what differs.
        min_interval_s: a periodic save is skipped when the last save of this
            checkpointer was less than this many seconds ago (the first one is
            always made; a stop signal always saves). 0: every due iteration.
    """

    def __init__(self, path, every: int = 1, comm=None, per_rank: bool = False, identity: dict | None = None,
                 min_interval_s: float = 0.0):
        path = Path(path)
        self.comm = mpi_comm(serial=True) if comm is None else comm
        self.rank = self.comm.rank
        self.per_rank = per_rank
        if per_rank:
            path = path.with_name(f"{path.stem}.rank{self.rank}{path.suffix}")
        self.path = path
        self.prev = path.with_name(f"{path.stem}.prev{path.suffix}")
        self.every = int(every)
        self.writes = self.per_rank or self.rank == 0
        self.identity = identity
        self.min_interval_s = float(min_interval_s)
        self._last_save: float | None = None

    def save(self, state: dict, iteration: int) -> None:
        """Write the state atomically (collective over ``comm``).

        Raises:
            InputError: on every rank, when the file cannot be written (a full
                disk, permissions): one line naming the file.
        """
        err = None
        if self.writes:
            tree = {"state": state, "iteration": int(iteration)}
            tmp = tmp_name(self.path)

            def fill(fh):
                fh.attrs["version"] = __version__
                fh.attrs["iteration"] = int(iteration)
                fh.attrs["saved"] = time.time()
                if self.identity is not None:
                    fh.attrs["identity"] = json.dumps(self.identity, sort_keys=True)
                for k, v in tree.items():
                    write_node(fh, k, v, compress=False)  # written every few iterations: speed over size
                fh.attrs["complete"] = True

            try:
                create_h5(tmp, fill, tree_nbytes(tree))
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
                if self.path.exists():
                    os.replace(self.path, self.prev)
                os.replace(tmp, self.path)
                fsync_dir(self.path.parent)
            except OSError as exc:
                err = os_error_line(exc, self.path, "write the checkpoint")
            finally:
                if tmp.exists():
                    tmp.unlink()
        if self.comm.size > 1:
            errs = self.comm.allgather(err)
            err = next((e for e in errs if e), None)
        if err:
            raise InputError(err)

    def load(self) -> tuple[dict, int] | None:
        """Newest valid (state, iteration), or None when there is none.

        Raises:
            InputError: a checkpoint holds data outside the typed layout (e.g.
                a planted pickle: UnsafeFileError), or belongs to another run:
                refused, never executed, never skipped.
        """
        for p in (self.path, self.prev):
            if not p.exists():
                continue
            try:
                tree, attrs = read_h5_tree(p)
                self._check_identity(p, attrs)
                return tree["state"], int(tree["iteration"])
            except InputError:  # unsafe content or another run: refused, never skipped
                raise
            except Exception as exc:  # a damaged file: try the older one
                log.warning("%s: unreadable checkpoint (%s); trying an older one", p, exc)
        return None

    def _check_identity(self, path, attrs) -> None:
        check_identity(path, attrs, self.identity)

    def step(self, iteration: int, state_fn) -> None:
        """Call once per iteration: saves when due or when a stop signal arrived.

        Args:
            iteration: the number of completed iterations.
            state_fn: zero-argument callable returning the state dict (only
                called when a save happens).
        Raises:
            Preempted: after saving, if SIGTERM/SIGUSR1 was received.
        """
        stop = StopFlag.agreed(self.comm)
        due = self.every > 0 and iteration % self.every == 0
        if due and not stop and self.min_interval_s > 0 and self._last_save is not None:
            # the same decision on every rank of comm (the save is collective)
            due = self.comm.bcast(time.monotonic() - self._last_save >= self.min_interval_s, root=0)
        if stop or due:
            self.save(state_fn(), iteration)
            self._last_save = time.monotonic()
        if stop:
            raise Preempted(f"stopped by a signal at iteration {iteration}; checkpoint in {self.path}")

    def remove(self) -> None:
        if self.writes:
            for p in (self.path, self.prev):
                if p.exists():
                    p.unlink()
