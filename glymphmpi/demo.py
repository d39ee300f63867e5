"""`glymph demo`: the main job on a small synthetic cohort.

Writes two brain-diffusion phantoms (small white-matter blocks, 5% and 3% noise; true D known) and a
small Gaussian-sphere series, validates each, writes a cohort.toml listing the phantoms, then
runs the demo's own cohort through the same local launcher as ``glymph cohort run
--scheduler local``: the methods that estimate D (declared in the registry by their headline
field ``D_mm2_per_h``) on the phantoms, rOMT-like transport methods on the Gaussian spheres (its
paper's test case; the phantoms start from an all-zero scan, which rOMT cannot transport), with
settings small enough for a few minutes on two cores. At the end it prints every estimate with
the truth and its interval beside it, and says so where a number is not a converged estimate.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

from glymphmpi.errors import EXIT_PREEMPTED

log = logging.getLogger(__name__)

#: demo settings per method. FEM runs its defaults: automatic regularisation, converged, with a 95%
#: interval for D. The PINN's real default run costs minutes per ensemble member, so the demo trains it
#: a few epochs only: a smoke test, which its summary (estimate = false) and every report say.
DEMO_SETTINGS = {
    "pinn": {"epochs": 3, "batches": 4, "width": 32, "depth": 4, "residual_times": 10,
             "residual_voxels": 2000},
    "romt": {"nt": 5, "max_iterations": 3},
}


def _demo_phantoms() -> tuple:
    """The two brain-diffusion phantoms: 16 mm white-matter blocks scanned every 4 h (0, 4, 8, 12 h),
    5% and 3% noise, true D 0.72 mm^2/h. Measured with the FEM defaults (rule "corrected", negative
    values kept, one process each, fresh clone, 2026-11-30, beside two niced benchmarks): D 0.7417
    [0.7135, 0.7700] (+3.0%) and 0.7239 [0.7030, 0.7449] (+0.5%); with the scans clipped at 0 (before
    2026-11-30) 0.7189 and 0.7119; the earlier default rule "noise" took 34 s and 49 s. Nearly
    noise-free data or scans days apart give D biased high (see glymphmpi.fem.auto.LOW_NOISE_REL):
    the demo shows the regime the automatic regularisation was checked on."""
    from glymphmpi.synth import brain_diffusion as bd

    times = (0.0, 4.0, 8.0, 12.0)
    return (bd.PhantomSpec(block=(16, 16, 16), noise=0.05, seed=0, dt_h=0.1, times_h=times),
            bd.PhantomSpec(block=(16, 16, 16), noise=0.03, seed=1, dt_h=0.1, times_h=times))


#: the demo's FEM runs are one process each, two at once on two cores: a 16 mm phantom has 4,096
#: nodes, too few to gain from two ranks beside other runs (measured in the demo on 2 cores: 77 s and
#: 163 s as 2-rank runs sharing the machine, against 34 s and 49 s alone on one rank)
DEMO_FEM_RESOURCES = {"ranks": 1}


def make_demo_cohort(out: Path) -> Path:
    from glymphmpi.io import atomic_write_bytes
    from glymphmpi.synth import brain_diffusion as bd
    from glymphmpi.synth import gaussian_spheres as gs

    subjects = []
    for i, spec in enumerate(_demo_phantoms()):
        sdir = out / "subjects" / f"sub-{i + 1:02d}"
        if not (sdir / "subject.toml").exists():
            bd.write(sdir, spec, sid=f"sub-{i + 1:02d}")
        subjects.append(f"subjects/sub-{i + 1:02d}/subject.toml")
    gdir = out / "subjects" / "gauss"
    if not (gdir / "subject.toml").exists():
        gs.write(gdir, n=25, n_images=3, sid="gauss")
    cohort = out / "cohort.toml"
    text = "# demo cohort written by `glymph demo`\nsubjects = [\n" + "".join(
        f'  "{s}",\n' for s in subjects) + "]\n"
    atomic_write_bytes(cohort, text.encode())
    return cohort


def _estimates_d(name: str) -> bool:
    from glymphmpi import methods as registry

    return "D_mm2_per_h" in registry.get(name).summary


def demo_cohort_text(cohort: Path, methods: list[str]) -> str:
    """The demo cohort file: the given cohort's subjects, each with the methods that suit it."""
    import tomli_w

    from glymphmpi.config import load_toml

    data = load_toml(cohort)
    root = cohort.parent
    subjects: list = []
    d_methods = [m for m in methods if _estimates_d(m)]
    t_methods = [m for m in methods if not _estimates_d(m)]
    for s in data.get("subjects", []):
        if d_methods:
            subjects.append({"path": s, "methods": d_methods})
    gauss = root / "subjects" / "gauss" / "subject.toml"
    if t_methods and gauss.exists():
        subjects.append({"path": str(gauss.relative_to(root)), "methods": t_methods})
    doc = {"subjects": subjects, "methods": [m for m in methods if any(m in e["methods"] for e in subjects)],
           "settings": {m: v for m, v in DEMO_SETTINGS.items() if m in methods},
           "cohort": {"poll_s": 0.5}}
    if d_methods and "fem" in d_methods:
        doc["resources"] = {"fem": dict(DEMO_FEM_RESOURCES)}
    return "# written by `glymph demo`: the demo cohort with quick settings\n" + tomli_w.dumps(doc)


def results_lines(cohort, run: Path) -> list[str]:
    """Every headline D of the demo with the truth and interval beside it; non-estimates said so."""
    from glymphmpi.report.cohort import D_KEY, show_value, subject_row, truth_note

    lines = []
    for s in cohort.subjects:
        row = subject_row(cohort, run, s.id)
        for m in cohort.method_names:
            d = row.get(f"{m}.{D_KEY}")
            if d is None:
                continue
            txt = f"  {s.id} {m}: D = {d:.4g} mm^2/h"
            ci = [k for k in row["headline"].get(m, []) if k.startswith("D_ci95") and f"{m}.{k}" in row]
            if ci:
                txt += ", 95% interval " + ", ".join(show_value(row[f"{m}.{k}"]) for k in ci)
            if "D_true" in row:  # the error of a converged estimate only; a smoke test's number has none
                txt += truth_note(row, m)
            warn = list(row["warnings"].get(m) or [])
            if row.get(f"{m}.converged") is None:
                warn.append("convergence not reported: a smoke-test number, not an estimate")
            if warn:
                txt += " -- " + "; ".join(dict.fromkeys(warn))
            lines.append(txt)
    return lines


def run_cohort_demo(out: Path, cohort: Path, quiet: bool = False) -> int:
    """Run the demo cohort with the local scheduler; prints the estimates and the report's path.

    Returns:
        0 when every run completed (a re-run of a complete demo does nothing and says so).
    """
    from glymphmpi.cohort.cli import make_launcher
    from glymphmpi.cohort.manifest import load_cohort
    from glymphmpi.cohort.methods import default_methods
    from glymphmpi.io import atomic_write_bytes
    from glymphmpi.report.cohort import report_paths

    t0 = time.time()
    out, cohort = Path(out), Path(cohort)
    methods = default_methods()
    if not methods:
        print("no method is installed in this checkout: nothing to run")
        return 0
    path = out / "cohort-demo.toml"
    text = demo_cohort_text(cohort, methods)
    if not path.exists() or path.read_text() != text:
        atomic_write_bytes(path, text.encode())
    co = load_cohort(path)
    run = out / "run"
    rc = make_launcher(co, run, "local", quiet=quiet).run()
    lines = results_lines(co, run)
    if lines:
        print("estimates:")
        print("\n".join(lines))
    print(f"demo finished in {time.time() - t0:.0f} s (exit {rc}); cohort file {path.resolve()}")
    print(f"status:  glymph cohort status {path} --out {run}")
    print(f"report:  {report_paths(run)['html'].resolve()}")
    return rc


def run_demo(out, quiet: bool = False) -> int:
    from glymphmpi.subject import load_subject

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cohort = make_demo_cohort(out)
    for toml in sorted((out / "subjects").glob("*/subject.toml")):
        s = load_subject(toml)
        d = s.describe()
        print(f"subject {d['id']}: {d['shape']} voxels, {d['mask_voxels']} in mask, "
              f"scans at {d['times_h']} h: OK")
    rc = run_cohort_demo(out, cohort, quiet=quiet)
    if rc == EXIT_PREEMPTED:  # stopped by a signal: do not start the next part
        return rc
    if importlib.util.find_spec("glymphmpi.bids.cli") is not None:  # the BIDS App path on a synthetic study
        from glymphmpi.bids.cli import run_bids_demo

        rc = run_bids_demo(out / "bids", quiet=quiet) or rc
    return rc
