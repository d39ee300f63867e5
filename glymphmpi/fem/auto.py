"""Settings chosen from the data: data scale, noise level, time step, memory, regularisation scale, interval for D.

Everything here is pure numpy on arrays that every rank holds (the subject's
scans and mask) or on global numbers, so it is light and testable without
DOLFINx. The driver that runs the solves is :func:`glymphmpi.fem.solve.estimate`.

Regularisation path (``fem.regularization = "auto"``): the weights keep the
ratios of (alpha, beta, gamma) and get a common scale s, tried on the decades
``PATH_SCALES`` from strong to weak, each solve warm-started from the last
(variable projection, which converges at every scale; L-BFGS on (D, g) crawls
at weak ones). The data are divided by their robust intensity first, so s
means the same for any units.

- Morozov's discrepancy principle when the noise level sigma is known (the
  pre-contrast scan, taken at or before the injection, time <= 0 h, is
  concentration zero plus noise: sigma = its upper quartile / 0.6745 over the
  mask, which holds whether or not negative values were clipped to 0; or
  ``fem.noise_sigma``): the largest s whose misfit reaches
  ``sigma^2 * sum_{scans i >= 1} (mass of the interior nodes)`` (the boundary
  values at the scan times are controls and fit their noise), refined by one
  solve at the scale interpolated in log-log between the bracketing decades.
  If even the weakest scale misfits more (model error dominates), the weakest
  is used and the summary says so. Noise-free data (sigma = 0) go straight
  to the weakest scale (after one warm-up decade).
- The L-curve when there is no pre-contrast scan: every decade is solved and
  the corner (largest Menger curvature of (log misfit, log R/s)) is chosen;
  the interval then takes sigma from the residual at the corner
  (misfit / (interior mass x (scans - 1))).

Interval for D: a Laplace approximation of the reduced functional
j(D) = min_g J(D, g) (g eliminated as in the projection optimiser): with i.i.d.
voxel noise of variance sigma^2 and the lumped mass of a voxel v (mm^3),
-log p = J / (2 sigma^2 v), so var(delta) = 2 sigma^2 v / j''(delta) and
sd(D) = |dD/ddelta| sd(delta), j'' from a central difference of dj/ddelta.
The noise part alone ignores the bias of the regularisation and of the time
discretisation, which dominates at low noise; so the interval is widened by
a measured sensitivity: b = max(|D(dt/2) - D|, half the change of D over the
decade of s around the chosen scale), and reported as
[D - 1.96 sd - b, D + 1.96 sd + b].
"""

from __future__ import annotations

import math

import numpy as np

from glymphmpi.errors import InputError
from glymphmpi.parallel import available_memory_bytes

PATH_SCALES = (1.0, 1e-1, 1e-2, 1e-3, 1e-4)
#: shortest scan spacing / this = the automatic time step (1 h for the phantoms' 7 h spacing)
STEPS_PER_SPACING = 7
#: bytes per (time step x mesh node) held at once: the states of the forward solve, the last
#: evaluation's copy, the fit at scans and the adjoint's work arrays (float64), measured ~5
BYTES_PER_STEP_NODE = 8 * 6


def data_scale(scans: np.ndarray, mask: np.ndarray, where=None) -> float:
    """Robust intensity of the scans inside the mask (99th percentile of |value|), > 0 and finite.

    The FEM divides the scans by it before fitting and multiplies its
    concentration outputs back, so that D and every stopping test are the same
    for any units of the images.
    """
    vals = np.abs(np.asarray(scans)[:, np.asarray(mask, dtype=bool)])
    if not np.all(np.isfinite(vals)):
        raise InputError("the scans hold NaN or Inf values inside the mask", where)
    s = float(np.percentile(vals, 99.0))
    if not s > 0:
        s = float(vals.max())
    if not (s > 0 and math.isfinite(s)):
        raise InputError("the scans are zero everywhere inside the mask: nothing to fit", where)
    return s


def noise_level(times_h, scans: np.ndarray, mask: np.ndarray, given: float | None, scale: float):
    """(sigma in scaled units or None, rule) for the discrepancy principle.

    Args:
        times_h: scan times (h after injection).
        scans: (p, ni, nj, nk) in the input's units.
        given: ``fem.noise_sigma`` in the input's units, or None.
        scale: :func:`data_scale`.
    """
    if given is not None:
        return float(given) / scale, f"fem.noise_sigma = {given:g} (given)"
    if float(times_h[0]) <= 0.0:
        v = np.asarray(scans[0])[np.asarray(mask, dtype=bool)].astype(np.float64)
        # upper quartile of zero-median noise = 0.6745 sigma; unaffected by the loader's clipping of
        # negative values to 0 (which changes everything below the median)
        sigma = float(np.percentile(v, 75.0)) / 0.6745
        sigma = max(sigma, 0.0)
        return sigma / scale, (f"pre-contrast scan (t = {float(times_h[0]):g} h): sigma = upper quartile / 0.6745 "
                               f"= {sigma:.4g} in the data's units")
    return None, "no pre-contrast scan (first scan after the injection): noise level unknown"


def auto_dt(times_h) -> float:
    """The time step that follows the scans: the shortest spacing / STEPS_PER_SPACING."""
    return float(np.min(np.diff(np.asarray(times_h, dtype=np.float64)))) / STEPS_PER_SPACING


def count_steps(times_h, dt_h: float, t_end_h: float | None = None) -> int:
    """Number of time steps of :meth:`TimeGrid.build` without building it (float, may be huge)."""
    t = np.asarray(times_h, dtype=np.float64)
    if t_end_h is not None and t_end_h > t[-1]:
        t = np.append(t, t_end_h)
    return int(np.sum(np.maximum(1.0, np.ceil(np.diff(t) / dt_h - 1e-9))))


def memory_estimate_bytes(n_steps: int, n_nodes: int, n_boundary: int) -> float:
    """Memory of one estimation (all ranks together): the time series of the states and of g."""
    return float(n_steps + 1) * (BYTES_PER_STEP_NODE * n_nodes + 8 * 8 * n_boundary)


def check_memory(times_h, dt_h: float, t_end_h, mask: np.ndarray, where="fem.dt_h") -> int:
    """Refuse settings whose time series would not fit in memory (before anything is allocated).

    Returns:
        the number of time steps.
    Raises:
        InputError: one line with the estimate.
    """
    n = count_steps(times_h, dt_h, t_end_h)
    m = np.asarray(mask, dtype=bool)
    n_nodes = int(m.sum())
    n_boundary = int((m & ~_erode(m)).sum())
    need = memory_estimate_bytes(n, n_nodes, n_boundary)
    have = available_memory_bytes()
    if need > 0.8 * have:
        raise InputError(f"dt_h = {dt_h:g} h gives {n:,} time steps on {n_nodes:,} nodes: the FEM needs about "
                         f"{need / 2**30:,.1f} GiB, more than the {have / 2**30:,.1f} GiB available; "
                         f"use a larger fem.dt_h", where)
    return n


def _erode(m: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_erosion(m, structure=np.ones((3, 3, 3), dtype=bool), border_value=0)


def morozov_pick(records: list, target: float) -> tuple[float | None, str]:
    """Scale where the misfit crosses ``target`` (log-log interpolation between decades).

    Args:
        records: [{"scale", "misfit", ...}] in the order solved (decreasing scale).
    Returns:
        (scale to refine at, or None if the crossing is exactly at a record / not reached; rule text).
    """
    for k, r in enumerate(records):
        if r["misfit"] <= target:
            if k == 0:
                return None, "misfit below the noise level already at the strongest scale"
            a, b = records[k - 1], r
            la, lb = math.log(a["misfit"]), math.log(max(b["misfit"], 1e-300))
            t = (math.log(target) - la) / (lb - la) if lb != la else 1.0
            s = math.exp(math.log(a["scale"]) + t * (math.log(b["scale"]) - math.log(a["scale"])))
            return s, "discrepancy principle (Morozov): misfit = noise level"
    return None, "discrepancy not reached: even the weakest scale misfits more than the noise (model error)"


def lcurve_pick(records: list) -> int:
    """Index of the L-curve corner: largest Menger curvature of (log misfit, log R/s) at interior points."""
    pts = np.array([[math.log(max(r["misfit"], 1e-300)), math.log(max(r["R"] / r["scale"], 1e-300))]
                    for r in records])
    best, kbest = -math.inf, len(records) // 2
    for k in range(1, len(records) - 1):
        a, b, c = pts[k - 1], pts[k], pts[k + 1]
        area2 = (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])
        den = np.linalg.norm(b - a) * np.linalg.norm(c - b) * np.linalg.norm(c - a)
        kappa = -2.0 * area2 / den if den > 0 else 0.0  # a corner of an L (convex toward the origin) is > 0
        if kappa > best:
            best, kbest = kappa, k
    return kbest


def interval(D: float, sd: float, bias: float) -> list:
    """[lo, hi] = D -+ (1.96 sd + bias)."""
    w = 1.96 * sd + bias
    return [D - w, D + w]
