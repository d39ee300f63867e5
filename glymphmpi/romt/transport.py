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

import numpy as np
from mpi4py import MPI

from glymphmpi.romt import kernels
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


class StepData:
    """A linearisation of S(v_k) for this rank's particles (Ml of them): their end
    positions ``y = x + dt v`` (3, Ml); the fused kernels of :mod:`glymphmpi.romt.kernels`
    recompute the trilinear factors from them on every pass.

    Attributes:
        y: (3, Ml) float64 positions after the push (index space).
        shape: the grid.
        closed: the boundary mode is ``closed``.
    """

    def __init__(self, y: np.ndarray, shape, closed: bool):
        self.y = np.ascontiguousarray(y, dtype=np.float64)
        self.shape = tuple(int(n) for n in shape)
        self.closed = bool(closed)

    @property
    def factor_squares(self) -> np.ndarray:
        """(3, Ml) ``sum_o b_{d,o}^2`` per axis (for the preconditioner)."""
        out = np.empty_like(self.y)
        kernels.factor_squares(self.y, *self.shape, self.closed, out)
        return out

    def factors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """numpy reference of the per-axis factors (for tests): (idx (8 Ml,) corner-major
        flat indices, b (3, 2, Ml) factors, s (3, 2, Ml) their derivatives in w_d)."""
        y = self.y
        f = np.floor(y)
        w = y - f
        f = f.astype(np.int64)
        strides = (self.shape[1] * self.shape[2], self.shape[2], 1)
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
                cc[d, o] = np.clip(c, 0, nd - 1) * strides[d]
        if self.closed:
            inside = np.all((y >= 0) & (y <= np.array(self.shape)[:, None] - 1), axis=0)
            b[0] *= inside
            s[0] *= inside
        idx = (cc[0][:, None, None, :] + cc[1][None, :, None, :] + cc[2][None, None, :, :]).reshape(-1)
        return idx, b, s

    def push(self, r: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``out[corner] += W_o r_i`` (out (N,) float64, accumulated in place)."""
        kernels.push(self.y, *self.shape, self.closed, np.ascontiguousarray(r, dtype=np.float64), out)
        return out

    def push_tangent(self, r: np.ndarray, q: np.ndarray, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``out[corner] += W_o r_i + q_i sum_d x_{d,i} dW_o/dw_d``: the push of r plus the
        derivative of the push along x (3, Ml), q = dt rho at the particles."""
        kernels.tangent(self.y, *self.shape, self.closed, np.ascontiguousarray(r, dtype=np.float64),
                        np.ascontiguousarray(q, dtype=np.float64), np.ascontiguousarray(x, dtype=np.float64), out)
        return out

    def gather(self, mu: np.ndarray, q: np.ndarray, want_dv: bool = True):
        """Adjoint of the particle push for the values mu (N,) on the grid.

        Returns:
            st: (Ml,) ``(S^T mu)`` at this rank's particles.
            dv: (3, Ml) ``(dS^T mu)_d = q sum_o dW_o/dw_d mu_o`` (q = dt rho), or None.
        """
        ml = self.y.shape[1]
        st = np.empty(ml)
        dv = np.empty((3, ml)) if want_dv else np.empty((3, 0))
        kernels.gather(self.y, *self.shape, self.closed, np.ascontiguousarray(mu, dtype=np.float64),
                       np.ascontiguousarray(q, dtype=np.float64), st, dv, want_dv)
        return st, (dv if want_dv else None)


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
        """End positions of this rank's particles for v (3, Ml)."""
        return StepData(self.x + self.dt * v, self.shape, self.boundary == "closed")

    # ------------------------------------------------------------ operators
    def _start(self, base: np.ndarray) -> np.ndarray:
        """The array the particles are scattered into: ``base * keep`` on one rank (the cells
        that do not move keep their mass), zeros on several (added after the reduction)."""
        if self.pc.serial:
            return base * self.keep
        return np.zeros(self.n)

    def _finish(self, out: np.ndarray, base: np.ndarray) -> np.ndarray:
        if not self.pc.serial:
            self.pc.allreduce_(out)
            out += base * self.keep
        return out

    def push(self, rho: np.ndarray, sd: StepData) -> np.ndarray:
        """``S(v) rho`` (N,) without diffusion."""
        out = self._start(rho)
        sd.push(rho[self.local], out)
        return self._finish(out, rho)

    def step(self, rho: np.ndarray, sd: StepData) -> np.ndarray:
        """``L^{-1} S(v) rho`` (N,)."""
        return self.diffusion.apply(self.push(rho, sd))

    def tangent_step(self, delta: np.ndarray, rho: np.ndarray, sd: StepData, x: np.ndarray) -> np.ndarray:
        """``L^{-1} (S(v) delta + dS(v)[x] rho)`` (N,), x (3, Ml) the velocity perturbation."""
        out = self._start(delta)
        sd.push_tangent(delta[self.local], self.dt * rho[self.local], x, out)
        return self.diffusion.apply(self._finish(out, delta))

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
