"""Figure of a FEM run: D and J over iterations, data vs fit slices per scan."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_fem(path, history: dict, scans: np.ndarray, fit: np.ndarray, mask: np.ndarray, times_h,
             title: str = "") -> Path:
    """Write a PNG.

    Args:
        path: output PNG.
        history: lists "iteration", "D" (mm^2/h), "J".
        scans: (p, ni, nj, nk) data; fit: (p, ni, nj, nk) fitted c at scan times.
        mask: (ni, nj, nk) bool; times_h: (p,) scan times.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from glymphmpi.io import atomic_path

    p = len(times_h)
    counts = mask.sum(axis=(0, 1))
    # the axial slice through the mask's centre (the fullest one if that is empty)
    k = int(round(float(np.dot(np.arange(counts.size), counts) / max(counts.sum(), 1))))
    if counts[k] == 0:
        k = int(np.argmax(counts))
    vmax = float(max(np.max(scans[:, :, :, k] * mask[:, :, k]), 1e-12))
    fig = plt.figure(figsize=(3 * p, 8.4), constrained_layout=True)
    gs = fig.add_gridspec(3, p)
    ax = fig.add_subplot(gs[0, : max(1, p // 2)])
    it = np.asarray(history.get("iteration", []))
    ax.plot(it, history.get("D", []), "o-", ms=3)
    ax.set_xlabel("iteration")
    ax.set_ylabel("D (mm$^2$/h)")
    ax2 = fig.add_subplot(gs[0, max(1, p // 2):])
    J = np.asarray(history.get("J", []), dtype=float)
    if J.size:
        ax2.semilogy(it, np.maximum(J, 1e-300), "o-", ms=3, color="C1")
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("J")
    for i in range(p):
        for row, img, lab in ((1, scans, "data"), (2, fit, "fit")):
            a = fig.add_subplot(gs[row, i])
            a.imshow(np.where(mask[:, :, k], img[i][:, :, k], np.nan).T, origin="lower", vmin=0, vmax=vmax,
                     cmap="magma")
            a.set_title(f"{lab} t = {times_h[i]:g} h", fontsize=9)
            a.set_xticks([])
            a.set_yticks([])
    if title:
        fig.suptitle(title)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path


def figures(rundir, subject, cfg, fields) -> Path:
    """The registry's figure hook of ``fem`` (rank 0, after the solve): ``figures/fem.png`` from
    results.h5 (the iteration history and the fit at the scan times)."""
    from glymphmpi.io import read_h5_tree

    tree, _ = read_h5_tree(rundir.results)
    fit = np.asarray(tree["fit_at_scans"], dtype=np.float64)
    return plot_fem(Path(rundir.figures) / "fem.png", tree["history"], subject.scans, fit, subject.mask,
                    subject.times_h, title=figure_title(subject.id, fields, cfg.mode))


def figure_title(sid: str, fields: dict, mode: str) -> str:
    """D with its 95% interval, and NOT CONVERGED / the number of warnings where they apply."""
    t = f"{sid}: D = {fields['D_mm2_per_h']:.4f} mm$^2$/h"
    ci = fields.get("D_ci95_mm2_per_h")
    if ci is not None and len(ci) == 2 and all(np.isfinite(ci)):
        t += f", 95% [{ci[0]:.4f}, {ci[1]:.4f}]"
    t += f" ({mode})"
    if fields.get("converged") is False:
        t += " - NOT CONVERGED: not an estimate"
    n = len(fields.get("warnings") or [])
    if n:
        t += f" - {n} warning(s), see summary.json"
    return t
