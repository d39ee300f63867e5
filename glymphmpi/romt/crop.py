"""The computational box of a loop: crop to the active set and the images' support, and back."""

from __future__ import annotations

import logging

import numpy as np
import scipy.fft

log = logging.getLogger(__name__)


def crop_box(active: np.ndarray, images, margin: int) -> tuple:
    """Slices of the computational box: the bounding box of the active set and of the
    images' support, widened by ``margin`` voxels (negative: the whole grid).

    Outside it nothing moves (v = 0) and there is no mass, so only the diffusion of
    the step could carry mass there: with ``dt sigma`` ~ 1e-3 the share that crosses
    ``margin`` = 6 voxels in nt = 10 steps is below ~1e-13 (C(10, 6) (dt sigma)^6), so
    the cropped solve equals the whole-grid one to round-off while the DCT, the
    dominant cost at brain scale, runs on fewer voxels. A particle would have to
    move more than ``margin - 1`` voxels in one step to reach the crop edge.
    Each side is widened to a fast DCT length (:func:`scipy.fft.next_fast_len`).
    """
    shape = active.shape
    if margin < 0:
        return tuple(slice(0, n) for n in shape)
    occ = active.copy()
    for img in images:
        occ |= img != 0
    box = []
    for d in range(3):
        axes = tuple(e for e in range(3) if e != d)
        idx = np.flatnonzero(occ.any(axis=axes))
        if idx.size == 0:
            return tuple(slice(0, n) for n in shape)
        lo = max(0, int(idx[0]) - margin)
        hi = min(shape[d], int(idx[-1]) + margin + 1)
        length = min(scipy.fft.next_fast_len(hi - lo, real=True), shape[d])
        lo = max(0, min(lo - (length - (hi - lo)) // 2, shape[d] - length))
        box.append(slice(lo, lo + length))
    return tuple(box)


def uncrop(res: dict, box: tuple, shape: tuple, nt: int, margin: int) -> dict:
    """Embed a loop solved on ``box`` into the whole grid (zero velocity and no mass outside); whether
    mass may have reached the box's edge is :func:`mass_at_risk`'s question."""
    out = dict(res)
    vel = np.zeros((nt, 3, *shape), dtype=np.float32)
    vel[(slice(None), slice(None), *box)] = res["velocity"]
    dens = np.zeros((nt + 1, *shape), dtype=np.float32)
    dens[(slice(None), *box)] = res["density"]
    end = np.zeros(shape)
    end[box] = res["rho_end"].reshape(res["density"].shape[1:])
    out.update(velocity=vel, density=dens, rho_end=end.ravel())
    if "source" in res:
        src = np.zeros((nt, *shape), dtype=np.float32)
        src[(slice(None), *box)] = res["source"]
        out["source"] = src
    return out


RISK_TOLERANCE = 1e-3
"""Share of a loop's mass that may have reached the crop edge below which nothing is reported: a tenth
of a percent, below every relative misfit the rat's loops reach (0.007-0.047). On the rOMT authors' rat
(14 loops) 4 loops had particles jump further than the default margin allows, carrying 4e-5 to 1.8e-3
of the mass; the longest jump of *any* particle carrying mass asked for crop margins of up to 38 voxels,
a box nearly the whole grid, for a few parts in ten thousand of the mass."""


def mass_at_risk(velocity: np.ndarray, density: np.ndarray, dt: float, margin: int,
                 tolerance: float = 0.0) -> tuple[float, int]:
    """(share, margin needed): the share of the mass carried by particles that jump further than
    ``margin - 1`` voxels in one step (they could reach the crop edge), and the smallest
    ``crop_margin`` under which at most ``tolerance`` of the mass would (0: no particle carrying
    mass; then the longest such jump + 1, rounded up)."""
    jumps, masses = [], []
    at_risk = 0.0
    for k in range(velocity.shape[0]):
        jump = dt * np.abs(velocity[k]).max(axis=0)
        at_risk += float(density[k][jump > margin - 1].sum(dtype=np.float64))
        carrying = density[k] > 0
        jumps.append(jump[carrying].ravel())
        masses.append(density[k][carrying].ravel().astype(np.float64))
    total = float(density[0].sum(dtype=np.float64))
    j, m = np.concatenate(jumps), np.concatenate(masses)
    need = 1
    if j.size:
        order = np.argsort(-j, kind="stable")
        over = np.flatnonzero(np.cumsum(m[order]) > tolerance * total)
        if over.size:  # the first particle (longest jump first) past the tolerated mass must stay inside
            need = int(np.ceil(j[order[over[0]]])) + 1
    return (at_risk / total if total > 0 else 0.0), need
