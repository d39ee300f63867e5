"""The ``[cohort]`` table: launcher options (light module, no heavy imports)."""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

from glymphmpi.config import NonNegativeInt, Positive, PositiveInt


@dataclasses.dataclass(frozen=True)
class CohortConfig:
    """Options of the cohort launcher (table ``[cohort]`` of a cohort file, or ``--set cohort.KEY=V``).

    Attributes:
        max_attempts: failed attempts of one (subject, method) run, over all launches, after
            which it is not retried (a failed run is retried by the next ``glymph cohort run``;
            stops after a checkpoint do not count).
        max_requeues: checkpointed stops (exit 75, time limit, preemption) one run may
            resume from within a launch (the job requeues itself or is resubmitted).
        poll_s: seconds between scheduler polls.
        array: submit one job array per method when several subjects share its resources.
        release_requeued: SLURM holds a requeued job for about two minutes (BeginTime);
            the launcher releases it at once (``scontrol update StartTime=now``).
        mpi_launcher: ``srun`` (PMI from ``srun_mpi``) or ``mpirun`` inside the sbatch jobs.
        srun_mpi: the ``--mpi`` plugin of srun (``pmix`` with Debian's Open MPI).
        interface: network interface of the dask scheduler and workers ("" = dask's
            default; ``lo`` in sandboxes and on a single node).
        dask_cores: cores of one dask-jobqueue worker job (per-subject reports).
        dask_memory: memory of one dask-jobqueue worker job.
        dask_walltime: wall time of one dask-jobqueue worker job.
        dask_max_jobs: most dask-jobqueue worker jobs at once (adaptive between 0 and this).
        report_wait_s: seconds the SLURM launcher waits, after every run has ended, for the
            subject reports on dask-jobqueue workers; then it writes the late ones itself (and says so).
        local_cores: cores the local scheduler shares between runs (0 = all of nproc).
        job_prefix: prefix of SLURM job names.
    """

    max_attempts: PositiveInt = 3
    max_requeues: NonNegativeInt = 3
    poll_s: Positive = 2.0
    array: bool = True
    release_requeued: bool = True
    mpi_launcher: Literal["srun", "mpirun"] = "srun"
    srun_mpi: str = "pmix"
    interface: str = ""
    dask_cores: PositiveInt = 1
    dask_memory: str = "1GB"
    dask_walltime: str = "01:00:00"
    dask_max_jobs: PositiveInt = 1
    report_wait_s: Positive = 600.0
    local_cores: NonNegativeInt = 0
    job_prefix: str = "glymph"

    def validate(self) -> None:
        """What the field declarations cannot say (they hold the choices and bounds)."""
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.job_prefix):
            raise ValueError(f"job_prefix: {self.job_prefix!r}: letters, digits, '-' and '_' only")
