"""Unbalanced rOMT (urOMT, Chen et al., Sci Rep 2023): a relative source r beside the velocity.

Continuity ``rho_t + div(rho v) = sigma lap rho + chi rho r``, discretised per step as

    q_k = exp(dt chi r_k) rho_k,      rho_{k+1} = L^{-1} S(v_k) q_k

(the source acts at the start of the step, exactly for a constant r, then the particle
push and the implicit diffusion of :mod:`glymphmpi.romt.transport`; the exponential keeps
every density positive whatever step Gauss-Newton proposes, where the explicit factor
``1 + dt r`` can turn negative for a long step: on the rat data the first step was cut to 1/128),
with the objective

    Phi(v, r) = sum_k dt rho_k^T |v_k|^2 + alpha sum_k dt sum chi r_k^2 rho_k
                + beta ||rho_nt - target||^2 + gamma sum_k dt sum_d ||grad v_{k,d}||^2 / 2.

The unknowns of a rank are ``u`` of shape (nt, 4, Ml): components 0-2 the velocity,
3 the relative source (per model time) at this rank's particles (the active set; chi
restricted to it). Gradient, tangent and adjoint reuse the balanced step operators
with ``q_k`` in place of ``rho_k``; the Gauss-Newton Hessian adds ``2 dt alpha chi rho_k``
on r and the same J^T J. With r = 0 everything reduces to :class:`~glymphmpi.romt.gn.LoopProblem`.
"""

from __future__ import annotations

import numpy as np

from glymphmpi.romt import kernels
from glymphmpi.romt.gn import Linearization, LoopProblem, Terms


class UnbalancedProblem(LoopProblem):
    """:class:`LoopProblem` with a relative source on ``chi``.

    Args:
        chi: (M,) weights of the source on the active set (1 inside the source region, 0 outside).
        alpha: weight of the source cost.
        rho_floor: the source cost weighs r^2 by ``rho + rho_floor``: where there is almost no
            mass the source has almost no effect, and without a floor Gauss-Newton's step in r
            there is unbounded (measured on the rat data: exp(dt r) overflowed).
        (the others as :class:`LoopProblem`)
    """

    def __init__(self, transport, rho0, target, nt, beta, gamma, lap, chi: np.ndarray, alpha: float,
                 rho_floor: float = 0.0, source_per_loop: bool = False):
        super().__init__(transport, rho0, target, nt, beta, gamma, lap)
        self.chi = np.asarray(chi, dtype=np.float64)  # (M,) on the active set
        self.chi_l = self.chi[self.pc.lo:self.pc.hi]
        self.alpha = float(alpha)
        self.rho_floor = float(rho_floor)
        self.source_per_loop = bool(source_per_loop)

    def _tie(self, g: np.ndarray) -> np.ndarray:
        """With one source per loop: the orthogonal projection onto {r_0 = ... = r_{nt-1}} (the r
        components replaced by their mean over the steps), in place; else unchanged."""
        if self.source_per_loop:
            g[:, 3] = g[:, 3].mean(axis=0)
        return g

    @property
    def u_shape(self) -> tuple:
        return (self.nt, 4, self.tr.m_local)

    def _lap_apply(self, u: np.ndarray) -> np.ndarray:
        out = np.zeros(u.shape)
        out[:, :3] = super()._lap_apply(np.ascontiguousarray(u[:, :3]))
        return out

    def _factor(self, r_local: np.ndarray) -> np.ndarray:
        """(N,) exp(dt chi r) (1 off the active set)."""
        m = np.ones(self.tr.n)
        m[self.tr.active] = np.exp(self.dt * self.chi * self.pc.allgather(r_local))
        return m

    def _on_active(self, local: np.ndarray) -> np.ndarray:
        """(N,) the particles' values (all ranks) on the grid, 0 elsewhere."""
        out = np.zeros(self.tr.n)
        out[self.tr.active] = self.pc.allgather(local)
        return out

    # ------------------------------------------------------------ forward
    def forward(self, u: np.ndarray, store: bool = True) -> Linearization:
        rho = self.rho0
        rhos, steps, qs, ms = [rho], [], [], []
        kin = src = 0.0
        loc = self.tr.local
        for k in range(self.nt):
            v, r = u[k, :3], u[k, 3]
            sd = self.tr.linearize(v)
            rl = rho[loc]
            kin += self.dt * float(np.dot(rl, (v ** 2).sum(axis=0)))
            src += self.alpha * self.dt * float(np.dot(rl + self.rho_floor, self.chi_l * r ** 2))
            m = self._factor(r)
            q = m * rho
            rho = self.tr.step(q, sd)
            if store:
                rhos.append(rho)
                steps.append(sd)
                qs.append(q)
                ms.append(m)
        res = rho - self.target
        fit = self.beta * float(np.dot(res, res))
        smooth = 0.5 * self.gamma * self.dt * float(np.vdot(u, self._lap_apply(u)))
        kin, src, smooth = self.pc.sum(kin), self.pc.sum(src), self.pc.sum(smooth)
        fit = float(self.pc.bcast(fit))
        if not store:
            rhos = [self.rho0, rho]
        lin = Linearization(rhos=rhos, steps=steps, terms=Terms(kin, fit, smooth, src))
        lin.qs, lin.ms = qs, ms
        return lin

    # ------------------------------------------------------------ derivatives
    def _adjoint(self, lam: np.ndarray, u: np.ndarray | None, lin: Linearization) -> np.ndarray:
        """Backward recursion from lam (N,) after the last step: (nt, 4, Ml) sensitivities of
        <lam, rho_nt> (plus the kinetic and source terms' when u is given)."""
        out = np.empty(self.u_shape)
        loc = self.tr.local
        for k in range(self.nt - 1, -1, -1):
            lam_q, dv = self.tr.adjoint_step(lam, lin.qs[k], lin.steps[k])
            out[k, :3] = dv
            out[k, 3] = self.dt * self.chi_l * lin.qs[k][loc] * lam_q[loc]
            lam = lin.ms[k] * lam_q
            if u is not None and k > 0:  # d(kinetic + source)/d rho_k
                v, r = u[k, :3], u[k, 3]
                lam = lam + self._on_active(self.dt * ((v ** 2).sum(axis=0) + self.alpha * self.chi_l * r ** 2))
        return out

    def gradient(self, u: np.ndarray, lin: Linearization) -> np.ndarray:
        g = self._adjoint(2.0 * self.beta * (lin.rhos[-1] - self.target), u, lin)
        loc = self.tr.local
        for k in range(self.nt):
            rl = lin.rhos[k][loc]
            g[k, :3] += 2.0 * self.dt * rl * u[k, :3]
            g[k, 3] += 2.0 * self.alpha * self.dt * self.chi_l * (rl + self.rho_floor) * u[k, 3]
        g += self.gamma * self.dt * self._lap_apply(u)
        return self._tie(g)

    def jvp(self, x: np.ndarray, lin: Linearization) -> np.ndarray:
        delta = np.zeros(self.tr.n)
        for k in range(self.nt):
            dq = lin.ms[k] * delta + self._on_active(self.dt * self.chi_l * lin.qs[k][self.tr.local] * x[k, 3])
            delta = self.tr.tangent_step(dq, lin.qs[k], lin.steps[k], x[k, :3])
        return delta

    def vjp(self, y: np.ndarray, lin: Linearization) -> np.ndarray:
        return self._adjoint(np.asarray(y, dtype=np.float64), None, lin)

    def hessp(self, x: np.ndarray, lin: Linearization) -> np.ndarray:
        loc = self.tr.local
        out = self.vjp(self.jvp(x, lin), lin)
        lap = self._lap_apply(x)
        s = 2.0 * self.beta
        for k in range(self.nt):  # velocity: 2 beta J^T J x + 2 dt rho_k x_k + gamma dt G^T G x in one pass
            kernels.hess_combine(out[k, :3], x[k, :3], lin.rhos[k], loc, lap[k, :3], s, 2.0 * self.dt,
                                 self.gamma * self.dt)
            o = out[k, 3]
            o *= s
            o += 2.0 * self.alpha * self.dt * self.chi_l * (lin.rhos[k][loc] + self.rho_floor) * x[k, 3]
        return self._tie(out)

    def _diagonal(self, b: np.ndarray, a: np.ndarray) -> np.ndarray:
        """``a + b``; with one source per loop the r part is the diagonal of the projected Hessian
        if the steps' columns of J_r are parallel (as they are where the mass moves less than a
        voxel per loop): mean_k b_k + (sum_k sqrt(a_k))^2 / nt, the same for every step (so that
        the preconditioner maps the tied subspace onto itself)."""
        diag = a + b
        if self.source_per_loop:
            diag[:, 3] = b[:, 3].mean(axis=0) + np.sqrt(a[:, 3]).sum(axis=0) ** 2 / self.nt
        return diag

    def energy_norm2(self, x: np.ndarray, lin: Linearization) -> float:
        """Kinetic metric of the velocity plus the source cost's metric of r:
        ``sum_k dt [rho_k |x_v|^2 + alpha chi (rho_k + floor) x_r^2]``."""
        loc = self.tr.local
        tot = 0.0
        for k in range(self.nt):
            rl = lin.rhos[k][loc]
            tot += self.dt * float(np.dot(rl, (x[k, :3] ** 2).sum(axis=0)))
            tot += self.alpha * self.dt * float(np.dot(rl + self.rho_floor, self.chi_l * x[k, 3] ** 2))
        return self.pc.sum(tot)

    def preconditioner_parts(self, lin: Linearization) -> tuple[np.ndarray, np.ndarray]:
        """(b, a) as :meth:`LoopProblem.preconditioner_parts`, with q_k = exp(dt chi r) rho_k
        in the transport's derivatives and the source component: b = 2 alpha dt chi (rho + floor),
        a = 2 beta (dt chi q)^2 sum_o W_o^2."""
        loc = self.tr.local
        b_out = np.empty(self.u_shape)
        a_out = np.empty(self.u_shape)
        for k in range(self.nt):
            rho = lin.rhos[k][loc]
            q = lin.qs[k][loc]
            bb = lin.steps[k].factor_squares  # (3, Ml)
            for d in range(3):
                o = [e for e in range(3) if e != d]
                a_out[k, d] = 2.0 * self.beta * (self.dt * q) ** 2 * 2.0 * bb[o[0]] * bb[o[1]]
                b_out[k, d] = 2.0 * self.dt * rho + self.gamma * self.dt * self.lap_diag
            a_out[k, 3] = 2.0 * self.beta * (self.dt * self.chi_l * q) ** 2 * (bb[0] * bb[1] * bb[2])
            b_out[k, 3] = 2.0 * self.alpha * self.dt * self.chi_l * (rho + self.rho_floor)
        return b_out, a_out
