"""The common shape of a method run: subject + config + run directory + summary.

Each method's CLI calls :func:`run_method` with a ``solve`` function; the
runner loads and validates the subject, resolves the config, prepares the
run directory (refusing complete output without ``--force``, resuming from a
checkpoint unless ``--fresh``), attaches the log file, records failures in
summary.json (status "failed" or "preempted" with the reason) and writes the
final summary last.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from glymphmpi.config import load_config
from glymphmpi.errors import GlymphError
from glymphmpi.log import add_file_log
from glymphmpi.store import RunDir
from glymphmpi.subject import load_subject

log = logging.getLogger(__name__)


def add_run_args(parser) -> None:
    """Arguments every method command shares."""
    parser.add_argument("subject", help="subject TOML file")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--config", help="TOML file with one table per method")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config key (repeatable), e.g. romt.beta=5000")
    parser.add_argument("--force", action="store_true", help="overwrite complete output")
    parser.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")


def run_method(method: str, args, solve: Callable, comm=None, config_section: str | None = None) -> dict:
    """Run ``solve(subject, config, rundir, comm) -> summary fields`` with the shared plumbing."""
    subject_cfg = load_config("subject", args.config, args.set)
    cfg = load_config(config_section or method, args.config, args.set)
    subject = load_subject(args.subject, subject_cfg)
    rundir = RunDir(args.out, comm=comm, force=args.force, fresh=args.fresh).prepare()
    handler = add_file_log(rundir.log, rundir.rank)
    log.info("%s on %s -> %s (%d rank%s)", method, subject.id, rundir.root, rundir.size,
             "" if rundir.size == 1 else "s")
    try:
        fields = solve(subject, cfg, rundir, comm)
        fields.setdefault("subject_path", str(subject.path))  # romt-post and reports find the subject
        summary = rundir.write_summary(method, subject.id, fields)
        log.info("done: %s", rundir.summary)
        return summary
    except GlymphError as exc:
        rundir.write_failure(method, subject.id, str(exc), exc.exit_code)
        raise
    except BaseException as exc:
        rundir.write_failure(method, subject.id, f"{type(exc).__name__}: {exc}".splitlines()[0], 1)
        raise
    finally:
        if handler is not None:
            logging.getLogger("glymphmpi").removeHandler(handler)
            handler.close()
