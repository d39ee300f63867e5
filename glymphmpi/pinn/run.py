"""The ``glymph pinn`` method: its communicator, training, outputs.

Writes (rank 0): ``results.h5`` (per-member loss, D and residual histories,
r(t), RAR/RAE events, the ensemble-mean prediction at the scan times),
``maps/pinn_pred_tXX.nii.gz`` and the summary fields of
:func:`glymphmpi.pinn.trainer.summary_fields`: ``D_mm2_per_h`` (ensemble mean),
``D_std_mm2_per_h``, ``residual_norm`` (in the data's units), ``estimate``
(false with ``estimate_reason`` for a smoke test or an early stop),
``converged`` and ``warnings`` (D still moving, residual not fallen), the
resolved schedule, final losses, runtime, device and world size. The figures (D and losses over epochs, r(t), slices of
data vs prediction) are the registry's hook
:func:`glymphmpi.report.pinn_figures.figures`, made from results.h5.
"""

from __future__ import annotations

import contextlib
import gc
import logging

import numpy as np

from glymphmpi.pinn.config import PinnConfig

log = logging.getLogger(__name__)


@contextlib.contextmanager
def communicator(cfg: PinnConfig):
    """The registry's communicator factory for ``pinn``: torch.distributed set up for
    ``cfg.device`` (the device decides the backend), torn down after the run. Yields the
    :class:`~glymphmpi.pinn.distributed.DistContext`, which is the communicator (mpi4py-like
    collectives; the identity in a single process)."""
    from glymphmpi.pinn.distributed import init_distributed, teardown

    ctx = init_distributed(cfg.device)
    try:
        yield ctx
    finally:
        gc.collect()
        teardown(ctx)


def solve(subject, cfg: PinnConfig, rundir, comm) -> dict:
    """Train the ensemble, write results/maps; returns the summary fields.

    ``comm`` is the :class:`~glymphmpi.pinn.distributed.DistContext` of :func:`communicator`.
    """
    from glymphmpi.log import quiet
    from glymphmpi.pinn.trainer import fit, problem_from_subject, resolve_schedule, summary_fields

    problem = problem_from_subject(subject)
    cfg = resolve_schedule(cfg, problem)  # epochs/batches/freeze/RAR made concrete for this data
    ckpt = rundir.checkpointer(every=cfg.checkpoint_every)
    members = fit(problem, cfg, comm, ckpt, quiet=quiet())
    fields = summary_fields(members, problem, cfg, comm)
    if comm.rank == 0:
        if not fields["estimate"]:
            log.warning("D = %.4g mm^2/h is not an estimate: %s", fields["D_mm2_per_h"], fields["estimate_reason"])
        elif fields["warnings"]:
            log.warning("D = %.4g mm^2/h did not converge: %s", fields["D_mm2_per_h"], "; ".join(fields["warnings"]))
    if rundir.rank == 0:
        write_outputs(rundir, subject, problem, cfg, members, fields)
    return fields


def write_outputs(rundir, subject, problem, cfg, members, fields) -> None:
    """results.h5 and NIfTI maps (rank 0)."""
    pred = np.mean([m.prediction for m in members], axis=0)  # (p, n_mask)
    vol = np.zeros((len(problem.times_h),) + problem.mask.shape)
    vol[:, problem.mask] = pred
    tree = {"D_mm2_per_h": fields["D_mm2_per_h"], "D_std_mm2_per_h": fields["D_std_mm2_per_h"],
            "D_members_mm2_per_h": np.array(fields["D_members_mm2_per_h"]),
            "residual_norm": fields["residual_norm"], "times_h": np.asarray(problem.times_h),
            "prediction_at_scans": vol.astype(np.float32), "members": {}}
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
