"""Settings of ``glymph pinn-select`` (table ``[pinn_select]``; light module)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from glymphmpi.config import NonNegative, NonNegativeInt, Positive, PositiveInt, UnitFraction


@dataclass(frozen=True)
class PinnSelectConfig:
    """Configuration of the set-up selection.

    Attributes:
        grid: grid TOML file (``[axes]``, ``[fixed]``); empty: the paper's
            grid. ``--grid`` on the command line takes precedence.
        seeds: seeds per set-up (each seed is one training run).
        misfit_tolerance: a set-up is eligible when its mean final data misfit
            is at most ``(1 + misfit_tolerance)`` times the best set-up's.
        early_stop_fraction: stop hopeless runs (D stuck at the lower bound or
            residual not falling; PinnConfig.early_stop_epochs) at this share of
            the epochs; 0: never. Set-ups that set early_stop_epochs keep theirs.
        parallel: local processes at once (0: the number of CPU cores).
        threads_per_run: torch/OpenMP threads of each local run.
        max_retries: re-runs of a failed run before it is recorded as failed.
        poll_s: seconds between SLURM status polls.
        scheduler: ``local`` (processes on this machine) or ``slurm`` (a job array);
            ``--scheduler`` on the command line.
        fem_run: an FEM run directory whose D to show beside the selection (``--fem``);
            empty: a sibling ``fem`` run when there is one.
        partition, account, qos, time: SLURM job-array settings.
        cpus_per_task, mem: SLURM resources of one array task.
    """

    grid: str = ""
    seeds: PositiveInt = 3
    misfit_tolerance: NonNegative = 0.25
    early_stop_fraction: UnitFraction = 0.25
    parallel: NonNegativeInt = 0
    threads_per_run: PositiveInt = 1
    max_retries: NonNegativeInt = 1
    poll_s: Positive = 2.0
    scheduler: Literal["local", "slurm"] = "local"
    fem_run: str = ""
    partition: str = ""
    account: str = ""
    qos: str = ""
    time: str = "02:00:00"
    cpus_per_task: PositiveInt = 1
    mem: str = "2G"

    #: settings that change where and how the grid trains, not its result (store.identity: a
    #: stopped selection may resume with other values)
    IDENTITY_EXCLUDE = ("parallel", "threads_per_run", "max_retries", "poll_s", "scheduler", "fem_run",
                        "partition", "account", "qos", "time", "cpus_per_task", "mem")

    def validate(self) -> None:
        """The SLURM job settings, checked like a cohort's [resources] (no control characters, SLURM syntax)."""
        from glymphmpi.cohort.resources import Resources

        Resources(ranks=1, cpus_per_task=self.cpus_per_task, mem=self.mem, time=self.time, partition=self.partition,
                  account=self.account, qos=self.qos).validate()
