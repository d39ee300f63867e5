"""``glymph fem`` end to end on a tiny subject: outputs, checkpoint/resume, preemption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("dolfinx")


def _tiny_subject(path, noise=0.0):
    """A 10x9x8 box phantom written with the voxel FD solver of the synth package
    (its own discretisation, not the FEM one), D = 0.5, three scans."""
    from glymphmpi.subject import write_subject
    from glymphmpi.synth.brain_diffusion import boundary_function, boundary_interior, solve_diffusion

    mask = np.ones((10, 9, 8), dtype=bool)
    mask[:3, :3, :] = False
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    _, bnd = boundary_interior(mask)
    g = boundary_function(mask, affine, np.flatnonzero(bnd))
    times = (0.0, 3.0, 8.0, 12.0)
    clean = solve_diffusion(mask, np.ones(3), 0.5, g, times, dt_h=0.1)
    scans = clean + noise * np.random.default_rng(0).standard_normal(clean.shape) * mask
    return write_subject(path, "tiny", times, scans, mask, affine)


def test_cli_outputs(tmp_path, glymph):
    """summary.json fields, results.h5 history, XDMF, NIfTI maps, figure; the
    data-boundary fit has small misfits; --force needed to overwrite."""
    from glymphmpi.io import read_h5_tree

    subj = _tiny_subject(tmp_path / "subj")
    out = tmp_path / "run"
    r = glymph("fem", subj, "--out", out, "--set", "fem.mode=data-boundary", "--set", "fem.dt_h=0.5")
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "complete" and s["method"] == "fem" and s["mpi_ranks"] == 1
    assert 0.2 < s["D_mm2_per_h"] < 1.3 and s["iterations"] >= 1
    assert len(s["misfit_per_scan"]) == 4 and s["misfit_per_scan"][0] == 0.0
    assert max(s["relative_misfit_per_scan"]) < 0.2
    assert any("data-boundary" in w and "biased" in w for w in s["warnings"])  # its D is said to be biased
    tree, attrs = read_h5_tree(out / "results.h5")
    assert json.loads(attrs["config"])["FemConfig"]["mode"] == "data-boundary"
    hist = tree["history"]
    assert len(hist["iteration"]) == s["iterations"] + 1 and hist["D"][-1] == pytest.approx(s["D_mm2_per_h"])
    assert tree["fit_at_scans"].shape == (4, 10, 9, 8)
    for name in ("c.xdmf", "c.h5", "g.xdmf", "g.h5"):
        assert (out / "vtk" / name).stat().st_size > 0
    for i in range(4):
        assert (out / "maps" / f"fit_{i:02d}.nii.gz").exists() and (out / "maps" / f"misfit_{i:02d}.nii.gz").exists()
    assert (out / "figures" / "fem.png").stat().st_size > 10_000
    r = glymph("fem", subj, "--out", out)
    assert r.returncode == 2 and "--force" in r.stderr


def test_bad_input_cli(tmp_path, glymph):
    """Fewer than 3 scans: exit 2 with one line naming the subject file."""
    from glymphmpi.subject import write_subject

    mask = np.ones((6, 6, 6), dtype=bool)
    p = write_subject(tmp_path / "s2", "two", (0.0, 4.0), np.ones((2, 6, 6, 6)), mask, np.eye(4))
    r = glymph("fem", p, "--out", tmp_path / "o")
    assert r.returncode == 2 and "at least 3 scans" in r.stderr and str(p) in r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].startswith("glymph: error:")


def test_preempt_and_resume(tmp_path):
    """SIGTERM during TAO: exit 75 with a checkpoint; the rerun resumes from it
    (history continues from the saved iteration) and completes."""
    from glymphmpi.io import read_h5_tree

    subj = _tiny_subject(tmp_path / "subj", noise=0.02)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "glymphmpi", "fem", str(subj), "--out", str(out), "--set", "fem.dt_h=0.25",
           "--set", "fem.regularization=fixed",
           "--set", "fem.max_iterations=40", "--set", "fem.d_rtol=0", "--set", "fem.gatol=0",
           "--set", "fem.grtol=0"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_COMM_WORLD", "PMIX_"))}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ck = out / "checkpoint.h5"
    t0 = time.time()
    while time.time() - t0 < 120:
        if ck.exists():
            tree, _ = read_h5_tree(ck)
            if tree["iteration"] >= 3:
                break
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "preempted" and s["resumable"]
    tree, _ = read_h5_tree(ck)
    saved = int(tree["iteration"])
    assert saved >= 3 and len(tree["state"]["history"]["iteration"]) == saved + 1
    Jsaved = tree["state"]["history"]["J"][-1]
    r = subprocess.run(cmd + ["--set", "fem.max_iterations=" + str(saved + 5)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming from {ck} at iteration {saved}" in r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "complete" and s["iterations"] == saved + 5
    res, _ = read_h5_tree(out / "results.h5")
    hist = res["history"]
    np.testing.assert_array_equal(hist["iteration"], np.arange(saved + 6))
    assert hist["J"][-1] <= Jsaved
    assert not ck.exists()


@pytest.mark.parametrize("mode,extra", [("data-boundary", ["fem.gatol=1e-12", "fem.grtol=1e-12"]),
                                        ("boundary-control", ["fem.max_iterations=15", "fem.d_rtol=0",
                                                             "fem.regularization=fixed"])])
def test_cli_two_ranks_same_D(tmp_path, glymph, mode, extra):
    """A fit on 2 ranks gives the serial D to 1e-6 relative (two subprocesses:
    1 rank and mpirun -n 2; data-boundary converged, boundary-control after the
    same 15 L-BFGS iterations). The subject is made by another discretisation,
    so D is not known exactly: only the agreement is tested."""
    run_glymph = glymph

    subj = _tiny_subject(tmp_path / "subj")
    D = []
    for n in (0, 2):
        out = tmp_path / f"run{n}"
        sets = [a for e in extra for a in ("--set", e)]
        r = run_glymph("fem", subj, "--out", out, "--set", f"fem.mode={mode}", *sets, mpi=n)
        assert r.returncode == 0, r.stderr[-2000:]
        s = json.loads((out / "summary.json").read_text())
        assert s["mpi_ranks"] == max(n, 1)
        D.append(s["D_mm2_per_h"])
    assert D[1] == pytest.approx(D[0], rel=1e-6)


def test_memory_estimated_up_front(tmp_path, glymph):
    """fem.dt_h = 1e-7 h is refused before anything is allocated: one line with the estimate, exit 2."""
    subj = _tiny_subject(tmp_path / "subj")
    t0 = time.time()
    r = glymph("fem", subj, "--out", tmp_path / "o", "--set", "fem.dt_h=1e-7")
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr and "fem.dt_h" in line and "GiB" in line and "time steps" in line
    assert time.time() - t0 < 60
