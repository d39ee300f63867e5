"""The ``glymph pinn`` command: distributed set-up, training, outputs.

Writes (rank 0): ``results.h5`` (per-member loss, D and residual histories,
r(t), RAR/RAE events), ``maps/pinn_pred_tXX.nii.gz`` (ensemble-mean
prediction at the scan times), figures (D and losses over epochs, r(t),
slices of data vs prediction) and summary fields ``D_mm2_per_h`` (ensemble
mean), ``D_std_mm2_per_h``, ``residual_norm``, final losses, epochs, runtime,
device and world size.
"""

from __future__ import annotations

import gc
import logging

import numpy as np

from glymphmpi.config import load_config
from glymphmpi.pinn.config import PinnConfig

log = logging.getLogger(__name__)


def main(args) -> int:
    from glymphmpi.pinn.distributed import TorchComm, init_distributed, teardown
    from glymphmpi.runner import run_method

    cfg = load_config("pinn", args.config, args.set)  # the device decides the backend
    ctx = init_distributed(cfg.device)
    comm = TorchComm(ctx) if ctx.active else None
    try:
        run_method("pinn", args, lambda s, c, r, cm: solve(s, c, r, cm, ctx, quiet=args.quiet), comm=comm)
    finally:
        gc.collect()
        teardown(ctx)
    return 0


def solve(subject, cfg: PinnConfig, rundir, comm, ctx, quiet: bool = False) -> dict:
    """Train the ensemble, write results/maps/figures; returns the summary fields."""
    from glymphmpi.pinn.trainer import fit, problem_from_subject

    problem = problem_from_subject(subject)
    ckpt = rundir.checkpointer(every=cfg.checkpoint_every)
    members = fit(problem, cfg, ctx, ckpt, quiet=quiet)
    Ds = np.array([m.D for m in members])
    last = members[0].history
    fields = {
        "D_mm2_per_h": float(Ds.mean()),
        "D_std_mm2_per_h": float(Ds.std(ddof=1)) if Ds.size > 1 else 0.0,
        "D_members_mm2_per_h": Ds.tolist(),
        "residual_norm": float(np.mean([m.residual_norm for m in members])),
        "final_loss_data": float(np.mean([m.history["loss_data"][-1] for m in members])),
        "final_loss_pde": float(np.mean([m.history["loss_pde"][-1] for m in members])),
        "epochs": cfg.epochs, "ensemble": cfg.ensemble, "pde_points_final": int(last["n_pde"][-1]),
        "device": str(ctx.device), "world_size": ctx.size, "backend": ctx.backend, "dtype": cfg.dtype,
        "train_s": float(sum(m.train_s for m in members)),
        "early_stopped": any(m.early_stop_reason for m in members),
        "early_stop_reason": "; ".join(m.early_stop_reason for m in members if m.early_stop_reason),
        "max_rank_difference": float(max(m.rank_spread for m in members)),
    }
    if rundir.rank == 0:
        write_outputs(rundir, subject, problem, cfg, members, fields)
    return fields


def write_outputs(rundir, subject, problem, cfg, members, fields) -> None:
    """results.h5, NIfTI maps and figures (rank 0)."""
    pred = np.mean([m.prediction for m in members], axis=0)  # (p, n_mask)
    vol = np.zeros((len(problem.times_h),) + problem.mask.shape)
    vol[:, problem.mask] = pred
    tree = {"D_mm2_per_h": fields["D_mm2_per_h"], "D_std_mm2_per_h": fields["D_std_mm2_per_h"],
            "D_members_mm2_per_h": np.array(fields["D_members_mm2_per_h"]),
            "residual_norm": fields["residual_norm"], "times_h": np.asarray(problem.times_h),
            "members": {}}
    for k, m in enumerate(members):
        tree["members"][f"m{k}"] = {
            "seed": m.seed, "D_mm2_per_h": m.D, "residual_norm": m.residual_norm,
            "t_grid_h": np.asarray(m.t_grid), "residual_t": np.asarray(m.residual_t),
            "history": {key: np.asarray(v, dtype=np.float64) for key, v in m.history.items()},
            "events": {f"{i:02d}_{e['kind']}_epoch{e['epoch']}": np.asarray(e["t"]) for i, e in
                       enumerate(m.events)},
            "train_s": m.train_s}
    rundir.write_results(tree, config=cfg, subject_id=subject.id,
                         extra_attrs={"units": "D mm^2/h; residual concentration/h; t h; x mm"})
    if cfg.maps:
        for i, _t in enumerate(problem.times_h):
            rundir.write_map(f"pinn_pred_t{i:02d}", vol[i], problem.affine)
    if cfg.figures:
        from glymphmpi.report import pinn_figures as pf

        pf.plot_histories([m.history for m in members], rundir.figures / "pinn_history.png")
        pf.plot_residual([(m.t_grid, m.residual_t) for m in members], problem.times_h,
                         rundir.figures / "pinn_residual_t.png")
        pf.plot_slices(subject.scans, vol, problem.mask, problem.times_h, rundir.figures / "pinn_slices.png")
