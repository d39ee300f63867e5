"""Figures of a PINN run: D and losses over epochs, r(t), data vs prediction slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    from glymphmpi.io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    _plt().close(fig)
    return path


def plot_histories(histories: list[dict], path, status: str = "") -> Path:
    """D (mm^2/h), data loss J, PDE loss L_r and the residual norm at checkpoints over epochs.

    One line per ensemble member; the checkpoint residual norm uses 20 times and
    at most 2000 interior voxels (the full r(t) is computed after training). ``status``
    (e.g. "smoke test, not an estimate" or "not converged") is shown above the D panel.
    Losses are of the data divided by the run's intensity scale.
    """
    plt = _plt()
    fig, ax = plt.subplots(1, 4, figsize=(17, 3.6))
    for k, h in enumerate(histories):
        ep = np.asarray(h["epoch"])
        ax[0].plot(ep, h["D"], label=f"member {k}")
        ax[1].semilogy(ep, h["loss_data"])
        ax[2].semilogy(ep, h["loss_pde"])
        if len(h.get("residual_check_epoch", ())):
            ax[3].semilogy(h["residual_check_epoch"], h["residual_check_norm"], "o-")
    ax[3].set(xlabel="epoch", ylabel="mean r(t)", title="residual norm at checkpoints")
    ax[0].set(xlabel="epoch", ylabel="D (mm$^2$/h)",
              title="diffusion coefficient" + (f"\n{status}" if status else ""))
    if status:
        ax[0].title.set_color("tab:red")
    ax[1].set(xlabel="epoch", ylabel="J", title="data misfit (scaled data)")
    ax[2].set(xlabel="epoch", ylabel="$L_r$", title="PDE loss (mean $|r|^p$)")
    if len(histories) > 1:
        ax[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_residual(curves: list[tuple], times_h, path) -> Path:
    """r(t) = mean |dc/dt - D lap c| over voxel centres, with the scan times marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for k, (t, r) in enumerate(curves):
        ax.semilogy(t, r, label=f"member {k}: mean {np.mean(r):.3g}")
    for t in times_h:
        ax.axvline(t, color="0.7", lw=0.8, ls="--")
    ax.set(xlabel="t (h)", ylabel="r(t) (conc./h)", title="PDE residual over time")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_slices(data: np.ndarray, pred: np.ndarray, mask: np.ndarray, times_h, path, axis: int = 2) -> Path:
    """Middle slice of data (top row) and network prediction (bottom row) at each scan time.

    Args:
        data, pred: (p, ni, nj, nk) volumes.
        mask: (ni, nj, nk) bool.
    """
    plt = _plt()
    p = data.shape[0]
    k = mask.shape[axis] // 2
    take = lambda a: np.take(a, k, axis=axis)  # noqa: E731
    vmax = float(np.max(np.where(mask, data, 0))) or 1.0
    fig, ax = plt.subplots(2, p, figsize=(2.6 * p, 5.2), squeeze=False)
    for i in range(p):
        for row, (vol, name) in enumerate(((data, "data"), (pred, "PINN"))):
            im = np.where(take(mask), take(vol[i]), np.nan)
            h = ax[row, i].imshow(im.T, origin="lower", vmin=0, vmax=vmax, cmap="magma")
            ax[row, i].set_title(f"{name}, t = {times_h[i]:g} h", fontsize=8)
            ax[row, i].axis("off")
    fig.colorbar(h, ax=ax, shrink=0.7, label="concentration")
    return _save(fig, path)


def figures(rundir, subject, cfg, fields) -> list[Path]:  # noqa: ARG001 - the registry's hook signature
    """The registry's figure hook of ``pinn`` (rank 0, after the solve): from results.h5.

    D and losses over epochs, r(t), slices of data vs the ensemble-mean prediction; nothing
    when ``pinn.figures`` is false.
    """
    if not cfg.figures:
        return []
    from glymphmpi.io import read_h5_tree

    tree, _ = read_h5_tree(rundir.results)
    members = [tree["members"][k] for k in sorted(tree["members"], key=lambda k: int(k[1:]))]
    times_h = np.asarray(tree["times_h"])
    fig_dir = Path(rundir.figures)
    status = ""
    if not fields.get("estimate", True):
        status = fields.get("estimate_reason", "not an estimate").split(":")[0]
    elif fields.get("converged") is False:
        status = "not converged (see the warnings in summary.json)"
    return [plot_histories([m["history"] for m in members], fig_dir / "pinn_history.png", status),
            plot_residual([(m["t_grid_h"], m["residual_t"]) for m in members], times_h,
                          fig_dir / "pinn_residual_t.png"),
            plot_slices(subject.scans, np.asarray(tree["prediction_at_scans"], dtype=np.float64), subject.mask,
                        times_h, fig_dir / "pinn_slices.png")]
