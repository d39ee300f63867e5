"""Whole series from MR signal to concentration: the ``t1map``, ``t1w`` and ``enhancement`` routes.

Each function takes the sessions' images as arrays on one grid (the caller checks the grid),
the domain mask, and the physical parameters; it returns a :class:`Conversion` with the
concentration per session, the count of voxels inside the mask where the equations had no
solution (clipped), and a ``meta`` dict that records the route, the equations and every
choice and assumption (it becomes the JSON sidecar of the derivative).

Concentration is set to 0 outside the mask (background voxels, where T1 maps are often 0,
carry no information for the methods); clipping is counted inside the mask only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from .signal import spgr_m0, spgr_t1

log = logging.getLogger(__name__)

ROUTES = ("t1map", "t1w", "enhancement")

#: the range a T1 (s) is kept in: below 10 ms is C > 20 mmol/L with any table r1; above 10 s is
#: beyond pure water at body temperature (about 4 s at 3 T)
T1_MIN_S = 0.01
T1_MAX_S = 10.0

#: assumed T1_0 (s) per tissue when no baseline T1 map exists (t1w route); flagged wherever used.
#: White and grey matter: Stanisz GJ et al., "T1, T2 relaxation and magnetization transfer in
#: tissue at 3T", Magn Reson Med 54:507-512 (2005) (3 T: WM 1.084 s, GM 1.820 s;
#: 1.5 T: WM 0.884 s, GM 1.124 s). CSF: about 4.3 s at both fields (free water at 37 C; e.g.
#: Lu H et al., J Magn Reson Imaging 22:13-22 (2005)), an approximate value.
T1_0_DEFAULTS_S = {
    3.0: {"wm": 1.084, "gm": 1.820, "csf": 4.3},
    1.5: {"wm": 0.884, "gm": 1.124, "csf": 4.3},
}
T1_0_SOURCE = ("Stanisz et al., Magn Reson Med 54:507-512 (2005) (white and grey matter); "
               "CSF about 4.3 s (free water at 37 C), approximate")


@dataclass
class Conversion:
    """The result of one route on one subject.

    Attributes:
        route: ``t1map``, ``t1w`` or ``enhancement``.
        concentration: (p, ni, nj, nk) float64, one image per session, in ``units``.
        units: ``mmol/L`` or ``1`` (enhancement: proportional to concentration).
        clipped: per session, voxels inside the mask without a solution (clipped).
        meta: the route, equations, parameters and assumptions (JSON-ready).
        warnings: plain sentences for the report and the log.
    """

    route: str
    concentration: np.ndarray
    units: str
    clipped: list[int]
    meta: dict
    warnings: list[str] = field(default_factory=list)

    @property
    def total_clipped(self) -> int:
        return int(sum(self.clipped))


def assumed_t1_0(tissue: str, field_T: float | None) -> float:
    """The documented default T1_0 (s) of a tissue at the table field nearest ``field_T``."""
    f = 3.0 if field_T is None else min(T1_0_DEFAULTS_S, key=lambda k: abs(k - float(field_T)))
    return T1_0_DEFAULTS_S[f][tissue]


def _clip_warning(route: str, clipped: list[int], n_mask: int, what: str) -> list[str]:
    total = int(sum(clipped))
    if not total:
        return []
    msg = (f"{route}: {total} voxel-session(s) inside the mask ({100.0 * total / max(n_mask * len(clipped), 1):.3g}%) "
           f"had no solution of the signal equation ({what}) and were clipped; per session: {clipped}")
    log.warning(msg)
    return [msg]


def convert_t1map(t1_series, t1_0, r1: float, mask, t1_range=(T1_MIN_S, T1_MAX_S)) -> Conversion:
    """Route ``t1map``: C = (1/r1)(1/T1 - 1/T1_0).

    Args:
        t1_series: (p, ni, nj, nk) T1 in s per session (the baseline may be among them).
        t1_0: (ni, nj, nk) baseline T1 in s.
        r1: relaxivity in L/(mmol s).
        mask: (ni, nj, nk) bool domain.
        t1_range: T1 values outside (s) are clipped into it and counted (T1 <= 0 included).
    """
    lo, hi = t1_range
    mask = np.asarray(mask, dtype=bool)
    t1 = np.asarray(t1_series, dtype=np.float64)
    t10 = np.asarray(t1_0, dtype=np.float64)
    bad0 = ~np.isfinite(t10) | (t10 < lo) | (t10 > hi)
    t10c = np.clip(np.nan_to_num(t10, nan=hi, posinf=hi, neginf=lo), lo, hi)
    conc = np.empty_like(t1)
    clipped = []
    for n in range(t1.shape[0]):
        bad = ~np.isfinite(t1[n]) | (t1[n] < lo) | (t1[n] > hi) | bad0
        t = np.clip(np.nan_to_num(t1[n], nan=hi, posinf=hi, neginf=lo), lo, hi)
        conc[n] = np.where(mask, (1.0 / t - 1.0 / t10c) / r1, 0.0)
        clipped.append(int((bad & mask).sum()))
    warnings = _clip_warning("t1map", clipped, int(mask.sum()),
                             f"T1 or T1_0 <= 0, non-finite or outside [{lo:g}, {hi:g}] s")
    meta = {
        "route": "t1map",
        "equation": "C = (1/r1) (1/T1 - 1/T1_0)",
        "T1_0": "baseline session's T1 map",
        "r1_L_per_mmol_s": r1,
        "T1_range_s": [lo, hi],
        "clipped_voxels_per_session": clipped,
        "outside_mask": "set to 0",
    }
    return Conversion("t1map", conc, "mmol/L", clipped, meta, warnings)


def convert_t1w(signal_series, seq, baseline_index: int, r1: float, mask, t1_0=None,
                t1_0_assumed: float | None = None, t1_0_note: str = "",
                t1_range=(T1_MIN_S, T1_MAX_S)) -> Conversion:
    """Route ``t1w``: SPGR M0 from the baseline session, T1 per voxel and session, then C.

    Args:
        signal_series: (p, ni, nj, nk) T1-weighted signal per session (arbitrary units).
        seq: per session ``(TR_s, flip_deg)``; sessions may differ.
        baseline_index: which session is the pre-contrast baseline.
        r1: relaxivity in L/(mmol s).
        mask: (ni, nj, nk) bool.
        t1_0: (ni, nj, nk) baseline T1 map in s, or None to use ``t1_0_assumed``.
        t1_0_assumed: an assumed uniform T1_0 in s (flagged in meta and warnings).
        t1_0_note: where the assumed value comes from (recorded).
    """
    lo, hi = t1_range
    mask = np.asarray(mask, dtype=bool)
    S = np.asarray(signal_series, dtype=np.float64)
    if t1_0 is None:
        if t1_0_assumed is None:
            raise ValueError("t1w route needs a baseline T1 map or an assumed T1_0")
        t10 = np.full(mask.shape, float(t1_0_assumed))
    else:
        t10 = np.asarray(t1_0, dtype=np.float64)
    bad0 = ~np.isfinite(t10) | (t10 < lo) | (t10 > hi)
    t10 = np.clip(np.nan_to_num(t10, nan=hi, posinf=hi, neginf=lo), lo, hi)
    TRb, FAb = seq[baseline_index]
    M0 = spgr_m0(S[baseline_index], t10, TRb, FAb)
    badm0 = ~np.isfinite(M0) | (M0 <= 0)
    conc = np.empty_like(S)
    clipped = []
    for n in range(S.shape[0]):
        TR, FA = seq[n]
        if n == baseline_index:
            t1, bad = t10, np.zeros(mask.shape, dtype=bool)
        else:
            t1, bad = spgr_t1(S[n], M0, TR, FA, lo, hi)
        bad = bad | bad0 | badm0
        conc[n] = np.where(mask & ~badm0, (1.0 / t1 - 1.0 / t10) / r1, 0.0)
        clipped.append(int((bad & mask).sum()))
    warnings = _clip_warning("t1w", clipped, int(mask.sum()),
                             "signal at or above the SPGR maximum M0 sin(a), signal <= 0, baseline signal "
                             f"<= 0, or T1 outside [{lo:g}, {hi:g}] s")
    meta = {
        "route": "t1w",
        "equation": "S = M0 sin(a) (1 - E1) / (1 - cos(a) E1), E1 = exp(-TR/T1); "
                    "M0 from the baseline T1w and T1_0; T1 = -TR / ln((1 - y)/(1 - y cos a)), "
                    "y = S/(M0 sin a); C = (1/r1)(1/T1 - 1/T1_0)",
        "sequence": "spoiled gradient echo (steady state), TE and T2* assumed equal across sessions",
        "repetition_time_s": [float(s[0]) for s in seq],
        "flip_angle_deg": [float(s[1]) for s in seq],
        "r1_L_per_mmol_s": r1,
        "T1_range_s": [lo, hi],
        "clipped_voxels_per_session": clipped,
        "outside_mask": "set to 0",
    }
    if t1_0 is None:
        meta["T1_0"] = "assumed"
        meta["T1_0_assumed_s"] = float(t1_0_assumed)
        meta["T1_0_source"] = t1_0_note
        msg = (f"t1w: no baseline T1 map, so T1_0 = {float(t1_0_assumed):g} s was ASSUMED in every voxel "
               f"({t1_0_note}); concentrations scale with this guess")
        log.warning(msg)
        warnings.append(msg)
    else:
        meta["T1_0"] = "baseline session's T1 map"
    return Conversion("t1w", conc, "mmol/L", clipped, meta, warnings)


def convert_enhancement(signal_series, baseline_index: int, mask) -> Conversion:
    """Route ``enhancement``: (S - S_0)/S_0, proportional to concentration only, NOT in mmol/L.

    A voxel whose baseline signal is <= 0 has no enhancement: set to 0 and counted.
    """
    mask = np.asarray(mask, dtype=bool)
    S = np.asarray(signal_series, dtype=np.float64)
    S0 = S[baseline_index]
    bad = ~np.isfinite(S0) | (S0 <= 0)
    conc = np.empty_like(S)
    clipped = []
    for n in range(S.shape[0]):
        with np.errstate(divide="ignore", invalid="ignore"):
            e = np.where(bad, 0.0, (S[n] - S0) / np.where(bad, 1.0, S0))
        badn = bad | ~np.isfinite(S[n])
        conc[n] = np.where(mask & ~badn, e, 0.0)
        clipped.append(int((badn & mask).sum()))
    warnings = _clip_warning("enhancement", clipped, int(mask.sum()), "baseline signal <= 0 or non-finite")
    msg = ("enhancement: relative signal enhancement (S - S_0)/S_0 is only PROPORTIONAL to concentration "
           "(and only while the signal is linear in it): values are not in mmol/L, and D estimates are "
           "unaffected by the scale but not by the non-linearity")
    warnings.append(msg)
    meta = {
        "route": "enhancement",
        "equation": "E = (S - S_0) / S_0",
        "units_note": "dimensionless; proportional to concentration, not in mmol/L",
        "clipped_voxels_per_session": clipped,
        "outside_mask": "set to 0",
    }
    return Conversion("enhancement", conc, "1", clipped, meta, warnings)
