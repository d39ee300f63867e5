"""Files are data, never code (issue 17 section 2): a pickle planted in an unfinished run's
checkpoint.h5 (fem, romt, pinn) or in results.h5 is refused in one line and never executed."""

from __future__ import annotations

import json
import pickle

import h5py
import numpy as np
import pytest


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling creates the marker file
        return (open, (self.marker, "w"))


def _plant_checkpoint(out, marker, torch_blob: bool = False):
    """Make ``out`` an unfinished run whose checkpoint.h5 (with the run's identity) carries a payload."""
    from glymphmpi.store import Checkpointer

    (out / "summary.json").unlink()
    ident_file = out / "identity.json"
    ident = json.loads(ident_file.read_text()) if ident_file.exists() else None
    ck = Checkpointer(out / "checkpoint.h5", identity=ident)
    ck.save({"x": np.zeros(2), "loop": 0, "iterations": 1, "member": 0, "epoch": 1}, 1)
    with h5py.File(ck.path, "a") as fh:
        if torch_blob:  # a torch.save-style blob that is in truth a plain pickle
            del fh["state/x"]
            fh["state/blob"] = np.frombuffer(pickle.dumps(_Payload(marker)), np.uint8)
            fh["state/blob"].attrs["kind"] = "array"
        else:
            fh["state"].create_dataset("rng", data=np.void(pickle.dumps(_Payload(marker))))
            fh["state/rng"].attrs["kind"] = "pickle"
    return ck.path


def _refused(r, path, marker):
    assert r.returncode == 2, r.stderr[-3000:]
    err = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("glymph: error:")]
    assert len(err) == 1 and str(path) in err[0] and "refused" in err[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr and not marker.exists()


@pytest.fixture(scope="module")
def gauss10(tmp_path_factory):
    from glymphmpi.synth import gaussian_spheres

    return gaussian_spheres.write(tmp_path_factory.mktemp("g10"), n=10, n_images=3, sid="g10")


ROMT = ["--no-post", "--set", "romt.max_iterations=1", "--set", "romt.pcg_max_iterations=3"]


def test_romt_planted_checkpoint_and_results(glymph, gauss10, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "PWNED"
    r = glymph("romt", gauss10, "--out", out, *ROMT)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = _plant_checkpoint(out, marker)
    _refused(glymph("romt", gauss10, "--out", out, *ROMT), ck, marker)
    # results.h5 of a finished run: post-processing reads it without ever unpickling
    assert glymph("romt", gauss10, "--out", out, "--fresh", *ROMT).returncode == 0
    with h5py.File(out / "results.h5", "a") as fh:
        fh["params"].create_dataset("evil", data=np.void(pickle.dumps(_Payload(marker))))
        fh["params/evil"].attrs["kind"] = "pickle"
    glymph("romt-post", out)
    assert not marker.exists()
    from glymphmpi.io import UnsafeFileError, read_h5_tree

    with pytest.raises(UnsafeFileError, match="results.h5"):
        read_h5_tree(out / "results.h5")
    assert not marker.exists()


def test_fem_planted_checkpoint(glymph, tmp_path):
    pytest.importorskip("dolfinx")
    from test_fem_cli import _tiny_subject

    subj = _tiny_subject(tmp_path / "subj")
    out, marker = tmp_path / "run", tmp_path / "PWNED"
    args = ["--set", "fem.mode=data-boundary", "--set", "fem.dt_h=1.0", "--set", "fem.max_iterations=2"]
    r = glymph("fem", subj, "--out", out, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = _plant_checkpoint(out, marker)
    _refused(glymph("fem", subj, "--out", out, *args), ck, marker)


@pytest.mark.parametrize("torch_blob", [False, True])
def test_pinn_planted_checkpoint(glymph, tmp_path, torch_blob):
    pytest.importorskip("torch")
    from glymphmpi.pinn.analytic import heat_kernel_box
    from glymphmpi.subject import write_subject

    scans, mask, affine, times = heat_kernel_box(n=6, D=0.5, tau=8.0)
    subj = write_subject(tmp_path / "hk", "hk", times, scans, mask, affine)
    out, marker = tmp_path / "run", tmp_path / "PWNED"
    args = ["--set", "pinn.depth=2", "--set", "pinn.width=8", "--set", "pinn.batches=2", "--set", "pinn.epochs=2",
            "--set", "pinn.residual_times=5", "--set", "pinn.figures=false", "--set", "pinn.maps=false"]
    r = glymph("pinn", subj, "--out", out, *args, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    ck = _plant_checkpoint(out, marker, torch_blob=torch_blob)
    r = glymph("pinn", subj, "--out", out, *args, env={"OMP_NUM_THREADS": "1"})
    _refused(r, ck if not torch_blob else "checkpoint", marker)
