"""Lagrangian analysis of rOMT velocity fields: pathlines, speed and Peclet along them.

All positions are in voxel index space (voxel centres at integers, axes
i, j, k as nibabel gives them); velocities in voxels per model time, as the
rOMT solver writes them; densities in image units.

The rOMT transport solves ``d rho/dt + div(rho v) = sigma Lap rho`` in model
steps of length ``dt`` (advection by ``dt * v_k``, then diffusion). Written
as a pure continuity equation, mass moves with the *augmented velocity*

    u = v - sigma grad(log rho)

so a particle moved by ``u`` for one model step of length ``dt`` travels what
the transport moves mass in that step: with a constant ``v`` and no density
gradient, ``nt`` steps move it by exactly ``nt * dt * v`` (no extra factor).

Pathlines of all seeds are integrated together (numpy, no per-particle loop)
with trilinear interpolation in space; inside a model step the rOMT velocity
is constant (as solved) and the diffusive part is constant (mean of both end
densities) or linear in time between the two end densities.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)

# ----------------------------------------------------------------- fields


def grad_log_density(rho: np.ndarray, floor: float) -> np.ndarray:
    """Guarded ``grad log rho`` by central differences (one-sided at the box edge).

    Args:
        rho: (ni, nj, nk) density.
        floor: absolute density below which the gradient is set to zero (and
            below which ``log`` is never taken: values are clipped to it).
    Returns:
        (3, ni, nj, nk) float32, per voxel (1/voxel).
    """
    r = np.asarray(rho, dtype=np.float64)
    floor = max(float(floor), np.finfo(np.float64).tiny)
    logr = np.log(np.maximum(r, floor))
    out = np.empty((3,) + r.shape, dtype=np.float32)
    for d in range(3):
        if r.shape[d] < 2:
            out[d] = 0.0
        else:
            out[d] = np.gradient(logr, axis=d)
    out[:, r < floor] = 0.0
    return out


@dataclass
class Step:
    """One model step of the field sequence.

    Attributes:
        v: (3, ni, nj, nk) rOMT velocity of the step, voxels per model time.
        rho0: (ni, nj, nk) density at the start of the step.
        rho1: (ni, nj, nk) density at its end.
        key0, key1: hashable names of the two densities (to reuse gradients).
        dt: model time of the step.
        sigma: diffusion coefficient, voxel^2 per model time.
        hours_per_model_time: converts model time to hours.
        t0_h: time of the step's start in hours.
    """

    v: np.ndarray
    rho0: np.ndarray
    rho1: np.ndarray
    key0: tuple
    key1: tuple
    dt: float
    sigma: float
    hours_per_model_time: float
    t0_h: float


class StepSource(Protocol):
    """A sequence of model steps (see :class:`Step`)."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Step]: ...


class ArraySteps:
    """Steps from in-memory arrays (one or more loops), for tests and small runs.

    Args:
        loops: list of (velocity (nt, 3, ni, nj, nk), density (nt+1, ni, nj, nk),
            t0_h, t1_h).
        dt: model time per step.
        sigma: voxel^2 per model time.
    """

    def __init__(self, loops: Sequence[tuple], dt: float, sigma: float):
        self.loops = list(loops)
        self.dt = float(dt)
        self.sigma = float(sigma)

    def __len__(self) -> int:
        return sum(v.shape[0] for v, *_ in self.loops)

    def __iter__(self) -> Iterator[Step]:
        for li, (v, rho, t0, t1) in enumerate(self.loops):
            nt = v.shape[0]
            hpm = (t1 - t0) / (nt * self.dt)
            for k in range(nt):
                yield Step(v[k], rho[k], rho[k + 1], (li, k), (li, k + 1), self.dt, self.sigma, hpm,
                           t0 + k * self.dt * hpm)


# ----------------------------------------------------------------- interpolation


def _corners(x: np.ndarray, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices (8, n) and trilinear weights (8, n) float32 of points x (n, 3).

    Points outside the box are clamped to it (constant extension).
    """
    ni, nj, nk = shape
    hi = np.array([ni - 1, nj - 1, nk - 1], dtype=np.float64)
    xc = np.clip(x, 0.0, hi)
    base = np.minimum(np.floor(xc), np.maximum(hi - 1, 0))
    w = (xc - base).astype(np.float32)  # (n, 3) in [0, 1]
    base = base.astype(np.int64)
    strides = np.array([nj * nk, nk, 1], dtype=np.int64)
    flat0 = base @ strides
    # a unit step along an axis of length 1 stays on the same voxel
    step = np.where(hi > 0, strides, 0)
    w0, w1, w2 = w[:, 0], w[:, 1], w[:, 2]
    u0, u1, u2 = 1 - w0, 1 - w1, 1 - w2
    idx = np.empty((8, x.shape[0]), dtype=np.int64)
    wts = np.empty((8, x.shape[0]), dtype=np.float32)
    for c in range(8):
        bi, bj, bk = (c >> 2) & 1, (c >> 1) & 1, c & 1
        idx[c] = flat0 + (bi * step[0] + bj * step[1] + bk * step[2])
        wts[c] = (w0 if bi else u0) * (w1 if bj else u1) * (w2 if bk else u2)
    return idx, wts


def interpolate(channels: Sequence[np.ndarray], corners: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Trilinear interpolation of flat channels at precomputed corners.

    Args:
        channels: C arrays of shape (ni * nj * nk,) (C order; float32 for speed).
        corners: ``_corners(x, shape)`` of the n points.
    Returns:
        (n, C) float64.
    """
    idx, wts = corners
    out = np.empty((idx.shape[1], len(channels)), dtype=np.float64)
    for c, ch in enumerate(channels):
        out[:, c] = np.einsum("cn,cn->n", ch.take(idx), wts)
    return out


def trilinear(field: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Trilinear interpolation of a channels-last field (ni, nj, nk, C) at x (n, 3): (n, C)."""
    f = np.asarray(field)
    chans = [np.ascontiguousarray(f[..., c]).ravel() for c in range(f.shape[3])]
    return interpolate(chans, _corners(np.asarray(x, dtype=np.float64), f.shape[:3]))


# ----------------------------------------------------------------- integrators

# Butcher-style tables: (stage time fractions, stage coefficients, final weights)
_SCHEMES = {
    "euler": ((0.0,), ((),), (1.0,)),
    "rk2": ((0.0, 0.5), ((), (0.5,)), (0.0, 1.0)),
    "rk4": ((0.0, 0.5, 0.5, 1.0), ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
            (1 / 6, 1 / 3, 1 / 3, 1 / 6)),
}


def integrator_names() -> list[str]:
    return sorted(_SCHEMES)


def _scheme(name: str):
    if name not in _SCHEMES:
        raise ValueError(f"unknown integrator {name!r} (valid: {', '.join(integrator_names())})")
    return _SCHEMES[name]


# ----------------------------------------------------------------- tracing


@dataclass
class TraceSettings:
    """Numerical settings of :func:`trace` (see RomtPostConfig for meanings)."""

    integrator: str = "rk2"
    substeps: int = 1
    time_interpolation: str = "linear"
    log_density_floor: float = 1e-4
    stop_density_fraction: float = 1e-3
    stop_speed_mm_per_h: float = 1e-6


@dataclass
class Pathlines:
    """All traced pathlines, padded to a common length.

    Attributes:
        positions: (n_nodes, n, 3) float32 voxel-index positions at the model
            step nodes; rows past a line's end repeat its last point.
        n_points: (n,) number of valid nodes of each line (>= 1).
        speed_mm_per_h: (n_nodes, n) float32 |v| (rOMT velocity) at each node.
        diffusive_mm_per_h: (n_nodes, n) float32 |sigma grad log rho| at each node.
        flux_speed_mm_per_h: (n_nodes, n) float32 |v - sigma grad log rho|.
        times_h: (n_nodes,) time of each node in hours.
        seeds: (n, 3) float64 start positions.
        stop_reason: (n,) int8: 0 ran to the end, 1 density, 2 speed, 3 left
            the mask.
    """

    positions: np.ndarray
    n_points: np.ndarray
    speed_mm_per_h: np.ndarray
    diffusive_mm_per_h: np.ndarray
    flux_speed_mm_per_h: np.ndarray
    times_h: np.ndarray
    seeds: np.ndarray
    stop_reason: np.ndarray
    stats: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.positions.shape[1])

    @property
    def peclet(self) -> np.ndarray:
        """(n_nodes, n) Pe = |v| / |sigma grad log rho|; NaN where there is no diffusion."""
        with np.errstate(divide="ignore", invalid="ignore"):
            pe = self.speed_mm_per_h / self.diffusive_mm_per_h
        pe[~(self.diffusive_mm_per_h > 0)] = np.nan
        return pe

    def valid(self) -> np.ndarray:
        """(n_nodes, n) bool: node j of line p is a real point."""
        return np.arange(self.positions.shape[0])[:, None] < self.n_points[None, :]

    def ends(self) -> np.ndarray:
        """(n, 3) last valid position of each line."""
        return self.positions[self.n_points - 1, np.arange(self.n)].astype(np.float64)

    def subset(self, keep: np.ndarray) -> Pathlines:
        """The lines selected by a boolean or index array (same nodes)."""
        return Pathlines(self.positions[:, keep], self.n_points[keep], self.speed_mm_per_h[:, keep],
                         self.diffusive_mm_per_h[:, keep], self.flux_speed_mm_per_h[:, keep],
                         self.times_h, self.seeds[keep], self.stop_reason[keep], dict(self.stats))

    @staticmethod
    def concatenate(parts: Sequence[Pathlines]) -> Pathlines:
        """Join line sets traced over the same nodes (e.g. from several MPI ranks)."""
        parts = [p for p in parts if p is not None]
        cat = np.concatenate
        return Pathlines(cat([p.positions for p in parts], axis=1), cat([p.n_points for p in parts]),
                         cat([p.speed_mm_per_h for p in parts], axis=1),
                         cat([p.diffusive_mm_per_h for p in parts], axis=1),
                         cat([p.flux_speed_mm_per_h for p in parts], axis=1), parts[0].times_h,
                         cat([p.seeds for p in parts]), cat([p.stop_reason for p in parts]),
                         dict(parts[0].stats))


def _inside(mask: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(n,) bool: the nearest voxel of x (n, 3) lies in the box and the mask."""
    r = np.rint(x).astype(np.int64)
    shp = np.array(mask.shape)
    ok = np.all((r >= 0) & (r < shp), axis=1)
    out = np.zeros(x.shape[0], dtype=bool)
    rr = r[ok]
    out[ok] = mask[rr[:, 0], rr[:, 1], rr[:, 2]]
    return out


def trace(steps: StepSource, seeds: np.ndarray, mask: np.ndarray, voxel_size_mm: np.ndarray,
          settings: TraceSettings | None = None, rho_max: float | None = None) -> Pathlines:
    """Integrate the pathlines of the augmented velocity from all seeds at once.

    Args:
        steps: the model steps in time order (all loops).
        seeds: (n, 3) voxel-index start positions (at the first step's start).
        mask: (ni, nj, nk) bool; particles never leave it (a step that would end
            outside it is not taken and the particle stops).
        voxel_size_mm: (3,) voxel sizes, to convert speeds to mm/h.
        settings: numerical settings.
        rho_max: reference density for the floors; default the maximum of the
            first step's start density (pass the global maximum when known).
    Returns:
        :class:`Pathlines` with ``len(steps) + 1`` nodes.
    """
    s = settings or TraceSettings()
    c_time, c_stage, c_weights = _scheme(s.integrator)
    mask = np.asarray(mask, dtype=bool)
    shape = mask.shape
    vox = np.asarray(voxel_size_mm, dtype=np.float64)
    n_steps = len(steps)
    n = int(seeds.shape[0])
    n_nodes = n_steps + 1
    pos = np.empty((n_nodes, n, 3), dtype=np.float32)
    spd = np.zeros((n_nodes, n), dtype=np.float32)
    dif = np.zeros((n_nodes, n), dtype=np.float32)
    flx = np.zeros((n_nodes, n), dtype=np.float32)
    times = np.zeros(n_nodes)
    x = np.asarray(seeds, dtype=np.float64).copy()
    pos[0] = x
    alive = np.ones(n, dtype=bool)
    n_points = np.ones(n, dtype=np.int64)
    reason = np.zeros(n, dtype=np.int8)
    grads: dict = {}
    end_f = None
    last = None
    for j, st in enumerate(steps):
        times[j] = st.t0_h
        if j > 0 and not alive.any():  # every line has ended: only the clock goes on
            pos[j + 1] = pos[j]
            last = st
            continue
        if rho_max is None:
            rho_max = float(np.max(st.rho0))
        floor = s.log_density_floor * rho_max
        stop_rho = s.stop_density_fraction * rho_max
        sig = np.float32(st.sigma)
        for key, rho in ((st.key0, st.rho0), (st.key1, st.rho1)):
            if key not in grads:  # sigma grad log rho, (3, N) float32
                grads[key] = (grad_log_density(rho, floor) * sig).reshape(3, -1)
        grads = {k: g for k, g in grads.items() if k in (st.key0, st.key1)}
        d0, d1 = grads[st.key0], grads[st.key1]
        v = np.asarray(st.v, dtype=np.float32).reshape(3, -1)
        node_f = [v[0], v[1], v[2], d0[0], d0[1], d0[2], np.asarray(st.rho0, dtype=np.float32).ravel()]
        stage_f: dict = {}  # step fraction theta -> [3 x (N,)] augmented velocity

        def u_at(theta: float, v=v, d0=d0, d1=d1, stage_f=stage_f) -> list:
            th = 0.5 if s.time_interpolation == "constant" else float(theta)
            if th not in stage_f:
                u = v - ((1.0 - th) * d0 + th * d1)
                stage_f[th] = [u[0], u[1], u[2]]
            return stage_f[th]

        scale = vox / st.hours_per_model_time  # voxel/model time -> mm/h per axis
        last = st

        act = np.nonzero(alive)[0]
        xa = x[act]
        cor = _corners(xa, shape)
        f0 = interpolate(node_f, cor)
        v0, dd0, rho0 = f0[:, 0:3], f0[:, 3:6], f0[:, 6]
        u0 = v0 - dd0 if s.time_interpolation == "linear" else interpolate(u_at(0.5), cor)
        spd[j, act] = np.linalg.norm(v0 * scale, axis=1)
        dif[j, act] = np.linalg.norm(dd0 * scale, axis=1)
        flx[j, act] = np.linalg.norm(u0 * scale, axis=1)
        # stopping rules at the node
        low_rho = rho0 < stop_rho
        slow = flx[j, act] < s.stop_speed_mm_per_h
        reason[act[low_rho]] = 1
        reason[act[slow & ~low_rho]] = 2
        go = ~(low_rho | slow)
        alive[act[~go]] = False
        act, xa = act[go], xa[go]
        if act.size == 0:
            pos[j + 1] = pos[j]
            continue

        h = st.dt / s.substeps
        xn = xa.copy()
        for sub in range(s.substeps):
            ks = []
            for stage, (ct, coef) in enumerate(zip(c_time, c_stage)):
                if stage == 0 and sub == 0:
                    ks.append(u0[go])
                    continue
                xs = xn + h * sum(c * k for c, k in zip(coef, ks)) if coef else xn
                ks.append(interpolate(u_at((sub + ct) / s.substeps), _corners(xs, shape)))
            xn = xn + h * sum(w * k for w, k in zip(c_weights, ks) if w != 0.0)
        ok = _inside(mask, xn)
        x[act[ok]] = xn[ok]
        n_points[act[ok]] += 1
        alive[act[~ok]] = False
        reason[act[~ok]] = 3
        pos[j + 1] = x
        end_f = [v[0], v[1], v[2], d1[0], d1[1], d1[2]]
    if last is not None:
        times[n_steps] = last.t0_h + last.dt * last.hours_per_model_time
        # sample the final nodes with the last step's end fields
        act = np.nonzero(n_points == n_nodes)[0]
        if act.size and end_f is not None:
            f = interpolate(end_f, _corners(x[act], shape))
            scale = vox / last.hours_per_model_time
            spd[n_steps, act] = np.linalg.norm(f[:, 0:3] * scale, axis=1)
            dif[n_steps, act] = np.linalg.norm(f[:, 3:6] * scale, axis=1)
            flx[n_steps, act] = np.linalg.norm((f[:, 0:3] - f[:, 3:6]) * scale, axis=1)
    return Pathlines(pos, n_points, spd, dif, flx, times, np.asarray(seeds, dtype=np.float64), reason,
                     {"n_steps": n_steps, "integrator": s.integrator, "substeps": s.substeps})


# ----------------------------------------------------------------- seeds and cleanup


def select_seeds(rho_max_t: np.ndarray, rho_sum_t: np.ndarray, mask: np.ndarray, rule: str,
                 max_fraction: float, sum_min: float, every: int = 1, max_seeds: int = 0) -> np.ndarray:
    """Seed voxels: inside the mask and passing the threshold rule(s).

    Args:
        rho_max_t: (ni, nj, nk) maximum over the model steps of the density.
        rho_sum_t: (ni, nj, nk) sum over the model steps of the density.
        mask: (ni, nj, nk) bool.
        rule: ``max``, ``sum``, ``both`` or ``either``.
        max_fraction: ``max`` rule: rho_max_t > max_fraction * max(rho_max_t).
        sum_min: ``sum`` rule: rho_sum_t > sum_min.
        every: keep every k-th candidate (C order).
        max_seeds: thin evenly to at most this many (0: no limit).
    Returns:
        (n, 3) float64 voxel indices.
    """
    by_max = rho_max_t > max_fraction * float(np.max(rho_max_t[mask])) if mask.any() else mask
    by_sum = rho_sum_t > sum_min
    sel = {"max": by_max, "sum": by_sum, "both": by_max & by_sum, "either": by_max | by_sum}
    if rule not in sel:
        raise ValueError(f"unknown seed rule {rule!r} (valid: {', '.join(sel)})")
    idx = np.argwhere(sel[rule] & mask)[:: max(1, int(every))]
    if max_seeds and idx.shape[0] > max_seeds:
        idx = idx[np.linspace(0, idx.shape[0] - 1, max_seeds).round().astype(np.int64)]
    return idx.astype(np.float64)


def distinct_points(lines: Pathlines, tol: float = 1e-6) -> np.ndarray:
    """(n,) number of distinct consecutive points of each line (moves > tol voxels)."""
    moved = np.linalg.norm(np.diff(lines.positions, axis=0), axis=2) > tol  # (n_nodes-1, n)
    valid = lines.valid()[1:]
    return 1 + np.count_nonzero(moved & valid, axis=0)


def cleanup(lines: Pathlines, min_points: int, min_distance_voxels: float) -> tuple[Pathlines, dict]:
    """Drop lines with fewer than ``min_points`` distinct points or a start-to-end
    distance (voxel index space) below ``min_distance_voxels``; returns (kept, counts)."""
    npts = distinct_points(lines)
    dist = np.linalg.norm(lines.ends() - lines.positions[0].astype(np.float64), axis=1)
    few = npts < min_points
    short = dist < min_distance_voxels
    keep = ~(few | short)
    return lines.subset(keep), {"dropped_few_points": int(few.sum()),
                                "dropped_short": int((short & ~few).sum()), "kept": int(keep.sum())}


# ----------------------------------------------------------------- maps and flux vectors


def point_maps(lines: Pathlines, mask: np.ndarray, smooth_sigma_voxels: float = 0.0) -> dict:
    """Speed and Pe maps: statistics of all pathline points falling in each voxel.

    Returns:
        dict of (ni, nj, nk) float32 arrays: ``speed`` (mean |v| of the points,
        mm/h), ``peclet`` (mean Pe of the points with a defined Pe),
        ``peclet_ratio`` (sum |v| / sum |sigma grad log rho| of the points),
        ``count`` (points per voxel); voxels without points are 0 (and NaN-free).
    """
    shape = mask.shape
    valid = lines.valid()
    r = np.rint(lines.positions[valid]).astype(np.int64)  # (m, 3) nearest voxels
    np.clip(r, 0, np.array(shape) - 1, out=r)
    flat = np.ravel_multi_index(r.T, shape)
    del r
    inside = mask.ravel()[flat]
    flat = flat[inside]
    n = int(np.prod(shape))
    spd = lines.speed_mm_per_h[valid][inside].astype(np.float64)
    dif = lines.diffusive_mm_per_h[valid][inside].astype(np.float64)
    has_pe = dif > 0
    pe = np.zeros_like(spd)
    pe[has_pe] = spd[has_pe] / dif[has_pe]
    sums = {
        "count": np.bincount(flat, minlength=n).astype(np.float64),
        "speed": np.bincount(flat, spd, minlength=n),
        "pe": np.bincount(flat, pe, minlength=n),
        "pe_count": np.bincount(flat, has_pe.astype(np.float64), minlength=n),
        "dif": np.bincount(flat, dif, minlength=n),
    }
    sums = {k: v.reshape(shape) for k, v in sums.items()}
    if smooth_sigma_voxels > 0:
        from scipy.ndimage import gaussian_filter

        m = mask.astype(np.float64)
        sums = {k: gaussian_filter(v * m, smooth_sigma_voxels, mode="constant") * m for k, v in sums.items()}

    def ratio(a, b):
        out = np.zeros(shape)
        ok = b > 1e-12 * max(float(b.max()), 1e-300)
        out[ok] = a[ok] / b[ok]
        return out.astype(np.float32)

    return {"speed": ratio(sums["speed"], sums["count"]), "peclet": ratio(sums["pe"], sums["pe_count"]),
            "peclet_ratio": ratio(sums["speed"], sums["dif"]), "count": sums["count"].astype(np.float32),
            "has_speed": sums["count"] > 0, "has_pe": sums["pe_count"] > 0,
            "has_pe_ratio": sums["dif"] > 0}


def flux_vectors(lines: Pathlines) -> dict:
    """Start-to-end displacement of each line (voxel index space).

    Returns:
        dict: ``start`` (n, 3), ``end`` (n, 3), ``displacement`` (n, 3) voxels,
        ``mean_speed_mm_per_h`` (n,), ``mean_peclet`` (n,) (NaN where no
        point has a defined Pe).
    """
    start = lines.positions[0].astype(np.float64)
    end = lines.ends()
    valid = lines.valid()
    cnt = valid.sum(axis=0)
    mean_spd = np.where(valid, lines.speed_mm_per_h, 0).sum(axis=0) / np.maximum(cnt, 1)
    pe = lines.peclet
    ok = valid & np.isfinite(pe)
    with np.errstate(invalid="ignore"):
        mean_pe = np.where(ok, pe, 0).sum(axis=0) / ok.sum(axis=0)
    return {"start": start, "end": end, "displacement": end - start, "mean_speed_mm_per_h": mean_spd,
            "mean_peclet": mean_pe}

