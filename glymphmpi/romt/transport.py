"""Particle-in-cell transport step and its derivatives.

One step of a loop (Chen et al.; index space, unit spacing)::

    rho_{k+1} = L^{-1} S(v_k) rho_k

``S(v)`` pushes the mass of each active cell i from its centre x_i to
``y_i = x_i + dt v_i`` and spreads it over the 8 surrounding cell centres with
trilinear weights (a scatter). Cells outside the active set have v = 0 and keep
their mass. ``open`` boundary: a corner outside the box loses its share;
``closed`` (the reference's dTri=1): a particle whose position leaves the box
``[0, n_d - 1]`` in any axis (so that a corner with nonzero weight lies
outside) loses all its mass.

Derivatives (for Gauss-Newton), with ``W_o(w)`` the weight of corner o and
``w = y - floor(y)``: ``d(S(v) rho)/dv_{d,i} = rho_i dt dW_o/dw_d`` at corner o
of particle i. The tangent ``J x`` and the adjoint ``J^T y`` reuse the corner
indices and the per-axis factors stored by :meth:`Transport.linearize`.

Particles (active cells) may be split over MPI ranks: each rank scatters its
own particles and the N-vectors are summed with Allreduce; per-particle
quantities are gathered with Allgatherv. On one rank (``MPI.COMM_SELF``)
everything is local.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from glymphmpi.romt.grid import DiffusionSolver


class ParticleComm:
    """Reductions over the ranks that share one loop's particles.

    Args:
        comm: mpi4py communicator (COMM_SELF: serial; one rank needs no messages).
        m_total: number of particles M.
    """

    def __init__(self, comm, m_total: int):
        self.comm = comm
        self.size, self.rank = comm.size, comm.rank
        base, extra = divmod(m_total, self.size)
        self.counts = np.array([base + (1 if r < extra else 0) for r in range(self.size)], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self.lo = int(self.offsets[self.rank])
        self.hi = int(self.lo + self.counts[self.rank])
        self.m_total = int(m_total)

    @property
    def serial(self) -> bool:
        return self.size == 1

    def allreduce_(self, arr: np.ndarray) -> np.ndarray:
        """Sum a float64 array over ranks in place; returns it."""
        if self.size > 1:
            self.comm.Allreduce(MPI.IN_PLACE, arr, op=MPI.SUM)
        return arr

    def sum(self, x: float) -> float:
        """Sum of a scalar over ranks, identical on every rank (reduced then broadcast)."""
        if self.size == 1:
            return float(x)
        tot = self.comm.reduce(float(x), root=0)
        return float(self.comm.bcast(tot, root=0))

    def bcast(self, obj):
        return obj if self.size == 1 else self.comm.bcast(obj, root=0)

    def allgather(self, local: np.ndarray) -> np.ndarray:
        """(..., M_local) -> (..., M): concatenate the ranks' particle blocks."""
        if self.size == 1:
            return local
        lead = local.shape[:-1]
        r = int(np.prod(lead)) if lead else 1
        send = np.ascontiguousarray(local.reshape(r, -1).T)  # (Ml, r)
        recv = np.empty((self.m_total, r), dtype=local.dtype)
        mpitype = MPI.DOUBLE if local.dtype == np.float64 else MPI.FLOAT
        self.comm.Allgatherv(send, [recv, self.counts * r, self.offsets * r, mpitype])
        return recv.T.reshape(*lead, self.m_total)


@dataclass
class StepData:
    """A linearisation of S(v_k) for this rank's particles (Ml of them).

    Attributes:
        idx: (8 * Ml,) int64 flat corner indices (clipped into the box; an
            outside corner has zero factors), corner-major order (o0, o1, o2).
        b: (3, 2, Ml) trilinear factors per axis and corner side (0 weight
            for an outside corner; closed mode also zeroes a leaving particle).
        s: (3, 2, Ml) derivatives of the factors w.r.t. w_d (+-1 or 0).
    """

    idx: np.ndarray
    b: np.ndarray
    s: np.ndarray

    def weights(self, r: np.ndarray) -> np.ndarray:
        """(8 * Ml,) corner weights times the particle values r (Ml,)."""
        b = self.b
        w = (b[0] * r)[:, None, None, :] * b[1][None, :, None, :] * b[2][None, None, :, :]
        return w.reshape(-1)

    def tangent_weights(self, r: np.ndarray, q: np.ndarray, x: np.ndarray) -> np.ndarray:
        """(8 * Ml,) weights of ``S delta + dS[x]``: r = delta (Ml,), q = dt rho (Ml,), x (3, Ml)."""
        b, s = self.b, self.s
        bx = [s[d] * (q * x[d]) for d in range(3)]  # (2, Ml) each: q x_d dW/dw_d factors
        p01 = (b[0] * r + bx[0])[:, None, :] * b[1][None, :, :] + b[0][:, None, :] * bx[1][None, :, :]
        q01 = b[0][:, None, :] * b[1][None, :, :]
        w = p01[:, :, None, :] * b[2][None, None, :, :] + q01[:, :, None, :] * bx[2][None, None, :, :]
        return w.reshape(-1)

    def gather(self, mu: np.ndarray, q: np.ndarray, want_dv: bool = True):
        """Adjoint of the particle push for the values mu (N,) on the grid.

        Returns:
            st: (Ml,) ``(S^T mu)`` at this rank's particles.
            dv: (3, Ml) ``(dS^T mu)_d = q sum_o dW_o/dw_d mu_o`` (q = dt rho), or None.
        """
        b, s = self.b, self.s
        g = mu[self.idx].reshape(2, 2, 2, -1)
        gb = g[:, :, 0] * b[2][0] + g[:, :, 1] * b[2][1]  # (2, 2, Ml)
        gbb = gb[:, 0] * b[1][0] + gb[:, 1] * b[1][1]  # (2, Ml)
        st = gbb[0] * b[0][0] + gbb[1] * b[0][1]
        if not want_dv:
            return st, None
        gs = g[:, :, 0] * s[2][0] + g[:, :, 1] * s[2][1]
        gsb = gb[:, 0] * s[1][0] + gb[:, 1] * s[1][1]
        gbs = gs[:, 0] * b[1][0] + gs[:, 1] * b[1][1]
        dv = np.empty((3,) + st.shape)
        dv[0] = (gbb[0] * s[0][0] + gbb[1] * s[0][1]) * q
        dv[1] = (gsb[0] * b[0][0] + gsb[1] * b[0][1]) * q
        dv[2] = (gbs[0] * b[0][0] + gbs[1] * b[0][1]) * q
        return st, dv


class Transport:
    """The PIC-plus-diffusion step on a grid with an active set of moving cells.

    Args:
        shape: (ni, nj, nk).
        active_flat: (M,) sorted flat indices of the cells whose velocity is unknown.
        dt: model time per step.
        sigma: diffusion, voxel^2 per model time.
        boundary: ``open`` or ``closed``.
        comm: communicator whose ranks split the particles (COMM_SELF: serial).
        workers: scipy.fft threads.
    """

    def __init__(self, shape, active_flat: np.ndarray, dt: float, sigma: float,
                 boundary: str = "open", comm=MPI.COMM_SELF, workers: int = 1):
        if boundary not in ("open", "closed"):
            raise ValueError(f"boundary must be 'open' or 'closed', got {boundary!r}")
        self.shape = tuple(int(s) for s in shape)
        self.n = int(np.prod(self.shape))
        self.dt = float(dt)
        self.boundary = boundary
        self.active = np.asarray(active_flat, dtype=np.int64)
        self.pc = ParticleComm(comm, self.active.size)
        self.local = self.active[self.pc.lo:self.pc.hi]
        self.x = np.stack(np.unravel_index(self.local, self.shape)).astype(np.float64)  # (3, Ml)
        self.keep = np.ones(self.n, dtype=np.float64)
        self.keep[self.active] = 0.0  # inactive cells keep their mass (v = 0 there)
        self.diffusion = DiffusionSolver(self.shape, self.dt * float(sigma), workers)
        self.strides = (self.shape[1] * self.shape[2], self.shape[2], 1)

    @property
    def m_local(self) -> int:
        return self.local.size

    # ------------------------------------------------------------ linearise
    def linearize(self, v: np.ndarray) -> StepData:
        """Corner indices and trilinear factors of this rank's particles for v (3, Ml)."""
        y = self.x + self.dt * v
        f = np.floor(y)
        w = y - f
        f = f.astype(np.int64)
        b = np.empty((3, 2, y.shape[1]))
        s = np.empty((3, 2, y.shape[1]))
        cc = np.empty((3, 2, y.shape[1]), dtype=np.int64)
        for d in range(3):
            nd = self.shape[d]
            for o in (0, 1):
                c = f[d] + o
                valid = (c >= 0) & (c < nd)
                b[d, o] = (w[d] if o else 1.0 - w[d]) * valid
                s[d, o] = (1.0 if o else -1.0) * valid
                cc[d, o] = np.clip(c, 0, nd - 1) * self.strides[d]
        if self.boundary == "closed":
            inside = np.all((y >= 0) & (y <= np.array(self.shape)[:, None] - 1), axis=0)
            b[0] *= inside
            s[0] *= inside
        idx = (cc[0][:, None, None, :] + cc[1][None, :, None, :] + cc[2][None, None, :, :]).reshape(-1)
        return StepData(idx=idx, b=b, s=s)

    # ------------------------------------------------------------ operators
    def scatter(self, sd: StepData, weights: np.ndarray, base: np.ndarray) -> np.ndarray:
        """``base * keep + sum over ranks of the particle scatter`` (N,)."""
        out = np.bincount(sd.idx, weights=weights, minlength=self.n)
        self.pc.allreduce_(out)
        out += base * self.keep
        return out

    def push(self, rho: np.ndarray, sd: StepData) -> np.ndarray:
        """``S(v) rho`` (N,) without diffusion."""
        return self.scatter(sd, sd.weights(rho[self.local]), rho)

    def step(self, rho: np.ndarray, sd: StepData) -> np.ndarray:
        """``L^{-1} S(v) rho`` (N,)."""
        return self.diffusion.apply(self.push(rho, sd))

    def tangent_step(self, delta: np.ndarray, rho: np.ndarray, sd: StepData, x: np.ndarray) -> np.ndarray:
        """``L^{-1} (S(v) delta + dS(v)[x] rho)`` (N,), x (3, Ml) the velocity perturbation."""
        w = sd.tangent_weights(delta[self.local], self.dt * rho[self.local], x)
        return self.diffusion.apply(self.scatter(sd, w, delta))

    def adjoint_step(self, lam: np.ndarray, rho: np.ndarray, sd: StepData, extra: np.ndarray | None = None,
                     want_dv: bool = True):
        """Transpose of :meth:`tangent_step`.

        Args:
            lam: (N,) adjoint variable after the step.
            rho: (N,) density before the step.
            sd: linearisation of the step.
            extra: (Ml,) added to the particle part of the returned adjoint
                (e.g. the kinetic term's derivative dt |v|^2), or None.
        Returns:
            lam_prev: (N,) ``S^T L^{-1} lam (+ extra)``.
            dv: (3, Ml) ``dS^T L^{-1} lam`` (None unless want_dv).
        """
        mu = self.diffusion.apply(lam)
        st, dv = sd.gather(mu, self.dt * rho[self.local], want_dv)
        if extra is not None:
            st = st + extra
        out = mu * self.keep
        out[self.active] = self.pc.allgather(st)
        return out, dv
