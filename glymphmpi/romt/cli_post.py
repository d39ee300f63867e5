"""``glymph romt-post RESULTS_DIR [--config C] [--set romt_post.key=value] [--subject S]`` (light module).

Re-runs the Lagrangian post-processing of a finished rOMT run directory with
other settings: rewrites maps/, vtk/ and figures/ and updates summary.json
(atomically) with the new statistics. The subject is loaded from the path
recorded in summary.json (``subject_path``) or the results' attributes, or
from ``--subject``. Under mpirun the ranks split the seeds.
"""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "romt-post", help="re-run the rOMT post-processing (pathlines, speed/Pe maps, VTK, figures)",
        description="Pathlines of the augmented velocity v - sigma grad log rho from a finished rOMT run; "
                    "speed and Peclet maps (NIfTI), pathlines and flux vectors (VTK, world mm), figures, "
                    "statistics merged into summary.json.")
    p.add_argument("results_dir", metavar="RESULTS_DIR", help="a finished `glymph romt` output directory")
    p.add_argument("--config", help="TOML file with a [romt_post] table")
    p.add_argument("--set", action="append", default=[], metavar="romt_post.KEY=VALUE",
                   help="override a setting (repeatable), e.g. romt_post.seed_every=2")
    p.add_argument("--subject", help="subject TOML file (default: the one recorded in the run)")
    p.set_defaults(func=_cmd_romt_post)


def find_subject_path(root, summary: dict | None, explicit: str | None):
    """The subject file: ``--subject``, else summary.json's or results.h5's ``subject_path``."""
    from pathlib import Path

    from glymphmpi.errors import InputError
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


def _cmd_romt_post(args) -> int:
    import logging
    import time
    from pathlib import Path

    from glymphmpi.config import load_config
    from glymphmpi.errors import InputError
    from glymphmpi.io import atomic_write_json
    from glymphmpi.log import add_file_log
    from glymphmpi.parallel import launcher_env
    from glymphmpi.store import RunDir, read_summary
    from glymphmpi.subject import load_subject

    root = Path(args.results_dir)
    if not root.is_dir():
        raise InputError("not a directory (expected a `glymph romt` output directory)", root)
    summary = read_summary(root)
    if summary is None or summary.get("status") != "complete":
        raise InputError("summary.json is missing or not complete: not a finished rOMT run", root)
    if summary.get("method", "romt") != "romt":
        raise InputError(f"summary.json is from method {summary.get('method')!r}, not romt", root)
    comm = None
    if launcher_env()["world_size"] > 1:
        from glymphmpi.parallel import world

        comm = world()
    cfg = load_config("romt_post", args.config, args.set)
    subject_cfg = load_config("subject", args.config, [s for s in args.set if s.startswith("subject.")])
    subject = load_subject(find_subject_path(root, summary, args.subject), subject_cfg)
    rundir = RunDir(root, comm=comm)
    if rundir.rank == 0:
        for d in RunDir.SUBDIRS:
            (root / d).mkdir(exist_ok=True)
    handler = add_file_log(rundir.log, rundir.rank)
    t0 = time.time()
    try:
        from glymphmpi.romt.post import postprocess

        fields = postprocess(rundir, subject, cfg, comm=comm)
    finally:
        if handler is not None:
            logging.getLogger("glymphmpi").removeHandler(handler)
            handler.close()
    if rundir.rank == 0:
        new = dict(read_summary(root) or summary)
        new.update(fields)
        new["post_rerun_s"] = round(time.time() - t0, 3)
        atomic_write_json(rundir.summary, new)
        print(f"{fields['n_pathlines']} pathlines; median speed "
              f"{_fmt(fields['median_speed_mm_per_h'])} mm/h, median Pe {_fmt(fields['median_peclet'])}; "
              f"updated {rundir.summary}")
    return 0


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4g}"
