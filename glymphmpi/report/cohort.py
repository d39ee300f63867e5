"""Cohort summary: per-subject pages, the cohort CSV, a long settings file, an HTML page, a plot.

Reads run outputs only: each run's ``summary.json``, the settings recorded in its
``results.h5`` (attribute ``config``), the figures in its ``figures/``, and, for synthetic
subjects, the ``truth.json`` next to the subject file. Which numbers are the headline of a
method comes from the method registry (:mod:`glymphmpi.methods`, each method's ``summary``
fields); an external command of a cohort file has no declaration, so its top-level numbers are
its headline. How a launcher saw a run (a cancelled job) is handed in by the caller as
``status``; this module does not read the launcher's records.

Layout::

    OUT/<subject>/report/summary.json, index.html      per subject (headline numbers, warnings, figures)
    OUT/report/cohort.csv                               one row per subject: status, headline numbers,
                                                        D and its interval, runtime, convergence, warnings
    OUT/report/cohort_settings.tsv                      long format: subject, method, key, value
    OUT/report/index.html, cohort_D.png                 the cohort
"""

from __future__ import annotations

import csv
import datetime as _dt
import html
import io
import json
import math
import os
from pathlib import Path

from glymphmpi import methods as registry
from glymphmpi.io import atomic_write_bytes, atomic_write_json
from glymphmpi.store import read_summary

D_KEY = "D_mm2_per_h"
#: fields every method may report about how its run went (shown beside its headline)
RUN_KEYS = ("runtime_s", "converged", "warnings")
FIG_EXT = (".png", ".svg", ".jpg")
#: unit suffixes of summary keys -> unit shown
UNITS = (("_mm2_per_h", "mm²/h"), ("_mm_per_h", "mm/h"), ("_mm3", "mm³"), ("_mm", "mm"), ("_s", "s"),
         ("_h", "h"))


def report_paths(out) -> dict[str, Path]:
    d = Path(out) / "report"
    return {"dir": d, "csv": d / "cohort.csv", "settings": d / "cohort_settings.tsv", "html": d / "index.html",
            "plot": d / "cohort_D.png"}


# ------------------------------------------------------------------ reading runs
def headline_keys(method: str, summary: dict) -> list[str]:
    """The method's headline fields: the registry's ``summary`` (plus an interval of D when the
    run gives one), else, for an unregistered command, every top-level finite number."""
    if method in registry.all_methods():
        keys = list(registry.get(method).summary)
        for k in (D_KEY.replace("D_", "D_ci95_", 1), "D_ci95_low_mm2_per_h", "D_ci95_high_mm2_per_h"):
            if k in summary and k not in keys:
                keys.append(k)
        return keys
    return [k for k, v in summary.items() if _number(v) is not None and k not in RUN_KEYS
            and k not in ("exit_code", "mpi_ranks")]


def _number(v):
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)) and math.isfinite(float(v)):
        return float(v)
    return None


def _value(v):
    """A headline value: a finite number, or an interval (two finite numbers, low and high)."""
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(_number(x) is not None for x in v):
        return (float(v[0]), float(v[1]))
    return _number(v)


def show_value(v, digits: int = 4) -> str:
    """A headline value as text: a number, or an interval 'low – high'."""
    if isinstance(v, tuple):
        return f"{v[0]:.{digits}g} – {v[1]:.{digits}g}"
    return f"{v:.{digits}g}"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (str, int, float, bool)) or v is None:
            out[f"{prefix}{k}"] = v
        elif isinstance(v, (list, tuple)) and len(v) <= 16:
            out[f"{prefix}{k}"] = json.dumps(v)
    return out


def run_settings(rd: Path, summary: dict, headline: list[str]) -> dict:
    """Everything of a run that is not its headline: the settings it ran with (``config.*``, from
    results.h5 and the summary's nested tables) and its other summary fields (``summary.*``)."""
    out: dict = {}
    res = rd / "results.h5"
    if res.exists():
        try:
            from glymphmpi.io import read_h5_attrs

            cfg = json.loads(read_h5_attrs(res).get("config", "{}") or "{}")
            for v in cfg.values() if len(cfg) == 1 and isinstance(next(iter(cfg.values())), dict) else [cfg]:
                out.update({f"config.{k}": x for k, x in _flat(v).items()})
        except (OSError, ValueError, ImportError):
            pass
    skip = set(headline) | set(RUN_KEYS) | {"status", "error"}
    for k, v in summary.items():
        if k in skip:
            continue
        if isinstance(v, dict):
            out.update({f"config.{kk}" if k == "config" else f"summary.{k}.{kk}": x
                        for kk, x in _flat(v).items()})
        elif isinstance(v, (list, tuple)):
            if len(v) <= 16:
                out[f"summary.{k}"] = json.dumps(v)
        else:
            out[f"summary.{k}"] = v
    return out


def warnings_of(summary: dict) -> list[str]:
    """What a reader must know about a run, in plain words."""
    w = [str(x) for x in summary.get("warnings", []) or []] if isinstance(summary.get("warnings"), list) else []
    if summary.get("estimate") is False:
        w.append(str(summary.get("estimate_reason") or "not an estimate (the run did not train or converge)"))
    if summary.get("smoke") is True or summary.get("smoke_test") is True:
        w.append("smoke test: settings too small for an estimate; its numbers only show the run works")
    if summary.get("converged") is False:
        it = summary.get("iterations")
        w.append("did not converge" + (f" (stopped after {it} iterations)" if it is not None else "")
                 + ": its numbers are not converged estimates")
    for k, v in summary.items():
        if k.endswith("reason") and isinstance(v, str) and v.upper().startswith("DIVERGED"):
            w.append(f"the optimiser stopped without converging ({v})")
    if summary.get("early_stopped"):
        w.append(f"stopped early: {summary.get('early_stop_reason') or 'no progress'}")
    return list(dict.fromkeys(w))


def _truth(toml: Path) -> dict:
    p = Path(toml).parent / "truth.json"
    if not p.exists():
        return {}
    try:
        t = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    for k in (D_KEY, "D"):
        if _number(t.get(k)) is not None:
            return {"D_true": float(t[k])}
    return {}


def label(key: str) -> tuple[str, str]:
    """``"median_speed_mm_per_h"`` -> ``("median speed", "mm/h")``."""
    for suffix, unit in UNITS:
        if key.endswith(suffix):
            return key[: -len(suffix)].replace("_", " "), unit
    return key.replace("_", " "), ""


def subject_row(cohort, out, sid: str, status: dict | None = None) -> dict:
    """One subject's numbers: status, headline fields, warnings, figures and settings of every method.

    Args:
        cohort: an object with ``subjects`` (``id``, ``toml``), ``method_names`` and ``runs(entry, m)``.
        out: the cohort output directory.
        sid: the subject.
        status: optional ``{method: {"state", "reason"}}``: how the launcher saw each run.
    """
    out = Path(out)
    entry = next(s for s in cohort.subjects if s.id == sid)
    row: dict = {"subject": sid, "subject_toml": str(entry.toml), **_truth(entry.toml)}
    figures: dict[str, list[str]] = {}
    settings: dict[str, dict] = {}
    warn: dict[str, list[str]] = {}
    heads: dict[str, list[str]] = {}
    for m in cohort.method_names:
        if not cohort.runs(entry, m):
            continue
        rd = out / sid / m
        summ = read_summary(rd) or {}
        seen = (status or {}).get(m) or {}
        state = summ.get("status") if summ.get("status") == "complete" else (
            seen.get("state") or summ.get("status") or ("missing" if not rd.exists() else "unfinished"))
        if state == "pending" and not summ:
            state = "missing" if not rd.exists() else "unfinished"
        row[f"{m}.status"] = state
        err = seen.get("reason") or summ.get("error")
        if state != "complete" and err:
            row[f"{m}.error"] = str(err).splitlines()[0]
        keys = headline_keys(m, summ)
        heads[m] = keys
        for k in keys + ["runtime_s", "mpi_ranks"]:
            v = _value(summ.get(k))
            if v is not None:
                row[f"{m}.{k}"] = v
        if isinstance(summ.get("converged"), bool):
            row[f"{m}.converged"] = summ["converged"]
        warn[m] = warnings_of(summ)
        if warn[m]:
            row[f"{m}.warnings"] = "; ".join(warn[m])
        if "D_true" in row and f"{m}.{D_KEY}" in row:
            row[f"{m}.D_rel_error"] = (row[f"{m}.{D_KEY}"] - row["D_true"]) / row["D_true"]
        figures[m] = sorted(str(p.relative_to(out)) for p in (rd / "figures").glob("*") if p.suffix in FIG_EXT) \
            if (rd / "figures").is_dir() else []
        settings[m] = run_settings(rd, summ, keys)
    row["figures"] = figures
    row["headline"] = heads
    row["warnings"] = warn
    row["settings"] = settings
    return row


# ------------------------------------------------------------------ the subject page
def truth_note(row: dict, m: str) -> str:
    """`` (truth T, +E%)`` beside method ``m``'s D in a row with a truth; the error only for a converged
    estimate, `` (truth T; not an estimate)`` otherwise."""
    if row.get(f"{m}.converged") is True:
        return f" (truth {row['D_true']:.4g}, {100 * row[f'{m}.D_rel_error']:+.1f}%)"
    return f" (truth {row['D_true']:.4g}; not an estimate)"


def subject_report(cohort, out, sid: str, *runs, status: dict | None = None) -> dict:
    """Write ``OUT/<sid>/report/{summary.json,index.html}``; ``runs`` only order the call after them."""
    del runs
    out = Path(out)
    row = subject_row(cohort, out, sid, status)
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
        title = registry.get(m).title if m in registry.all_methods() else m
        parts.append(f"<h2>{html.escape(title)}: {html.escape(str(row.get(f'{m}.status')))}</h2>")
        if row.get(f"{m}.error"):
            parts.append(f"<p class=err>{html.escape(row[f'{m}.error'])}</p>")
        for w in row["warnings"].get(m, []):
            parts.append(f"<p class=warn>&#9888; {html.escape(w)}</p>")
        trs = []
        for k in row["headline"].get(m, []) + ["runtime_s"]:
            v = row.get(f"{m}.{k}")
            if v is None:
                continue
            name, unit = label(k)
            extra = ""
            if k == D_KEY and f"{m}.D_rel_error" in row:
                extra = truth_note(row, m)
            trs.append(f"<tr><td>{html.escape(name)}</td><td>{show_value(v)}</td><td>{html.escape(unit)}{extra}</td></tr>")
        if trs:
            parts.append("<table><tr><th>quantity</th><th>value</th><th>unit</th></tr>" + "".join(trs) + "</table>")
        for f in row["figures"].get(m, []):
            rel = os.path.relpath(out / f, rdir)
            parts.append(f'<a href="{html.escape(rel)}"><img src="{html.escape(rel)}" height=220></a>')
        n = len(row["settings"].get(m, {}))
        if n:
            parts.append(f"<p class=na>{n} settings and further fields: "
                         f'<a href="../../report/cohort_settings.tsv">cohort_settings.tsv</a></p>')
    atomic_write_bytes(rdir / "index.html", _page(f"glymphmpi: {sid}", "\n".join(parts)).encode())
    return row


_CSS = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee}"
        "td:first-child{text-align:left}.err{color:#a00}.warn{color:#850}.fail{background:#fdd}.na{color:#999}")


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n{body}\n</body></html>\n")


def _fmt(v, digits: int = 4) -> str:
    if v is None or v == "":
        return "<span class=na>-</span>"
    if isinstance(v, (float, tuple)):
        return html.escape(show_value(v, digits))
    return html.escape(str(v))


def _error_bar(row: dict, m: str) -> tuple[float, float]:
    """(below, above) D for the plot: its interval if the run gives one, else its spread, else NaN."""
    d = row.get(f"{m}.{D_KEY}")
    for k in row["headline"].get(m, []):
        v = row.get(f"{m}.{k}")
        if k == D_KEY or not k.startswith("D_") or d is None:
            continue
        if isinstance(v, tuple):
            return d - v[0], v[1] - d
        if isinstance(v, float) and any(w in k for w in ("std", "sd", "spread")):
            return v, v
    return math.nan, math.nan


def cohort_plot(rows: list[dict], methods: list[str], path: Path) -> Path | None:
    """D per subject: each D-reporting method side by side (with its interval or spread), truth as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    dm = [m for m in methods if any(f"{m}.{D_KEY}" in r for r in rows)]
    rows = [r for r in rows if any(f"{m}.{D_KEY}" in r for m in dm)]  # subjects with a D
    if not dm or not rows:
        return None
    x = np.arange(len(rows))
    w = 0.8 / len(dm)
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows) + 2), 3.6))
    for i, m in enumerate(dm):
        ys = np.array([r.get(f"{m}.{D_KEY}", np.nan) for r in rows], dtype=float)
        eb = np.array([_error_bar(r, m) for r in rows]).T
        err = np.nan_to_num(eb) if np.isfinite(eb).any() else None
        xs = x + (i - (len(dm) - 1) / 2) * w
        ax.bar(xs, ys, w, label=m)
        if err is not None:
            ax.errorbar(xs, ys, yerr=err, fmt="none", ecolor="k", capsize=3, lw=1)
    truths = [r.get("D_true") for r in rows]
    first = next((i for i, t in enumerate(truths) if t is not None), None)
    for xi, t in zip(x, truths):
        if t is not None:
            ax.hlines(t, xi - 0.45, xi + 0.45, colors="k", linestyles="--", lw=1,
                      label="true D" if xi == first else None)
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


def _csv_value(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.10g}"
    if isinstance(v, tuple):
        return " ".join(f"{x:.10g}" for x in v)
    return str(v)


# ------------------------------------------------------------------ the cohort
def cohort_report(cohort, out, statuses: dict | None = None) -> dict[str, Path]:
    """Write the cohort CSV, the settings TSV, the HTML page and the plot; returns their paths.

    Args:
        cohort: see :func:`subject_row`; also ``path`` (shown on the page).
        out: the cohort output directory.
        statuses: optional ``{subject: {method: {"state", "reason"}}}`` from the launcher.
    """
    out = Path(out)
    paths = report_paths(out)
    rows = []
    for s in cohort.subjects:
        srep = out / s.id / "report" / "summary.json"
        row = subject_row(cohort, out, s.id, (statuses or {}).get(s.id))
        row["subject_report"] = str(srep.parent / "index.html") if srep.exists() else ""
        rows.append(row)
    methods = cohort.method_names
    # CSV: per method its status, headline numbers (D, its interval, relative error), runtime, convergence
    cols = ["subject"] + (["D_true"] if any("D_true" in r for r in rows) else [])
    for m in methods:
        keys = list(dict.fromkeys(k for r in rows for k in r["headline"].get(m, [])))
        for c in ["status", "error", *keys, "D_rel_error", *RUN_KEYS]:
            if any(f"{m}.{c}" in r for r in rows) or (c == "status" and any(m in r["headline"] for r in rows)):
                cols.append(f"{m}.{c}")
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(cols)
    for r in rows:
        wr.writerow([_csv_value(r.get(c)) for c in cols])
    atomic_write_bytes(paths["csv"], buf.getvalue().encode())
    # settings and every other field, long format
    buf = io.StringIO()
    wr = csv.writer(buf, delimiter="\t", lineterminator="\n")
    wr.writerow(["subject", "method", "key", "value"])
    for r in rows:
        for m, kv in r["settings"].items():
            for k, v in sorted(kv.items()):
                wr.writerow([r["subject"], m, k, " ".join(_csv_value(v).split())])
    atomic_write_bytes(paths["settings"], buf.getvalue().encode())
    plot = cohort_plot(rows, methods, paths["plot"])

    # HTML
    p = [f"<h1>glymphmpi cohort report</h1><p>cohort <code>{html.escape(str(cohort.path))}</code>, "
         f"{len(rows)} subjects, methods {', '.join(methods)}; written "
         f"{_dt.datetime.now(_dt.UTC).isoformat(timespec='seconds')}. "
         f'Numbers: <a href="cohort.csv">cohort.csv</a>; settings: '
         f'<a href="cohort_settings.tsv">cohort_settings.tsv</a>.</p>']
    if plot:
        p.append('<img src="cohort_D.png" style="max-width:100%">')
    dm = [m for m in methods if any(f"{m}.{D_KEY}" in r for r in rows)]
    if dm:
        head = ["subject"] + (["true D"] if any("D_true" in r for r in rows) else [])
        extra: dict[str, list[str]] = {}
        for m in dm:
            head.append(f"{m} D")
            extra[m] = [k for k in dict.fromkeys(k for r in rows for k in r["headline"].get(m, []))
                        if k != D_KEY and (k.startswith("D_") or "resid" in k)]
            head += [f"{m} {label(k)[0]}" for k in extra[m]]
        p.append("<h2>D (mm&sup2;/h)</h2><table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head)
                 + "</tr>")
        for r in rows:
            cells = [html.escape(r["subject"])]
            if "true D" in head:
                cells.append(_fmt(r.get("D_true")))
            for m in dm:
                e = r.get(f"{m}.D_rel_error")
                warn = " &#9888;" if r["warnings"].get(m) else ""
                err = "" if e is None else (f" ({100 * e:+.1f}%)" if r.get(f"{m}.converged") is True
                                            else " (not an estimate)")
                cells.append(_fmt(r.get(f"{m}.{D_KEY}")) + err + warn)
                cells += [_fmt(r.get(f"{m}.{k}")) for k in extra[m]]
            p.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        p.append("</table>")
    for m in methods:  # the other headline numbers (speed and Peclet statistics, ...)
        keys = [k for k in dict.fromkeys(k for r in rows for k in r["headline"].get(m, []))
                if k != D_KEY and not k.startswith("D_") and "resid" not in k
                and any(f"{m}.{k}" in r for r in rows)]
        if not keys:
            continue
        p.append(f"<h2>{html.escape(m)}</h2><table><tr><th>subject</th>"
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
            for w in r["warnings"].get(m, []):
                txt += f"<br><span class=warn>{html.escape(w)}</span>"
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
