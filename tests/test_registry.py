"""The method registry (glymphmpi/methods.py): built-in entries, lookups, and a toy method added as
one module + one registry entry, run through `glymph`, a local cohort and the cohort report."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from glymphmpi import methods
from glymphmpi.errors import InputError

ROOT = Path(__file__).resolve().parents[1]

TOY_MODULE = '''
"""A toy method: the mean tracer mass of the scans, times a factor."""
from dataclasses import dataclass
from pathlib import Path

from glymphmpi.methods import Method, Option


@dataclass(frozen=True)
class ToyConfig:
    """Settings of the toy.

    Attributes:
        factor: the mean scan mass is multiplied by this.
        poison: return a NaN result (the runner must record the run failed).
    """

    factor: float = 1.0
    poison: bool = False


def solve(subject, cfg, rundir, comm):
    masses = subject.mass_per_scan()
    value = float("nan") if cfg.poison else float(masses.mean()) * cfg.factor
    rundir.write_results({"masses": masses}, cfg, subject.id)
    return {"mass_mean": value, "ranks": comm.size, "comm": type(comm).__name__}


def figures(rundir, subject, cfg, fields):
    assert not (Path(rundir.root) / "summary.json").exists()  # called before summary.json is written
    Path(rundir.figures, "toy.txt").write_text(f"{subject.id} {fields['mass_mean']!r}\\n")


METHOD = Method("toy", "the mean scan mass (a test of the registry)", config="toymethod:ToyConfig",
                solve="toymethod:solve", figures="toymethod:figures", summary=("mass_mean",),
                options=(Option("--poison", "toy.poison", "return NaN", value=True),),
                comm="self", kind="serial", default_ranks=1, template="fem", cohort_default=False)
'''


@pytest.fixture
def toy_plugin(tmp_path, monkeypatch):
    """The toy as an installed plugin: its module and an entry point ``glymphmpi.methods: toy``."""
    d = tmp_path / "plugin"
    d.mkdir()
    (d / "toymethod.py").write_text(TOY_MODULE)
    dist = d / "toymethod-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toymethod\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[glymphmpi.methods]\ntoy = toymethod:METHOD\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(d), str(ROOT)]))
    return d


def glymph(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "glymphmpi", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=os.environ.copy())


def test_builtin_table():
    assert methods.names()[:5] == ["romt", "fem", "pinn", "pinn-select", "romt-post"]
    fem, pinn, sel = methods.get("fem"), methods.get("pinn"), methods.get("pinn-select")
    assert (fem.kind, fem.default_ranks, fem.template_name, fem.cohort_default) == ("mpi", 2, "fem", True)
    assert (pinn.kind, pinn.template_name, pinn.requires) == ("torch", "pinn", ("torch", "pinn"))
    assert sel.table == "pinn_select" and not sel.cohort_default and sel.template_name == "run"
    assert methods.get("romt-post").updates == "romt"
    for m in methods.all_methods().values():  # every dotted path resolves
        assert callable(m.solve_fn()) and m.config_class().__dataclass_params__.frozen
        assert m.figures is None or callable(m.figures_fn())
    with pytest.raises(InputError, match="unknown method 'nope'; valid methods: romt, fem, pinn"):
        methods.get("nope")


def test_config_tables_and_nested_romt_post(tmp_path):
    tables = methods.known_sections()
    assert {"subject", "romt", "fem", "pinn", "pinn_select", "cohort"} <= set(tables)
    cfg = methods.load_config("romt", None, ["romt.post.seed_every=2", ("romt.postprocess", False)])
    assert cfg.post.seed_every == 2 and cfg.postprocess is False
    # the old table name is an alias of [romt.post], in files and in --set
    p = tmp_path / "c.toml"
    p.write_text("[romt_post]\nintegrator = 'rk4'\n[romt.post]\nseed_every = 3\n")
    cfg = methods.load_config("romt", p, ["romt_post.substeps=2"])
    assert (cfg.post.integrator, cfg.post.seed_every, cfg.post.substeps) == ("rk4", 3, 2)
    post = methods.load_config("romt_post", p)
    assert type(post).__name__ == "RomtPostConfig" and post.integrator == "rk4"
    with pytest.raises(InputError, match="unknown config table"):
        methods.load_config("romt.nothing")


def test_cli_builds_its_subcommands_from_the_table_without_heavy_imports():
    code = ("import sys, glymphmpi.cli as c; p = c.build_parser();"
            "names = p._subparsers._group_actions[0].choices;"
            "print(all(n in names for n in ('romt','fem','pinn','pinn-select','romt-post')),"
            " any(m in sys.modules for m in ('torch','dolfinx','dask','glymphmpi.romt.solve')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["True", "False"]


def test_toy_method_through_glymph(toy_plugin, tmp_path, small_phantom):
    from glymphmpi.subject import load_subject

    r = glymph("--help")
    assert r.returncode == 0 and "toy" in r.stdout and "the mean scan mass" in r.stdout
    r = glymph("--quiet", "toy", small_phantom, "--out", tmp_path / "t", "--set", "toy.factor=2.5")
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "t" / "summary.json").read_text())
    want = 2.5 * float(load_subject(small_phantom).mass_per_scan().mean())
    assert s["status"] == "complete" and s["method"] == "toy"
    assert s["mass_mean"] == pytest.approx(want, rel=1e-12) and s["ranks"] == 1 and s["comm"] == "Intracomm"
    assert (tmp_path / "t" / "figures" / "toy.txt").read_text().split()[0] == s["subject"]
    # a non-finite headline is a failed run, never complete
    r = glymph("--quiet", "toy", small_phantom, "--out", tmp_path / "bad", "--poison")
    assert r.returncode == 1 and "not finite" in r.stderr and "Traceback" not in r.stderr
    s = json.loads((tmp_path / "bad" / "summary.json").read_text())
    assert s["status"] == "failed" and "mass_mean = nan" in s["error"]
    r = glymph("toy", small_phantom, "--out", tmp_path / "x", "--set", "toy.nope=1")
    assert r.returncode == 2 and "nope" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_toy_method_through_a_local_cohort_and_its_report(toy_plugin, tmp_path, small_phantom):
    from glymphmpi.subject import load_subject

    subj = tmp_path / "subjects"
    for sid in ("sub-01", "sub-02"):
        d = subj / sid
        d.mkdir(parents=True)
        txt = small_phantom.read_text().replace('id = "ph16"', f'id = "{sid}"')
        txt = txt.replace('path = "', f'path = "{small_phantom.parent}/').replace(
            'mask = "', f'mask = "{small_phantom.parent}/')
        (d / "subject.toml").write_text(txt)
    c = tmp_path / "cohort.toml"
    c.write_text(textwrap.dedent("""\
        subjects = ["subjects/*/subject.toml"]
        methods = ["toy"]
        [settings.toy]
        factor = 3.0
        """))
    r = glymph("--quiet", "cohort", "run", c, "--out", tmp_path / "o", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    want = 3.0 * float(load_subject(small_phantom).mass_per_scan().mean())
    for sid in ("sub-01", "sub-02"):
        s = json.loads((tmp_path / "o" / sid / "toy" / "summary.json").read_text())
        assert s["status"] == "complete" and s["mass_mean"] == pytest.approx(want, rel=1e-12)
    r = glymph("cohort", "report", c, "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader((tmp_path / "o" / "report" / "cohort.csv").open()))
    vals = [float(v) for row in rows for k, v in row.items() if "mass_mean" in k and v not in ("", None)]
    assert len(vals) == 2 and np.allclose(vals, want, rtol=1e-6)


# ------------------------------------------------------------------ the runner under MPI
def _mpi_solve(subject, cfg, rundir, comm):
    value = float("nan") if cfg.max_negative_mass_fraction == 0.5 else float(subject.mass_per_scan().mean())
    return {"mass_mean": value, "ranks": comm.size, "rank_sum": comm.allreduce(comm.rank + 1)}


def _mpi_figures(rundir, subject, cfg, fields):
    from mpi4py import MPI

    if cfg.max_negative_mass_fraction == 0.25:
        raise RuntimeError("figure hook failed")
    Path(rundir.figures, f"hook_rank{MPI.COMM_WORLD.rank}.txt").write_text(repr(fields["rank_sum"]))


@pytest.mark.mpi
def test_runner_keeps_the_ranks_together(comm, mpi_tmp_path):
    """A method with comm="mpi" under mpirun -n 2: the runner hands it COMM_WORLD, calls the figure hook on
    rank 0 only, and a failure of the hook (rank 0) or a NaN result fails the run on every rank."""
    import argparse

    from glymphmpi.errors import GlymphError
    from glymphmpi.runner import run_method
    from glymphmpi.subject import write_subject

    if comm.rank == 0:
        mask = np.zeros((5, 5, 5), bool)
        mask[1:4, 1:4, 1:4] = True
        write_subject(mpi_tmp_path / "s", "mpi-1", [0.0, 1.0], np.ones((2, 5, 5, 5)), mask, np.eye(4))
    comm.Barrier()
    m = methods.Method("mpitoy", "toy under MPI", config="glymphmpi.config:SubjectConfig", table="subject",
                       solve="test_registry:_mpi_solve", figures="test_registry:_mpi_figures",
                       summary=("mass_mean",), comm="mpi", kind="mpi")

    def args(out, *sets):
        return argparse.Namespace(subject=str(mpi_tmp_path / "s" / "subject.toml"), out=str(mpi_tmp_path / out),
                                  config=None, set=list(sets), force=False, fresh=False)

    s = run_method(m, args("ok"))
    assert s["status"] == "complete" and s["ranks"] == comm.size and s["rank_sum"] == comm.size * (comm.size + 1) // 2
    comm.Barrier()
    assert sorted(p.name for p in (mpi_tmp_path / "ok" / "figures").iterdir()) == ["hook_rank0.txt"]
    for out, item, needle in (("hook", "subject.max_negative_mass_fraction=0.25", "figure hook failed"),
                              ("nan", "subject.max_negative_mass_fraction=0.5", "not finite")):
        with pytest.raises((GlymphError, RuntimeError), match=needle):
            run_method(m, args(out, item))
        comm.Barrier()
        assert json.loads((mpi_tmp_path / out / "summary.json").read_text())["status"] == "failed"
