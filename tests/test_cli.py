"""The glymph command: info, version, usage errors, exit codes, import hygiene."""

from __future__ import annotations

import json
import subprocess
import sys

from glymphmpi import __version__


def test_version(glymph):
    r = glymph("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"glymphmpi {__version__}"


def test_info_reports_stack(glymph):
    r = glymph("info", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["numpy"].startswith("1.")  # Debian's petsc4py needs numpy 1
    assert rep["mpi"]["library"].startswith("Open MPI")
    assert rep["petsc"]["petsc"].startswith("3.18")
    assert rep["dolfinx"] == "0.5.2"
    assert rep["torch"]["version"].startswith("2.13") and "gloo" in rep["torch"]["distributed_backends"]
    assert isinstance(rep["missing"], list)
    assert rep["methods"] == {"romt": "ok", "fem": "ok", "pinn": "ok", "pinn-select": "ok", "romt-post": "ok"}
    # apptainer is not installable here: info must say so rather than hide it
    if rep["apptainer"] is None:
        assert any("apptainer" in m for m in rep["missing"])
    text = glymph("info").stdout
    assert "DOLFINx     0.5.2" in text and ("missing:" in text or "nothing missing" in text)


def test_usage_error_is_one_line_exit_2(glymph):
    r = glymph("synth", "nonsense", "--out", "x")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("glymph synth: error:")
    r = glymph("subject", "check")
    assert r.returncode == 2


def test_bad_synth_parameters(tmp_path, glymph):
    r = glymph("synth", "brain-diffusion", "--out", tmp_path, "--D", "-1")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "D > 0" in r.stderr
    r = glymph("synth", "brain-diffusion", "--out", tmp_path, "--times", "0,a")
    assert r.returncode == 2 and "--times" in r.stderr


def test_import_is_light():
    code = ("import sys, glymphmpi, glymphmpi.cli, glymphmpi.config, glymphmpi.subject, glymphmpi.store;"
            "glymphmpi.cli.build_parser();"
            "bad=[m for m in ('torch','dolfinx','dask','distributed','dask_jobqueue') if m in sys.modules];"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_gaussian_spheres_cli(tmp_path, glymph):
    r = glymph("synth", "gaussian-spheres", "--out", tmp_path / "g", "--n", "20")
    assert r.returncode == 0, r.stderr
    r = glymph("subject", "check", tmp_path / "g" / "subject.toml", "--json")
    d = json.loads(r.stdout)
    assert d["shape"] == [20, 20, 20] and d["times_h"] == [0, 1, 2, 3, 4]
    # total mass is (nearly) the same in every image: blurring conserves mass away from the edges
    m = d["mass_per_scan"]
    assert max(m) / min(m) < 1.01


def test_quiet_is_one_process_wide_switch():
    """--quiet sets glymphmpi.log's switch; every progress bar and per-iteration line reads it."""
    from glymphmpi import log

    try:
        log.setup_logging(0, quiet=True)
        assert log.quiet() and log.progress(range(3), quiet=False).disable
        log.setup_logging(0, quiet=False)
        assert not log.quiet() and not log.progress(range(3), quiet=False).disable
    finally:
        log.setup_logging(0)


def test_quiet_romt_prints_no_progress(tmp_path):
    import subprocess
    import sys

    from glymphmpi.synth import gaussian_spheres

    subj = gaussian_spheres.write(tmp_path / "s", n=8, n_images=2, sid="g8", dt_h=1.0)
    base = [sys.executable, "-m", "glymphmpi"]
    args = ["romt", str(subj), "--no-post", "--set", "romt.max_iterations=1"]
    loud = subprocess.run(base + args + ["--out", str(tmp_path / "a")], capture_output=True, text=True)
    quiet = subprocess.run(base + ["--quiet"] + args + ["--out", str(tmp_path / "b")], capture_output=True,
                           text=True)
    assert loud.returncode == 0 and quiet.returncode == 0, loud.stderr + quiet.stderr
    assert "GN 1" in loud.stderr and "GN 1" not in quiet.stderr  # INFO progress lines only without --quiet


ABORT_SCRIPT = """
import argparse, sys
from mpi4py import MPI
from glymphmpi import cli

def fails_on_rank0(args):
    comm = MPI.COMM_WORLD
    if comm.rank == 0:
        raise RuntimeError("internal failure on rank 0 only")
    comm.Barrier()  # rank 1 waits for rank 0, which never comes
    return 0

p = argparse.ArgumentParser()
p.add_argument("--verbose", action="store_true")
p.add_argument("--quiet", action="store_true")
p.set_defaults(func=fails_on_rank0)
cli.build_parser = lambda: p
sys.exit(cli.main([]))
"""


def test_internal_error_on_one_rank_ends_every_rank(tmp_path):  # starts mpirun itself: not an mpi-marked test
    """An unexpected exception on rank 0 alone aborts the MPI job (exit != 0, the traceback in the output)
    instead of leaving rank 1 in its next collective for ever (the coupled rOMT run that failed after its
    last sweep held rank 1 at 100% CPU until it was killed)."""
    import subprocess
    import sys

    script = tmp_path / "fails.py"
    script.write_text(ABORT_SCRIPT)
    from glymphmpi.cohort.environment import child_env

    env = child_env()  # without this process's MPI rank variables
    r = subprocess.run(["mpirun", "-n", "2", sys.executable, str(script)], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode != 0
    assert "internal failure on rank 0 only" in r.stdout + r.stderr
