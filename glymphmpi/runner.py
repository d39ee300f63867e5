"""The common shape of a method run: subject + config + communicator + run directory + summary.

:func:`run_method` runs a :class:`~glymphmpi.methods.Method` of the registry: it resolves the
config (one table, the method's command-line options as overrides), builds the communicator
the entry asks for (always one: ``COMM_SELF`` in serial), loads and validates the subject,
prepares the run directory (refusing complete output without ``--force``, resuming from a
checkpoint unless ``--fresh``), attaches the log file, calls ``solve(subject, cfg, rundir,
comm)``, checks that the headline results are finite, calls the figure hook on rank 0, and
writes summary.json last. Failures are recorded in summary.json (status "failed" or
"preempted" with the reason).

A method with ``updates`` set (``romt-post``) re-processes a finished run of another method:
the run directory is that run's, the subject the one it recorded, and the new fields are
merged into its summary.json.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

from glymphmpi.errors import GlymphError, InputError
from glymphmpi.log import file_log
from glymphmpi.methods import Method, get, load_config, resolve
from glymphmpi.subject import load_subject

log = logging.getLogger(__name__)


def add_run_args(parser, method: Method | None = None) -> None:
    """Arguments of a method command: the shared ones, then the method's own options."""
    if method is not None and method.updates:
        parser.add_argument("results_dir", metavar="RESULTS_DIR",
                            help=f"a finished `glymph {method.updates}` output directory")
        parser.add_argument("--subject", help="subject TOML file (default: the one recorded in the run)")
    else:
        parser.add_argument("subject", help="subject TOML file")
        parser.add_argument("--out", required=True, help="output directory")
        parser.add_argument("--force", action="store_true", help="overwrite complete output")
        parser.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    parser.add_argument("--config", help="TOML file with one table per method")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config key (repeatable), e.g. romt.beta=5000")
    for opt in method.options if method is not None else ():
        opt.add_to(parser)


def overrides(method: Method | None, args) -> list:
    """``--set`` items, then the method's options as ``(dotted key, value)`` overrides."""
    out = list(getattr(args, "set", None) or [])
    for opt in method.options if method is not None else ():
        o = opt.override(args)
        if o is not None:
            out.append(o)
    return out


@contextlib.contextmanager
def open_comm(method: Method, cfg):
    """The communicator ``method.comm`` asks for (never None); torn down on exit."""
    if method.comm in ("mpi", "self"):
        from glymphmpi.parallel import mpi_comm

        yield mpi_comm(serial=method.comm == "self")
        return
    with resolve(method.comm)(cfg) as comm:
        yield comm


def finite_problems(method: Method, fields: dict) -> list[str]:
    """The method's headline numbers (``method.summary``) that are NaN or infinite.

    Scalars only: a list-valued headline (an interval such as ``D_ci95_mm2_per_h``) may hold NaN
    where the interval is unavailable; the point estimate next to it is what must be finite.
    """
    bad = []
    for k in method.summary:
        v = fields.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v):
            bad.append(f"{k} = {v}")
    return bad


def _figures_call(comm, fn, *args) -> None:
    """A figure hook: on every rank with ``comm=`` when it says ``collective = True`` (it splits its
    figures over the ranks and returns the same on all), else on rank 0 alone."""
    if getattr(fn, "collective", False) and comm.size > 1:
        fn(*args, comm=comm)
    else:
        _rank0_call(comm, fn, *args)


def _rank0_call(comm, fn, *args) -> None:
    """Call ``fn`` on rank 0; an exception there is raised on every rank (the ranks stay together)."""
    err = None
    if comm.rank == 0:
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            err = exc
    if comm.size > 1:
        msg = comm.bcast(None if err is None else f"{type(err).__name__}: {err}", root=0)
        if msg and comm.rank != 0:
            raise GlymphError(f"failed on rank 0: {msg}")
    if err is not None:
        raise err


def run_method(method, args, solve=None, comm=None, config_section: str | None = None) -> dict:
    """Run a registered method (``method``: its name or :class:`Method`) with the shared plumbing.

    ``solve``/``comm``/``config_section`` serve callers outside the registry (a test's own
    command line): ``solve(subject, cfg, rundir, comm)`` with the config table
    ``config_section`` (default: the method's name) and ``comm`` (default: ``COMM_SELF``).
    """
    if solve is not None:  # an ad-hoc method outside the registry
        m = Method(str(method), "", config="", solve="", table=config_section or str(method), comm="self")
        cfg = load_config(m.table, args.config, overrides(None, args))
        if comm is None:
            from glymphmpi.parallel import mpi_comm

            comm = mpi_comm(serial=True)
        return _run(m, args, cfg, comm, solve, None)
    m = method if isinstance(method, Method) else get(method)
    cfg = load_config(m.table, args.config, overrides(m, args))
    m.require()
    with open_comm(m, cfg) as comm:
        if m.updates:
            return _update(m, args, cfg, comm)
        return _run(m, args, cfg, comm, m.solve_fn(), m.figures_fn())


def _run(m: Method, args, cfg, comm, solve, figures) -> dict:
    from glymphmpi.store import RunDir, run_identity

    subject_cfg = load_config("subject", args.config, overrides(m, args))
    subject = load_subject(args.subject, subject_cfg, keep_negative=m.keep_negative)
    # locks OUT (one run at a time) and refuses to resume another run's unfinished state
    rundir = RunDir(args.out, comm=comm, force=args.force, fresh=args.fresh).prepare(
        identity=run_identity(m.name, subject, cfg))
    with file_log(rundir.log, rundir.rank):
        return _solve_and_record(m, subject, cfg, rundir, comm, solve, figures)


def _solve_and_record(m: Method, subject, cfg, rundir, comm, solve, figures) -> dict:
    """solve, the finiteness check, the figure hook and summary.json; a failure recorded as such."""
    log.info("%s on %s -> %s (%d rank%s)", m.name, subject.id, rundir.root, rundir.size,
             "" if rundir.size == 1 else "s")
    try:
        fields = solve(subject, cfg, rundir, comm)
        fields.setdefault("subject_path", str(subject.path))  # romt-post and reports find the subject
        bad = finite_problems(m, fields)
        if bad:
            raise GlymphError(f"{m.name}: the result is not finite ({', '.join(bad)}); not marked complete")
        if figures is not None:
            _figures_call(comm, figures, rundir, subject, cfg, fields)
        summary = rundir.write_summary(m.name, subject.id, fields)
        log.info("done: %s", rundir.summary)
        return summary
    except GlymphError as exc:
        rundir.write_failure(m.name, subject.id, str(exc), exc.exit_code)
        raise
    except BaseException as exc:
        rundir.write_failure(m.name, subject.id, f"{type(exc).__name__}: {exc}".splitlines()[0], 1)
        raise
    finally:
        rundir.release()


def find_subject_path(root, summary: dict | None, explicit: str | None) -> Path:
    """The subject file of a finished run: ``explicit``, else summary.json's or results.h5's ``subject_path``."""
    from glymphmpi.io import read_h5_attrs

    if explicit:
        return Path(explicit)
    candidates = []
    for key in ("subject_path", "subject_file"):
        if summary and summary.get(key):
            candidates.append(summary[key])
    try:
        attrs = read_h5_attrs(Path(root) / "results.h5")
    except OSError:
        attrs = {}
    for key in ("subject_path", "subject_file"):
        if attrs.get(key):
            candidates.append(attrs[key])
    for c in candidates:
        p = Path(str(c))
        if not p.is_absolute():
            p = Path(root) / p
        if p.exists():
            return p
    if candidates:
        raise InputError(f"the recorded subject file {candidates[0]} does not exist; give --subject", root)
    raise InputError("no subject file recorded in summary.json or results.h5; give --subject", root)


def _update(m: Method, args, cfg, comm) -> dict:
    """Re-process the finished run ``args.results_dir`` of method ``m.updates``; merge the summary."""
    from glymphmpi.io import atomic_write_json
    from glymphmpi.store import RunDir, read_summary

    base = get(m.updates)
    what = base.title or base.name
    root = Path(args.results_dir)
    if not root.is_dir():
        raise InputError(f"not a directory (expected a `glymph {base.name}` output directory)", root)
    summary = read_summary(root)
    if summary is None or summary.get("status") != "complete":
        raise InputError(f"summary.json is missing or not complete: not a finished {what} run", root)
    if summary.get("method", base.name) != base.name:
        raise InputError(f"summary.json is from method {summary.get('method')!r}, not {base.name}", root)
    subject_cfg = load_config("subject", args.config, overrides(m, args))
    subject = load_subject(find_subject_path(root, summary, args.subject), subject_cfg)
    rundir = RunDir(root, comm=comm).lock()
    if rundir.rank == 0:
        for d in RunDir.SUBDIRS:
            (root / d).mkdir(exist_ok=True)
    t0 = time.time()
    try:
        with file_log(rundir.log, rundir.rank):
            fields = m.solve_fn()(subject, cfg, rundir, comm)
            bad = finite_problems(m, fields)
            if bad:
                raise GlymphError(f"{m.name}: the result is not finite ({', '.join(bad)}); "
                                  "summary.json not updated")
            figures = m.figures_fn()
            if figures is not None:
                _figures_call(comm, figures, rundir, subject, cfg, fields)
    except BaseException:
        rundir.release()
        raise
    new = dict(read_summary(root) or summary)
    if rundir.rank == 0:
        new.update(fields)
        new["post_rerun_s"] = round(time.time() - t0, 3)
        atomic_write_json(rundir.summary, new)
        head = ", ".join(f"{k} {_fmt(fields.get(k))}" for k in m.summary if k in fields)
        print(f"{m.name}: {head}; updated {rundir.summary}")
    rundir.release()  # after the summary: nothing else may write here meanwhile
    return new


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)
