"""``glymph cohort run|status|report COHORT.toml --out DIR [--scheduler local|slurm]``.

The CLI layer of the cohort: it loads the cohort file, takes the output folder's lock, builds
the launcher with the cohort's reports as its hooks, and prints status tables. It is the one
cohort module that calls the report (the launchers know only :class:`~.tasks.Hooks`).
"""

from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("cohort", help="run, watch and summarise a whole cohort (local or SLURM)")
    sub = p.add_subparsers(dest="cohort_action", metavar="ACTION", parser_class=type(p))
    sub.required = True

    def common(s):
        s.add_argument("cohort", help="cohort TOML file (subjects, methods, resources, settings)")
        s.add_argument("--out", required=True, help="cohort output directory")
        s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a launcher option (cohort.max_attempts=5) or a method setting")

    r = sub.add_parser("run", help="run every method on every subject; resumes, skips what is complete")
    common(r)
    r.add_argument("--scheduler", choices=("local", "slurm"), default="local",
                   help="local: dask LocalCluster + mpirun/torchrun here (default); slurm: sbatch jobs")
    r.add_argument("--site", help="dask-jobqueue YAML (e.g. hpc/sites/generic-slurm.yaml) for the SLURM workers")
    r.add_argument("--retry-failed", action="store_true",
                   help="forget earlier failures (cohort.max_attempts counts from zero again)")
    r.set_defaults(func=_run)

    s = sub.add_parser("status", help="subject x method table: pending, running (job), complete, failed, resumable")
    common(s)
    s.add_argument("--json", action="store_true", help="print JSON instead of the table")
    s.set_defaults(func=_status)

    t = sub.add_parser("report", help="write the cohort CSV, HTML page and plot from the runs so far")
    common(t)
    t.set_defaults(func=_report)


def _load(args, validate_subjects=True):
    from .manifest import load_cohort

    return load_cohort(args.cohort, args.set, validate_subjects=validate_subjects)


def check_out(out) -> Path:
    """``--out`` of a cohort: a writable directory (made if missing), no control characters."""
    import os

    from glymphmpi.errors import InputError

    from .resources import has_control

    if has_control(str(out)):
        raise InputError(f"--out {str(out)!r} contains a control character (newline, tab, ...)")
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise InputError("--out is a file, not a directory", p)
    try:
        (p / "cohort").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out cannot be created: {exc.strerror}", p) from None
    if not os.access(p / "cohort", os.W_OK | os.X_OK):
        raise InputError("--out is not writable", p)
    return p.resolve()


def statuses(cohort, out, query_slurm: bool = False) -> dict:
    """How the launcher sees every run: ``{subject: {method: status}}`` (see state.status_table)."""
    return status_of(cohort, out, query_slurm)["runs"]


def status_of(cohort, out, query_slurm: bool = True) -> dict:
    from .state import status_table, uses_slurm

    out = Path(out)
    jobs = None
    if query_slurm and uses_slurm(out / "cohort"):
        from .sbatch import JobTable, available

        if available():
            jobs = JobTable.query()
    return status_table(cohort.run_tasks(out), out / "cohort", jobs, title=str(cohort.path), out=out)


class CohortReports:
    """The cohort's hooks: a subject's report when its runs have ended, the cohort report at the end.

    Picklable (dask-jobqueue workers run :meth:`group_done`).
    """

    def __init__(self, cohort, out: Path):
        self.cohort = cohort
        self.out = Path(out)

    def wants_group(self, row: str, has_runs: bool) -> bool:
        return has_runs or not (self.out / row / "report" / "summary.json").exists()

    def group_done(self, row: str, *after) -> None:
        from glymphmpi.report.cohort import subject_report

        del after
        subject_report(self.cohort, self.out, row, status=statuses(self.cohort, self.out).get(row))

    def finished(self, refresh: bool = True) -> list[str]:
        from glymphmpi.report.cohort import cohort_report, report_paths

        paths = report_paths(self.out)
        if refresh or not paths["html"].exists():
            cohort_report(self.cohort, self.out, statuses(self.cohort, self.out))
        return [f"report: {paths['html']}"]


def make_launcher(cohort, out, scheduler: str = "local", quiet: bool = False, site: bool = False,
                  cluster_factory=None):
    """The launcher of a cohort (its tasks, settings file and reports)."""
    from .launcher import write_settings
    from .tasks import LaunchSpec

    out = Path(out).resolve()
    workdir = out / "cohort"
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_settings(cohort.settings_toml() if cohort.settings else "", f"cohort {cohort.path}", workdir)
    spec = LaunchSpec(workdir=workdir, options=cohort.options, title=f"cohort {cohort.path.name}",
                      config_path=config, rerun=f"glymph cohort run {cohort.path} --out {out}",
                      hooks=CohortReports(cohort, out))
    tasks = cohort.run_tasks(out)
    if scheduler == "slurm":
        from .slurm import SlurmLauncher

        return SlurmLauncher(tasks, spec, quiet=quiet, site=site, cluster_factory=cluster_factory)
    from .local import LocalLauncher

    return LocalLauncher(tasks, spec, quiet=quiet)


def _run(args) -> int:
    from glymphmpi.errors import InputError
    from glymphmpi.store.lock import DirLock

    cohort = _load(args)
    out = check_out(args.out)
    if args.site:
        _load_site(args.site)
    if args.scheduler == "slurm":
        from .sbatch import available

        if not available():
            raise InputError("--scheduler slurm: no SLURM controller answers (sinfo); "
                             "for a local one: hpc/install.sh --slurm && hpc/slurm/up.sh")
    with DirLock(out / "cohort", what="glymph cohort run"):
        launcher = make_launcher(cohort, out, args.scheduler, quiet=args.quiet, site=bool(args.site))
        if args.retry_failed:
            launcher.ledger.forget_failures()
        return launcher.run()


def _load_site(path) -> None:
    """Merge a dask-jobqueue YAML site profile into dask's configuration."""
    import dask.config
    import yaml

    from glymphmpi.errors import InputError

    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise InputError(f"cannot read: {exc}", path) from None
    except yaml.YAMLError as exc:
        raise InputError(f"malformed YAML: {str(exc).splitlines()[0]}", path) from None
    if not isinstance(data, dict) or "jobqueue" not in data:
        raise InputError("a site profile needs a top-level 'jobqueue:' mapping (dask-jobqueue config)", path)
    dask.config.update(dask.config.config, data, priority="new")


def _status(args) -> int:
    import json

    from .state import format_status

    st = status_of(_load(args, validate_subjects=False), args.out)
    print(json.dumps(st, indent=2) if args.json else format_status(st))
    return 0


def _report(args) -> int:
    from glymphmpi.report.cohort import cohort_report, subject_report

    cohort = _load(args, validate_subjects=False)
    st = statuses(cohort, args.out)
    for s in cohort.subjects:
        subject_report(cohort, args.out, s.id, status=st.get(s.id))
    paths = cohort_report(cohort, args.out, st)
    print(f"report: {paths['html'].resolve()}")
    print(f"csv:    {paths['csv'].resolve()}")
    return 0
