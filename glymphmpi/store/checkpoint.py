"""Checkpoints: restart state saved atomically every N iterations and on a stop signal."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from glymphmpi import __version__
from glymphmpi.errors import Preempted
from glymphmpi.io.atomic import fsync_dir, tmp_name
from glymphmpi.io.h5 import UnsafeFileError, _h5, read_h5_tree, write_node
from glymphmpi.store.signals import StopFlag

log = logging.getLogger(__name__)


class Checkpointer:
    """Save/load restart state every N iterations and on SIGTERM/SIGUSR1.

    State is a dict in the typed layout of :mod:`glymphmpi.io.h5` (arrays,
    numbers, strings, nested dicts, JSON-able lists; RNG states as dicts). Files: ``checkpoint.h5`` and the previous one
    ``checkpoint.prev.h5``; :meth:`load` returns the newest that loads.

    Args:
        path: checkpoint file (``OUT/checkpoint.h5``).
        every: save when ``iteration % every == 0`` (0 disables periodic saves).
        comm: communicator; only rank 0 writes unless ``per_rank``.
        per_rank: each rank keeps its own file ``checkpoint.rank{r}.h5``.
    """

    def __init__(self, path, every: int = 1, comm=None, per_rank: bool = False):
        path = Path(path)
        self.comm = comm
        self.rank = 0 if comm is None else comm.rank
        self.per_rank = per_rank
        if per_rank:
            path = path.with_name(f"{path.stem}.rank{self.rank}{path.suffix}")
        self.path = path
        self.prev = path.with_name(f"{path.stem}.prev{path.suffix}")
        self.every = int(every)
        self.writes = self.per_rank or self.rank == 0

    def save(self, state: dict, iteration: int) -> None:
        if self.writes:
            tree = {"state": state, "iteration": int(iteration)}
            tmp = tmp_name(self.path)
            h5py = _h5()
            try:
                with h5py.File(tmp, "w") as fh:
                    fh.attrs["version"] = __version__
                    fh.attrs["iteration"] = int(iteration)
                    fh.attrs["saved"] = time.time()
                    for k, v in tree.items():
                        write_node(fh, k, v)
                    fh.attrs["complete"] = True
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
                if self.path.exists():
                    os.replace(self.path, self.prev)
                os.replace(tmp, self.path)
                fsync_dir(self.path.parent)
            finally:
                if tmp.exists():
                    tmp.unlink()
        if self.comm is not None and self.comm.size > 1:
            self.comm.Barrier()

    def load(self) -> tuple[dict, int] | None:
        """Newest valid (state, iteration), or None when there is none.

        Raises:
            UnsafeFileError: a checkpoint holds data outside the typed layout
                (e.g. a planted pickle): refused, never executed, never skipped.
        """
        for p in (self.path, self.prev):
            if not p.exists():
                continue
            try:
                tree, _ = read_h5_tree(p)
                return tree["state"], int(tree["iteration"])
            except UnsafeFileError:
                raise
            except Exception as exc:  # a damaged file: try the older one
                log.warning("%s: unreadable checkpoint (%s); trying an older one", p, exc)
        return None

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
        if stop or (self.every > 0 and iteration % self.every == 0):
            self.save(state_fn(), iteration)
        if stop:
            raise Preempted(f"stopped by a signal at iteration {iteration}; checkpoint in {self.path}")

    def remove(self) -> None:
        if self.writes:
            for p in (self.path, self.prev):
                if p.exists():
                    p.unlink()
