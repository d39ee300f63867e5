"""Cohort summary: per-subject reports, one CSV, one HTML page and a cohort plot.

Reads only the run directories' ``summary.json`` files (DESIGN.md section 2) and, for
synthetic subjects, the ``truth.json`` next to the subject file. Method summaries differ in
their keys; every numeric scalar becomes a CSV column ``<method>.<key>``, and the page shows
the ones that matter side by side: D from FEM and PINN (with PINN's spread and residual
norms), rOMT speed and Peclet statistics, and runtimes.

Layout::

    OUT/<subject>/report/summary.json, index.html     per subject (links to its figures)
    OUT/report/cohort.csv, index.html, cohort_D.png   the cohort
"""

from __future__ import annotations

import csv
import datetime as _dt
import html
import io
import json
import math
import os
import re
from pathlib import Path

from glymphmpi.io import atomic_write_bytes, atomic_write_json
from glymphmpi.store import read_summary

D_KEYS = ("D_mm2_per_h", "D")
SPREAD_RE = re.compile(r"^D.*(std|spread|sd|iqr|ci)", re.I)
RESID_RE = re.compile(r"resid", re.I)
ROMT_RE = re.compile(r"(speed|peclet|(^|_)pe(_|$))", re.I)
FIG_EXT = (".png", ".svg", ".jpg")


def report_paths(out) -> dict[str, Path]:
    d = Path(out) / "report"
    return {"dir": d, "csv": d / "cohort.csv", "html": d / "index.html", "plot": d / "cohort_D.png"}


def _scalars(summary: dict, prefix: str = "") -> dict[str, float | str]:
    """Numeric scalars (and a few strings) of a summary, nested dicts flattened with '.'."""
    out: dict = {}
    for k, v in summary.items():
        key = f"{prefix}{k}"
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)) and math.isfinite(float(v)):
            out[key] = float(v)
        elif isinstance(v, dict):
            out.update(_scalars(v, key + "."))
        elif isinstance(v, str) and k in ("status", "error"):
            out[key] = v
    return out


def _truth(toml: Path) -> dict:
    p = Path(toml).parent / "truth.json"
    if not p.exists():
        return {}
    try:
        t = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    for k in D_KEYS:
        if isinstance(t.get(k), (int, float)):
            return {"D_true": float(t[k])}
    return {}


def _d(fields: dict, method: str) -> float | None:
    for k in D_KEYS:
        v = fields.get(f"{method}.{k}")
        if isinstance(v, float):
            return v
    return None


def subject_row(cohort, out, sid: str) -> dict:
    """One subject's numbers: status, key fields and figures of every method."""
    out = Path(out)
    entry = next(s for s in cohort.subjects if s.id == sid)
    row: dict = {"subject": sid, "subject_toml": str(entry.toml), **_truth(entry.toml)}
    figures: dict[str, list[str]] = {}
    from glymphmpi.cohort.state import CohortState, task_key, task_status

    recs = CohortState(out).data["tasks"]
    for m in cohort.method_names:
        if not cohort.runs(entry, m):
            continue
        rd = out / sid / m
        summ = read_summary(rd) or {}
        # the launcher's view (e.g. a cancelled job) over the method's own summary
        st = task_status(out, sid, m, recs.get(task_key(sid, m)))
        row[f"{m}.status"] = st["state"] if (summ or st["state"] != "pending") else (
            "missing" if not rd.exists() else "unfinished")
        err = st.get("reason") or summ.get("error")
        if st["state"] != "complete" and err:
            row[f"{m}.error"] = str(err).splitlines()[0]
        for k, v in _scalars(summ).items():
            if k not in ("status", "error"):
                row[f"{m}.{k}"] = v
        figs = sorted(str(p.relative_to(out)) for p in (rd / "figures").glob("*") if p.suffix in FIG_EXT) \
            if (rd / "figures").is_dir() else []
        figures[m] = figs
    for m in cohort.method_names:
        d = _d(row, m)
        if d is not None and "D_true" in row:
            row[f"{m}.D_rel_error"] = (d - row["D_true"]) / row["D_true"]
    row["figures"] = figures
    return row


def subject_report(cohort, out, sid: str, *runs) -> dict:
    """Write ``OUT/<sid>/report/{summary.json,index.html}``; ``runs`` only order the call after them."""
    del runs
    out = Path(out)
    row = subject_row(cohort, out, sid)
    rdir = out / sid / "report"
    row["written"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    row["hostname"] = os.uname().nodename
    atomic_write_json(rdir / "summary.json", row)
    parts = [f"<h1>{html.escape(sid)}</h1>", f"<p>subject file: <code>{html.escape(row['subject_toml'])}</code>"]
    if "D_true" in row:
        parts.append(f"; true D = {row['D_true']:.4g} mm&sup2;/h (synthetic)")
    parts.append("</p>")
    for m in cohort.method_names:
        if f"{m}.status" not in row:
            continue
        parts.append(f"<h2>{html.escape(m)}: {html.escape(str(row.get(f'{m}.status')))}</h2>")
        if row.get(f"{m}.error"):
            parts.append(f"<p class=err>{html.escape(row[f'{m}.error'])}</p>")
        kv = [(k.split(".", 1)[1], v) for k, v in row.items() if k.startswith(m + ".") and isinstance(v, float)]
        if kv:
            parts.append("<table>" + "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.6g}</td></tr>"
                                             for k, v in kv) + "</table>")
        for f in row["figures"].get(m, []):
            rel = os.path.relpath(out / f, rdir)
            parts.append(f'<a href="{html.escape(rel)}"><img src="{html.escape(rel)}" height=220></a>')
    atomic_write_bytes(rdir / "index.html", _page(f"glymphmpi: {sid}", "\n".join(parts)).encode())
    return row


_CSS = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee}"
        "td:first-child{text-align:left}.err{color:#a00}.fail{background:#fdd}.na{color:#999}")


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n{body}\n</body></html>\n")


def _fmt(v, digits: int = 4) -> str:
    if v is None or v == "":
        return "<span class=na>-</span>"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return html.escape(str(v))


def _pick(row: dict, method: str, rx: re.Pattern) -> list[tuple[str, float]]:
    return [(k.split(".", 1)[1], v) for k, v in row.items()
            if k.startswith(method + ".") and isinstance(v, float) and rx.search(k.split(".", 1)[1])
            and ".config." not in k]


def cohort_plot(rows: list[dict], methods: list[str], path: Path) -> Path | None:
    """D per subject: each D-reporting method side by side (PINN with its spread), truth as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    dm = [m for m in methods if any(_d(r, m) is not None for r in rows)]
    rows = [r for r in rows if any(_d(r, m) is not None for m in dm)]  # subjects with a D
    if not dm or not rows:
        return None
    x = np.arange(len(rows))
    w = 0.8 / len(dm)
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows) + 2), 3.6))
    for i, m in enumerate(dm):
        ys = np.array([_d(r, m) if _d(r, m) is not None else np.nan for r in rows])
        err = None
        sp = [next((v for k, v in _pick(r, m, SPREAD_RE)), np.nan) for r in rows]
        if np.isfinite(sp).any():
            err = np.nan_to_num(np.asarray(sp))
        ax.bar(x + (i - (len(dm) - 1) / 2) * w, ys, w, yerr=err, capsize=3, label=m)
    truths = [r.get("D_true") for r in rows]
    for xi, t in zip(x, truths):
        if t is not None:
            ax.hlines(t, xi - 0.45, xi + 0.45, colors="k", linestyles="--", lw=1,
                      label="true D" if xi == next(i for i, tt in enumerate(truths) if tt is not None) else None)
    ax.set_xticks(x, [r["subject"] for r in rows], rotation=30 if len(rows) > 6 else 0)
    ax.set_ylabel("D (mm$^2$/h)")
    ax.set_title("Effective diffusion coefficient per subject")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def cohort_report(cohort, out) -> dict[str, Path]:
    """Write the cohort CSV, HTML page and plot; returns their paths."""
    out = Path(out)
    paths = report_paths(out)
    rows = []
    for s in cohort.subjects:
        srep = out / s.id / "report" / "summary.json"
        row = subject_row(cohort, out, s.id)
        row["subject_report"] = str(srep.parent / "index.html") if srep.exists() else ""
        rows.append(row)
    methods = cohort.method_names
    # CSV: fixed leading columns, then every other field in sorted order
    lead = ["subject", "D_true"] + [f"{m}.{k}" for m in methods for k in ("status", "D_mm2_per_h", "runtime_s")]
    cols = [c for c in lead if any(c in r for r in rows)]
    rest = sorted({k for r in rows for k in r if k not in cols and k not in ("figures", "subject_report")})
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(cols + rest)
    for r in rows:
        wr.writerow([("" if r.get(c) is None else f"{r[c]:.10g}" if isinstance(r.get(c), float) else r.get(c))
                     for c in cols + rest])
    atomic_write_bytes(paths["csv"], buf.getvalue().encode())
    plot = cohort_plot(rows, methods, paths["plot"])

    # HTML
    p = [f"<h1>glymphmpi cohort report</h1><p>cohort <code>{html.escape(str(cohort.path))}</code>, "
         f"{len(rows)} subjects, methods {', '.join(methods)}; written "
         f"{_dt.datetime.now(_dt.UTC).isoformat(timespec='seconds')}. "
         f'All numbers: <a href="cohort.csv">cohort.csv</a>.</p>']
    if plot:
        p.append('<img src="cohort_D.png" style="max-width:100%">')
    dm = [m for m in methods if any(_d(r, m) is not None for r in rows)]
    if dm:
        head = ["subject"] + (["true D"] if any("D_true" in r for r in rows) else [])
        for m in dm:
            head += [f"{m} D"]
            if any(_pick(r, m, SPREAD_RE) for r in rows):
                head += [f"{m} spread"]
            if any(_pick(r, m, RESID_RE) for r in rows):
                head += [f"{m} residual"]
        p.append("<h2>D (mm&sup2;/h)</h2><table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head)
                 + "</tr>")
        for r in rows:
            cells = [html.escape(r["subject"])]
            if "true D" in head:
                cells.append(_fmt(r.get("D_true")))
            for m in dm:
                d = _d(r, m)
                e = r.get(f"{m}.D_rel_error")
                cells.append(_fmt(d) + (f" ({100 * e:+.1f}%)" if e is not None else ""))
                if f"{m} spread" in head:
                    cells.append(_fmt(next((v for _, v in _pick(r, m, SPREAD_RE)), None)))
                if f"{m} residual" in head:
                    cells.append("<br>".join(f"{html.escape(k)} {v:.3g}" for k, v in _pick(r, m, RESID_RE))
                                 or _fmt(None))
            p.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        p.append("</table>")
    rm = [m for m in methods if any(_pick(r, m, ROMT_RE) for r in rows)]
    for m in rm:
        keys = sorted({k for r in rows for k, _ in _pick(r, m, ROMT_RE)})
        p.append(f"<h2>{html.escape(m)}: speed and P&eacute;clet statistics</h2><table><tr><th>subject</th>"
                 + "".join(f"<th>{html.escape(k)}</th>" for k in keys) + "</tr>")
        for r in rows:
            p.append(f"<tr><td>{html.escape(r['subject'])}</td>"
                     + "".join(f"<td>{_fmt(r.get(f'{m}.{k}'))}</td>" for k in keys) + "</tr>")
        p.append("</table>")
    p.append("<h2>Runs</h2><table><tr><th>subject</th>" + "".join(
        f"<th>{html.escape(m)}</th>" for m in methods) + "<th>figures</th></tr>")
    for r in rows:
        cells = []
        for m in methods:
            st = r.get(f"{m}.status")
            if st is None:  # not run on this subject
                cells.append("<td><span class=na>-</span></td>")
                continue
            rt = r.get(f"{m}.runtime_s")
            ranks = r.get(f"{m}.mpi_ranks")
            txt = html.escape(str(st)) + (f", {rt:.1f} s" if isinstance(rt, float) else "") + (
                f" on {ranks:.0f}" if isinstance(ranks, float) and st == "complete" else "")
            if r.get(f"{m}.error"):
                txt += f"<br><span class=err>{html.escape(r[f'{m}.error'])}</span>"
            cells.append(f"<td{' class=fail' if st not in ('complete',) else ''}>{txt}</td>")
        links = []
        if r.get("subject_report"):
            links.append(f'<a href="{html.escape(os.path.relpath(r["subject_report"], paths["dir"]))}">subject</a>')
        for m in methods:
            for f in r.get("figures", {}).get(m, []):
                links.append(f'<a href="{html.escape(os.path.relpath(out / f, paths["dir"]))}">'
                             f"{html.escape(m)}/{html.escape(Path(f).name)}</a>")
        p.append(f"<tr><td>{html.escape(r['subject'])}</td>{''.join(cells)}<td style='text-align:left'>"
                 f"{' '.join(links)}</td></tr>")
    p.append("</table>")
    atomic_write_bytes(paths["html"], _page("glymphmpi cohort report", "\n".join(p)).encode())
    return paths
