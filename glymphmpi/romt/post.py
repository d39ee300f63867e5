"""rOMT Lagrangian post-processing: from results.h5 to maps, VTK files, figures and statistics.

Reads the velocities and interpolated densities of every loop of an rOMT run
(layout: the rOMT results contract, ``/params``, ``/mask``, ``/loops/NNN``),
traces pathlines of the augmented velocity ``v - sigma grad log rho`` from
the seed voxels through all loops (:mod:`glymphmpi.romt.lagrangian`), drops
the pathlines that barely move, and writes

* ``maps/speed.nii.gz`` (mean |v| of the pathline points in each voxel, mm/h),
  ``maps/peclet.nii.gz`` (mean Pe of the points), ``maps/peclet_ratio.nii.gz``
  (sum |v| / sum |sigma grad log rho|), ``maps/pathline_points.nii.gz``
  (points per voxel), all with the subject's affine;
* ``vtk/pathlines.vtp`` (polylines, world mm, speed and Pe as point data) and
  ``vtk/flux_vectors.vtp`` (start points with displacement vectors, mm);

and returns the summary statistics to merge into summary.json (the figures are drawn
from these files by the registry's hook, :func:`glymphmpi.report.romt_figures.figures`). Seeds are
split over the ranks of ``rundir.comm``; rank 0 gathers and writes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI
from nibabel.affines import apply_affine

from glymphmpi.errors import InputError
from glymphmpi.romt import lagrangian as lg

log = logging.getLogger(__name__)

AFFINE_TOL_MM = 1e-4
STOP_REASONS = ("ran_to_end", "low_density", "low_speed", "left_mask")  # Pathlines.stop_reason codes


# ----------------------------------------------------------------- results.h5


def _value(node):
    v = node[()]
    kind = node.attrs.get("kind", "")
    if isinstance(kind, bytes):
        kind = kind.decode()
    if kind == "str" or isinstance(v, bytes):
        return v.decode() if isinstance(v, bytes) else str(v)
    if kind in ("scalar", "bool"):
        return v.item() if hasattr(v, "item") else v
    return np.asarray(v)


class RomtResults:
    """Lazy reader of an rOMT results.h5 (validated on open).

    Attributes:
        path: the file.
        params: dict of ``/params``.
        mask: (ni, nj, nk) bool.
        loops: sorted loop names (``"000"``, ...).
        nt, dt, sigma: model steps per loop, model time per step, voxel^2 per model time.
        shape: (ni, nj, nk); voxel_size_mm (3,); affine (4, 4).
    """

    def __init__(self, path):
        import h5py

        self.path = Path(path)
        if not self.path.exists():
            raise InputError("results file not found (is this an rOMT run directory?)", self.path)
        try:
            fh = h5py.File(self.path, "r")
        except OSError as exc:
            raise InputError(f"not a readable HDF5 file ({exc})", self.path) from None
        with fh:
            if not fh.attrs.get("complete", False):
                raise InputError("incomplete results file (the run did not finish)", self.path)
            for name in ("params", "mask", "loops"):
                if name not in fh:
                    raise InputError(f"missing /{name}: not an rOMT results file", self.path)
            self.params = {k: _value(fh["params"][k]) for k in fh["params"].keys()}
            for key in ("nt", "dt", "sigma", "voxel_size_mm", "affine", "shape"):
                if key not in self.params:
                    raise InputError(f"missing /params/{key}", self.path)
            self.mask = np.asarray(fh["mask"][()]) != 0
            self.loops = sorted(fh["loops"].keys())
            self.attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in fh.attrs.items()}
            self.nt = int(self.params["nt"])
            self.dt = float(self.params["dt"])
            self.sigma = float(self.params["sigma"])
            self.shape = tuple(int(s) for s in np.asarray(self.params["shape"]).ravel())
            self.voxel_size_mm = np.asarray(self.params["voxel_size_mm"], dtype=np.float64).ravel()
            self.affine = np.asarray(self.params["affine"], dtype=np.float64).reshape(4, 4)
            if not self.loops:
                raise InputError("no loops in /loops", self.path)
            if self.mask.shape != self.shape:
                raise InputError(f"/mask shape {self.mask.shape} differs from /params/shape {self.shape}",
                                 self.path)
            for name in self.loops:
                g = fh["loops"][name]
                for key in ("velocity", "density", "t0_h", "t1_h"):
                    if key not in g:
                        raise InputError(f"missing /loops/{name}/{key}", self.path)
                if g["velocity"].shape != (self.nt, 3) + self.shape:
                    raise InputError(f"/loops/{name}/velocity has shape {g['velocity'].shape}, expected "
                                     f"{(self.nt, 3) + self.shape}", self.path)
                if g["density"].shape != (self.nt + 1,) + self.shape:
                    raise InputError(f"/loops/{name}/density has shape {g['density'].shape}, expected "
                                     f"{(self.nt + 1,) + self.shape}", self.path)
                if not float(_value(g["t1_h"])) > float(_value(g["t0_h"])):
                    raise InputError(f"/loops/{name}: t1_h must be after t0_h", self.path)
        if self.dt <= 0 or self.nt < 1 or self.sigma < 0:
            raise InputError(f"bad params nt={self.nt}, dt={self.dt}, sigma={self.sigma}", self.path)

    def cache_opts(self) -> dict:
        """h5py chunk-cache settings: a chunk may span several steps, so cache what one
        step touches (about 4 steps of velocity) for the next steps."""
        n_vox = int(np.prod(self.shape))
        return {"rdcc_nbytes": int(min(4 * 4 * 4 * n_vox + (1 << 20), 4 << 30)), "rdcc_nslots": 1_000_003}

    @property
    def n_steps(self) -> int:
        return self.nt * len(self.loops)

    def density_stats(self) -> tuple[np.ndarray, np.ndarray, float]:
        """Max and sum over all distinct time nodes of the density, and the global max.

        A loop's first density is counted for the first loop only (it repeats
        the previous loop's last one in sequential mode).
        """
        import h5py

        mx = np.zeros(self.shape, dtype=np.float64)
        sm = np.zeros(self.shape, dtype=np.float64)
        with h5py.File(self.path, "r", **self.cache_opts()) as fh:
            for li, name in enumerate(self.loops):
                rho = fh["loops"][name]["density"]
                for k in range(0 if li == 0 else 1, self.nt + 1):
                    r = np.asarray(rho[k], dtype=np.float64)
                    np.maximum(mx, r, out=mx)
                    sm += r
        return mx, sm, float(mx.max())

    def steps(self) -> H5Steps:
        return H5Steps(self)


class H5Steps:
    """The model steps of all loops of a results file, read step by step.

    Only one step's velocity and two densities are held in memory at a time
    (the datasets are chunked, so a step reads only its own chunks).
    """

    def __init__(self, res: RomtResults):
        self.res = res

    def __len__(self) -> int:
        return self.res.n_steps

    def __iter__(self):
        import h5py

        r = self.res
        with h5py.File(r.path, "r", **r.cache_opts()) as fh:
            for name in r.loops:
                g = fh["loops"][name]
                t0, t1 = float(_value(g["t0_h"])), float(_value(g["t1_h"]))
                hpm = (t1 - t0) / (r.nt * r.dt)
                vel, dens = g["velocity"], g["density"]
                rho1 = np.asarray(dens[0], dtype=np.float32)
                for k in range(r.nt):
                    rho0, rho1 = rho1, np.asarray(dens[k + 1], dtype=np.float32)
                    yield lg.Step(np.asarray(vel[k], dtype=np.float32), rho0, rho1, (name, k), (name, k + 1),
                                  r.dt, r.sigma, hpm, t0 + k * r.dt * hpm)


# ----------------------------------------------------------------- driver


def settings_from(cfg) -> lg.TraceSettings:
    return lg.TraceSettings(integrator=cfg.integrator, substeps=cfg.substeps,
                            time_interpolation=cfg.time_interpolation,
                            log_density_floor=cfg.log_density_floor,
                            stop_density_fraction=cfg.stop_density_fraction,
                            stop_speed_mm_per_h=cfg.stop_speed_mm_per_h)


def check_subject(res: RomtResults, subject) -> None:
    """The subject must be the one the results were computed on (grid and affine)."""
    if tuple(subject.shape) != res.shape:
        raise InputError(f"subject {subject.id} has grid {subject.shape}, the results {res.shape}",
                         subject.path)
    diff = float(np.abs(np.asarray(subject.affine) - res.affine).max())
    if diff > AFFINE_TOL_MM:
        raise InputError(f"subject {subject.id} affine differs from the results' by {diff:.3g} mm",
                         subject.path)


def trace_results(res: RomtResults, cfg, comm=MPI.COMM_SELF) -> tuple[lg.Pathlines | None, dict]:
    """Seeds, pathlines (split over ranks, gathered on rank 0) and tracing statistics.

    Returns:
        (pathlines on rank 0 / None elsewhere, stats dict).
    """
    from glymphmpi.parallel import split_evenly

    rank, size = comm.rank, comm.size
    t0 = time.perf_counter()
    mx, sm, rho_max = res.density_stats()
    if not rho_max > 0:
        raise InputError("every density is zero: nothing to trace", res.path)
    seeds = lg.select_seeds(mx, sm, res.mask, cfg.seed_rule, cfg.seed_max_fraction, cfg.seed_sum_min,
                            cfg.seed_every, cfg.max_seeds)
    mine = split_evenly(seeds.shape[0], size, rank)
    sl = slice(mine[0], mine[-1] + 1) if mine else slice(0, 0)
    t1 = time.perf_counter()
    lines = lg.trace(res.steps(), seeds[sl], res.mask, res.voxel_size_mm, settings_from(cfg), rho_max)
    t2 = time.perf_counter()
    if size > 1:
        parts = comm.gather(lines, root=0)
        lines = lg.Pathlines.concatenate(parts) if rank == 0 else None
    stats = {"n_seeds": int(seeds.shape[0]), "seed_s": round(t1 - t0, 3), "trace_s": round(t2 - t1, 3),
             "n_steps": res.n_steps, "rho_max": rho_max}
    return lines, stats


def postprocess(rundir, subject, cfg, comm=MPI.COMM_SELF) -> dict:
    """Post-process a finished rOMT run directory (see module docstring).

    Args:
        rundir: :class:`glymphmpi.store.RunDir` with ``results.h5``.
        subject: the :class:`glymphmpi.subject.Subject` the run was made on.
        cfg: :class:`glymphmpi.romt.post_config.RomtPostConfig`.
        comm: communicator whose ranks all call this and split the seeds;
            COMM_SELF (the default) runs serially on the calling rank (e.g. rank 0
            only), whatever ``rundir.comm`` is.
    Returns:
        summary fields (the same on every rank): ``n_pathlines``,
        ``median_speed_mm_per_h``, ``median_peclet``, ``fraction_pe_gt_1``
        and the details under ``romt_post``.
    """
    rank = comm.rank
    t_start = time.perf_counter()
    res = RomtResults(rundir.results)
    check_subject(res, subject)
    lines, stats = trace_results(res, cfg, comm)
    fields = None
    err = None
    if rank == 0:
        try:
            fields = _finish(rundir, subject, res, cfg, lines, stats)
            fields["romt_post"]["runtime_s"] = round(time.perf_counter() - t_start, 3)
        except Exception as exc:  # raise on every rank, not only on rank 0
            err = exc
    if comm.size > 1:
        err_msg = comm.bcast(None if err is None else f"{type(err).__name__}: {err}", root=0)
        fields = comm.bcast(fields, root=0)
        if err_msg and rank != 0:
            raise RuntimeError(f"post-processing failed on rank 0: {err_msg}")
    if err is not None:
        raise err
    return fields


def _median(a: np.ndarray) -> float | None:
    return float(np.median(a)) if a.size else None


def _finish(rundir, subject, res: RomtResults, cfg, lines: lg.Pathlines, stats: dict) -> dict:
    """Rank 0: cleanup, maps, flux vectors, files and statistics."""
    n_traced = lines.n
    kept, drop = lg.cleanup(lines, cfg.min_points, cfg.min_distance_voxels)
    mask = res.mask
    maps = lg.point_maps(kept, mask, cfg.smooth_sigma_voxels)
    flux = lg.flux_vectors(kept)
    affine = subject.affine
    A = np.asarray(affine)[:3, :3]
    disp_mm = flux["displacement"] @ A.T
    flux_len_mm = np.linalg.norm(disp_mm, axis=1)
    arc_mm = _arc_lengths_mm(kept, A)
    inside = mask & maps["has_speed"]
    has_pe = mask & maps["has_pe"]
    speed_vals = maps["speed"][inside]
    pe_vals = maps["peclet"][has_pe]
    pe_ratio_vals = maps["peclet_ratio"][mask & maps["has_pe_ratio"]]
    if kept.n == 0:
        log.warning("no pathline survived the cleanup (%d traced): maps are empty", n_traced)
    outputs = []
    if cfg.write_maps:
        for name, key in (("speed", "speed"), ("peclet", "peclet"), ("peclet_ratio", "peclet_ratio"),
                          ("pathline_points", "count")):
            p = rundir.write_map(name, maps[key], affine)
            outputs.append(str(Path(p).relative_to(rundir.root)))
    if cfg.write_vtk:
        outputs += _write_vtk(rundir, kept, flux, disp_mm, flux_len_mm, arc_mm, affine)
    detail = {
        "n_seeds": stats["n_seeds"],
        "n_traced": n_traced,
        "n_pathlines": kept.n,
        "dropped_few_points": drop["dropped_few_points"],
        "dropped_short": drop["dropped_short"],
        "stop_reasons": {name: int((kept.stop_reason == i).sum()) for i, name in enumerate(STOP_REASONS)},
        "stop_reasons_traced": {name: int((lines.stop_reason == i).sum())
                                for i, name in enumerate(STOP_REASONS)},
        "n_steps": stats["n_steps"],
        "voxels_with_points": int(inside.sum()),
        "median_speed_mm_per_h": _median(speed_vals),
        "p90_speed_mm_per_h": float(np.percentile(speed_vals, 90)) if speed_vals.size else None,
        "median_peclet": _median(pe_vals),
        "median_peclet_ratio": _median(pe_ratio_vals),
        "fraction_pe_gt_1": float(np.mean(pe_vals > 1.0)) if pe_vals.size else None,
        "fraction_pe_ratio_gt_1": float(np.mean(pe_ratio_vals > 1.0)) if pe_ratio_vals.size else None,
        "median_flux_length_mm": _median(flux_len_mm),
        "mean_flux_length_mm": float(flux_len_mm.mean()) if flux_len_mm.size else None,
        "median_pathline_length_mm": _median(arc_mm),
        "seed_s": stats["seed_s"],
        "trace_s": stats["trace_s"],
        "outputs": outputs,
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
    }
    log.info("post: %d seeds -> %d pathlines (%d few points, %d short) in %.1f s; median speed %s mm/h, "
             "median Pe %s", detail["n_seeds"], kept.n, drop["dropped_few_points"], drop["dropped_short"],
             stats["trace_s"], _fmt(detail["median_speed_mm_per_h"]), _fmt(detail["median_peclet"]))
    return {"n_pathlines": kept.n, "median_speed_mm_per_h": detail["median_speed_mm_per_h"],
            "median_peclet": detail["median_peclet"], "fraction_pe_gt_1": detail["fraction_pe_gt_1"],
            "romt_post": detail}


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _arc_lengths_mm(lines: lg.Pathlines, A: np.ndarray) -> np.ndarray:
    """(n,) polyline length of each line in world mm."""
    seg = np.diff(lines.positions, axis=0) @ A.T.astype(np.float32)  # (n_nodes-1, n, 3) float32
    length = np.linalg.norm(seg, axis=2)
    del seg
    length[~lines.valid()[1:]] = 0.0
    return length.sum(axis=0, dtype=np.float64)


def line_points(lines: lg.Pathlines) -> tuple[np.ndarray, np.ndarray]:
    """Valid points grouped line by line: (order index into (node, line) pairs, lengths).

    Returns:
        (node index (m,), line index (m,)) of the points in line-major order.
    """
    valid = lines.valid().T  # (n, n_nodes)
    li, nj = np.nonzero(valid)
    return nj, li


def _write_vtk(rundir, kept, flux, disp_mm, flux_len_mm, arc_mm, affine) -> list[str]:
    from glymphmpi.io import vtk

    nj, li = line_points(kept)
    pts = apply_affine(affine, kept.positions[nj, li].astype(np.float64))
    pe = kept.peclet[nj, li]
    conn, offs = vtk.lines_from_lengths(kept.n_points)
    p1 = vtk.write_vtp(rundir.vtk / "pathlines.vtp", pts, lines=(conn, offs), point_data={
        "speed_mm_per_h": kept.speed_mm_per_h[nj, li],
        "peclet": pe.astype(np.float32),
        "diffusive_speed_mm_per_h": kept.diffusive_mm_per_h[nj, li],
        "flux_speed_mm_per_h": kept.flux_speed_mm_per_h[nj, li],
        "time_h": kept.times_h[nj].astype(np.float32),
    }, cell_data={
        "pathline_length_mm": arc_mm.astype(np.float32),
        "flux_length_mm": flux_len_mm.astype(np.float32),
        "stop_reason": kept.stop_reason.astype(np.int8),
    })
    starts_mm = apply_affine(affine, np.asarray(flux["start"], dtype=np.float64))
    p2 = vtk.write_vtp(rundir.vtk / "flux_vectors.vtp", starts_mm, verts=True,
                       point_data={
                           "displacement_mm": disp_mm.astype(np.float32),
                           "length_mm": flux_len_mm.astype(np.float32),
                           "mean_speed_mm_per_h": flux["mean_speed_mm_per_h"].astype(np.float32),
                           "mean_peclet": flux["mean_peclet"].astype(np.float32),
                       })
    return [str(Path(p).relative_to(rundir.root)) for p in (p1, p2)]


def write_romt_results(path, *, nt: int, dt: float, sigma: float, mask: np.ndarray, affine: np.ndarray,
                       times_h, loops: list[tuple[np.ndarray, np.ndarray]], extra_params: dict | None = None,
                       attrs: dict | None = None) -> Path:
    """Write a results.h5 in the rOMT contract layout (for synthetic fields, tests, benchmarks).

    Args:
        path: target file.
        nt, dt, sigma: steps per loop, model time per step, voxel^2 per model time.
        mask: (ni, nj, nk) bool; affine: (4, 4); times_h: (n_loops + 1,) scan times.
        loops: per loop (velocity (nt, 3, ni, nj, nk), density (nt+1, ni, nj, nk)).
        extra_params: more ``/params`` entries (beta, gamma, mode, boundary, ...).
        attrs: root attributes (e.g. ``subject_path``).
    """
    from glymphmpi.io import write_h5_tree
    from glymphmpi.subject import voxel_sizes

    times_h = np.asarray(times_h, dtype=np.float64)
    params = {"nt": int(nt), "dt": float(dt), "sigma": float(sigma), "beta": 0.0, "gamma": 0.0,
              "mode": "sequential", "boundary": "open", "voxel_size_mm": voxel_sizes(affine),
              "affine": np.asarray(affine, dtype=np.float64), "shape": np.array(mask.shape),
              "times_h": times_h, "n_loops": len(loops)}
    params.update(extra_params or {})
    tree = {"params": params, "mask": np.asarray(mask, dtype=np.uint8),
            "loops": {f"{i:03d}": {"velocity": np.asarray(v, dtype=np.float32),
                                   "density": np.asarray(r, dtype=np.float32),
                                   "t0_h": float(times_h[i]), "t1_h": float(times_h[i + 1])}
                      for i, (v, r) in enumerate(loops)}}
    return write_h5_tree(path, tree, attrs or {})
