"""THE method registry: every method ``glymph`` runs, declared once.

An explicit table (the pattern of torchdiffeq's ``SOLVERS``): :data:`METHODS` maps a name to a
:class:`Method`, and :func:`get` fails listing the valid names. The CLI builds its method
subcommands from it, config loading takes its tables from it, the runner builds the
communicator, calls ``solve`` and the figure hook from it, and the cohort plans, renders job
scripts and writes reports from it. Nothing is found by file name.

Every dotted path (``"package.module:attribute"``) is imported only when used, so this module
imports no method code: ``import glymphmpi.methods`` stays light and below the methods in the
layers (docs/architecture.md).

Adding a method is one module plus one entry here (or, for code outside the package, a
:class:`Method` object published under the entry-point group ``glymphmpi.methods``, or
:func:`register` in-process). The one ``solve`` signature::

    solve(subject, cfg, rundir, comm) -> dict      # summary fields

and the one figure-hook signature (rank 0, after solve, before summary.json)::

    figures(rundir, subject, cfg, fields) -> None
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from typing import Any

from glymphmpi.errors import InputError

KINDS = ("mpi", "torch", "serial")
_MISSING = object()


@dataclasses.dataclass(frozen=True)
class Option:
    """A method-specific command-line option that is a config override.

    ``Option("--mode", "romt.mode", "...", choices=(...))`` turns ``--mode parallel`` into the
    override ``romt.mode = "parallel"``; with ``value`` set the option is a flag without an
    argument (``Option("--no-post", "romt.postprocess", "...", value=False)``).
    """

    flag: str
    key: str
    help: str
    choices: tuple | None = None
    value: Any = _MISSING
    type: type = str
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return "opt_" + self.flag.lstrip("-").replace("-", "_")

    def add_to(self, parser) -> None:
        if self.value is not _MISSING:
            parser.add_argument(self.flag, dest=self.dest, action="store_true", help=self.help)
        else:
            parser.add_argument(self.flag, dest=self.dest, choices=self.choices, type=self.type,
                                metavar=self.metavar, default=None, help=self.help)

    def override(self, args) -> tuple[str, Any] | None:
        """``(dotted key, value)`` when the option was given, else None."""
        got = getattr(args, self.dest, None)
        if self.value is not _MISSING:
            return (self.key, self.value) if got else None
        return None if got is None else (self.key, got)


@dataclasses.dataclass(frozen=True)
class Method:
    """One method, declared in one place.

    Attributes:
        name: command and method name (``glymph NAME``; the run folder name in a cohort).
        help: one line for ``glymph --help``.
        title: display name in messages and reports (``rOMT``; default: the name).
        config: ``"module:Class"`` of its frozen config dataclass (a light module).
        solve: ``"module:function"``, ``solve(subject, cfg, rundir, comm) -> dict``.
        table: its table in a config file / ``--set`` section (default: the name).
        description: longer text of ``glymph NAME --help``.
        options: method-specific options, each a config override (no closures over args).
        comm: how the runner builds the communicator: ``"mpi"`` (``MPI.COMM_WORLD`` under a
            launcher with several ranks, else ``MPI.COMM_SELF``), ``"self"`` (always
            ``COMM_SELF``), or ``"module:factory"``, a context manager ``factory(cfg)`` yielding
            the communicator and tearing down after the run (the PINN's torch.distributed).
            Never None.
        requires: ``(module, pip extra or None)`` that must be importable to run it.
        summary: headline summary fields (reports, cohort CSV); each scalar one must be finite
            when present, else the run is recorded ``failed`` (a list, e.g. an interval, may hold NaN).
        figures: ``"module:function"`` hook ``(rundir, subject, cfg, fields)`` or None.
        kind: job kind: ``mpi`` (ranks), ``torch`` (DDP processes) or ``serial``.
        default_ranks: processes when a cohort does not say.
        template: job template ``jobs/TEMPLATE.sbatch`` (None: ``jobs/run.sbatch``, the generic one;
            the renderer sets METHOD and KIND, so any template serves any method).
        cohort_default: part of a cohort's method list when it names none.
        keep_negative: load the scans with their negative values (noise) rather than clipped to 0
            (:func:`glymphmpi.subject.load_subject`): for a least-squares fit whose noise model is
            zero-mean.
        updates: for a method that re-processes a finished run of another method (``romt-post``):
            that method's name. Its command takes ``RESULTS_DIR [--subject S]`` instead of
            ``SUBJECT --out DIR``, and its fields are merged into the existing summary.json.
    """

    name: str
    help: str
    config: str
    solve: str
    table: str = ""
    title: str = ""
    description: str = ""
    options: tuple[Option, ...] = ()
    comm: str = "mpi"
    requires: tuple[str, str | None] | None = None
    summary: tuple[str, ...] = ()
    figures: str | None = None
    kind: str = "serial"
    default_ranks: int = 1
    template: str | None = None
    cohort_default: bool = False
    updates: str | None = None
    keep_negative: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"method {self.name!r}: kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if not self.table:
            object.__setattr__(self, "table", self.name)
        if not self.title:
            object.__setattr__(self, "title", self.name)

    # ---------------------------------------------------------------- lazily resolved parts
    def config_class(self) -> type:
        return resolve(self.config)

    def solve_fn(self):
        return resolve(self.solve)

    def figures_fn(self):
        return None if self.figures is None else resolve(self.figures)

    def installed(self) -> bool:
        """Its code is present in this checkout (its solve module exists; not imported)."""
        try:
            return importlib.util.find_spec(self.solve.split(":")[0]) is not None
        except (ModuleNotFoundError, ValueError):
            return False

    def require(self) -> None:
        """Raise :class:`~glymphmpi.errors.MissingDependency` naming the fix when not installed."""
        if self.requires:
            from glymphmpi.errors import require

            require(self.requires[0], f"the method {self.name!r} (glymph {self.name})", self.requires[1])

    @property
    def template_name(self) -> str:
        return self.template or "run"


def resolve(path: str):
    """``"package.module:attr"`` -> the object (imported now)."""
    mod, _, attr = path.partition(":")
    obj = importlib.import_module(mod)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj


# ------------------------------------------------------------------------------ the table
_RUN = "Run under mpirun -n K for MPI."

METHODS: dict[str, Method] = {m.name: m for m in (
    Method(
        "romt", "regularized optimal mass transport velocities (run under mpirun -n K for MPI)",
        config="glymphmpi.romt.config:RomtConfig", solve="glymphmpi.romt.method:solve", title="rOMT",
        description="rOMT (Chen et al.): velocity fields moving each scan to the next with least kinetic "
                    "energy under advection-diffusion, then the Lagrangian post-processing (pathlines, speed "
                    "and Peclet maps, VTK, figures; settings in [romt.post]). Under mpirun, parallel mode "
                    "spreads the loops over the ranks; sequential mode splits each loop's particles.",
        options=(Option("--mode", "romt.mode", "overrides romt.mode: chain loops (sequential), start each "
                        "from its scan (parallel), or parallel then sweeps to the chain (coupled)",
                        choices=("sequential", "parallel", "coupled")),
                 Option("--no-post", "romt.postprocess", "skip the post-processing (maps, figures, VTK)",
                        value=False)),
        comm="mpi", requires=("scipy", None),
        summary=("median_speed_mm_per_h", "median_peclet", "fraction_pe_gt_1", "n_pathlines"),
        figures="glymphmpi.report.romt_figures:figures",
        kind="mpi", default_ranks=2, template="romt", cohort_default=True),
    Method(
        "fem", "FEM optimal control (DOLFINx + PETSc TAO over MPI): D and boundary concentration",
        config="glymphmpi.fem.config:FemConfig", solve="glymphmpi.fem.solve:solve", title="FEM",
        description="Optimal control of dc/dt = D lap c (Valnes et al.): D and the boundary concentration "
                    "fitted to the scans with PETSc TAO on a DOLFINx Q1 mesh of the mask. " + _RUN,
        comm="mpi", requires=("dolfinx", None),
        summary=("D_mm2_per_h", "D_ci95_mm2_per_h", "iterations", "J"),
        figures="glymphmpi.report.fem_figures:figures",
        kind="mpi", default_ranks=2, template="fem", cohort_default=True, keep_negative=True),
    Method(
        "pinn", "physics-informed neural network estimate of D (torchrun/srun/mpirun for DDP)",
        config="glymphmpi.pinn.config:PinnConfig", solve="glymphmpi.pinn.run:solve", title="PINN",
        description="Fit c(x, t) and D to the scans with a PINN (Zapf et al. 2022); writes summary.json, "
                    "results.h5, maps/ and figures/ in --out. Several processes (torchrun, srun, mpirun) "
                    "train data-parallel.",
        comm="glymphmpi.pinn.run:communicator", requires=("torch", "pinn"),
        summary=("D_mm2_per_h", "D_std_mm2_per_h", "residual_norm"),
        figures="glymphmpi.report.pinn_figures:figures",
        kind="torch", default_ranks=1, template="pinn", cohort_default=True),
    Method(
        "pinn-select", "train a grid of PINN set-ups and pick the lowest-residual one",
        config="glymphmpi.pinnselect.config:PinnSelectConfig", solve="glymphmpi.pinnselect.run:solve",
        table="pinn_select", title="PINN set-up selection",
        description="Trains a grid of PINN set-ups (default: w_r in {1,32,64,256}, p in {2, 2->1, 1}, two "
                    "learning-rate schedules, with/without RAR) x seeds, locally or as a SLURM job array, and "
                    "selects the set-up with the lowest PDE residual among those whose data misfit is within "
                    "a tolerance of the best. Re-runs train only what is not complete.",
        options=(Option("--grid", "pinn_select.grid", "grid TOML ([axes] and [fixed] tables); default: the "
                        "paper's grid", metavar="GRID.toml"),
                 Option("--scheduler", "pinn_select.scheduler", "where the grid's runs train",
                        choices=("local", "slurm")),
                 Option("--fem", "pinn_select.fem_run", "an FEM run directory whose D to show beside the "
                        "selection", metavar="DIR")),
        comm="self", requires=("torch", "pinn"),
        summary=("D_mm2_per_h", "D_std_mm2_per_h", "residual_norm"),
        figures=None,  # its one figure is part of the selection (pinnselect.run)
        # it trains its grid with local processes inside its own job (give it CPUs with
        # [resources.pinn-select] cpus_per_task): opt-in, not a default cohort method
        kind="serial", default_ranks=1, template=None, cohort_default=False),
    Method(
        "romt-post", "re-run the rOMT post-processing (pathlines, speed/Pe maps, VTK, figures)",
        config="glymphmpi.romt.config:RomtConfig", solve="glymphmpi.romt.method:solve_post", table="romt",
        title="rOMT post-processing",
        description="Pathlines of the augmented velocity v - sigma grad log rho from a finished rOMT run "
                    "(settings: [romt.post], e.g. --set romt.post.seed_every=2); speed and Peclet maps "
                    "(NIfTI), pathlines and flux vectors (VTK, world mm), figures, statistics merged into "
                    "summary.json. Under mpirun the ranks split the seeds.",
        comm="mpi", requires=("scipy", None),
        summary=("median_speed_mm_per_h", "median_peclet", "fraction_pe_gt_1", "n_pathlines"),
        figures="glymphmpi.report.romt_figures:figures",
        kind="mpi", default_ranks=1, template="romt", cohort_default=False, updates="romt"),
)}

#: config tables that belong to no method: name -> "module:Class"
OTHER_TABLES = {"subject": "glymphmpi.config:SubjectConfig", "cohort": "glymphmpi.cohort.config:CohortConfig"}
#: old table names still accepted in files and ``--set`` (alias -> dotted table path)
TABLE_ALIASES = {"romt_post": "romt.post"}

_plugins_loaded = False


def _load_plugins() -> None:
    """Methods published by installed distributions under the entry-point group ``glymphmpi.methods``."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group="glymphmpi.methods"):
        try:
            m = ep.load()
        except Exception as exc:  # a broken plugin must not take the built-in methods down
            import logging

            logging.getLogger(__name__).warning("method plugin %s not loaded: %s", ep.name, exc)
            continue
        if not isinstance(m, Method):
            raise InputError(f"entry point glymphmpi.methods:{ep.name} is not a glymphmpi.methods.Method")
        METHODS.setdefault(m.name, m)


def register(method: Method) -> None:
    """Add (or replace) a method for this process."""
    METHODS[method.name] = method


def all_methods() -> dict[str, Method]:
    _load_plugins()
    return METHODS


def names() -> list[str]:
    return list(all_methods())


def get(name: str) -> Method:
    """The method ``name``; an :class:`InputError` listing the valid names otherwise."""
    table = all_methods()
    if name not in table:
        raise InputError(f"unknown method {name!r}; valid methods: {', '.join(table)}")
    return table[name]


def cohort_defaults() -> list[str]:
    """The methods a cohort runs when it names none: default ones that are installed, in table order."""
    return [n for n, m in all_methods().items() if m.cohort_default and m.installed()]


# ------------------------------------------------------------------------------ config tables
def config_tables() -> dict[str, type]:
    """Every config table: name -> frozen dataclass (``subject``, the methods' tables in registry
    order, then the other tables of :data:`OTHER_TABLES`)."""
    out: dict[str, type] = {"subject": resolve(OTHER_TABLES["subject"])}
    for m in all_methods().values():
        out.setdefault(m.table, m.config_class())
    for name, path in OTHER_TABLES.items():
        out.setdefault(name, resolve(path))
    return out


def known_sections() -> list[str]:
    return sorted(config_tables())


def config_class(section: str) -> type:
    """The dataclass of a table (``"fem"``, ``"romt.post"``, or an alias such as ``romt_post``)."""
    from glymphmpi.config import table_class

    return table_class(config_tables(), section, TABLE_ALIASES)


def load_config(section: str, path=None, overrides=()):
    """Resolve one table (``"romt"``, ``"romt.post"``, ...) from an optional TOML file and overrides.

    See :func:`glymphmpi.config.resolve_table`; the tables are those of the registry.
    """
    from glymphmpi.config import resolve_table

    return resolve_table(config_tables(), section, path, overrides, TABLE_ALIASES)
