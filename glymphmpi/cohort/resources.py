"""Scheduler resources of one run, and what SLURM accepts for each value.

Every value that reaches a job script is checked here, once, with ``re.fullmatch`` (a ``$``
anchor would let a trailing newline through) and refused when it holds a control character.
Used by the cohort file's ``[resources]`` tables and by pinn-select's ``[pinn_select]`` job
settings alike.
"""

from __future__ import annotations

import dataclasses
import re

#: ASCII control characters (newline, tab, carriage return, escape, DEL, ...)
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: ids used in job names and paths (subjects, methods): no leading '.' or '-'
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: SLURM --time: minutes, minutes:seconds, hours:minutes:seconds, days-hours[:minutes[:seconds]]
TIME_RE = re.compile(r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}|UNLIMITED|INFINITE")
MEM_RE = re.compile(r"\d+[KMGT]?")
NAME_LIST_RE = re.compile(r"[A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*")  # partition, qos: comma lists
NAME_RE = re.compile(r"[A-Za-z0-9._-]+")  # account
CONSTRAINT_RE = re.compile(r"[A-Za-z0-9._,&|:*\[\]()-]+")
#: one sbatch option: ``--name`` or ``--name=value`` (the value is quoted when rendered)
EXTRA_RE = re.compile(r"--[A-Za-z][A-Za-z0-9-]*(=.*)?", re.S)
JOB_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,200}")


def has_control(value: str) -> bool:
    return CONTROL.search(value) is not None


def check_text(value: str, what: str) -> str:
    """``value`` unless it holds a control character (ValueError naming ``what``)."""
    if has_control(value):
        raise ValueError(f"{what} {value!r} contains a control character (newline, tab, ...)")
    return value


def check_id(value, what: str) -> str:
    """An id for job names and paths: letters, digits, '.', '_', '-', not starting with '.' or '-'."""
    if not isinstance(value, str) or not SAFE_ID.fullmatch(value):
        raise ValueError(f"{what} {value!r} is not safe for job names and paths "
                         "(letters, digits, '.', '_', '-'; not starting with '.' or '-'; at most 64)")
    return value


def check_time(value: str, what: str = "time") -> str:
    if not isinstance(value, str) or not TIME_RE.fullmatch(value):
        raise ValueError(f"{what} {value!r} is not a SLURM time (MM, HH:MM:SS, D-HH:MM:SS)")
    return value


def check_extra(option: str) -> str:
    if not isinstance(option, str) or has_control(option) or not EXTRA_RE.fullmatch(option):
        raise ValueError(f"extra {option!r} is not one sbatch option like \"--exclusive\" or "
                         "\"--gres=gpu:1\" (no control characters)")
    return option


@dataclasses.dataclass(frozen=True)
class Resources:
    """Scheduler resources of one method's run on one subject.

    Attributes:
        ranks: MPI ranks (mpi), DDP processes (torch), 1 (serial).
        gpus: GPUs per node (torch: one process per GPU; ``--gpus-per-node``).
        cpus_per_task: CPU cores per rank (``--cpus-per-task``; OMP_NUM_THREADS).
        nodes: nodes (``--nodes``), 0 = let SLURM choose.
        mem: memory per node, SLURM syntax (``"4G"``), "" = site default.
        time: wall time, SLURM syntax (``"01:00:00"``, ``"1-00:00:00"``).
        partition, account, qos, constraint: passed on when not empty.
        image: Apptainer image (.sif): runs ``apptainer exec`` (``--nv`` with GPUs).
        bind: Apptainer ``--bind`` list (e.g. ``"/data,/scratch"``).
        extra: further sbatch options, one option per entry (e.g. ``["--exclusive"]``).
    """

    ranks: int = 0
    gpus: int = 0
    cpus_per_task: int = 1
    nodes: int = 0
    mem: str = ""
    time: str = "01:00:00"
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    image: str = ""
    bind: str = ""
    extra: tuple[str, ...] = ()

    def validate(self) -> None:
        if self.ranks < 0 or self.gpus < 0 or self.cpus_per_task < 1 or self.nodes < 0:
            raise ValueError("ranks, gpus and nodes must be >= 0 and cpus_per_task >= 1")
        check_time(self.time)
        if self.mem and not MEM_RE.fullmatch(self.mem):
            raise ValueError(f"mem {self.mem!r} is not a SLURM size like 4G or 4000M")
        for key, rx in (("partition", NAME_LIST_RE), ("account", NAME_RE), ("qos", NAME_LIST_RE),
                        ("constraint", CONSTRAINT_RE)):
            v = getattr(self, key)
            if v and not rx.fullmatch(v):
                raise ValueError(f"{key} {v!r} has characters SLURM does not accept")
        check_text(self.image, "image")
        check_text(self.bind, "bind")
        for e in self.extra:
            check_extra(e)

    def processes(self, spec) -> int:
        """Processes of one run of method ``spec``: ranks, else GPUs (torch), else its default."""
        if spec.kind == "serial":
            return 1
        if self.ranks:
            return self.ranks
        if spec.kind == "torch" and self.gpus:
            return self.gpus * max(self.nodes, 1)
        return spec.default_ranks
