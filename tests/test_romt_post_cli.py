"""`glymph romt-post` on a synthetic finished run, and the post-processing split over MPI ranks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_romt_post import make_run


def test_romt_post_cli_reruns_and_updates_summary(tmp_path, glymph):
    rd, toml, truth = make_run(tmp_path, sigma=0.0)
    before = json.loads(rd.summary.read_text())
    r = glymph("romt-post", rd.root, "--set", "romt_post.seed_max_fraction=0.5",
               "--set", "romt_post.write_figures=false")
    assert r.returncode == 0, r.stderr
    after = json.loads(rd.summary.read_text())
    assert after["status"] == "complete" and after["runtime_s"] == before["runtime_s"]
    n1 = after["n_pathlines"]
    assert n1 > 0 and after["romt_post"]["config"]["seed_max_fraction"] == 0.5
    assert (rd.maps / "speed.nii.gz").exists() and (rd.vtk / "pathlines.vtp").exists()
    assert not (rd.figures / "speed_map.png").exists()
    # other settings: every 2nd seed -> half of them (rounded up), summary updated
    r = glymph("romt-post", rd.root, "--set", "romt_post.seed_max_fraction=0.5", "--set",
               "romt_post.seed_every=2", "--set", "romt_post.write_figures=false")
    assert r.returncode == 0, r.stderr
    after2 = json.loads(rd.summary.read_text())
    assert after2["n_pathlines"] == (n1 + 1) // 2
    vox = np.array([0.5, 0.8, 1.25])
    assert after2["median_speed_mm_per_h"] == pytest.approx(
        np.linalg.norm(truth["vel"] * vox) / (3.0 / truth["T"]), rel=1e-5)


def test_romt_post_cli_errors(tmp_path, glymph):
    rd, toml, _ = make_run(tmp_path, summary=False)
    r = glymph("romt-post", rd.root)
    assert r.returncode == 2 and "not a finished rOMT run" in r.stderr and "Traceback" not in r.stderr
    from glymphmpi.io import atomic_write_json

    atomic_write_json(rd.summary, {"status": "complete", "method": "romt", "subject": "synth-01"})
    r = glymph("romt-post", rd.root)
    assert r.returncode == 2 and "give --subject" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = glymph("romt-post", rd.root, "--subject", toml, "--set", "romt_post.integrator=rk9",
               "--set", "romt_post.write_figures=false")
    assert r.returncode == 2 and "valid: euler, rk2, rk4" in r.stderr
    r = glymph("romt-post", rd.root, "--subject", toml, "--set", "romt_post.write_figures=false")
    assert r.returncode == 0, r.stderr
    # a subject on another grid is refused
    other, other_toml, _ = make_run(tmp_path / "other", shape=(20, 18, 12))
    r = glymph("romt-post", rd.root, "--subject", other_toml)
    assert r.returncode == 2 and "grid" in r.stderr


@pytest.mark.mpi
def test_postprocess_split_over_ranks(comm, mpi_tmp_path):
    """Seeds split over the ranks give the same lines as one rank (uniform translation)."""
    from glymphmpi.romt import post
    from glymphmpi.romt.post_config import RomtPostConfig
    from glymphmpi.store import RunDir
    from glymphmpi.subject import load_subject

    if comm.rank == 0:
        make_run(mpi_tmp_path)
    comm.Barrier()
    subject = load_subject(mpi_tmp_path / "subject" / "subject.toml")
    rd = RunDir(mpi_tmp_path / "run", comm=comm)
    cfg = RomtPostConfig(seed_max_fraction=0.5, write_figures=False)
    fields = post.postprocess(rd, subject, cfg, comm=comm)
    res = post.RomtResults(rd.results)
    lines, stats = post.trace_results(res, cfg)  # serial, on every rank
    assert fields["n_pathlines"] == lines.n == stats["n_seeds"]
    if comm.rank == 0:
        from glymphmpi.io import vtk

        pl = vtk.read_vtp(rd.vtk / "pathlines.vtp")
        starts = pl["points"][np.r_[0, pl["lines"][1][:-1]]]
        from nibabel.affines import apply_affine

        np.testing.assert_allclose(starts, apply_affine(subject.affine, lines.seeds), atol=1e-4)
    # the figure hook is collective: each rank draws its share, every rank gets all outputs in order
    from glymphmpi.report.romt_figures import figures

    assert figures.collective
    fields["romt_post"]["outputs"] = []
    figures(rd, subject, RomtPostConfig(seed_max_fraction=0.5, figure_max_lines=300), fields, comm=comm)
    names = ["speed_map", "peclet_map", "pathlines_speed", "pathlines_peclet", "flux_vectors_speed",
             "flux_vectors_peclet"]
    assert fields["romt_post"]["outputs"] == [f"figures/{n}.png" for n in names]
    assert comm.allgather(fields["romt_post"]["outputs"]) == [fields["romt_post"]["outputs"]] * comm.size
    comm.Barrier()
    for n in names:
        assert (rd.figures / f"{n}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.mpi
def test_split_figures_raise_on_every_rank(comm):
    """A figure that fails on one rank fails the hook on every rank (the ranks stay together)."""
    from glymphmpi.errors import GlymphError
    from glymphmpi.report.romt_figures import _run_split

    def bad():
        raise ValueError("no such map")

    tasks = [lambda: "a", bad, lambda: "c"]  # task 1 runs on rank 1 (2 ranks) or rank 0 (1 rank)
    with pytest.raises((ValueError, GlymphError), match="no such map"):
        _run_split(tasks, comm)
    assert _run_split([lambda: "a", lambda: "b", lambda: "c"], comm) == ["a", "b", "c"]


def test_romt_then_romt_post_on_small_gaussian_spheres(tmp_path, glymph):
    """`glymph romt` runs the post-processing by default; `romt-post` re-runs it with other
    settings. A 16^3 sphere series, 2 loops of 5 steps, 2 GN iterations (a rough solve, seconds)."""
    from glymphmpi.io.vtk import read_vtp

    r = glymph("synth", "gaussian-spheres", "--out", tmp_path / "subj", "--n", 16, "--images", 3)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    r = glymph("--quiet", "romt", tmp_path / "subj" / "subject.toml", "--out", run, "--set",
               "romt.max_iterations=2", "--set", "romt.nt=5", "--set", "romt.dt=0.8",
               "--set", "romt_post.write_figures=false")
    assert r.returncode == 0, r.stderr
    s1 = json.loads((run / "summary.json").read_text())
    assert s1["status"] == "complete" and s1["n_pathlines"] > 50
    truth = json.loads((tmp_path / "subj" / "truth.json").read_text())
    # the spheres move 1 voxel (1 mm) per axis per hour: ideal speed sqrt(3) mm/h; measured 1.74
    # after 2 GN iterations; 20% allows the rough solve
    assert s1["median_speed_mm_per_h"] == pytest.approx(np.sqrt(3.0), rel=0.2)
    fv = read_vtp(run / "vtk" / "flux_vectors.vtp")
    d = fv["point_data"]["displacement_mm"].astype(float)
    cos = d @ np.asarray(truth["direction"]) / np.linalg.norm(d, axis=1)
    assert cos.mean() > 0.9
    r = glymph("romt-post", run, "--subject", tmp_path / "subj" / "subject.toml",
               "--set", "romt_post.seed_every=3", "--set", "romt_post.write_figures=false")
    assert r.returncode == 0, r.stderr
    s2 = json.loads((run / "summary.json").read_text())
    assert s2["romt_post"]["n_seeds"] == (s1["romt_post"]["n_seeds"] + 2) // 3
    assert s2["gn_iterations"] == s1["gn_iterations"]  # the solver's fields are kept
