"""The per-subject QC page of a BIDS derivative, ``OUTPUT_DIR/sub-<label>.html`` (figures first, as fMRIPrep does).

Reads only files: the subject TOML and its concentration maps, the provenance JSON of the
concentration stage, and each method's run folder (``summary.json``, ``results.h5``, ``maps/``,
``figures/``). Order of the page:

1. figures: the concentration series over the anatomy with the mask outline; the mask on three
   planes; each method's maps over the anatomy; fit against data per scan time; convergence
   curves (``results.h5`` ``history``); the methods' own figures (the PINN's r(t) among them);
2. headline numbers with units (and the interval where a method gives one);
3. warnings in plain words;
4. settings.

Images are PNG files in ``sub-<label>/figures/`` referenced by relative paths, so the page loads
from any copy of the derivative folder.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_CSS = ("body{font-family:sans-serif;margin:1.5em;max-width:1300px}h1{margin-bottom:0}"
        "h2{border-bottom:1px solid #ccc;margin-top:1.5em}img{max-width:100%;border:1px solid #ddd;margin:4px 0}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
        ".warn{background:#fff3cd;border-left:4px solid #e0a800;padding:6px 10px;margin:6px 0}"
        ".fig{display:inline-block;vertical-align:top;margin-right:10px}.cap{font-size:90%;color:#444}")

#: summary keys -> unit shown, by the end of the key
_UNITS = (("_mm2_per_h", "mm²/h"), ("_mm_per_h", "mm/h"), ("_s", "s"), ("_h", "h"), ("_ml", "mL"))


def _unit(key: str) -> str:
    for end, u in _UNITS:
        if key.endswith(end):
            return u
    if "peclet" in key or key.startswith("fraction") or key in ("iterations", "n_pathlines"):
        return "1"
    return ""


def _load(path: Path):
    import nibabel as nib

    return np.asarray(nib.load(str(path)).get_fdata(dtype=np.float64))


def _slice(vol: np.ndarray, axis: int = 2, k: int | None = None) -> np.ndarray:
    k = vol.shape[axis] // 2 if k is None else k
    return np.rot90(np.take(vol, k, axis=axis))


def _best_slice(mask: np.ndarray, axis: int = 2) -> int:
    """The slice with the most mask voxels (the one nearest the middle among equals)."""
    counts = mask.sum(axis=tuple(a for a in range(3) if a != axis)).astype(float)
    mid = (mask.shape[axis] - 1) / 2
    return int(np.argmax(counts - 1e-6 * np.abs(np.arange(counts.size) - mid)))


def _overlay(ax, anat2d, over2d, mask2d, vmax, cmap="hot", title=""):
    ax.imshow(anat2d, cmap="gray", interpolation="nearest")
    if over2d is not None:
        im = ax.imshow(np.ma.masked_where(~mask2d, over2d), cmap=cmap, vmin=min(0.0, float(np.nanmin(over2d))),
                       vmax=vmax, alpha=0.75, interpolation="nearest")
    else:
        im = None
    if mask2d.any() and not mask2d.all():
        ax.contour(mask2d.astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    return im


def _figure(path: Path, n: int, draw, width=2.6, height=2.8, suptitle=""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(width * n + 0.6, height), squeeze=False)
    draw(fig, axes[0])
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name)
    fig.savefig(tmp, dpi=80, format="png", bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def _concentration_fig(fdir, sid, anat, mask, scans, times, units):
    k = _best_slice(mask)
    vmax = float(max(np.percentile(scans[:, mask], 99.5), 1e-12))
    a2, m2 = _slice(anat, k=k), _slice(mask, k=k)

    def draw(fig, axes):
        im = None
        for i, ax in enumerate(axes):
            im = _overlay(ax, a2, _slice(scans[i], k=k), m2, vmax, title=f"t = {times[i]:g} h")
        if im is not None:
            fig.colorbar(im, ax=list(axes), shrink=0.8, label=units)

    return _figure(fdir / "concentration.png", len(times), draw,
                   suptitle=f"{sid}: concentration over the baseline image (axial slice {k}; cyan: mask outline)")


def _mask_fig(fdir, sid, anat, mask):
    def draw(fig, axes):
        for ax, axis, name in zip(axes, (0, 1, 2), ("sagittal", "coronal", "axial")):
            k = _best_slice(mask, axis)
            _overlay(ax, _slice(anat, axis, k), None, _slice(mask, axis, k), 1.0, title=f"{name} {k}")

    return _figure(fdir / "mask.png", 3, draw, suptitle=f"{sid}: domain mask outline ({int(mask.sum())} voxels)")


def _maps_fig(fdir, sid, method, anat, mask, maps: list[tuple[str, np.ndarray, str]]):
    k = _best_slice(mask)
    a2, m2 = _slice(anat, k=k), _slice(mask, k=k)

    def draw(fig, axes):
        for ax, (name, vol, unit) in zip(axes, maps):
            v2 = _slice(vol, k=k)
            vmax = float(np.percentile(vol[mask], 99)) if mask.any() else float(vol.max())
            im = _overlay(ax, a2, v2, m2, max(vmax, 1e-12), cmap="viridis", title=f"{name} ({unit})")
            fig.colorbar(im, ax=ax, shrink=0.7)

    return _figure(fdir / f"maps_{method}.png", len(maps), draw, suptitle=f"{sid}: {method} maps over the anatomy")


def _fit_fig(fdir, sid, method, mask, scans, fits, times):
    """Data against the method's fit at each scan time (scatter over the mask voxels, and the relative misfit)."""
    def draw(fig, axes):
        for i, ax in enumerate(axes):
            d, f = scans[i][mask], fits[i][mask]
            ax.plot(d, f, ".", ms=2, alpha=0.5)
            hi = float(max(d.max(), f.max(), 1e-12))
            ax.plot([0, hi], [0, hi], "k-", lw=0.8)
            rel = float(np.linalg.norm(f - d) / max(np.linalg.norm(d), 1e-300))
            ax.set_title(f"t = {times[i]:g} h: misfit {100 * rel:.2g}%", fontsize=9)
            ax.set_xlabel("data")
            if i == 0:
                ax.set_ylabel(f"{method} fit")

    return _figure(fdir / f"fit_{method}.png", len(times), draw, height=3.1,
                   suptitle=f"{sid}: {method} fit against data per scan")


def _convergence_fig(fdir, sid, method, history: dict):
    keys = [k for k, v in history.items() if k not in ("iteration", "wall_s") and np.ndim(v) == 1 and len(v) > 1
            and np.all(np.isfinite(np.asarray(v, dtype=float)))]
    if not keys:
        return None
    keys = keys[:4]
    it = np.asarray(history.get("iteration", np.arange(len(history[keys[0]]))))

    def draw(fig, axes):
        for ax, k in zip(axes, keys):
            v = np.asarray(history[k], dtype=float)
            x = it if len(it) == len(v) else np.arange(len(v))
            ax.plot(x, v, "o-", ms=3)
            if np.all(v > 0) and v.max() / max(v.min(), 1e-300) > 100:
                ax.set_yscale("log")
            ax.set_xlabel("iteration")
            ax.set_title(k, fontsize=9)

    return _figure(fdir / f"convergence_{method}.png", len(keys), draw, width=3.0,
                   suptitle=f"{sid}: {method} convergence")


def _rel(path: Path, out: Path) -> str:
    return html.escape(Path(os.path.relpath(path, out)).as_posix(), quote=True)


def _method_runs(out: Path, sid: str) -> list[tuple[str, Path, dict]]:
    runs = []
    sdir = out / sid
    for d in sorted(sdir.iterdir()) if sdir.is_dir() else []:
        sj = d / "summary.json"
        if d.is_dir() and sj.is_file():
            try:
                summ = json.loads(sj.read_text())
            except (OSError, json.JSONDecodeError):
                summ = {"status": "unreadable summary.json", "method": d.name}
            if summ.get("method") == d.name:  # a method's run folder (not the cohort's report/)
                runs.append((d.name, d, summ))
    return runs


def _headline(method: str, summ: dict) -> list[tuple[str, str, str]]:
    try:
        from glymphmpi import methods as registry

        keys = list(registry.get(method).summary)
    except Exception:  # an external method of a cohort file: show the usual keys it has
        keys = []
    keys += [k for k in ("D_mm2_per_h", "D_ci95_mm2_per_h", "D_std_mm2_per_h", "converged", "iterations",
                         "runtime_s") if k in summ and k not in keys]
    rows = []
    for k in keys:
        if k not in summ:
            continue
        v = summ[k]
        if isinstance(v, float):
            txt = f"{v:.4g}"
        elif isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v):
            txt = f"[{v[0]:.4g}, {v[1]:.4g}]"
        else:
            txt = html.escape(str(v))
        if k == "D_mm2_per_h" and summ.get("estimate") is False:
            txt += f" (not an estimate: {html.escape(str(summ.get('estimate_reason', '')))})"
        elif k == "D_mm2_per_h" and (summ.get("converged") is False or any(
                isinstance(x, str) and "MAXITS" in x.upper() for kk, x in summ.items() if kk.endswith("reason"))):
            txt += " (NOT converged: iteration cap reached; not an estimate)"
        rows.append((k, txt, _unit(k.replace("_ci95", "").replace("_std", ""))))
    return rows


def _run_warnings(method: str, summ: dict) -> list[str]:
    w = []
    if summ.get("status") != "complete":
        w.append(f"{method}: the run is {summ.get('status', 'unknown')}" +
                 (f" ({summ['error']})" if summ.get("error") else "") + "; its numbers are not shown as results")
    capped = any(isinstance(v, str) and ("MAXITS" in v.upper() or "MAX_ITER" in v.upper())
                 for k, v in summ.items() if k.endswith("reason"))
    own = summ.get("warnings")
    if (summ.get("converged") is False or summ.get("hit_iteration_cap") or capped) and not own:
        w.append(f"{method}: the optimiser stopped at its iteration cap ({summ.get('iterations', '?')} iterations) "
                 "before converging; the numbers are not converged estimates")
    if summ.get("estimate") is False:
        w.append(f"{method}: not an estimate: {summ.get('estimate_reason', 'the method says so')}")
    for key in ("warnings", "warning"):
        v = summ.get(key)
        if isinstance(v, str):
            w.append(f"{method}: {v}")
        elif isinstance(v, list):
            w += [f"{method}: {x}" for x in v if isinstance(x, str)]
    mb = summ.get("mass_balance_rel_error") or summ.get("mass_change_rel")
    if isinstance(mb, (int, float)) and abs(mb) > 0.05:
        w.append(f"{method}: mass is not conserved (relative change {mb:.3g})")
    return w


def write_subject_report(out, sid: str) -> Path:
    """Write ``OUT/<sid>.html`` and its figures in ``OUT/<sid>/figures/``; returns the page."""
    from glymphmpi.io import atomic_write_bytes, read_h5_tree
    from glymphmpi.subject import load_subject

    out = Path(out)
    sdir = out / sid
    fdir = sdir / "figures"
    toml = sdir / f"{sid}_subject.toml"
    subj = load_subject(toml)
    prov_path = sdir / f"{sid}_desc-concentration_provenance.json"
    prov = json.loads(prov_path.read_text()) if prov_path.is_file() else {}
    units = prov.get("units", "concentration")
    anat = _load(subj.anatomy) if subj.anatomy else subj.scans.max(axis=0)
    mask = subj.mask
    times = list(subj.times_h)
    figs: list[tuple[Path, str]] = []
    figs.append((_concentration_fig(fdir, sid, anat, mask, subj.scans, times, units),
                 "Concentration at each scan time over the baseline image; the cyan line is the mask outline."))
    figs.append((_mask_fig(fdir, sid, anat, mask),
                 "The domain mask" + (" (AUTOMATIC: no mask derivative was given)" if "automatic" in
                                      str(prov.get("mask", "")) else f" from {prov.get('mask', '?')}") + "."))
    runs = _method_runs(out, sid)
    headline_html, warnings, settings = [], list(prov.get("warnings", [])), []
    for method, rd, summ in runs:
        warnings += _run_warnings(method, summ)
        maps_dir = rd / "maps"
        single, per_scan = [], {}
        for f in sorted(maps_dir.glob("*.nii.gz")) if maps_dir.is_dir() else []:
            stem = f.name[:-7]


            m = re.match(r"^(.*?)_t?(\d{2,3})$", stem)
            try:
                vol = _load(f)
            except Exception:  # a map that cannot be read is reported, not drawn
                warnings.append(f"{method}: map {f.name} cannot be read")
                continue
            if vol.shape != mask.shape:
                continue
            if m:
                per_scan.setdefault(m.group(1), {})[int(m.group(2))] = vol
            else:
                single.append((stem, vol, _unit_of_map(stem)))
        if single:
            figs.append((_maps_fig(fdir, sid, method, anat, mask, single[:4]),
                         f"{method}: maps over the anatomy ({', '.join(n for n, _, _ in single[:4])})."))
        fitname = next((n for n in ("fit", "pinn_pred", "pred") if n in per_scan), None)
        if fitname and len(per_scan[fitname]) == len(times):
            fits = np.stack([per_scan[fitname][i] for i in sorted(per_scan[fitname])])
            keep = [i for i in range(len(times)) if np.any(subj.scans[i][mask] != 0)]  # the baseline is all 0
            figs.append((_fit_fig(fdir, sid, method, mask, subj.scans[keep], fits[keep], [times[i] for i in keep]),
                         f"{method}: the model at each scan time against the data, voxel by voxel inside the mask."))
        h5 = rd / "results.h5"
        if h5.is_file():
            try:
                tree, attrs = read_h5_tree(h5)
            except Exception as exc:  # reported on the page, never fatal for the report
                warnings.append(f"{method}: results.h5 cannot be read ({str(exc).splitlines()[0]})")
                tree, attrs = {}, {}
            hist = tree.get("history") if isinstance(tree, dict) else None
            if isinstance(hist, dict):
                p = _convergence_fig(fdir, sid, method, hist)
                if p:
                    figs.append((p, f"{method}: objective and parameters per iteration (results.h5 history)."))
            if attrs.get("config"):
                settings.append((method, str(attrs["config"])))
        for png in sorted((rd / "figures").glob("*.png")) if (rd / "figures").is_dir() else []:
            figs.append((png, f"{method}: {png.stem} (the method's own figure"
                              f"{'; includes the PINN r(t)' if method == 'pinn' else ''})."))
        rows = _headline(method, summ)
        headline_html.append(f"<h3>{html.escape(method)}: {html.escape(str(summ.get('status')))}</h3>")
        if rows:
            headline_html.append("<table><tr><th>quantity</th><th>value</th><th>units</th></tr>" + "".join(
                f"<tr><td>{html.escape(k)}</td><td>{v}</td><td>{html.escape(u)}</td></tr>" for k, v, u in rows)
                + "</table>")
    parts = [f"<h1>{html.escape(sid)}</h1>",
             f"<p>route <b>{html.escape(str(prov.get('route', '?')))}</b>, concentration in "
             f"<b>{html.escape(units)}</b>, {len(times)} scans at {', '.join(f'{t:g}' for t in times)} h "
             f"({html.escape(str(prov.get('time_source', '')))})</p>",
             "<h2>Figures</h2>"]
    onerror = ("document.body.setAttribute('data-broken', (document.body.getAttribute('data-broken') || '') "
               "+ this.getAttribute('src') + ' ')")
    for p, cap in figs:
        parts.append(f'<div class=fig><img src="{_rel(p, out)}" alt="{html.escape(p.name)}" '
                     f'onerror="{onerror}"><div class=cap>{html.escape(cap)}</div></div>')
    parts.append("<h2>Headline numbers</h2>")
    parts += headline_html or ["<p>No method has run on this subject yet.</p>"]
    parts.append("<h2>Warnings</h2>")
    if warnings:
        parts += [f"<div class=warn>{html.escape(w)}</div>" for w in warnings]
    else:
        parts.append("<p>None.</p>")
    parts.append("<h2>Settings</h2>")
    conv = prov.get("conversion", {})
    parts.append("<table>" + "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(json.dumps(v))}</td></tr>"
                                     for k, v in {**conv, "r1_source": prov.get("r1_source", ""),
                                                  "options": prov.get("options", {})}.items()) + "</table>")
    for method, cfg in settings:
        parts.append(f"<details><summary>{html.escape(method)} configuration</summary><pre>"
                     f"{html.escape(cfg)}</pre></details>")
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>glymphmpi: {html.escape(sid)}</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
    path = out / f"{sid}.html"
    atomic_write_bytes(path, page.encode())
    return path


def _unit_of_map(stem: str) -> str:
    units = {"speed": "mm/h", "peclet": "1", "peclet_ratio": "1", "pathline_points": "count",
             "relative_source": "1/h", "D": "mm²/h"}
    return units.get(stem, "?")
