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
from glymphmpi.parallel import available_memory_bytes, ranks_on_this_node
from glymphmpi.romt.config import RomtConfig
from glymphmpi.romt.loop import active_set, check_images, smooth_images
from glymphmpi.romt.loopstore import LoopStore, config_key
from glymphmpi.romt.results import RESULTS_ATTRS, build_results_tree, results_node_attrs
from glymphmpi.romt.schedule import solve_series

log = logging.getLogger(__name__)


#: float64 values one loop keeps per time step and active voxel: the velocity and its Gauss-Newton/PCG
#: copies (3 components each), the densities and the transport's step data; a rat loop (nt 10, about
#: 1e5 active voxels) peaked at about 0.9 GB, which this bounds from above with the interpreter's share.
VALUES_PER_STEP_VOXEL = 64


def check_memory(cfg: RomtConfig, n_active: int, ranks_here: int) -> None:
    """Refuse settings whose loop would not fit in this node's memory, before anything is allocated.

    Raises:
        InputError: one line with the estimate (``romt.nt`` named).
    """
    need = float(cfg.nt + 1) * n_active * VALUES_PER_STEP_VOXEL * 8.0
    have = available_memory_bytes()
    if need * ranks_here > 0.8 * have:
        raise InputError(f"nt = {cfg.nt:,} time steps on {n_active:,} active voxels need about "
                         f"{need / 2**30:,.1f} GiB per rank ({ranks_here} rank(s) on this node), more than the "
                         f"{have / 2**30:,.1f} GiB available; use a smaller romt.nt", "romt.nt")


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
    if cfg.smooth_sigma_voxels > 0:
        images = smooth_images(images, subject.mask, cfg.smooth_sigma_voxels)
    names = [str(p) for p in subject.scan_paths] if subject.scan_paths else None
    check_images(images, names)
    active = active_set(subject.mask, cfg.mask_dilation)
    check_memory(cfg, int(active.sum()), ranks_on_this_node(comm))
    store = LoopStore(rundir, config_key(cfg), cfg.checkpoint_every, cfg.checkpoint_min_interval_s)
    if getattr(rundir, "fresh", False) and rundir.rank == 0:  # --fresh/--force: no finished loops either
        store.forget_loops()
    comm.Barrier()
    region = source_region(subject, cfg) if cfg.model == "unbalanced" else None
    loops, info = solve_series(images, cfg, active, comm=comm, store=store, source_region=region)
    fields = {}
    if comm.rank == 0:
        tree, fields = build_results_tree(loops, subject, cfg)
        for w in fields["warnings"]:
            log.warning("%s", w)
        if cfg.model == "unbalanced":
            p = rundir.write_map("relative_source", source_map(tree), subject.affine)
            log.info("relative source per loop (1/h): %s", p)
        tree["params"]["intensity_scale"] = info["intensity_scale"]
        tree["params"]["intensity_factor"] = info["intensity_factor"]
        rundir.write_results(tree, config=cfg, subject_id=subject.id, extra_attrs=RESULTS_ATTRS,
                             node_attrs=results_node_attrs(tree))
        fields["n_groups"] = info["n_groups"]
        fields["solve_s"] = round(info["solve_s"], 3)
        fields["intensity_scale"] = info["intensity_scale"]
        if "coupled_sweeps" in info:
            fields["coupled_sweeps"] = info["coupled_sweeps"]
        fields["active_voxels"] = int(active.sum())
    fields = comm.bcast(fields, root=0)
    comm.Barrier()
    if comm.rank == 0:
        store.cleanup()
    return fields


solve = run


def source_region(subject, cfg: RomtConfig) -> np.ndarray:
    """chi of the unbalanced model: ``romt.source_mask`` (a NIfTI on the subject's grid) or the subject mask."""
    if not cfg.source_mask:
        return np.asarray(subject.mask, dtype=bool)
    from pathlib import Path

    from glymphmpi.subject import load_nifti

    path = Path(cfg.source_mask)
    if not path.is_absolute() and subject.path is not None:
        path = Path(subject.path).parent / path
    data, affine = load_nifti(path, "romt.source_mask")
    if data.shape[:3] != tuple(subject.shape):
        raise InputError(f"romt.source_mask: grid {data.shape} differs from the subject's {tuple(subject.shape)}", path)
    if float(np.abs(np.asarray(affine) - np.asarray(subject.affine)).max()) > 1e-4:
        raise InputError("romt.source_mask: affine differs from the subject's", path)
    return np.asarray(data).reshape(subject.shape) != 0


def source_map(tree: dict) -> np.ndarray:
    """(ni, nj, nk, n_loops) float32: per loop the time-mean relative source, in 1/h."""
    maps = []
    for name in sorted(tree["loops"]):
        g = tree["loops"][name]
        maps.append(np.asarray(g["source"], dtype=np.float64).mean(axis=0) / g["hours_per_model_time"])
    return np.stack(maps, axis=-1).astype(np.float32)
