"""``glymph bids``, ``glymph concentration`` and ``glymph synth bids`` (CLI wiring of the BIDS front end).

``glymph bids BIDS_DIR OUTPUT_DIR participant|group [--participant-label L ...] [--methods fem,...]``
follows the BIDS-Apps convention:

* ``participant``: for each selected participant, check everything first (nothing is written
  when any participant's input is bad), then write the concentration series and the subject
  TOML into the derivative dataset, then run the chosen methods through the cohort backend
  (``glymph cohort run`` on ``OUTPUT_DIR/code/cohort-<labels>.toml`` with ``--out OUTPUT_DIR``:
  local or SLURM, arrays, checkpoints, requeue and resume apply; a re-run does only what is
  missing), export the method maps under BIDS names and write ``OUTPUT_DIR/sub-<l>.html``.
* ``group``: the cohort report over every participant processed so far
  (``OUTPUT_DIR/code/cohort.toml``) and the per-subject pages again.

``glymph concentration BIDS_DIR OUTPUT_DIR`` is the first stage alone.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)


BIDS_HELP = """A BIDS App (BIDS_DIR OUTPUT_DIR participant|group), writing a BIDS derivative dataset.

participant: check every selected participant, write the concentration series and a subject TOML per
  participant, run the chosen methods through the cohort backend (local or SLURM; a re-run does only
  what is missing), export the method maps under BIDS names and write OUTPUT_DIR/sub-<label>.html.
group: the cohort report over every participant processed so far, and the per-subject pages again."""


def _add_conc_args(p) -> None:
    p.add_argument("bids_dir", help="raw BIDS dataset (one session per time point)")
    p.add_argument("output_dir", help="derivative dataset to write")
    p.add_argument("--participant-label", nargs="+", default=[], metavar="L",
                   help="participants to process (01 or sub-01); default: all")
    p.add_argument("--route", default="auto", choices=("auto", "t1map", "t1w", "enhancement"),
                   help="signal to concentration: auto = t1map when every session has a T1 map, else t1w")
    p.add_argument("--r1", type=float, help="relaxivity in L/(mmol s) (default: the table, by agent and field)")
    p.add_argument("--agent", help="contrast agent (default: the ce- entity): gadobutrol, gadoterate, gadopentetate")
    p.add_argument("--field-strength", type=float, dest="field_T", help="tesla (default: MagneticFieldStrength)")
    p.add_argument("--t1-0", type=float, dest="t1_0",
                   help="t1w route without a baseline T1 map: assumed T1_0 in s (flagged in the outputs)")
    p.add_argument("--tissue", default="wm", choices=("wm", "gm", "csf"),
                   help="t1w route without a baseline T1 map and --t1-0: the tissue whose tabulated T1_0 is assumed")
    p.add_argument("--mask-dir", help="mask derivative: DIR/sub-<l>/anat/sub-<l>_desc-<desc>_mask.nii.gz "
                                      "(default: an automatic mask, reported as such)")
    p.add_argument("--mask-desc", default="brain", help="the desc- label of the masks (default: brain)")
    p.add_argument("--injection-time", help="ISO date-time of the injection, with acq_time in sessions.tsv")
    p.add_argument("--baseline-session", dest="baseline", help="the pre-contrast session (default: the earliest)")


def register(subparsers) -> None:
    b = subparsers.add_parser("bids", help="BIDS App: BIDS_DIR OUTPUT_DIR participant|group",
                              description=BIDS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_conc_args(b)
    b.add_argument("analysis_level", choices=("participant", "group"))
    b.add_argument("--methods", default="fem",
                   help="comma-separated methods (default: fem; 'none': concentration only)")
    b.add_argument("--scheduler", choices=("local", "slurm"), default="local")
    b.add_argument("--config", help="TOML file with one table per method (settings of the runs)")
    b.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a method setting or a cohort option (fem.max_iterations=20, cohort.max_attempts=2)")
    b.set_defaults(func=_cmd_bids)

    c = subparsers.add_parser("concentration", help="MR signal to tracer concentration: BIDS_DIR OUTPUT_DIR",
                              description="The first stage of `glymph bids`: T1 maps or T1-weighted images to "
                                          "concentration (mmol/L), or relative enhancement, as a BIDS derivative "
                                          "with a subject TOML per participant.")
    _add_conc_args(c)
    c.set_defaults(func=_cmd_concentration)

    synth = subparsers.choices.get("synth")
    if synth is not None:
        sub = next(a for a in synth._actions if isinstance(a, argparse._SubParsersAction))
        s = sub.add_parser("bids", help="raw BIDS dataset from the brain phantom through the MR signal equations")
        s.add_argument("out", help="dataset folder")
        s.add_argument("--subjects", type=int, default=2)
        s.add_argument("--routes", default="t1map,t1w", help="per subject, cycled: t1map (T1 maps) or t1w (SPGR T1w)")
        s.add_argument("--block", type=int, nargs=3, default=[12, 12, 12], metavar=("NI", "NJ", "NK"))
        s.add_argument("--times", default="0,7,24,46", help="session times in hours (the first is the baseline)")
        s.add_argument("--D", type=float, default=0.72, help="the phantom's D in mm^2/h")
        s.add_argument("--noise", type=float, default=0.0, help="image noise std relative to the baseline mean")
        s.add_argument("--agent", default="gadobutrol")
        s.add_argument("--field-strength", type=float, default=3.0, dest="field_T")
        s.add_argument("--tr", type=float, default=0.01, help="T1w repetition time in s")
        s.add_argument("--flip", type=float, default=12.0, help="T1w flip angle in degrees")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--dt-h", type=float, default=0.25, help="the phantom's time step in hours")
        s.set_defaults(func=_cmd_synth_bids)


# ------------------------------------------------------------------ concentration stage
def _options(args):
    from .inputs import Options

    return Options(route=args.route, r1=args.r1, agent=args.agent, field_T=args.field_T, t1_0=args.t1_0,
                   tissue=args.tissue, mask_dir=args.mask_dir, mask_desc=args.mask_desc,
                   injection_time=args.injection_time, baseline=args.baseline)


def concentration_stage(args) -> list[str]:
    """Check every selected participant, then write their derivatives; returns the subject ids."""
    from glymphmpi.errors import InputError

    from . import derivatives as dv
    from .inputs import prepare
    from .layout import select

    bids_dir, out = Path(args.bids_dir), Path(args.output_dir)
    bres, ores = bids_dir.resolve(), out.resolve()
    if ores == bres or (bres in ores.parents and bres / "derivatives" not in [ores, *ores.parents]):
        raise InputError("OUTPUT_DIR must not be inside the raw dataset except under its derivatives/ "
                         "(e.g. BIDS_DIR/derivatives/glymphmpi)", out)
    opts = _options(args)
    opts.validate()
    labels = select(bids_dir, args.participant_label)
    optdict = {k: v for k, v in vars(opts).items()}
    prepared = []
    for lab in labels:  # every participant checked before anything is written
        prep = prepare(bids_dir, lab, opts)
        inputs = [f for srcs in prep.sources for f in srcs]
        if opts.mask_dir:
            inputs.append(Path(prep.mask_source))
        prepared.append((prep, dv.fingerprint(inputs + [bids_dir / prep.participant.id /
                                                       f"{prep.participant.id}_sessions.tsv"], optdict)))
    dv.write_dataset_description(out, bids_dir)
    for prep, fp in prepared:
        sid = prep.participant.id
        if dv.is_current(out, sid, fp):
            print(f"{sid}: concentration up to date ({dv.subject_toml(out, sid)})")
            continue
        toml = dv.write_participant(out, prep, fp, optdict)
        c = prep.conversion
        print(f"{sid}: route {c.route}, {len(prep.participant.sessions)} sessions "
              f"({', '.join(f'{t:g}' for t in prep.times_h)} h), {c.units}, {c.total_clipped} clipped voxel(s) "
              f"-> {toml}")
        for w in prep.warnings:
            print(f"  warning: {w}")
    return [p.participant.id for p, _ in prepared]


def _cmd_concentration(args) -> int:
    concentration_stage(args)
    return 0


# ------------------------------------------------------------------ bids app
def _methods(text: str) -> list[str]:
    from glymphmpi import methods as registry
    from glymphmpi.errors import InputError

    names = [m.strip() for m in text.split(",") if m.strip()]
    if names == ["none"]:
        return []
    if not names:
        raise InputError("--methods: give at least one method, or 'none'")
    for n in names:
        m = registry.get(n)  # unknown -> InputError listing the valid names
        if not m.installed():
            raise InputError(f"--methods: {n} is not installed here")
    return names


def _cohort_text(out: Path, sids: list[str], methods: list[str], config: str | None) -> str:
    import tomli_w

    from glymphmpi.config import load_toml

    from . import derivatives as dv

    doc: dict = {"subjects": [Path("..", sid, dv.subject_toml(out, sid).name).as_posix() for sid in sids],
                 "methods": methods}
    if config:
        settings = load_toml(config)
        doc["settings"] = {k: v for k, v in settings.items() if isinstance(v, dict)}
    return "# written by glymph bids\n" + tomli_w.dumps(doc)


def _write_if_changed(path: Path, text: str) -> None:
    from glymphmpi.io import atomic_write_bytes

    if not path.exists() or path.read_text() != text:
        atomic_write_bytes(path, text.encode())


def _glymph(*argv) -> int:
    cmd = [sys.executable, "-m", "glymphmpi", *map(str, argv)]
    log.debug("running %s", " ".join(cmd))
    return subprocess.call(cmd)


def _processed(out: Path) -> list[str]:
    return sorted(p.parent.name for p in out.glob("sub-*/sub-*_subject.toml")
                  if p.name == f"{p.parent.name}_subject.toml")


def _finish_subjects(out: Path, sids: list[str], methods: list[str]) -> list[Path]:
    """Method maps under BIDS names and the per-subject pages."""
    import json

    from glymphmpi.report.subject import write_subject_report

    from . import derivatives as dv

    pages = []
    for sid in sids:
        try:
            sessions = json.loads(dv.provenance_path(out, sid).read_text())["sessions"]
        except (OSError, ValueError, KeyError):
            sessions = []
        for m in methods:
            summ = out / sid / m / "summary.json"
            if summ.is_file() and json.loads(summ.read_text()).get("status") == "complete":
                dv.export_method_maps(out, sid, m, sessions)
        pages.append(write_subject_report(out, sid))
    return pages


def _cmd_bids(args) -> int:
    from glymphmpi.errors import InputError

    from .layout import select

    out = Path(args.output_dir)
    methods = _methods(args.methods)
    if args.config and not Path(args.config).is_file():
        raise InputError("--config file not found", args.config)
    sets = []
    for s in args.set:
        sets += ["--set", s]
    if args.analysis_level == "participant":
        sids = concentration_stage(args)
        rc = 0
        if methods:
            code = out / "code"
            code.mkdir(parents=True, exist_ok=True)
            tag = "all" if not args.participant_label else "-".join(s[4:] for s in sids)
            tag = tag if len(tag) <= 60 else f"{len(sids)}participants"
            toml = code / f"cohort-{tag}.toml"
            _write_if_changed(toml, _cohort_text(out, sids, methods, args.config))
            _write_if_changed(code / "cohort.toml", _cohort_text(out, _processed(out), methods, args.config))
            rc = _glymph(*(["--quiet"] if args.quiet else []), "cohort", "run", toml, "--out", out,
                         "--scheduler", args.scheduler, *sets)
        pages = _finish_subjects(out, sids, methods)
        for p in pages:
            print(f"report: {p.resolve()}")
        return rc
    # group
    select(args.bids_dir, args.participant_label)  # a label that does not exist: one line, exit 2
    sids = _processed(out)
    if not sids:
        raise InputError("no participant has been processed yet: run the participant level first", out)
    code = out / "code"
    toml = code / "cohort.toml"
    if methods:
        _write_if_changed(toml, _cohort_text(out, sids, methods, args.config))
        rc = _glymph("cohort", "report", toml, "--out", out, *sets)
        if rc:
            return rc
    pages = _finish_subjects(out, sids, methods)
    for p in pages:
        print(f"report: {p.resolve()}")
    return 0


# ------------------------------------------------------------------ demo
#: quick method settings of the BIDS demo. The data-boundary mode interpolates the boundary data linearly in
#: time and is biased on the phantom (measured: D = 0.843 for the true 0.72 mm^2/h at 12^3, 0-12 h); the default
#: boundary-control mode is the accurate one but took more than 5 minutes here on the shared 2-core machine.
DEMO_SETS = ("fem.mode=data-boundary", "fem.max_iterations=15")


def run_bids_demo(out, quiet: bool = False) -> int:
    """The whole BIDS path on a synthetic study: ``synth bids``, ``bids participant`` (FEM), ``bids group``.

    Args:
        out: demo folder; the raw study goes to ``out/study``, the derivative to
            ``out/study/derivatives/glymphmpi``. A re-run reuses both (only what is missing is done).

    Returns:
        the exit code of the participant level (0 when every run completed).
    """
    from glymphmpi.synth.bids import SynthBidsSpec, write_bids

    out = Path(out)
    study = out / "study"
    if not (study / "dataset_description.json").is_file():
        write_bids(study, SynthBidsSpec(subjects=2, block=(12, 12, 12), times_h=(0.0, 4.0, 8.0, 12.0)))
    deriv = study / "derivatives" / "glymphmpi"
    common = [str(study), str(deriv)]
    sets = [w for s in DEMO_SETS for w in ("--set", s)]
    q = ["--quiet"] if quiet else []
    rc = _glymph(*q, "bids", *common, "participant", "--mask-dir", study / "derivatives" / "masks", *sets)
    rc_group = _glymph(*q, "bids", *common, "group")
    print(f"BIDS demo: raw study {study.resolve()}, derivative {deriv.resolve()}")
    for page in sorted(deriv.glob("sub-*.html")):
        print(f"  subject report: {page.resolve()}")
    print(f"  cohort report:  {(deriv / 'report' / 'index.html').resolve()}")
    return rc or rc_group


# ------------------------------------------------------------------ synth bids
def _cmd_synth_bids(args) -> int:
    from glymphmpi.errors import InputError
    from glymphmpi.synth.bids import SynthBidsSpec, write_bids

    try:
        times = tuple(float(t) for t in args.times.split(",") if t.strip())
    except ValueError:
        raise InputError(f"--times {args.times!r}: numbers separated by commas") from None
    spec = SynthBidsSpec(subjects=args.subjects, routes=tuple(r.strip() for r in args.routes.split(",") if r.strip()),
                         block=tuple(args.block), times_h=times, D_mm2_per_h=args.D, agent=args.agent,
                         field_T=args.field_T, TR_s=args.tr, flip_deg=args.flip, noise=args.noise, seed=args.seed,
                         dt_h=args.dt_h)
    root = write_bids(args.out, spec)
    print(root)
    return 0
