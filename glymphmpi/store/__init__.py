"""Run state of the core layer: checkpoints, stop signals, run identity, locks and run directories.

Modules:
    checkpoint  Checkpointer: restart state every N iterations and on a stop signal
    signals     StopFlag: SIGTERM/SIGUSR1 -> checkpoint and exit 75
    identity    run_identity: method, subject content hash, result-changing settings, version
    lock        DirLock / lock_dir: one run (or cohort) per output directory at a time
    rundir      RunDir: one run's output directory (layout, lock, identity, provenance, summary.json)

File formats and atomic writes live in :mod:`glymphmpi.io`.
"""

from glymphmpi.store.checkpoint import Checkpointer
from glymphmpi.store.identity import differences, run_identity, subject_hash
from glymphmpi.store.lock import DirLock, lock_dir
from glymphmpi.store.rundir import RunDir, git_sha, provenance, read_summary
from glymphmpi.store.signals import StopFlag

__all__ = ["Checkpointer", "DirLock", "RunDir", "StopFlag", "differences", "git_sha", "lock_dir", "provenance",
           "read_summary", "run_identity", "subject_hash"]
