"""Exact solutions for tests and benchmarks: the 3D heat kernel on a box of voxels.

``c(x, t) = (tau / (t + tau))^{3/2} exp(-|x - x0|^2 / (4 D (t + tau)))`` solves
``dc/dt = D lap c`` in all of R^3 (peak 1 at t = 0); restricted to a box it is
the solution with its own values as boundary data.
"""

from __future__ import annotations

import numpy as np


def heat_kernel(xyz: np.ndarray, t, D: float, x0, tau: float) -> np.ndarray:
    """c at (..., 3) points (mm) and times t (h, broadcastable)."""
    r2 = ((np.asarray(xyz) - np.asarray(x0)) ** 2).sum(-1)
    s = np.asarray(t) + tau
    return (tau / s) ** 1.5 * np.exp(-r2 / (4.0 * D * s))


def heat_kernel_box(n: int = 10, D: float = 0.5, times_h=(0.0, 1.0, 2.0, 4.0), tau: float = 2.0,
                    voxel_mm: float = 1.0, noise: float = 0.0, seed: int = 0, x0=None):
    """Scans of the heat kernel on an n^3 box of voxels (full mask).

    Returns:
        (scans (p, n, n, n), mask (n, n, n) bool, affine (4, 4), times (p,)).
    """
    affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 20.0]  # an offset, so that scaling is exercised
    ijk = np.stack(np.meshgrid(*(np.arange(n),) * 3, indexing="ij"), -1).astype(np.float64)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    if x0 is None:
        x0 = xyz.reshape(-1, 3).mean(0)
    times = np.asarray(times_h, dtype=np.float64)
    scans = np.stack([heat_kernel(xyz, t, D, x0, tau) for t in times])
    if noise > 0:
        scans = scans + noise * np.random.default_rng(seed).standard_normal(scans.shape)
    return scans, np.ones((n, n, n), bool), affine, times
