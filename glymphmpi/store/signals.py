"""Stop signals: SIGTERM/SIGUSR1 recorded so that a solver checkpoints and exits 75."""

from __future__ import annotations

import contextlib
import logging
import signal

log = logging.getLogger(__name__)


class StopFlag:
    """Records SIGTERM/SIGUSR1 so that a solver can checkpoint and exit 75.

    Install once at the CLI edge (``with StopFlag.installed(): ...``); solvers
    poll :meth:`requested` (collective via :meth:`agreed`).
    """

    _signal: int | None = None

    @classmethod
    def _handler(cls, signum, frame):  # noqa: ARG003
        cls._signal = signum
        log.warning("received signal %d: will checkpoint and stop", signum)

    @classmethod
    @contextlib.contextmanager
    def installed(cls, signals=(signal.SIGTERM, signal.SIGUSR1)):
        old = {s: signal.signal(s, cls._handler) for s in signals}
        try:
            yield cls
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    @classmethod
    def requested(cls) -> bool:
        return cls._signal is not None

    @classmethod
    def agreed(cls, comm) -> bool:
        """Collective: True on all ranks if any rank received a signal."""
        if comm.size == 1:
            return cls.requested()
        from mpi4py import MPI

        return bool(comm.allreduce(cls.requested(), op=MPI.LOR))

    @classmethod
    def reset(cls) -> None:
        cls._signal = None
