"""The selection rule and its table (pure functions on run records).

Rule (Zapf et al. 2022: trust a PINN's D only when its PDE residual is small):
among set-ups with at least one completed, not early-stopped seed, those whose
mean final data misfit is within ``(1 + tol)`` of the best set-up's are
eligible; the eligible set-up with the lowest mean residual norm wins. D is
reported as the mean and spread over the winner's seeds. The true D is never
consulted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class RunRecord:
    setup: str
    seed: int
    status: str  # complete | failed | early_stopped | pending
    D: float = math.nan
    residual_norm: float = math.nan
    misfit: float = math.nan
    runtime_s: float = math.nan
    reason: str = ""
    out: str = ""


@dataclass
class SetupRow:
    setup: str
    axes: dict
    seeds_complete: int
    seeds_total: int
    D_mean: float
    D_std: float
    residual_mean: float
    misfit_mean: float
    runtime_s: float
    eligible: bool = False
    chosen: bool = False
    notes: list = field(default_factory=list)


def aggregate(records: list[RunRecord], setups) -> list[SetupRow]:
    rows = []
    for s in setups:
        recs = [r for r in records if r.setup == s.name]
        ok = [r for r in recs if r.status == "complete"]
        D = np.array([r.D for r in ok])
        notes = [f"seed {r.seed}: {r.status} ({r.reason})" for r in recs if r.status not in ("complete",)]
        rows.append(SetupRow(
            setup=s.name, axes=s.axes, seeds_complete=len(ok), seeds_total=len(recs),
            D_mean=float(D.mean()) if D.size else math.nan,
            D_std=float(D.std(ddof=1)) if D.size > 1 else (0.0 if D.size else math.nan),
            residual_mean=float(np.mean([r.residual_norm for r in ok])) if ok else math.nan,
            misfit_mean=float(np.mean([r.misfit for r in ok])) if ok else math.nan,
            runtime_s=float(np.nansum([r.runtime_s for r in recs])), notes=notes))
    return rows


def choose(rows: list[SetupRow], misfit_tolerance: float) -> SetupRow | None:
    """Mark eligible rows and the chosen one (see module docstring)."""
    done = [r for r in rows if r.seeds_complete > 0 and np.isfinite(r.residual_mean)]
    if not done:
        return None
    best = min(r.misfit_mean for r in done)
    for r in done:
        r.eligible = r.misfit_mean <= best * (1.0 + misfit_tolerance) + 1e-300
    winner = min((r for r in done if r.eligible), key=lambda r: (r.residual_mean, r.misfit_mean))
    winner.chosen = True
    return winner
