"""Run state of the core layer: checkpoints, stop signals and run directories.

Modules:
    checkpoint  Checkpointer: restart state every N iterations and on a stop signal
    signals     StopFlag: SIGTERM/SIGUSR1 -> checkpoint and exit 75
    rundir      RunDir: one run's output directory (layout, provenance, summary.json)

File formats and atomic writes live in :mod:`glymphmpi.io`.
"""

from glymphmpi.store.checkpoint import Checkpointer
from glymphmpi.store.rundir import RunDir, git_sha, provenance, read_summary
from glymphmpi.store.signals import StopFlag

__all__ = ["Checkpointer", "RunDir", "StopFlag", "git_sha", "provenance", "read_summary"]
