"""What a launch runs: tasks (one method run each), the launch's settings, and its plan.

A task is one process tree that follows the run-directory contract (``summary.json`` with
status complete / failed / preempted, exit 75 after a checkpoint): ``CLI --quiet METHOD SUBJECT
--out OUTDIR [--config C] [METHOD ARGS] [TASK ARGS]``. A cohort makes one task per (subject,
method); pinn-select one per (set-up, seed) of its grid. Both run on the same launchers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .config import CohortConfig
from .methods import MethodSpec
from .resources import Resources
from .state import task_key, task_status


@dataclasses.dataclass(frozen=True)
class Task:
    """One run.

    Attributes:
        row, col: its place in the status table (subject and method; set-up and seed).
        subject: the subject TOML.
        method: what to run.
        outdir: its run directory.
        resources: scheduler resources.
        args: words appended to this run's command line (e.g. ``--set pinn.w_r=32``).
    """

    row: str
    col: str
    subject: Path
    method: MethodSpec
    outdir: Path
    resources: Resources
    args: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return task_key(self.row, self.col)

    def argv(self, config: Path | None) -> list[str]:
        """The command line of the run (without mpirun/srun)."""
        return self.method.argv(self.subject, self.outdir, config) + list(self.args)


class Hooks:
    """What a launch calls besides running tasks (a cohort's reports); default: nothing.

    ``group_done`` runs when every task of a row has ended (on a dask worker: it must be
    picklable); ``finished`` returns the lines to print at the end.
    """

    def wants_group(self, row: str, has_runs: bool) -> bool:  # noqa: ARG002
        return False

    def group_done(self, row: str, *after) -> None:  # noqa: ARG002
        return None

    def finished(self, refresh: bool = True) -> list[str]:  # noqa: ARG002
        return []


@dataclasses.dataclass
class LaunchSpec:
    """Everything a launcher needs to know besides the tasks.

    Attributes:
        workdir: the launch's own folder (state.json, logs/, jobs/, dask/): ``OUT/cohort``.
        options: launcher options (the cohort file's ``[cohort]`` table).
        title: shown in the first line (``cohort cohort.toml``).
        rows_noun: what the rows are, plural (``subjects``).
        config_path: the settings file passed to every run (``--config``), or None.
        rerun: the command that resumes the launch (printed when stopped).
        hooks: reports and other follow-ups.
        retries: failed runs started again at once within this launch (pinn-select);
            the cohort retries them on the next launch instead (``max_attempts``).
        throttle: most array tasks running at once (0: no limit).
    """

    workdir: Path
    options: CohortConfig
    title: str
    rows_noun: str = "subjects"
    config_path: Path | None = None
    rerun: str = ""
    hooks: Hooks = dataclasses.field(default_factory=Hooks)
    retries: int = 0
    throttle: int = 0


def plan(tasks: list[Task], ledger, max_attempts: int) -> tuple[list[Task], list[Task], list[Task]]:
    """Split the tasks into (to run, complete, given up)."""
    todo, done, gave_up = [], [], []
    for t in tasks:
        rec = ledger.get(t.key)
        st = task_status(t.outdir, {k: v for k, v in rec.items() if k != "state"})
        if st["state"] == "complete":
            done.append(t)
        elif rec.get("failures", 0) >= max_attempts:
            gave_up.append(t)
        else:
            todo.append(t)
    return todo, done, gave_up
