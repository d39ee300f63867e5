"""``glymph pinn-select``: grid -> runs -> selection -> table, figure, summary."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path

import numpy as np

from glymphmpi.errors import InputError
from glymphmpi.io import atomic_write_bytes, atomic_write_json
from glymphmpi.pinnselect import execute
from glymphmpi.pinnselect.grid import expand_runs, load_grid, make_setups
from glymphmpi.pinnselect.select import aggregate, choose
from glymphmpi.store import read_summary

log = logging.getLogger(__name__)

COLUMNS = ("setup", "axes", "seeds_complete", "seeds_total", "D_mean", "D_std", "residual_mean",
           "misfit_mean", "runtime_s", "eligible", "chosen", "notes")


def find_fem(out: Path, fem_dir: str | None) -> dict | None:
    """The FEM summary to show beside the PINN estimate: --fem DIR or a sibling ``fem`` run."""
    cands = [Path(fem_dir)] if fem_dir else [out.parent / "fem"]
    for c in cands:
        s = read_summary(c)
        if s and s.get("status") == "complete" and "D_mm2_per_h" in s:
            return {"dir": str(c), "D_mm2_per_h": float(s["D_mm2_per_h"])}
    if fem_dir:
        raise InputError("no complete FEM summary.json there", fem_dir)
    return None


def table_csv(rows, records) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["setup", "seed", "status", "D_mm2_per_h", "residual_norm", "data_misfit", "runtime_s", "reason"])
    for r in records:
        w.writerow([r.setup, r.seed, r.status, f"{r.D:.6g}", f"{r.residual_norm:.6g}", f"{r.misfit:.6g}",
                    f"{r.runtime_s:.3f}", r.reason])
    return buf.getvalue()


def setups_csv(rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow([r.setup, json.dumps(r.axes), r.seeds_complete, r.seeds_total, f"{r.D_mean:.6g}",
                    f"{r.D_std:.6g}", f"{r.residual_mean:.6g}", f"{r.misfit_mean:.6g}", f"{r.runtime_s:.2f}",
                    int(r.eligible), int(r.chosen), "; ".join(r.notes)])
    return buf.getvalue()


def plot(rows, records, chosen, fem, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = fem["D_mm2_per_h"] if fem else chosen.D_mean
    ref_name = "FEM estimate" if fem else "selected PINN D"
    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=120)
    ok = [r for r in records if r.status == "complete"]
    x = np.array([r.residual_norm for r in ok])
    y = np.array([r.D / ref for r in ok])
    elig = {r.setup for r in rows if r.eligible}
    col = ["tab:blue" if r.setup in elig else "tab:gray" for r in ok]
    ax.scatter(x, y, c=col, s=22, alpha=0.8, label="runs (blue: misfit within tolerance)")
    win = [r for r in ok if r.setup == chosen.setup]
    ax.scatter([r.residual_norm for r in win], [r.D / ref for r in win], marker="*", s=160, c="tab:red",
               label=f"selected: {chosen.setup}")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("residual norm  mean |dc/dt - D lap c|  (concentration/h)")
    ax.set_ylabel(f"D / {ref_name}")
    ax.set_title(f"PINN set-ups: D relative to the {ref_name} ({ref:.3g} mm$^2$/h)")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def solve(subject, cfg, rundir, comm) -> dict:  # noqa: ARG001 - the registry's signature
    """The registry's ``solve`` of ``pinn-select``: train the grid (``cfg.scheduler``), select, write."""
    out = rundir.root
    grid = cfg.grid
    setups = (load_grid(grid, cfg.early_stop_fraction) if grid
              else make_setups(early_stop_fraction=cfg.early_stop_fraction))
    runs = expand_runs(setups, cfg.seeds)
    subject_path = Path(subject.path).resolve()
    atomic_write_json(out / "grid.json", [{"setup": s.name, "axes": s.axes, "pinn": s.keys} for s in setups])
    log.info("%d set-ups x %d seeds = %d runs (%s)", len(setups), cfg.seeds, len(runs), cfg.scheduler)
    job = execute.run_grid(subject_path, out, runs, cfg, cfg.scheduler)  # tasks of the cohort backend
    records = [execute.record(out, r) for r in runs]
    rows = aggregate(records, setups)
    chosen = choose(rows, cfg.misfit_tolerance)
    atomic_write_bytes(out / "runs.csv", table_csv(rows, records).encode())
    atomic_write_bytes(out / "setups.csv", setups_csv(rows).encode())
    n = {s: sum(r.status == s for r in records) for s in ("complete", "failed", "early_stopped", "pending",
                                                           "preempted")}
    if chosen is None:
        raise InputError(f"no run completed ({n['failed']} failed, {n['pending']} pending); see {out}/runs.csv")
    fem = find_fem(out, cfg.fem_run or None)
    plot(rows, records, chosen, fem, rundir.figures / "pinn_select_D_vs_residual.png")
    selection = {
        "chosen_setup": chosen.setup, "chosen_axes": chosen.axes,
        "chosen_pinn": next(s.keys for s in setups if s.name == chosen.setup),
        "D_mm2_per_h": chosen.D_mean, "D_std_mm2_per_h": chosen.D_std, "residual_norm": chosen.residual_mean,
        "data_misfit": chosen.misfit_mean, "seeds": chosen.seeds_complete,
        "misfit_tolerance": cfg.misfit_tolerance, "fem": fem,
        "rule": "lowest mean residual norm among set-ups whose mean data misfit <= (1 + tol) x the best",
    }
    atomic_write_json(out / "selection.json", selection)
    rundir.write_results({"setups": {r.setup: {
        "D_mean": r.D_mean, "D_std": r.D_std, "residual_mean": r.residual_mean, "misfit_mean": r.misfit_mean,
        "seeds_complete": r.seeds_complete, "eligible": bool(r.eligible), "chosen": bool(r.chosen),
        "D_runs": np.array([x.D for x in records if x.setup == r.setup]),
        "residual_runs": np.array([x.residual_norm for x in records if x.setup == r.setup])} for r in rows}},
        config=cfg, subject_id=subject.id)
    log.info("selected %s: D = %.4g +- %.2g mm^2/h (residual %.3g)%s", chosen.setup, chosen.D_mean,
             chosen.D_std, chosen.residual_mean, f"; FEM D = {fem['D_mm2_per_h']:.4g}" if fem else "")
    return {
        "D_mm2_per_h": chosen.D_mean, "D_std_mm2_per_h": chosen.D_std, "chosen_setup": chosen.setup,
        "residual_norm": chosen.residual_mean, "data_misfit": chosen.misfit_mean,
        "runs": len(records), "runs_complete": n["complete"], "runs_failed": n["failed"],
        "runs_early_stopped": n["early_stopped"], "setups": len(setups), "scheduler": cfg.scheduler,
        "slurm_job": job, "fem_D_mm2_per_h": fem["D_mm2_per_h"] if fem else None,
        "train_s_total": float(np.nansum([r.runtime_s for r in records])) if records else math.nan,
    }

