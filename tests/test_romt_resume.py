"""rOMT checkpoint/resume: a run stopped by SIGTERM exits 75 with a
checkpoint, and running again finishes with the same result as an
uninterrupted run (the state saved after every Gauss-Newton iteration holds
everything the iteration depends on, so the results agree to round-off: we
require 1e-12 relative on the velocities)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ARGS = ["--no-post", "--set", "romt.max_iterations=5", "--set", "romt.gn_gtol=0.0", "--set", "romt.gn_tol=0.0",
        "--set", "romt.gn_ftol=0.0", "--set", "romt.pcg_max_iterations=15"]


@pytest.fixture(scope="module")
def gauss14(tmp_path_factory):
    from glymphmpi.synth import gaussian_spheres

    out = tmp_path_factory.mktemp("g14")
    return gaussian_spheres.write(out, n=14, n_images=4, sid="g14")


def _velocities(path):
    import h5py

    with h5py.File(path) as fh:
        return [fh[f"loops/{k}/velocity"][()] for k in sorted(fh["loops"].keys())], \
               [fh[f"loops/{k}/objective_history"][()] for k in sorted(fh["loops"].keys())]


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_sigterm_then_resume_matches_uninterrupted(glymph, gauss14, tmp_path, mode):
    ref = tmp_path / "ref"
    r = glymph("romt", gauss14, "--out", ref, "--mode", mode, *ARGS)
    assert r.returncode == 0, r.stderr

    out = tmp_path / "cut"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_COMM_WORLD", "PMIX_"))}
    proc = subprocess.Popen([sys.executable, "-m", "glymphmpi", "romt", str(gauss14), "--out", str(out),
                             "--mode", mode, *ARGS], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    # wait for the first loop to finish and a checkpoint of the second to appear
    while time.time() - t0 < 120:
        if (out / "romt_loops" / "loop_000.h5").exists() and list(out.glob("checkpoint*.h5")):
            break
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert list(out.glob("checkpoint*.h5"))
    import json

    assert json.loads((out / "summary.json").read_text())["status"] == "preempted"

    r = glymph("romt", gauss14, "--out", out, "--mode", mode, *ARGS)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr or "finished before" in r.stderr
    v_ref, h_ref = _velocities(ref / "results.h5")
    v_cut, h_cut = _velocities(out / "results.h5")
    assert len(v_ref) == len(v_cut) == 3
    for a, b, ha, hb in zip(v_ref, v_cut, h_ref, h_cut):
        assert np.allclose(ha, hb, rtol=1e-12, atol=0)
        assert np.abs(a - b).max() <= 1e-6 * np.abs(a).max()  # float32 storage


def test_fresh_discards_finished_loops_and_other_config_is_refused(glymph, gauss14, tmp_path):
    out = tmp_path / "run"
    stale = out / "romt_loops"
    stale.mkdir(parents=True)
    from glymphmpi.io import write_h5_tree

    write_h5_tree(stale / "loop_000.h5", {"velocity": np.zeros(3)}, {"config_key": "other", "loop": 0})
    r = glymph("romt", gauss14, "--out", out, *ARGS[:3])
    assert r.returncode == 2 and "different configuration" in r.stderr
    r = glymph("romt", gauss14, "--out", out, "--fresh", *ARGS[:3])
    assert r.returncode == 0, r.stderr


WRAPPER = """mpirun -n 2 "$@" &
pid=$!
trap 'kill -USR1 $pid' TERM
wait $pid; rc=$?
if [ $rc -gt 128 ]; then wait $pid; rc=$?; fi
exit $rc
"""


@pytest.mark.parametrize("how", ["usr1-to-mpirun", "term-to-wrapper"])
def test_mpirun_parallel_stop_exits_75(gauss14, tmp_path, how):
    """Issue 17 §6: a stopped `mpirun -n 2 glymph romt --mode parallel` exits 75 (requeue). Open MPI's mpirun
    itself exits 1 after SIGTERM whatever its ranks return, but forwards SIGUSR1 and then reports the ranks'
    75; so the job scripts turn TERM into USR1 for mpirun (the wrapper here is that protocol)."""
    import shutil

    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed")
    out = tmp_path / "cut"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_COMM_WORLD", "PMIX_"))}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "glymphmpi", "romt", str(gauss14), "--out", str(out), "--mode", "parallel", *ARGS]
    if how == "usr1-to-mpirun":
        proc = subprocess.Popen(["mpirun", "-n", "2", *cmd], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        sig = signal.SIGUSR1
    else:
        script = tmp_path / "wrap.sh"
        script.write_text(WRAPPER)
        proc = subprocess.Popen(["bash", str(script), *cmd], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        sig = signal.SIGTERM
    t0 = time.time()
    while time.time() - t0 < 120 and proc.poll() is None and not list(out.glob("checkpoint*.h5")):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert list(out.glob("checkpoint*.h5"))
    assert not (out / "summary.json").exists() or '"complete"' not in (out / "summary.json").read_text()


@pytest.mark.parametrize("sig", ["USR1", "TERM"])
def test_job_template_with_mpirun_stops_with_75_and_requeues(gauss14, tmp_path, sig):
    """Issue 17 §6 end to end: jobs/romt.sbatch with GLYMPH_MPI=mpirun running `mpirun -n 2 glymph romt
    --mode parallel`; the signal SLURM sends to the batch shell (USR1 from --signal=B:USR1@120, TERM
    from scancel -b / preemption) goes to mpirun as USR1: the ranks checkpoint, the job exits 75
    and requeues itself after USR1 (stub scontrol); after TERM (a cancellation) it does not requeue."""
    import shlex
    import shutil
    from pathlib import Path

    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed")
    root = Path(__file__).resolve().parents[1]
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text('#!/bin/bash\necho "scontrol $*" >> "$LOG"\n')
    (fake / "sleep").write_text("#!/bin/bash\nexit 0\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    out = tmp_path / "cut"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_COMM_WORLD", "PMIX_", "SLURM_"))}
    env.update(OMPI_MCA_rmaps_base_oversubscribe="1", PATH=f"{fake}:{env['PATH']}", LOG=str(tmp_path / "log"),
               GLYMPH=f"{shlex.quote(sys.executable)} -m glymphmpi", GLYMPH_MPI="mpirun", KIND="mpi",
               METHOD="romt", SUBJECT=str(gauss14), OUTDIR=str(out), SLURM_NTASKS="2", SLURM_JOB_ID="77",
               GLYMPH_ARGS=shlex.join(["--mode", "parallel", *ARGS]))
    proc = subprocess.Popen(["bash", str(root / "jobs/romt.sbatch")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while time.time() - t0 < 120 and proc.poll() is None and not list(out.glob("checkpoint*.h5")):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(getattr(signal, f"SIG{sig}"))  # to the batch shell only
    so, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, (so[-1000:], err[-2000:])
    assert "rc 75" in so
    requeued = (tmp_path / "log").exists() and "scontrol requeue 77" in (tmp_path / "log").read_text()
    assert requeued == (sig == "USR1")  # TERM is a cancellation: checkpoint, but no requeue
    assert list(out.glob("checkpoint*.h5"))


def test_a_missing_finished_loop_is_an_error_not_a_hole(tmp_path):
    """Rank 0 reads every finished loop back from the run directory; a file that is missing (another
    group still writing it: the coupled run's race) or unreadable stops the run instead of passing None on
    as a loop (which failed later, as "argument of type 'NoneType' is not iterable", or could have
    written a partial run)."""
    from mpi4py import MPI

    from glymphmpi.romt.loopstore import LoopStore
    from glymphmpi.romt.schedule import _gather
    from glymphmpi.store import RunDir

    rundir = RunDir(tmp_path / "run", comm=MPI.COMM_SELF).prepare(identity={"method": "test"})
    try:
        store = LoopStore(rundir, "key")
        for k in (0, 2):
            store.save_loop(k, {"velocity": np.zeros(3)}, writer=True)
        with pytest.raises(RuntimeError, match=r"\[1\] missing or unreadable"):
            _gather({}, 3, MPI.COMM_SELF, MPI.COMM_SELF, store, keep_arrays=True)
        store.save_loop(1, {"velocity": np.ones(3)}, writer=True)
        loops = _gather({}, 3, MPI.COMM_SELF, MPI.COMM_SELF, store, keep_arrays=True)
        assert [float(res["velocity"][0]) for res in loops] == [0.0, 1.0, 0.0]
    finally:
        rundir.release()
