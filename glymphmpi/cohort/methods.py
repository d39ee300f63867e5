"""Methods a cohort can run: the registry's methods plus the cohort file's own commands.

A method is a command line ``CMD [--quiet] NAME SUBJECT --out DIR [--config C] [ARGS]`` that
follows the run-directory contract (docs/architecture.md: summary.json with status complete /
failed / preempted, exit 75 after a checkpoint). The built-in ones are those of the method
registry (:mod:`glymphmpi.methods`: job kind, default ranks, job template and headline summary
fields are declared there); a cohort file may add its own under ``[method.NAME]`` (``command``,
``kind``, ``args``, ``template``, ``ranks``).
"""

from __future__ import annotations

import dataclasses
import shlex
import shutil
import sys
from pathlib import Path

from glymphmpi import methods as registry
from glymphmpi.errors import InputError

KINDS = registry.KINDS
#: job template of a method that names none (jobs/run.sbatch: METHOD and KIND are set when rendered)
DEFAULT_TEMPLATE = "run"


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One runnable method.

    Attributes:
        name: the method's name (also its config table and output directory name).
        kind: ``mpi`` (ranks via mpirun/srun), ``torch`` (DDP processes via torchrun/srun)
            or ``serial`` (one process).
        command: argv prefix of the CLI (``None`` = this Python's ``glymph``).
        args: extra arguments after ``SUBJECT --out DIR``.
        template: job template name in ``jobs/`` (None: ``jobs/run.sbatch``).
        default_ranks: processes when the cohort does not say.
        builtin: a method of the registry (else an external command of the cohort file).
        headline: the summary.json fields reports show first (the registry's ``summary``);
            empty for an external command (reports then show its top-level numbers).
    """

    name: str
    kind: str = "mpi"
    command: tuple[str, ...] | None = None
    args: tuple[str, ...] = ()
    template: str | None = None
    default_ranks: int = 1
    builtin: bool = False
    headline: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"method {self.name!r}: kind must be one of {', '.join(KINDS)}, not {self.kind!r}")

    @property
    def template_name(self) -> str:
        return self.template or DEFAULT_TEMPLATE

    def installed(self) -> bool:
        return not self.builtin or registry.get(self.name).installed()

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


def from_registry(m) -> MethodSpec:
    """The cohort's view of a registered :class:`glymphmpi.methods.Method`."""
    return MethodSpec(m.name, m.kind, template=m.template, default_ranks=m.default_ranks, builtin=True,
                      headline=tuple(m.summary))


def default_methods() -> list[str]:
    """The methods a cohort runs when its file names none (the registry's defaults, installed)."""
    return registry.cohort_defaults()


def get_method(name: str, extra: dict[str, MethodSpec] | None = None) -> MethodSpec:
    """The method ``name`` (the cohort file's own ones first); fails with the list of valid names."""
    if extra and name in extra:
        return extra[name]
    cohortable = [n for n, m in registry.all_methods().items() if not m.updates]
    if name not in cohortable:
        valid = sorted(set(cohortable) | set(extra or {}))
        raise InputError(f"unknown method {name!r}; valid methods: {', '.join(valid)}")
    return from_registry(registry.get(name))


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
    from .resources import CONTROL

    for w in [*cmd, *args]:
        if CONTROL.search(w):
            raise InputError(f"[method.{name}]: {w!r} contains a control character", where)
    kind = table.get("kind", "serial")
    template = table.get("template")
    if template is not None and not (isinstance(template, str) and template.replace("-", "").replace(
            "_", "").isalnum()):
        raise InputError(f"[method.{name}]: 'template' must be the name of a jobs/NAME.sbatch file", where)
    ranks = table.get("ranks", 1)
    if not isinstance(ranks, int) or isinstance(ranks, bool) or ranks < 1:
        raise InputError(f"[method.{name}]: 'ranks' must be an integer >= 1", where)
    try:
        return MethodSpec(name, kind, tuple(cmd), tuple(args), template, ranks)
    except InputError as exc:
        raise InputError(str(exc), where) from None
