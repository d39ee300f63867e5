"""pinn-select: grid expansion, the selection rule, a local 4-point grid, a SLURM job array."""

from __future__ import annotations

import csv
import json
import math
import shutil

import pytest

from glymphmpi.errors import InputError
from glymphmpi.pinnselect.grid import expand_runs, make_setups, run_overrides
from glymphmpi.pinnselect.select import RunRecord, aggregate, choose

pytest.importorskip("torch")


def test_default_grid_is_the_papers():
    setups = make_setups()
    assert len(setups) == 4 * 3 * 2 * 2
    names = {s.name for s in setups}
    assert "wr32_p2to1_lr0.001-0.0001_raron" in names
    s = next(s for s in setups if s.name == "wr256_p1_lr0.0001-1e-05_raroff")
    # PinnConfig's epochs and batches are automatic (0): the grid pins 2000 epochs of 20 minibatches
    assert s.keys == {"w_r": 256.0, "p_schedule": "1", "lr_start": 1e-4, "lr_end": 1e-5, "rar_epochs": [],
                      "epochs": 2000, "batches": 20}
    on = next(s for s in setups if s.axes["rar"] and s.axes["w_r"] == 1.0)
    assert on.keys["rar_epochs"] == [500, 1000, 1500]  # 25/50/75% of the grid's 2000 epochs
    es = make_setups(early_stop_fraction=0.25)
    # delta is held for half the epochs by default (1000), then 25% of the other 1000
    assert all(s.keys["early_stop_epochs"] == [1000 + 250] for s in es)
    fz = make_setups({"w_r": [1.0]}, {"epochs": 400, "delta_freeze_epochs": 100}, early_stop_fraction=0.25)
    assert fz[0].keys["early_stop_epochs"] == [175]  # 100 epochs with D held + 25% of the other 300
    runs = expand_runs(setups[:1], 3)
    assert [r.seed for r in runs] == [0, 1, 2]
    assert "pinn.seed=2" in run_overrides(runs[2]) and "pinn.ensemble=1" in run_overrides(runs[2])


def test_grid_errors():
    with pytest.raises(InputError, match="unknown grid axis 'wr'"):
        make_setups({"wr": [1]})
    with pytest.raises(InputError, match="non-empty list"):
        make_setups({"w_r": []})
    with pytest.raises(InputError, match="p_schedule"):
        make_setups({"p_schedule": ["3"]})
    with pytest.raises(InputError, match="set by pinn-select"):
        make_setups({"w_r": [1]}, {"seed": 3})


def _setups():
    return make_setups({"w_r": [1.0, 32.0, 64.0]}, {"epochs": 10})


def test_choose_lowest_residual_within_misfit_tolerance():
    s = _setups()
    recs = [
        RunRecord("wr1", 0, "complete", D=0.5, residual_norm=0.10, misfit=1.00),
        RunRecord("wr1", 1, "complete", D=0.6, residual_norm=0.12, misfit=1.10),
        RunRecord("wr32", 0, "complete", D=0.7, residual_norm=0.02, misfit=1.20),
        RunRecord("wr32", 1, "failed", reason="boom"),
        RunRecord("wr64", 0, "complete", D=0.9, residual_norm=0.001, misfit=3.0),  # misfit too large
    ]
    rows = aggregate(recs, s)
    win = choose(rows, misfit_tolerance=0.25)
    assert win.setup == "wr32" and win.D_mean == 0.7 and win.seeds_complete == 1
    assert [r.eligible for r in rows] == [True, True, False]
    assert rows[0].D_mean == pytest.approx(0.55) and rows[0].D_std == pytest.approx(math.sqrt(0.005))
    # a tighter tolerance excludes wr32 (misfit 1.2 > 1.05 x best 1.05)
    rows = aggregate(recs, s)
    assert choose(rows, misfit_tolerance=0.1).setup == "wr1"
    assert "seed 1: failed (boom)" in rows[1].notes


def test_choose_none_complete():
    rows = aggregate([RunRecord("wr1", 0, "failed")], _setups())
    assert choose(rows, 0.1) is None


GRID = """
[axes]
w_r = [0.0, 1.0]
lr = [[3e-3, 1e-3], [1e-5, 1e-5]]
[fixed]
epochs = 3
depth = 2
width = 16
batches = 2
residual_times = 10
residual_voxels = 100
figures = false
maps = false
checkpoint_every = 0
"""


@pytest.fixture(scope="module")
def tiny_subject(tmp_path_factory):
    from glymphmpi.synth import brain_diffusion as bd

    out = tmp_path_factory.mktemp("tiny")
    return bd.write(out, bd.PhantomSpec(block=(8, 8, 8), dt_h=0.5), sid="tiny")


def test_local_grid_selects_lowest_residual(tmp_path, glymph, tiny_subject):
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID)
    out = tmp_path / "sel"
    r = glymph("pinn-select", tiny_subject, "--out", out, "--grid", grid, "--set", "pinn_select.seeds=1",
               "--set", "pinn_select.parallel=2", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = list(csv.DictReader(open(out / "runs.csv")))
    assert len(runs) == 4 and all(row["status"] == "complete" for row in runs)
    # recompute the rule independently from each run's own summary.json
    per = {}
    for row in runs:
        s = json.loads((out / "runs" / row["setup"] / f"seed{row['seed']}" / "summary.json").read_text())
        per[row["setup"]] = (s["final_loss_data"], s["residual_norm"], s["D_mm2_per_h"])
    best = min(m for m, _, _ in per.values())
    eligible = {k: v for k, v in per.items() if v[0] <= 1.25 * best}
    expect = min(eligible, key=lambda k: eligible[k][1])
    sel = json.loads((out / "selection.json").read_text())
    assert sel["chosen_setup"] == expect
    assert sel["D_mm2_per_h"] == pytest.approx(per[expect][2])
    summ = json.loads((out / "summary.json").read_text())
    assert summ["status"] == "complete" and summ["runs_complete"] == 4 and summ["chosen_setup"] == expect
    assert (out / "figures" / "pinn_select_D_vs_residual.png").stat().st_size > 10_000
    # the grid ran as tasks of the cohort backend: its state and the cohort's status table
    status = (out / "grid" / "status.txt").read_text().splitlines()
    assert status[0].split() == ["set-up", "seed0"] and status[-1] == "4 complete"
    # resumable: a forced re-selection trains nothing new (run summaries untouched)
    stamp = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/seed0/summary.json")}
    r = glymph("pinn-select", tiny_subject, "--out", out, "--grid", grid, "--set", "pinn_select.seeds=1",
               "--force", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert stamp == {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/seed0/summary.json")}
    # a missing run is trained again, only that one
    victim = next(iter(stamp))
    shutil.rmtree(victim.parent)
    r = glymph("pinn-select", tiny_subject, "--out", out, "--grid", grid, "--set", "pinn_select.seeds=1",
               "--force", timeout=600)
    assert r.returncode == 0 and victim.exists()
    others = {p: t for p, t in stamp.items() if p != victim}
    assert others == {p: p.stat().st_mtime_ns for p in others}


def test_bad_grid_file(tmp_path, glymph, tiny_subject):
    g = tmp_path / "g.toml"
    g.write_text("[axes]\nw_r = 3\n")
    r = glymph("pinn-select", tiny_subject, "--out", tmp_path / "o", "--grid", g)
    assert r.returncode == 2 and "g.toml: grid axis 'w_r' must be a non-empty list" in r.stderr


@pytest.mark.slurm
def test_slurm_job_array(tmp_path, glymph, tiny_subject):
    if shutil.which("sbatch") is None:
        pytest.fail("SLURM is not available: run the slurm tests through `make test` (hpc/slurm/up.sh)")
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID)
    out = tmp_path / "sel"
    r = glymph("pinn-select", tiny_subject, "--out", out, "--grid", grid, "--scheduler", "slurm",
               "--set", "pinn_select.seeds=1", "--set", "pinn_select.poll_s=0.5", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    summ = json.loads((out / "summary.json").read_text())
    assert summ["slurm_job"] and summ["runs_complete"] == 4
    scripts = list((out / "grid" / "jobs").glob("pinn-*.sbatch"))
    assert len(scripts) == 1 and "#SBATCH --array=0-3" in scripts[0].read_text()
    logs = list((out / "grid" / "logs").glob(f"pinn.{summ['slurm_job']}_*.log"))
    assert len(logs) == 4


def test_cohort_runs_pinn_select_and_reports_it(tmp_path, glymph, tiny_subject):
    """A per-subject method list with pinn-select; the cohort CSV gains its D column."""
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID.replace("w_r = [0.0, 1.0]", "w_r = [1.0]"))
    cohort = tmp_path / "cohort.toml"
    cohort.write_text(f'subjects = [{{path = "{tiny_subject}", methods = ["pinn-select"]}}]\n'
                      'methods = ["fem", "pinn-select"]\n'
                      f'[settings.pinn_select]\ngrid = "{grid}"\nseeds = 1\nparallel = 2\n')
    r = glymph("cohort", "run", cohort, "--out", tmp_path / "run", "--scheduler", "local", timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "run" / "report" / "cohort.csv")))
    assert rows[0]["pinn-select.status"] == "complete"
    sel = json.loads((tmp_path / "run" / "tiny" / "pinn-select" / "selection.json").read_text())
    assert float(rows[0]["pinn-select.D_mm2_per_h"]) == pytest.approx(sel["D_mm2_per_h"], rel=1e-9)


def test_early_stop_of_hopeless_run(tmp_path, glymph, tiny_subject):
    """D pinned at the lower bound (delta0 = -30, lr tiny): stopped at the check epoch with the reason."""
    out = tmp_path / "p"
    r = glymph("pinn", tiny_subject, "--out", out, "--set", "pinn.epochs=6", "--set", "pinn.depth=2",
               "--set", "pinn.width=16", "--set", "pinn.batches=2", "--set", "pinn.delta0=-30.0",
               "--set", "pinn.lr_start=1e-7", "--set", "pinn.lr_end=1e-7", "--set", "pinn.early_stop_epochs=[3]",
               "--set", "pinn.delta_freeze_epochs=1",  # explicit: the automatic freeze (half) would cover epoch 3
               "--set", "pinn.residual_times=10", "--set", "pinn.residual_voxels=100", "--set", "pinn.figures=false",
               "--set", "pinn.maps=false")
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["early_stopped"] is True
    assert "stuck at the lower bound" in s["early_stop_reason"] and "not below" in s["early_stop_reason"]
    import h5py

    with h5py.File(out / "results.h5") as fh:
        assert len(fh["members/m0/history/epoch"][()]) == 3  # stopped at epoch 3 of 6
    from glymphmpi.pinnselect.execute import record
    from glymphmpi.pinnselect.grid import Run, Setup

    s_path = tmp_path / "runs" / "p" / "seed0"
    s_path.mkdir(parents=True)
    (s_path / "summary.json").write_text(json.dumps(s))
    rec = record(tmp_path, Run(Setup("p", {}, {}), 0))
    assert rec.status == "early_stopped" and "lower bound" in rec.reason
