"""The cohort part of ``glymph demo``: run every installed method on the demo cohort, locally.

``glymph demo`` (glymphmpi/demo.py) writes two brain-diffusion phantoms (true D known) and a
Gaussian-sphere series plus a cohort.toml listing the phantoms, then calls
:func:`run_cohort_demo`. Here the demo's own cohort file is derived from it: FEM and PINN on
the phantoms (they estimate D, which the phantoms know), rOMT on the Gaussian spheres (its
paper's test case; the phantoms start from an all-zero scan, which rOMT cannot transport),
with settings small enough for a few minutes on a laptop. It runs through the same local
launcher as ``glymph cohort run --scheduler local`` and prints where the report is.
"""

from __future__ import annotations

import time
from pathlib import Path

from glymphmpi.config import load_toml

#: quick settings per method (the defaults reproduce the papers and take much longer)
DEMO_SETTINGS = {
    "fem": {"max_iterations": 15},
    "pinn": {"epochs": 3, "batches": 4, "width": 32, "depth": 4, "residual_times": 10,
             "residual_voxels": 2000},
    "romt": {"nt": 5, "gn_max_iter": 3},
}


def demo_cohort_text(cohort: Path, methods: list[str]) -> str:
    """The demo cohort file: the given cohort's subjects, each with the methods that suit it."""
    import tomli_w

    data = load_toml(cohort)
    root = cohort.parent
    subjects: list = []
    d_methods = [m for m in methods if m in ("fem", "pinn")]
    for s in data.get("subjects", []):
        if d_methods:
            subjects.append({"path": s, "methods": d_methods})
    gauss = root / "subjects" / "gauss" / "subject.toml"
    if "romt" in methods and gauss.exists():
        subjects.append({"path": str(gauss.relative_to(root)), "methods": ["romt"]})
    doc = {"subjects": subjects, "methods": [m for m in methods if any(m in e["methods"] for e in subjects)],
           "settings": {m: v for m, v in DEMO_SETTINGS.items() if m in methods},
           "cohort": {"poll_s": 0.5}}
    return "# written by `glymph demo`: the demo cohort with quick settings\n" + tomli_w.dumps(doc)


def run_cohort_demo(out: Path, cohort: Path, quiet: bool = False) -> int:
    """Run the demo cohort with the local scheduler; prints the report's path.

    Args:
        out: the demo directory (holds ``subjects/`` and ``cohort.toml``); runs go to ``out/run``.
        cohort: the cohort file written by ``glymph demo``.
        quiet: no progress lines.

    Returns:
        0 when every run completed (a re-run of a complete demo does nothing and says so).
    """
    from glymphmpi.io import atomic_write_bytes

    from .launch import LocalLauncher
    from .manifest import load_cohort
    from .methods import installed_builtins

    t0 = time.time()
    out, cohort = Path(out), Path(cohort)
    methods = installed_builtins()
    if not methods:
        print("no method (romt, fem, pinn) is installed in this checkout: nothing to run")
        return 0
    path = out / "cohort-demo.toml"
    text = demo_cohort_text(cohort, methods)
    if not path.exists() or path.read_text() != text:
        atomic_write_bytes(path, text.encode())
    co = load_cohort(path)
    run = out / "run"
    rc = LocalLauncher(co, run, quiet=quiet).run()
    from glymphmpi.report.cohort import report_paths

    print(f"demo finished in {time.time() - t0:.0f} s (exit {rc}); cohort file {path.resolve()}")
    print(f"status:  glymph cohort status {path} --out {run}")
    print(f"report:  {report_paths(run)['html'].resolve()}")
    return rc
