"""``solve(subject, cfg, rundir, comm)`` of the rOMT method: every loop of a subject's
series (:mod:`glymphmpi.romt.schedule`), results.h5 (:mod:`glymphmpi.romt.results`),
the summary fields.

Modules of the solver, one job each: :mod:`~glymphmpi.romt.grid` (DCT diffusion,
graph Laplacian), :mod:`~glymphmpi.romt.transport` (particle step and its
derivatives), :mod:`~glymphmpi.romt.gn` (objective, Gauss-Newton),
:mod:`~glymphmpi.romt.loop` (one loop), :mod:`~glymphmpi.romt.crop` (the loop's
box), :mod:`~glymphmpi.romt.runtime` (allocator, BLAS threads),
:mod:`~glymphmpi.romt.loopstore` (finished loops, checkpoints),
:mod:`~glymphmpi.romt.schedule` (loops over ranks).
"""

from __future__ import annotations

import logging

import numpy as np

from glymphmpi.errors import InputError
from glymphmpi.romt.config import RomtConfig
from glymphmpi.romt.loop import active_set, check_images
from glymphmpi.romt.loopstore import LoopStore, config_key
from glymphmpi.romt.results import RESULTS_ATTRS, build_results_tree
from glymphmpi.romt.schedule import solve_series

log = logging.getLogger(__name__)


def run(subject, cfg: RomtConfig, rundir, comm) -> dict:
    """The ``glymph romt`` solve: every loop, results.h5, summary fields.

    Args:
        subject: a loaded :class:`glymphmpi.subject.Subject`.
        cfg: settings.
        rundir: prepared :class:`glymphmpi.store.RunDir`.
        comm: world communicator (COMM_SELF in serial).
    """
    images = np.asarray(subject.scans, dtype=np.float64)
    if images.shape[0] < 2:
        raise InputError(f"rOMT needs at least 2 scans, got {images.shape[0]}", subject.path)
    if cfg.mask_images:
        images = images * subject.mask
    names = [str(p) for p in subject.scan_paths] if subject.scan_paths else None
    check_images(images, names)
    active = active_set(subject.mask, cfg.mask_dilation)
    store = LoopStore(rundir, config_key(cfg), cfg.checkpoint_every)
    if getattr(rundir, "fresh", False) and rundir.rank == 0:  # --fresh/--force: no finished loops either
        store.forget_loops()
    comm.Barrier()
    loops, info = solve_series(images, cfg, active, comm=comm, store=store)
    fields = {}
    if comm.rank == 0:
        tree, fields = build_results_tree(loops, subject, cfg)
        for w in fields["warnings"]:
            log.warning("%s", w)
        tree["params"]["intensity_scale"] = info["intensity_scale"]
        tree["params"]["intensity_factor"] = info["intensity_factor"]
        rundir.write_results(tree, config=cfg, subject_id=subject.id, extra_attrs=RESULTS_ATTRS)
        fields["n_groups"] = info["n_groups"]
        fields["solve_s"] = round(info["solve_s"], 3)
        fields["intensity_scale"] = info["intensity_scale"]
        fields["active_voxels"] = int(active.sum())
    fields = comm.bcast(fields, root=0)
    comm.Barrier()
    if comm.rank == 0:
        store.cleanup()
    return fields


solve = run
