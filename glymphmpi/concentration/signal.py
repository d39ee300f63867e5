"""Spoiled gradient echo (SPGR, FLASH) steady-state signal and its closed-form inversions.

    S = M0 sin(a) (1 - E1) / (1 - cos(a) E1),   E1 = exp(-TR / T1)

(Ernst; e.g. Bernstein, King & Zhou, Handbook of MRI Pulse Sequences, 2004, eq. 14.15,
with T2* decay folded into M0, which cancels because TE is fixed between sessions.)
Solving for E1 with y = S / (M0 sin a):

    E1 = (1 - y) / (1 - y cos a)

which is in (0, 1), i.e. a positive finite T1, exactly when 0 < y < 1: a signal at or above
M0 sin(a) (the model's maximum, reached as T1 -> 0) or at or below zero has no solution.
All functions are elementwise on numpy arrays; times in seconds, angles in degrees.
"""

from __future__ import annotations

import numpy as np


def spgr_signal(M0, T1_s, TR_s: float, flip_deg: float) -> np.ndarray:
    """SPGR steady-state signal.

    Args:
        M0: equilibrium magnetisation (any shape, arbitrary units; includes receive gain and T2*).
        T1_s: longitudinal relaxation time in s (broadcasts with M0), > 0.
        TR_s: repetition time in s.
        flip_deg: flip angle in degrees.
    """
    a = np.deg2rad(flip_deg)
    E1 = np.exp(-TR_s / np.asarray(T1_s, dtype=np.float64))
    return np.asarray(M0, dtype=np.float64) * np.sin(a) * (1.0 - E1) / (1.0 - np.cos(a) * E1)


def spgr_m0(S, T1_s, TR_s: float, flip_deg: float) -> np.ndarray:
    """M0 from a signal S and a known T1 (the baseline session): the inverse of :func:`spgr_signal` in M0."""
    a = np.deg2rad(flip_deg)
    E1 = np.exp(-TR_s / np.asarray(T1_s, dtype=np.float64))
    return np.asarray(S, dtype=np.float64) * (1.0 - np.cos(a) * E1) / (np.sin(a) * (1.0 - E1))


def spgr_t1(S, M0, TR_s: float, flip_deg: float, t1_min_s: float, t1_max_s: float):
    """T1 per voxel from the signal and M0, in closed form, clipped to [t1_min_s, t1_max_s].

    Args:
        S: signal (any shape).
        M0: equilibrium magnetisation (broadcasts with S).
        TR_s, flip_deg: the sequence of this session.
        t1_min_s, t1_max_s: the range a solution is kept in; voxels without a solution
            (y >= 1: signal above the model's maximum; y <= 0) or outside it are clipped.

    Returns:
        (T1 in s, bool array: True where the voxel had no solution in range and was clipped).
    """
    a = np.deg2rad(flip_deg)
    S = np.asarray(S, dtype=np.float64)
    M0 = np.broadcast_to(np.asarray(M0, dtype=np.float64), S.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = S / (M0 * np.sin(a))
        E1 = (1.0 - y) / (1.0 - y * np.cos(a))
        T1 = -TR_s / np.log(E1)
    ok = np.isfinite(y) & (y > 0) & (y < 1) & np.isfinite(T1) & (T1 >= t1_min_s) & (T1 <= t1_max_s)
    # no solution in range: a signal at/above the model's maximum, or a T1 below the range, is
    # clipped to t1_min (strongest enhancement); a signal <= 0, NaN or a T1 above the range to t1_max
    low = ~ok & ((np.isfinite(y) & (y >= 1)) | (np.isfinite(T1) & (T1 > 0) & (T1 < t1_min_s) & (y > 0)))
    out = np.where(ok, T1, np.where(low, t1_min_s, t1_max_s))
    return out, ~ok
