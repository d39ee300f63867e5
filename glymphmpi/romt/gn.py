"""One rOMT loop: objective, adjoint gradient, Gauss-Newton with PCG and Armijo.

Unknowns: ``u`` of shape (nt, 3, Ml), the velocity (voxels per model time,
along the index axes) of this rank's particles at every step. The objective
(free end point; see :mod:`glymphmpi.romt.config` for the scaling)::

    Phi(u) = sum_k dt rho_k^T |v_k|^2                          (kinetic)
             + beta ||rho_nt - rho_target||^2                   (fit)
             + gamma sum_k dt sum_d v_{k,d}^T (G^T G) v_{k,d} / 2  (smooth)

Gradient by one forward and one adjoint recursion (O(nt) steps), including
the kinetic term's dependence on rho_k. The Gauss-Newton Hessian

    H = 2 dt diag(rho_k) + gamma dt G^T G + 2 beta J^T J,   J = d rho_nt / d u

is applied matrix-free (J x: one tangent recursion, J^T y: one adjoint
recursion), and PCG solves ``H s = -g`` with the diagonal preconditioner
``2 dt rho_k + gamma dt deg + 2 beta dt^2 rho_k^2 sum_o (dW_o/dw_d)^2`` (kinetic,
smoothness and the single-step part of J^T J).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from glymphmpi.romt import kernels
from glymphmpi.romt.grid import ActiveLaplacian
from glymphmpi.romt.transport import Transport

log = logging.getLogger(__name__)


@dataclass
class Terms:
    """Objective terms (identical on all ranks)."""

    kinetic: float
    fit: float
    smooth: float
    source: float = 0.0  # unbalanced model: alpha sum_k dt sum chi r^2 rho

    @property
    def total(self) -> float:
        return self.kinetic + self.fit + self.smooth + self.source


@dataclass
class Linearization:
    """Forward states at a point u: densities and step data."""

    rhos: list  # nt + 1 arrays (N,)
    steps: list  # nt StepData
    terms: Terms


@dataclass
class GNState:
    """Resumable state of a Gauss-Newton solve."""

    u: np.ndarray  # (nt, 3, Ml)
    history: list = field(default_factory=list)  # objective after each accepted iterate (incl. start)
    iterations: int = 0
    pcg_iterations: int = 0
    g0_norm: float = 0.0
    done: bool = False
    reason: str = ""
    step_rel: float = float("inf")  # ||u_k - u_{k-1}||_E / ||u_k||_E of the last accepted step
    phi_ref: float = 0.0  # the objective the GMW test is relative to (0: the start, history[0])


class LoopProblem:
    """The objective of one loop and its derivatives.

    Args:
        transport: the step operator (holds the particle split over ranks).
        rho0: (N,) initial density.
        target: (N,) density to reach at the end.
        nt: number of steps.
        beta, gamma: weights.
        lap: the active-set graph Laplacian G^T G (:class:`ActiveLaplacian`, this rank's rows).
    """

    def __init__(self, transport: Transport, rho0: np.ndarray, target: np.ndarray, nt: int,
                 beta: float, gamma: float, lap: ActiveLaplacian):
        self.tr = transport
        self.pc = transport.pc
        self.rho0 = np.ascontiguousarray(rho0, dtype=np.float64).ravel()
        self.target = np.ascontiguousarray(target, dtype=np.float64).ravel()
        self.nt = int(nt)
        self.dt = transport.dt
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.lap = lap
        self.lap_diag = lap.diagonal

    @property
    def u_shape(self) -> tuple:
        return (self.nt, 3, self.tr.m_local)

    def zeros(self) -> np.ndarray:
        return np.zeros(self.u_shape)

    def dot(self, a: np.ndarray, b: np.ndarray) -> float:
        return self.pc.sum(float(np.vdot(a, b)))

    # ------------------------------------------------------------ smoothness
    def _lap_apply(self, u: np.ndarray) -> np.ndarray:
        """(nt, 3, Ml) -> (nt, 3, Ml): this rank's rows of G^T G applied per component."""
        full = self.pc.allgather(u.reshape(-1, u.shape[-1]))  # (3 nt, M)
        return self.lap.apply(full).reshape(u.shape)

    # ------------------------------------------------------------ forward
    def forward(self, u: np.ndarray, store: bool = True) -> Linearization:
        """Densities rho_0..rho_nt and the objective at u (the same on all ranks)."""
        rho = self.rho0
        rhos, steps = [rho], []
        kin = 0.0
        for k in range(self.nt):
            sd = self.tr.linearize(u[k])
            kin += self.dt * float(np.dot(rho[self.tr.local], (u[k] ** 2).sum(axis=0)))
            rho = self.tr.step(rho, sd)
            if store:
                rhos.append(rho)
                steps.append(sd)
        r = rho - self.target
        fit = self.beta * float(np.dot(r, r))
        lu = self._lap_apply(u)
        smooth = 0.5 * self.gamma * self.dt * float(np.vdot(u, lu))
        kin = self.pc.sum(kin)
        smooth = self.pc.sum(smooth)
        fit = float(self.pc.bcast(fit))
        if not store:
            rhos = [self.rho0, rho]
        return Linearization(rhos=rhos, steps=steps, terms=Terms(kin, fit, smooth))

    def objective(self, u: np.ndarray) -> Terms:
        return self.forward(u, store=False).terms

    # ------------------------------------------------------------ derivatives
    def gradient(self, u: np.ndarray, lin: Linearization) -> np.ndarray:
        """dPhi/du (nt, 3, Ml) by the adjoint recursion (lin = forward(u))."""
        g = np.empty(self.u_shape)
        lam = 2.0 * self.beta * (lin.rhos[-1] - self.target)
        loc = self.tr.local
        for k in range(self.nt - 1, -1, -1):
            rho_k = lin.rhos[k]
            extra = self.dt * (u[k] ** 2).sum(axis=0) if k > 0 else None
            lam, dv = self.tr.adjoint_step(lam, rho_k, lin.steps[k], extra)
            g[k] = dv + 2.0 * self.dt * rho_k[loc] * u[k]
        g += self.gamma * self.dt * self._lap_apply(u)
        return g

    def jvp(self, x: np.ndarray, lin: Linearization) -> np.ndarray:
        """J x = d rho_nt/du . x (N,), x (nt, 3, Ml)."""
        delta = np.zeros(self.tr.n)
        for k in range(self.nt):
            delta = self.tr.tangent_step(delta, lin.rhos[k], lin.steps[k], x[k])
        return delta

    def vjp(self, y: np.ndarray, lin: Linearization) -> np.ndarray:
        """J^T y (nt, 3, Ml), y (N,)."""
        out = np.empty(self.u_shape)
        lam = np.asarray(y, dtype=np.float64)
        for k in range(self.nt - 1, -1, -1):
            lam, out[k] = self.tr.adjoint_step(lam, lin.rhos[k], lin.steps[k])
        return out

    def hessp(self, x: np.ndarray, lin: Linearization) -> np.ndarray:
        """Gauss-Newton Hessian times x (nt, 3, Ml)."""
        loc = self.tr.local
        out = self.vjp(self.jvp(x, lin), lin)
        lap = self._lap_apply(x)
        for k in range(self.nt):  # 2 beta J^T J x + 2 dt rho_k x_k + gamma dt G^T G x in one pass per step
            kernels.hess_combine(out[k], x[k], lin.rhos[k], loc, lap[k], 2.0 * self.beta, 2.0 * self.dt,
                                 self.gamma * self.dt)
        return out

    def preconditioner_parts(self, lin: Linearization) -> tuple[np.ndarray, np.ndarray]:
        """(b, a), both (nt, 3, Ml): the diagonal of H split into the regularisation part b
        (kinetic and smoothness) and the single-step part a of 2 beta J^T J."""
        loc = self.tr.local
        b_out = np.empty(self.u_shape)
        a_out = np.empty(self.u_shape)
        for k in range(self.nt):
            rho = lin.rhos[k][loc]
            q = lin.steps[k].factor_squares  # (3, Ml): sum over the two sides of b_d^2
            for d in range(3):
                others = [e for e in range(3) if e != d]
                # sum_o (dW_o/dw_d)^2 = 2 * prod_{e != d} q_e (when both sides are inside)
                jj = 2.0 * q[others[0]] * q[others[1]]
                a_out[k, d] = 2.0 * self.beta * (self.dt * rho) ** 2 * jj
                b_out[k, d] = 2.0 * self.dt * rho + self.gamma * self.dt * self.lap_diag
        return b_out, a_out

    def preconditioner(self, lin: Linearization) -> np.ndarray:
        """Diagonal approximation of H (nt, ncomp, Ml), strictly positive: b + a of
        :meth:`preconditioner_parts`.

        (A time-block inverse of ``B + c c^T`` per particle was tried, on the idea that J^T J
        is nearly rank one over the steps at a particle; it is not in these Eulerian unknowns:
        the mass at a cell differs from step to step as it moves, so the columns of J for two
        steps land on different cells. On a translating blob it left the objective 9x higher
        after 10 Gauss-Newton iterations than the diagonal.)
        """
        diag = self._diagonal(*self.preconditioner_parts(lin))
        floor = max(1e-10 * float(diag.max(initial=0.0)), 1e-300)
        return np.maximum(diag, floor)

    def _diagonal(self, b: np.ndarray, a: np.ndarray) -> np.ndarray:
        """The preconditioner's diagonal from :meth:`preconditioner_parts` (before the floor)."""
        return a + b

    def energy_norm2(self, x: np.ndarray, lin: Linearization) -> float:
        """``sum_k dt rho_k |x_k|^2`` (all ranks): the kinetic metric at lin's densities, the norm
        in which rOMT measures a change of the velocity (a velocity where there is no mass moves
        nothing; its value is set only by the smoothness term)."""
        loc = self.tr.local
        tot = 0.0
        for k in range(self.nt):
            tot += self.dt * float(np.dot(lin.rhos[k][loc], (x[k, :3] ** 2).sum(axis=0)))
        return self.pc.sum(tot)

    # ------------------------------------------------------------ PCG
    def pcg(self, g: np.ndarray, lin: Linearization, max_iter: int, rtol: float) -> tuple[np.ndarray, int]:
        """Solve H s = -g by preconditioned CG; returns (s, iterations). The vector updates run
        as fused kernels (:func:`glymphmpi.romt.kernels.cg_step` and friends: 4 passes over the
        unknowns per iteration instead of about 10)."""
        m = np.ascontiguousarray(self.preconditioner(lin), dtype=np.float64).reshape(-1)
        s = np.zeros(g.size)
        r = -np.ascontiguousarray(g, dtype=np.float64).reshape(-1)
        z = np.empty_like(r)
        rz = self.pc.sum(kernels.cg_precondition(r, m, z))
        p = z.copy()
        r0 = math.sqrt(self.pc.sum(kernels.dot(r, r)))
        it = 0
        for it in range(1, max_iter + 1):
            hp = np.ascontiguousarray(self.hessp(p.reshape(g.shape), lin), dtype=np.float64).reshape(-1)
            php = self.pc.sum(kernels.dot(p, hp))
            if php <= 0:  # cannot happen for an SPD H; guard against round-off
                it -= 1
                break
            a = rz / php
            rr = self.pc.sum(kernels.cg_step(s, r, p, hp, a))
            if math.sqrt(rr) <= rtol * r0:
                break
            rz_new = self.pc.sum(kernels.cg_precondition(r, m, z))
            kernels.cg_direction(p, z, rz_new / rz)
            rz = rz_new
        return s.reshape(g.shape), it


def gmw_converged(state: GNState, gnorm: float, tau: float) -> bool:
    """The stopping rule of Gill, Murray and Wright (Practical Optimization, 1981, sec. 8.2.3), as
    FAIR (Modersitzki 2009) uses it for image registration, at iterate k >= 1::

        Phi_{k-1} - Phi_k <= tau (1 + |Phi_0|)          (the objective no longer moves)
        ||u_k - u_{k-1}||_E <= sqrt(tau) ||u_k||_E      (nor the unknowns)
        ||g_k||          <= tau^(1/3) (1 + |Phi_0|)     (and the gradient is small)

    the first and last relative to the start of the solve (``state.phi_ref``: a warm start
    passes the objective of the cold start, so that a good start does not tighten the
    tolerance: on the rat, loop 3 warm-started at 1/4 of its cold objective was still
    iterating after 21 iterations at misfit 0.01); ``||.||_E`` is the kinetic (and,
    unbalanced, source) metric of :meth:`LoopProblem.energy_norm2` instead of GMW's Euclidean
    norm, whose velocities in cells without mass (set only by the smoothness term, moving
    nothing) kept changing by ~20% per iteration on the rat data; tau = 0 disables it."""
    h = state.history
    if tau <= 0 or len(h) < 2:
        return False
    scale = 1.0 + abs(state.phi_ref or h[0])
    return (h[-2] - h[-1] <= tau * scale and state.step_rel <= math.sqrt(tau)
            and gnorm <= tau ** (1.0 / 3.0) * scale)


def gauss_newton(prob: LoopProblem, state: GNState, max_iter: int, gtol: float, ftol: float,
                 pcg_max_iter: int, pcg_rtol: float, ls_max_halvings: int = 12, armijo_c: float = 1e-4,
                 on_iteration=None, label: str = "", tau: float = 0.0) -> GNState:
    """Gauss-Newton iterations from ``state`` until a stop criterion holds: the gradient
    tolerance (``||g|| <= gtol ||g_0||``), the relative decrease of one iteration below
    ``ftol``, or :func:`gmw_converged` with ``tau``; otherwise ``max_iter``.

    Args:
        prob: the loop problem.
        state: start (``u``, history, counters); updated in place and returned.
        on_iteration: called with the state after every accepted iteration
            (checkpointing); may raise to stop.
    Returns:
        The final state (``done`` True, ``reason`` says why it stopped).
    """
    carry = None  # the forward states of an accepted full step, reused by the next iteration
    while not state.done:
        if state.iterations >= max_iter:
            state.done, state.reason = True, f"max iterations ({max_iter})"
            break
        t0 = time.perf_counter()
        lin = carry if carry is not None else prob.forward(state.u)
        carry = None
        phi = lin.terms.total
        if not state.history:
            state.history.append(phi)
        g = prob.gradient(state.u, lin)
        gnorm = math.sqrt(prob.dot(g, g))
        if state.iterations == 0 and state.g0_norm == 0.0:
            state.g0_norm = gnorm
        if gnorm <= gtol * state.g0_norm or gnorm == 0.0:
            state.done, state.reason = True, f"gradient tolerance (|g|/|g0| = {gnorm / max(state.g0_norm, 1e-300):.2e})"
            break
        if gmw_converged(state, gnorm, tau):
            state.done = True
            change = (state.history[-2] - state.history[-1]) / (1 + abs(state.phi_ref or state.history[0]))
            state.reason = (f"converged (objective change {change:.1e}"
                            f" of the start, step {state.step_rel:.1e} of |u|, tol {tau:g})")
            break
        s, pit = prob.pcg(g, lin, pcg_max_iter, pcg_rtol)
        s_e2 = prob.energy_norm2(s, lin)
        del lin
        gs = prob.dot(g, s)
        if gs >= 0:  # not a descent direction (should not happen): use the steepest descent
            s, gs = -g, -gnorm ** 2
        a, accepted, new, u_try = 1.0, False, None, None
        for _ in range(ls_max_halvings + 1):
            u_try = state.u + a * s
            if a == 1.0:  # keep the states: a full step is usually accepted
                trial = prob.forward(u_try)
                new = trial.terms
            else:
                trial, new = None, prob.objective(u_try)
            if new.total <= phi + armijo_c * a * gs:
                accepted = True
                carry = trial
                break
            del trial
            a *= 0.5
        accepted = bool(prob.pc.bcast(accepted))
        state.pcg_iterations += pit
        if not accepted:
            carry = None
            state.done, state.reason = True, "line search failed (no sufficient decrease)"
            break
        state.u = u_try
        # the step in the kinetic (and source) metric of the densities it was computed at,
        # relative to the new iterate's: GMW's "the unknowns no longer move"
        lin_new = carry if carry is not None else prob.forward(u_try)
        state.step_rel = a * math.sqrt(s_e2) / max(math.sqrt(prob.energy_norm2(u_try, lin_new)), 1e-300)
        del lin_new
        state.iterations += 1
        state.history.append(new.total)
        rel = (phi - new.total) / max(abs(phi), 1e-300)
        log.info("%sGN %d: Phi %.6g -> %.6g (kin %.4g fit %.4g smooth %.4g source %.4g), |g| %.3g, PCG %d, "
                 "step %.3g (|du|/|u| %.2g), %.1f s", label, state.iterations, phi, new.total, new.kinetic, new.fit,
                 new.smooth, new.source, gnorm, pit, a, state.step_rel, time.perf_counter() - t0)
        if rel < ftol:
            state.done, state.reason = True, f"objective tolerance (relative decrease {rel:.2e})"
        if on_iteration is not None:
            on_iteration(state)
    return state
