"""``glymph cohort run|status|report COHORT.toml --out DIR [--scheduler local|slurm]``."""

from __future__ import annotations


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


def _run(args) -> int:
    from glymphmpi.errors import InputError

    cohort = _load(args)
    if args.site:
        _load_site(args.site)
    from .launch import LocalLauncher, SlurmLauncher

    if args.scheduler == "slurm":
        launcher = SlurmLauncher(cohort, args.out, quiet=args.quiet, site=bool(args.site))
    else:
        launcher = LocalLauncher(cohort, args.out, quiet=args.quiet)
    if args.retry_failed:
        for rec in launcher.state.data["tasks"].values():
            if rec.get("state") != "complete":
                rec["failures"] = 0
    if args.scheduler == "slurm":
        from .sbatch import available

        if not available():
            raise InputError("--scheduler slurm: no SLURM controller answers (sinfo); "
                             "for a local one: hpc/install.sh --slurm && hpc/slurm/up.sh")
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

    from .state import cohort_status, format_status

    st = cohort_status(_load(args, validate_subjects=False), args.out)
    print(json.dumps(st, indent=2) if args.json else format_status(st))
    return 0


def _report(args) -> int:
    from glymphmpi.report.cohort import cohort_report, subject_report

    cohort = _load(args, validate_subjects=False)
    for s in cohort.subjects:
        subject_report(cohort, args.out, s.id)
    paths = cohort_report(cohort, args.out)
    print(f"report: {paths['html'].resolve()}")
    print(f"csv:    {paths['csv'].resolve()}")
    return 0
