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
(14 loops, default margin 6) at most 2.9e-5 of a loop's mass jumped as far as a crop edge; the earlier
test (any particle jumping more than margin - 1 voxels, anywhere in the box) counted up to 4.7e-3 and,
for any mass at all, asked for margins of up to 38 voxels, a box nearly the whole grid."""


def edge_distance(box: tuple, shape: tuple) -> np.ndarray:
    """(box shape) distance in voxels from each voxel of the box to the nearest of its faces that lies
    inside the grid (a crop edge: the first voxel beyond it is outside the box), inf where the box has
    no such face (a face on the grid's own boundary is not a crop edge)."""
    n = [b.stop - b.start for b in box]
    dist = np.full(n, np.inf)
    for d, b in enumerate(box):
        idx = np.arange(n[d], dtype=np.float64)
        sh = [1, 1, 1]
        sh[d] = n[d]
        if b.start > 0:
            dist = np.minimum(dist, (idx + 1.0).reshape(sh))
        if b.stop < shape[d]:
            dist = np.minimum(dist, (n[d] - idx).reshape(sh))
    return dist


def mass_at_risk(velocity: np.ndarray, density: np.ndarray, dt: float, margin: int, dist: np.ndarray,
                 tolerance: float = 0.0) -> tuple[float, int]:
    """(share, margin needed) of a loop solved on a cropped box: the share of the mass carried by
    particles whose jump in one step (``dt max_d |v_d|``, voxels) reaches their distance to the
    nearest crop edge (``dist``: :func:`edge_distance` of the box), and the smallest ``crop_margin``
    under which at most ``tolerance`` of the mass would (a margin larger by m moves every crop edge
    m voxels further; ``margin`` itself when it suffices). Particles without mass do not count."""
    excess, masses = [], []
    for k in range(velocity.shape[0]):
        jump = dt * np.abs(velocity[k]).max(axis=0)
        carrying = density[k] > 0
        excess.append((jump[carrying] - dist[carrying]).ravel())  # >= 0: may reach the edge
        masses.append(density[k][carrying].ravel().astype(np.float64))
    total = float(density[0].sum(dtype=np.float64))
    e, m = np.concatenate(excess), np.concatenate(masses)
    share = float(m[e >= 0].sum()) / total if total > 0 else 0.0
    need = int(margin)
    if e.size:
        order = np.argsort(-e, kind="stable")
        over = np.flatnonzero(np.cumsum(m[order]) > tolerance * total)
        if over.size and e[order[over[0]]] >= 0:  # the first particle past the tolerated mass must stay inside
            need = int(margin) + int(np.floor(e[order[over[0]]])) + 1
    return share, need
