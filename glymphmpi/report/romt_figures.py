"""Figures of the rOMT Lagrangian post-processing (matplotlib, Agg, PNG).

* ``speed_map.png``, ``peclet_map.png``: three orthogonal slices through the
  centre of the pathline points, the map over the anatomy (or the first
  scan) in grey, with a colour bar in units;
* ``pathlines_speed.png``, ``pathlines_peclet.png``: pathlines in 3D (world
  mm), segments coloured by speed (mm/h) or Pe (log scale, 1 in the middle);
* ``flux_vectors_speed.png``, ``flux_vectors_peclet.png``: start-to-end
  displacement arrows in 3D, coloured by the line's mean speed or Pe.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from nibabel.affines import apply_affine

log = logging.getLogger(__name__)

SPEED_LABEL = "speed |v| (mm/h)"
PE_LABEL = "Péclet number Pe = |v| / |σ ∇log ρ| (–)"


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path, dpi) -> str:
    from glymphmpi.io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    _plt().close(fig)
    return str(path)


def background_image(subject) -> np.ndarray:
    """The anatomy image when the subject has one (same grid), else the first scan."""
    if subject.anatomy is not None:
        from glymphmpi.subject import load_nifti

        data, _ = load_nifti(subject.anatomy, "anatomy")
        if data.shape[:3] == tuple(subject.shape):
            return data.reshape(subject.shape)
        log.warning("%s: anatomy grid %s differs from the subject's; using the first scan",
                    subject.anatomy, data.shape)
    return np.asarray(subject.scans[0])


def _pe_norm(values: np.ndarray):
    from matplotlib.colors import LogNorm

    v = values[np.isfinite(values) & (values > 0)]
    if v.size == 0:
        return LogNorm(0.1, 10.0)
    lo, hi = np.percentile(v, [2, 98])
    m = max(abs(np.log10(max(lo, 1e-6))), abs(np.log10(max(hi, 1e-6))), 0.5)
    m = min(m, 6.0)
    return LogNorm(10 ** -m, 10 ** m)


def _format_colorbar(cb, kind: str) -> None:
    """Plain numbers (0.1, 1, 10) on a logarithmic Pe colour bar."""
    if kind != "peclet":
        return
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    cb.ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 3.0)))
    cb.ax.yaxis.set_minor_locator(NullLocator())
    cb.ax.yaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))


def _speed_norm(values: np.ndarray):
    from matplotlib.colors import Normalize

    v = values[np.isfinite(values)]
    hi = float(np.percentile(v, 99)) if v.size else 1.0
    return Normalize(0.0, hi if hi > 0 else 1.0)


def map_slices(path, data, has_data, background, voxel_size_mm, title, label, kind="speed",
               centre=None, dpi=110) -> str:
    """Three orthogonal slices of a map over a grey background.

    Args:
        path: PNG file.
        data: (ni, nj, nk) map; shown where ``has_data``.
        has_data: (ni, nj, nk) bool.
        background: (ni, nj, nk) grey image.
        voxel_size_mm: (3,) for the aspect ratio.
        title: figure title; label: colour bar label with units.
        kind: ``speed`` (linear, 0 to the 99th percentile) or ``peclet`` (log, centred at 1).
        centre: (3,) voxel of the slices; default the centre of the data.
    """
    plt = _plt()
    data = np.asarray(data, dtype=np.float64)
    if centre is None:
        idx = np.argwhere(has_data)
        centre = np.rint(idx.mean(axis=0)).astype(int) if idx.size else np.array(data.shape) // 2
    ci, cj, ck = (int(c) for c in centre)
    vals = data[has_data]
    if kind == "source":  # signed: symmetric around 0 (blue: loss, red: gain)
        from matplotlib.colors import Normalize

        m = float(np.percentile(np.abs(vals), 99)) if vals.size else 1.0
        norm = Normalize(-(m or 1.0), m or 1.0)
    else:
        norm = _pe_norm(vals) if kind == "peclet" else _speed_norm(vals)
    cmap = "RdBu_r" if kind in ("peclet", "source") else "plasma"  # no black at 0: stands out of the grey
    bg = np.asarray(background, dtype=np.float64)
    bg_hi = float(np.percentile(bg, 99.5)) or 1.0
    vx = np.asarray(voxel_size_mm, dtype=np.float64)
    views = [(f"slice i = {ci}", np.s_[ci, :, :], (1, 2)),
             (f"slice j = {cj}", np.s_[:, cj, :], (0, 2)),
             (f"slice k = {ck}", np.s_[:, :, ck], (0, 1))]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6), layout="constrained")
    im = None
    for ax, (name, sl, (a, b)) in zip(axes, views):
        ax.imshow(bg[sl].T, origin="lower", cmap="gray", vmin=0, vmax=bg_hi, aspect=vx[b] / vx[a],
                  interpolation="nearest")
        show = np.ma.masked_where(~has_data[sl], np.where(has_data[sl], data[sl], np.nan))
        if kind == "peclet":
            show = np.ma.masked_where(~(show > 0), show)
        im = ax.imshow(show.T, origin="lower", cmap=cmap, norm=norm, aspect=vx[b] / vx[a],
                       interpolation="nearest", alpha=0.9)
        ax.set_title(name)
        ax.set_xlabel("ijk"[a] + " (voxel)")
        ax.set_ylabel("ijk"[b] + " (voxel)")
    cb = fig.colorbar(im, ax=axes, shrink=0.85, pad=0.01)
    cb.set_label(label)
    _format_colorbar(cb, kind)
    fig.suptitle(title)
    return _save(fig, path, dpi)


def _setup_3d(ax, pts: np.ndarray) -> None:
    if pts.size:
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        span = np.maximum(hi - lo, 1e-6)
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_zlim(lo[2], hi[2])
        ax.set_box_aspect(span)
    ax.set_xlabel("x (mm)")
    ax.set_ylabel("y (mm)")
    ax.set_zlabel("z (mm)")
    ax.view_init(elev=22, azim=-60)


def _colouring(values: np.ndarray, kind: str):
    """(norm, colour map, ok) of the line figures: Pe on a log scale centred at 1 (only positive
    values can be coloured), speed on a linear one (finite values)."""
    norm = _pe_norm(values) if kind == "peclet" else _speed_norm(values)
    cmap = _plt().get_cmap("RdBu_r" if kind == "peclet" else "turbo")
    ok = np.isfinite(values) & ((values > 0) if kind == "peclet" else True)
    return norm, cmap, ok


def _figure_3d(values: np.ndarray, kind: str, what: str):
    """A 3D axes with the colour map of ``kind``: (plt, fig, ax, norm, cmap, ok).

    ``ok`` marks the values that can be coloured (finite; positive for Pe). When
    none can, the axes say so (``what`` names the drawn items).
    """
    plt = _plt()
    fig = plt.figure(figsize=(8.5, 7.2), layout="constrained")
    ax = fig.add_subplot(projection="3d")
    norm, cmap, ok = _colouring(values, kind)
    if not ok.any():
        ax.text2D(0.5, 0.5, f"no {what} has a defined value" + (
            "\n(Pe needs diffusion: sigma > 0 and a density gradient)" if kind == "peclet" else ""),
            transform=ax.transAxes, ha="center", va="center")
    return plt, fig, ax, norm, cmap, ok


def _finish_3d(plt, fig, ax, pts: np.ndarray, context, norm, cmap, label: str, kind: str, title: str,
               path, dpi) -> str:
    """Faint context points, limits from ``pts`` and the context, colour bar, title; saves the figure."""
    if context is not None and context.size:
        ax.scatter(*context.T, s=0.3, c="0.75", alpha=0.25, depthshade=False)
        pts = np.concatenate([pts, context]) if pts.size else context
    _setup_3d(ax, pts)
    sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
    cb = fig.colorbar(sm, ax=ax, shrink=0.7, pad=0.08)
    cb.set_label(label)
    _format_colorbar(cb, kind)
    ax.set_title(title)
    return _save(fig, path, dpi)


def pathlines_3d(path, segments, values: np.ndarray, title: str, label: str, kind="speed",
                 context: np.ndarray | None = None, dpi=110) -> str:
    """Pathline pieces in 3D coloured by a value.

    Args:
        segments: (m, 2, 3) world mm segment end points, or a list of m (n_i, 3) polylines.
        values: (m,) value of each segment or polyline.
        context: optional (q, 3) world mm points (e.g. the mask outline) drawn faintly.
    """
    from mpl_toolkits.mplot3d.art3d import Line3DCollection

    segs = list(segments)
    plt, fig, ax, norm, cmap, ok = _figure_3d(values, kind, "segment")
    if ok.any():
        lc = Line3DCollection([p for p, o in zip(segs, ok) if o], colors=cmap(norm(values[ok])), linewidths=0.9)
        ax.add_collection3d(lc, autolim=False)
    pts = np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1, 3) for p in segs]) if segs else np.zeros((0, 3))
    return _finish_3d(plt, fig, ax, pts, context, norm, cmap, label, kind, title, path, dpi)


#: figure_view -> (horizontal axis, vertical axis, horizontal reversed): what a viewer on that side
#: of the world axis sees with the remaining axes (z up for x and y views, y up for z views)
VIEWS = {"+x": (1, 2, False), "-x": (1, 2, True), "+y": (0, 2, True), "-y": (0, 2, False),
         "+z": (0, 1, False), "-z": (0, 1, True)}


def pathlines_2d(path, segments, values: np.ndarray, title: str, label: str, kind="speed", view="-x",
                 context: np.ndarray | None = None, dpi=110) -> str:
    """Pathline pieces projected along a world axis (``view`` as in :data:`VIEWS`), coloured by a value.

    Args:
        segments: a list of m (n_i, 3) world mm polylines (or an (m, 2, 3) array).
        values: (m,) value of each polyline.
        context: optional (q, 3) world mm points (e.g. the mask outline) drawn faintly.
    """
    from matplotlib.collections import LineCollection

    h, v, flip = VIEWS[view]
    plt = _plt()
    segs = [np.asarray(p, dtype=np.float64).reshape(-1, 3) for p in segments]
    norm, cmap, ok = _colouring(np.asarray(values, dtype=np.float64), kind)
    fig, ax = plt.subplots(figsize=(10, 6), layout="constrained")
    if context is not None and context.size:
        ax.scatter(context[:, h], context[:, v], s=0.3, c="0.8", alpha=0.4, linewidths=0)
    if ok.any():
        lc = LineCollection([p[:, [h, v]] for p, o in zip(segs, ok) if o], colors=cmap(norm(values[ok])),
                            linewidths=0.7)
        ax.add_collection(lc)
    else:
        ax.text(0.5, 0.5, "no pathline has a defined value", transform=ax.transAxes, ha="center", va="center")
    pts = np.concatenate(segs) if segs else np.zeros((0, 3))
    if context is not None and context.size:
        pts = np.concatenate([pts, context])
    if pts.size:
        ax.set_xlim(pts[:, h].min(), pts[:, h].max())
        ax.set_ylim(pts[:, v].min(), pts[:, v].max())
    if flip:
        ax.invert_xaxis()
    ax.set_aspect("equal")
    ax.set_xlabel("xyz"[h] + " (mm)")
    ax.set_ylabel("xyz"[v] + " (mm)")
    sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
    cb = fig.colorbar(sm, ax=ax, shrink=0.8)
    cb.set_label(label)
    _format_colorbar(cb, kind)
    ax.set_title(f"{title}, seen from {view}")
    return _save(fig, path, dpi)


def flux_vectors_3d(path, start: np.ndarray, disp: np.ndarray, values: np.ndarray, title: str,
                    label: str, kind="speed", context: np.ndarray | None = None, dpi=110) -> str:
    """Arrows from each pathline's start to its end (world mm), coloured by a value."""
    plt, fig, ax, norm, cmap, ok = _figure_3d(values, kind, "vector")
    if ok.any():
        cols = cmap(norm(values[ok]))
        # a 3D quiver draws all shafts, then one side of every head, then the other side
        cols = np.concatenate([cols, cols, cols])
        ax.quiver(*start[ok].T, *disp[ok].T, colors=cols, arrow_length_ratio=0.3, linewidths=1.1)
    pts = np.concatenate([start, start + disp]) if start.size else start
    return _finish_3d(plt, fig, ax, pts, context, norm, cmap, label, kind, title, path, dpi)


def mask_outline_world(mask: np.ndarray, affine: np.ndarray, max_points: int = 4000) -> np.ndarray:
    """(q, 3) world mm centres of the mask's boundary voxels (evenly thinned)."""
    from scipy.ndimage import binary_erosion

    edge = mask & ~binary_erosion(mask)
    idx = np.argwhere(edge)
    if idx.shape[0] > max_points:
        idx = idx[np.linspace(0, idx.shape[0] - 1, max_points).astype(int)]
    return apply_affine(np.asarray(affine, dtype=np.float64), idx)


def figures(rundir, subject, cfg, fields, comm=None) -> None:
    """The registry's figure hook of ``romt`` and ``romt-post``: every figure from the run's outputs.

    Reads ``maps/speed.nii.gz``, ``maps/peclet.nii.gz``, ``maps/pathline_points.nii.gz``,
    ``vtk/pathlines.vtp`` and ``vtk/flux_vectors.vtp`` (what the post-processing wrote);
    draws nothing when the post-processing was skipped or wrote none of them.

    Collective (``figures.collective``): with a communicator of several ranks every rank calls it,
    draws its share of the figures (figure i on rank i mod size) and all ranks return the same
    ``fields``; a failure on one rank is raised on every rank.

    Args:
        cfg: the :class:`glymphmpi.romt.config.RomtConfig` (figure settings in ``cfg.post``).
        comm: MPI communicator, or None (serial).
    """
    post = getattr(cfg, "post", cfg)
    if not getattr(post, "write_figures", True):
        return
    root = Path(rundir.root)
    tasks: list = []
    src = root / "maps" / "relative_source.nii.gz"
    if src.exists():  # unbalanced model: urOMT's Eulerian relative source, with or without post-processing
        tasks.append(lambda: source_figure(rundir, subject, src, post.figure_dpi))
    if getattr(cfg, "postprocess", True):
        need = [root / "maps" / f"{n}.nii.gz" for n in ("speed", "peclet", "pathline_points")]
        need += [root / "vtk" / "pathlines.vtp", root / "vtk" / "flux_vectors.vtp"]
        missing = [str(p.relative_to(root)) for p in need if not p.exists()]
        if missing:
            log.info("rOMT figures skipped: %s not written (romt.post.write_maps / write_vtk)", ", ".join(missing))
        else:
            tasks += figure_tasks(rundir, subject, need, post)
    outputs = _run_split(tasks, comm)
    if isinstance(fields.get("romt_post"), dict):
        fields["romt_post"].setdefault("outputs", []).extend(outputs)


figures.collective = True


def _run_split(tasks: list, comm) -> list[str]:
    """Run task i on rank i mod size; every rank gets all outputs in task order (errors raised on all)."""
    rank, size = (0, 1) if comm is None else (comm.rank, comm.size)
    mine, err = {}, None
    for i in range(rank, len(tasks), size):
        try:
            mine[i] = tasks[i]()
        except Exception as exc:  # noqa: BLE001 - raised below on every rank
            err = exc
            break
    if size > 1:
        parts = comm.allgather((mine, None if err is None else f"{type(err).__name__}: {err}"))
        msgs = [m for _, m in parts if m]
        if msgs and err is None:
            from glymphmpi.errors import GlymphError

            raise GlymphError(f"figures failed on another rank: {msgs[0]}")
        for d, _ in parts:
            mine.update(d)
    if err is not None:
        raise err
    return [mine[i] for i in range(len(tasks))]


def source_figure(rundir, subject, path, dpi: int) -> str:
    """``figures/relative_source.png``: the relative source r (1/h) of the unbalanced model, mean
    over the loops, on three slices (red: tracer appears, blue: it disappears); returns the path
    relative to the run directory."""
    import nibabel as nib

    r = np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)  # (ni, nj, nk, n_loops), 1/h
    mean = r.mean(axis=-1) if r.ndim == 4 else r
    mask = np.asarray(subject.mask, dtype=bool)
    fig_dir = Path(rundir.figures)
    fig_dir.mkdir(parents=True, exist_ok=True)
    n = r.shape[-1] if r.ndim == 4 else 1
    out = map_slices(fig_dir / "relative_source.png", mean, mask, background_image(subject), subject.voxel_size_mm,
                     f"{subject.id}: relative source r of the unbalanced model (mean over {n} loop(s))",
                     "relative source r (1/h)", "source", dpi=dpi)
    return str(Path(out).relative_to(rundir.root))


#: pathline points per drawn piece in the 3D figures: each piece is one coloured polyline (its mean
#: value); matplotlib's 3D projection costs per piece, so 4 points per piece draws 4x faster than
#: single segments (measured 2.9 -> 0.9 s per figure on the 50^3 spheres, 1500 lines)
PIECE_POINTS = 4


def _line_pieces(vtp: dict, pick: np.ndarray, k: int = PIECE_POINTS) -> tuple[list, np.ndarray, np.ndarray]:
    """Pieces of up to ``k`` + 1 consecutive points (neighbouring pieces share an end point) of the
    picked polylines of a pathlines.vtp, with the mean speed and Pe of each piece's points."""
    conn, offs = vtp["lines"]
    ends = np.asarray(offs, dtype=np.int64)
    starts = np.concatenate([[0], ends[:-1]])
    pts = np.asarray(vtp["points"], dtype=np.float64)
    spd = np.asarray(vtp["point_data"]["speed_mm_per_h"], dtype=np.float64)
    pe = np.asarray(vtp["point_data"]["peclet"], dtype=np.float64)
    pieces, vs, vp = [], [], []
    for s, e in zip(starts[pick], ends[pick]):
        idx = np.asarray(conn[s:e], dtype=np.int64)
        for a in range(0, idx.size - 1, k):
            j = idx[a:a + k + 1]
            pieces.append(pts[j])
            vs.append(spd[j].mean())
            vp.append(pe[j].mean())
    return pieces, np.asarray(vs), np.asarray(vp)


def figure_tasks(rundir, subject, need: list, cfg) -> list:
    """The six post-processing figures as independent thunks (each returns its path relative to
    the run directory); the maps and VTK files (``need``: speed, peclet, pathline_points NIfTI,
    pathlines and flux-vector VTP) are read once, by the first thunk that needs them."""
    cache: dict = {}

    def data():
        if not cache:
            import nibabel as nib

            from glymphmpi.io.vtk import read_vtp

            speed, peclet, count = (np.asarray(nib.load(str(p)).dataobj, dtype=np.float32) for p in need[:3])
            cache["maps"] = {"speed": speed, "peclet": peclet, "has_speed": count > 0,
                             "has_pe": (count > 0) & (peclet > 0)}
            cache["lines"], cache["flux"] = read_vtp(need[3]), read_vtp(need[4])
            cache["mask"] = np.asarray(subject.mask, dtype=bool)
        return cache

    return [(lambda k=k: _one_figure(k, rundir, subject, data(), cfg)) for k in range(6)]


def _one_figure(k: int, rundir, subject, d: dict, cfg) -> str:
    """Figure k of the post-processing (0-1 maps, 2-3 pathlines, 4-5 flux vectors)."""
    fig_dir = Path(rundir.figures)
    fig_dir.mkdir(parents=True, exist_ok=True)
    affine = np.asarray(subject.affine)
    dpi = cfg.figure_dpi
    sid = subject.id
    maps, lines, flux, mask = d["maps"], d["lines"], d["flux"], d["mask"]
    if k < 2:
        bg = background_image(subject)
        vox = subject.voxel_size_mm
        if k == 0:
            o = map_slices(fig_dir / "speed_map.png", maps["speed"], maps["has_speed"] & mask, bg, vox,
                           f"{sid}: rOMT speed map (mean |v| of the pathline points per voxel)", SPEED_LABEL,
                           "speed", dpi=dpi)
        else:
            o = map_slices(fig_dir / "peclet_map.png", maps["peclet"], maps["has_pe"] & mask, bg, vox,
                           f"{sid}: Péclet map (mean Pe of the pathline points; red: advection, blue: diffusion)",
                           PE_LABEL, "peclet", dpi=dpi)
        return str(Path(o).relative_to(rundir.root))
    context = mask_outline_world(mask, affine)
    if k < 4:
        n = 0 if lines["lines"] is None else len(lines["lines"][1])
        pick = np.arange(n)
        if n > cfg.figure_max_lines:
            pick = np.linspace(0, n - 1, cfg.figure_max_lines).round().astype(int)
        segs, seg_speed, seg_pe = _line_pieces(lines, pick) if n else ([], np.zeros(0), np.zeros(0))
        shown = f"{pick.size} of {n} pathlines" if pick.size < n else f"{n} pathlines"
        view = getattr(cfg, "figure_view", "3d")
        name, vals, what, label, kind = (("pathlines_speed.png", seg_speed, "speed-lines", SPEED_LABEL, "speed")
                                         if k == 2 else
                                         ("pathlines_peclet.png", seg_pe, "Péclet-lines", PE_LABEL, "peclet"))
        if view == "3d":
            o = pathlines_3d(fig_dir / name, segs, vals, f"{sid}: {what} ({shown})", label, kind, context, dpi)
        else:
            o = pathlines_2d(fig_dir / name, segs, vals, f"{sid}: {what} ({shown})", label, kind, view, context,
                             dpi)
        return str(Path(o).relative_to(rundir.root))
    nv = np.asarray(flux["points"]).shape[0]
    vpick = np.arange(nv)
    if nv > cfg.figure_max_vectors:
        vpick = np.linspace(0, nv - 1, cfg.figure_max_vectors).round().astype(int)
    vshown = f"{vpick.size} of {nv}" if vpick.size < nv else f"{nv}"
    fd = flux["point_data"]
    start = np.asarray(flux["points"], dtype=np.float64)[vpick]
    disp = np.asarray(fd["displacement_mm"], dtype=np.float64).reshape(-1, 3)[vpick]
    if k == 4:
        o = flux_vectors_3d(fig_dir / "flux_vectors_speed.png", start, disp,
                            np.asarray(fd["mean_speed_mm_per_h"], dtype=np.float64)[vpick],
                            f"{sid}: flux vectors, pathline start to end ({vshown})",
                            "mean " + SPEED_LABEL, "speed", context, dpi)
    else:
        o = flux_vectors_3d(fig_dir / "flux_vectors_peclet.png", start, disp,
                            np.asarray(fd["mean_peclet"], dtype=np.float64)[vpick],
                            f"{sid}: flux vectors, pathline start to end ({vshown})", "mean " + PE_LABEL,
                            "peclet", context, dpi)
    return str(Path(o).relative_to(rundir.root))
