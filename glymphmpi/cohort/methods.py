"""Methods the cohort layer can run, by name (a registry of named choices).

A method is a command line ``CMD [--quiet] NAME SUBJECT --out DIR [--config C] [ARGS]`` that
follows the run-directory contract (DESIGN.md section 2: summary.json with status complete /
failed / preempted, exit 75 after a checkpoint). The built-in ones are ``glymph romt``,
``glymph fem`` (MPI ranks) and ``glymph pinn`` (torch DDP); a cohort file may add its own
under ``[method.NAME]`` (``command``, ``kind``, ``args``), and code may call
:func:`register_method`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shlex
import shutil
import sys
from pathlib import Path

from glymphmpi.errors import InputError

KINDS = ("mpi", "torch", "serial")
#: job template (jobs/NAME.sbatch) per kind, for methods without their own template
KIND_TEMPLATE = {"mpi": "fem", "serial": "fem", "torch": "pinn"}


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One runnable method.

    Attributes:
        name: the method's name (also its config table and output directory name).
        kind: ``mpi`` (ranks via mpirun/srun), ``torch`` (DDP processes via torchrun/srun)
            or ``serial`` (one process).
        command: argv prefix of the CLI (``None`` = this Python's ``glymph``).
        args: extra arguments after ``SUBJECT --out DIR``.
        template: job template name in ``jobs/`` (default by kind).
        default_ranks: processes when the cohort does not say.
        module: module that must be importable for the method to count as installed
            (``None``: always available, e.g. an external command).
    """

    name: str
    kind: str = "mpi"
    command: tuple[str, ...] | None = None
    args: tuple[str, ...] = ()
    template: str | None = None
    default_ranks: int = 1
    module: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"method {self.name!r}: kind must be one of {', '.join(KINDS)}, not {self.kind!r}")

    @property
    def template_name(self) -> str:
        return self.template or KIND_TEMPLATE[self.kind]

    def installed(self) -> bool:
        if self.module is None:
            return True
        try:
            return importlib.util.find_spec(self.module) is not None
        except ModuleNotFoundError:
            return False

    def cli(self) -> list[str]:
        """The argv prefix that stands for ``glymph`` (e.g. ``[.../python, -m, glymphmpi]``)."""
        if self.command is not None:
            return list(self.command)
        exe = Path(sys.executable).with_name("glymph")
        if exe.exists():
            return [str(exe)]
        found = shutil.which("glymph")
        return [found] if found else [sys.executable, "-m", "glymphmpi"]

    def argv(self, subject: str | Path, outdir: str | Path, config: str | Path | None = None) -> list[str]:
        """Argument list after the launcher: ``CLI --quiet NAME SUBJECT --out DIR ...``."""
        a = [*self.cli(), "--quiet", self.name, str(subject), "--out", str(outdir)]
        if config is not None:
            a += ["--config", str(config)]
        return a + list(self.args)


_BUILTIN = {
    "romt": MethodSpec("romt", "mpi", default_ranks=2, module="glymphmpi.romt.cli"),
    "fem": MethodSpec("fem", "mpi", default_ranks=2, module="glymphmpi.fem.cli"),
    "pinn": MethodSpec("pinn", "torch", default_ranks=1, module="glymphmpi.pinn.cli"),
}
_REGISTRY: dict[str, MethodSpec] = dict(_BUILTIN)
# Opt-in (not part of the default method list): residual-guided PINN set-up selection. It trains its grid
# with local processes inside its own job (give it CPUs with [resources.pinn-select] cpus_per_task).
_REGISTRY["pinn-select"] = MethodSpec("pinn-select", "serial", default_ranks=1, module="glymphmpi.pinnselect.cli")


def register_method(spec: MethodSpec) -> None:
    """Add or replace a method in the process-wide registry."""
    _REGISTRY[spec.name] = spec


def builtin_names() -> list[str]:
    return list(_BUILTIN)


def installed_builtins() -> list[str]:
    """Built-in methods present in this checkout, in the canonical order romt, fem, pinn."""
    return [n for n, s in _BUILTIN.items() if s.installed()]


def get_method(name: str, extra: dict[str, MethodSpec] | None = None) -> MethodSpec:
    """The method ``name`` (cohort-defined ones first); fails with the list of valid names."""
    table = {**_REGISTRY, **(extra or {})}
    if name not in table:
        raise InputError(f"unknown method {name!r}; valid methods: {', '.join(sorted(table))}")
    return table[name]


def method_from_table(name: str, table: dict, where) -> MethodSpec:
    """A ``[method.NAME]`` table of a cohort file -> :class:`MethodSpec`."""
    allowed = {"command", "kind", "args", "template", "ranks"}
    unknown = set(table) - allowed
    if unknown:
        raise InputError(f"[method.{name}]: unknown key(s) {', '.join(sorted(unknown))} "
                         f"(valid: {', '.join(sorted(allowed))})", where)
    cmd = table.get("command")
    if isinstance(cmd, str):
        cmd = shlex.split(cmd)
    if not cmd or not all(isinstance(c, str) for c in cmd):
        raise InputError(f"[method.{name}]: 'command' must be a non-empty string or list of strings", where)
    args = table.get("args", [])
    if isinstance(args, str):
        args = shlex.split(args)
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise InputError(f"[method.{name}]: 'args' must be a list of strings", where)
    kind = table.get("kind", "serial")
    template = table.get("template")
    if template is not None and not isinstance(template, str):
        raise InputError(f"[method.{name}]: 'template' must be a string", where)
    ranks = table.get("ranks", 1)
    if not isinstance(ranks, int) or isinstance(ranks, bool) or ranks < 1:
        raise InputError(f"[method.{name}]: 'ranks' must be an integer >= 1", where)
    try:
        return MethodSpec(name, kind, tuple(cmd), tuple(args), template, ranks, None)
    except InputError as exc:
        raise InputError(str(exc), where) from None
