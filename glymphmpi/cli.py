"""The ``glymph`` command: parse, dispatch.

The method subcommands (``romt``, ``fem``, ``pinn``, ...) come from the method
registry (:mod:`glymphmpi.methods`): one subcommand per entry, its options
from the entry, run by :func:`glymphmpi.runner.run_method`. Nothing heavy is
imported to build the parser.

Exit codes: 0 done; 2 bad input or usage (one line, no traceback); 1 internal
failure; 75 stopped by a signal after writing a checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys

from glymphmpi import __version__
from glymphmpi.errors import EXIT_FAILURE, EXIT_INPUT, GlymphError, InputError
from glymphmpi.log import setup_logging
from glymphmpi.parallel import launcher_env

log = logging.getLogger("glymphmpi.cli")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(EXIT_INPUT, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="glymph", description="Molecular transport in the brain from contrast-enhanced MRI.")
    p.add_argument("--version", action="version", version=f"glymphmpi {__version__}")
    p.add_argument("--quiet", action="store_true", help="warnings only, no progress bars")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    s = sub.add_parser("info", help="environment: MPI, PETSc, DOLFINx, torch, GPU, SLURM")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_info)

    s = sub.add_parser("synth", help="write a synthetic subject")
    ss = s.add_subparsers(dest="kind", metavar="KIND", parser_class=_Parser)
    ss.required = True
    g = ss.add_parser("gaussian-spheres", help="the rOMT paper's Gaussian-sphere series")
    g.add_argument("--out", required=True)
    g.add_argument("--n", type=int, default=50, help="grid size n (n^3 voxels)")
    g.add_argument("--images", type=int, default=5)
    g.add_argument("--id", default="gauss")
    g.add_argument("--dt-h", type=float, default=1.0, help="hours between images")
    g.set_defaults(func=_cmd_synth_gauss)
    b = ss.add_parser("brain-diffusion", help="diffusion phantom in MNI152 white matter")
    b.add_argument("--out", required=True)
    b.add_argument("--block", type=int, nargs=3, default=[36, 36, 36], metavar=("NI", "NJ", "NK"))
    b.add_argument("--centre-mm", type=float, nargs=3, default=None)
    b.add_argument("--D", type=float, default=0.72, help="true D in mm^2/h")
    b.add_argument("--times", default="0,7,24,46", help="scan times in hours, comma-separated")
    b.add_argument("--noise", type=float, default=0.0, help="noise std relative to the peak")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--boundary", choices=("face", "full"), default="face",
                   help="Dirichlet voxels: a 6-neighbour outside (face) or any of 26 (full: the FEM mesh's "
                        "boundary nodes)")
    b.add_argument("--dt-h", type=float, default=0.05, help="forward-solve time step (h)")
    b.add_argument("--id", default="phantom")
    b.set_defaults(func=_cmd_synth_brain)

    s = sub.add_parser("subject", help="check or create subject files")
    ss = s.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    ss.required = True
    c = ss.add_parser("check", help="validate a subject and print what was found")
    c.add_argument("subject")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_cmd_subject_check)
    i = ss.add_parser("init", help="subject.toml from a 4D NIfTI and its times, or from rOMT/urOMT .mat frames",
                      description="SERIES is one 4D NIfTI (x, y, z, time), or the MATLAB .mat volumes of the "
                                  "rOMT/urOMT codes in time order (one 3D array each, variable --variable; "
                                  "they need --voxel-size and --mask, and --times or --frame-interval-h).")
    i.add_argument("series", nargs="+", help="4D NIfTI, or .mat frames in time order")
    i.add_argument("--times", help="hours, comma-separated, one per volume")
    i.add_argument("--frame-interval-h", type=float, metavar="H",
                   help=".mat frames: hours between consecutive frames (the first at 0 h)")
    i.add_argument("--voxel-size", type=float, nargs="+", metavar="MM",
                   help=".mat frames: voxel size in mm (one number, or three)")
    i.add_argument("--variable", default="rho_n",
                   help=".mat frames: the variable holding the volume (default rho_n; '' = the only 3D array)")
    i.add_argument("--anatomy", help=".mat frames: optional anatomical .mat volume for display")
    i.add_argument("--out", required=True, help="directory for subject.toml and 3D scans")
    i.add_argument("--id", required=True)
    m = i.add_mutually_exclusive_group(required=True)
    m.add_argument("--mask")
    m.add_argument("--auto-mask", type=float, metavar="FRACTION",
                   help="mask = voxels whose max over time exceeds FRACTION of the global max")
    i.set_defaults(func=_cmd_subject_init)

    s = sub.add_parser("config", help="every setting with its default and meaning, as a TOML file to edit",
                       description="Prints the settings of METHOD (default: every table) as TOML: each key "
                                   "with its default, its meaning and its bounds. Save it, edit it, and pass it "
                                   "with --config FILE.")
    s.add_argument("method", nargs="?", metavar="METHOD", help="a method (romt, fem, pinn, ...) or table name")
    s.set_defaults(func=_cmd_config)

    s = sub.add_parser("demo", help="the main job on a small synthetic cohort")
    s.add_argument("--out", default="demo-output")
    s.set_defaults(func=_cmd_demo)

    from glymphmpi.cohort.cli import register as register_cohort
    from glymphmpi.methods import all_methods
    from glymphmpi.runner import add_run_args

    for m in all_methods().values():
        mp = sub.add_parser(m.name, help=m.help, description=m.description or m.help)
        add_run_args(mp, m)
        mp.set_defaults(func=_cmd_method, method=m.name)
    register_cohort(sub)
    from glymphmpi.bids.cli import register as register_bids  # glymph bids, concentration, synth bids (H7)

    register_bids(sub)
    return p


def _parse_times(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise InputError(f"--times {text!r}: expected numbers separated by commas") from None


# ------------------------------------------------------------------ commands
def _cmd_info(args) -> int:
    from glymphmpi.info import environment_report, format_report

    rep = environment_report()
    if args.json:
        import json

        print(json.dumps(rep, indent=2))
    else:
        print(format_report(rep))
    return 0


def _cmd_synth_gauss(args) -> int:
    from glymphmpi.synth import gaussian_spheres

    if args.n < 4 or args.images < 2:
        raise InputError("need --n >= 4 and --images >= 2")
    path = gaussian_spheres.write(args.out, n=args.n, n_images=args.images, sid=args.id, dt_h=args.dt_h)
    print(path)
    return 0


def _cmd_synth_brain(args) -> int:
    from glymphmpi.synth import brain_diffusion as bd

    times = tuple(_parse_times(args.times))
    spec = bd.PhantomSpec(block=tuple(args.block), centre_mm=None if args.centre_mm is None else
                          tuple(args.centre_mm), D_mm2_per_h=args.D, times_h=times,
                          noise=args.noise, seed=args.seed, dt_h=args.dt_h, boundary=args.boundary)
    if args.D <= 0 or args.noise < 0 or args.dt_h <= 0 or len(times) < 2 or any(
            b <= a for a, b in zip(times, times[1:])):
        raise InputError("need D > 0, noise >= 0, dt > 0 and at least 2 increasing times")
    path = bd.write(args.out, spec, sid=args.id)
    print(path)
    return 0


def _cmd_subject_check(args) -> int:
    from glymphmpi.subject import load_subject

    subj = load_subject(args.subject)
    d = subj.describe()
    if args.json:
        import json

        print(json.dumps(d, indent=2))
    else:
        print(f"subject {d['id']}: OK")
        print(f"  grid        {d['shape'][0]} x {d['shape'][1]} x {d['shape'][2]} voxels, "
              f"voxel {' x '.join(f'{v:g}' for v in d['voxel_size_mm'])} mm")
        print(f"  scans       {len(d['times_h'])} at t = {', '.join(f'{t:g}' for t in d['times_h'])} h")
        print(f"  mask        {d['mask_voxels']} voxels, {d['mask_volume_ml']:.3f} mL")
        print("  mass/scan   " + ", ".join(f"{m:.4g}" for m in d["mass_per_scan"]) + " (conc x mm^3)")
        print("  mass change " + ", ".join("n/a (from 0)" if c is None else f"{c:+.1f}%"
                                           for c in d["mass_change_pct"]) + " (scan to scan)")
        if d["mass_warning"]:
            print(f"  warning: {d['mass_warning']}")
    return 0


def _cmd_subject_init(args) -> int:
    mats = [p for p in args.series if p.lower().endswith(".mat")]
    if mats:
        return _init_from_mat(args)
    if len(args.series) != 1:
        raise InputError(f"expected one 4D NIfTI or .mat frames, got {len(args.series)} files", args.series[0])
    if args.times is None:
        raise InputError("--times is required for a 4D NIfTI (hours, one per volume)")
    from glymphmpi.subject import init_from_4d

    path = init_from_4d(args.series[0], _parse_times(args.times), args.out, args.id,
                        mask_path=args.mask, auto_mask_fraction=args.auto_mask)
    print(path)
    return 0


def _init_from_mat(args) -> int:
    """``glymph subject init f1.mat f2.mat ...``: the rOMT/urOMT authors' frame files."""
    from glymphmpi.romt.matlab import init_from_mat

    other = [p for p in args.series if not p.lower().endswith(".mat")]
    if other:
        raise InputError("mixes .mat frames with other files", other[0])
    if args.mask is None:
        raise InputError("--mask is required with .mat frames (a .mat or NIfTI volume, nonzero = inside)")
    if args.voxel_size is None or len(args.voxel_size) not in (1, 3):
        raise InputError("--voxel-size is required with .mat frames: one number or three (mm)")
    if (args.times is None) == (args.frame_interval_h is None):
        raise InputError("with .mat frames give either --times or --frame-interval-h")
    if args.times is not None:
        times = _parse_times(args.times)
        if len(times) != len(args.series):
            raise InputError(f"--times has {len(times)} values for {len(args.series)} frames")
        if any(b <= a for a, b in zip(times, times[1:])):
            raise InputError(f"--times must increase, got {args.times!r}")
        interval, t0 = None, times[0]
    else:
        interval, t0, times = args.frame_interval_h, 0.0, None
    path = init_from_mat(args.series, args.out, args.id, args.voxel_size, interval if interval else 1.0,
                         args.mask, variable=args.variable or None, anatomy_path=args.anatomy, t0_h=t0,
                         times_h=times)
    print(path)
    return 0


def _cmd_config(args) -> int:
    from glymphmpi import methods
    from glymphmpi.config import to_toml

    tables = methods.config_tables()
    if args.method is not None:
        name = methods.get(args.method).table if args.method in methods.all_methods() else args.method
        if name not in tables:
            raise InputError(f"unknown method or table {args.method!r}; valid: "
                             f"{', '.join(dict.fromkeys([*methods.names(), *tables]))}")
        tables = {name: tables[name]}
    head = (f"glymphmpi {__version__} settings: every key with its default.\n"
            "Edit, then pass with --config FILE; keys you delete keep their defaults.")
    print(to_toml(tables, head), end="")
    return 0


def _cmd_method(args) -> int:
    from glymphmpi.runner import run_method

    run_method(args.method, args)
    return 0


def _cmd_demo(args) -> int:
    from glymphmpi.demo import run_demo

    return run_demo(args.out, quiet=args.quiet)


# ------------------------------------------------------------------ main
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rank = launcher_env()["rank"]
    setup_logging(rank, verbose=args.verbose, quiet=args.quiet)
    from glymphmpi.store import StopFlag

    try:
        with StopFlag.installed():
            rc = args.func(args)
        return int(rc or 0)
    except GlymphError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"glymph: error: {msg}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("glymph: interrupted", file=sys.stderr)
        return 130
    except Exception:  # an internal failure: keep the traceback for a bug report
        log.exception("internal error")
        from glymphmpi.parallel import abort_mpi_world

        abort_mpi_world(EXIT_FAILURE)  # the other ranks may be waiting in a collective
        return EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
