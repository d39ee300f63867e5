"""The reduced functional J(D, g) and its gradient over a distributed control vector.

Functional (discretised as written in the issue)::

    J = sum_{i>=1} ||c(t_i) - d_i||^2_{L2}
        + 1/2 sum_{n=1}^N tau_n [ alpha g^n.Mg g^n + gamma g^n.Kg g^n
                                  + beta ((g^n - g^{n-1})/tau_n).Mg ((g^n - g^{n-1})/tau_n) ]

with Mg, Kg the boundary mass and tangential-gradient stiffness matrices
(``ds`` integrals), M the (lumped or consistent) mass matrix for the L2 norm,
g^0 the first scan's boundary values. The scan at t_0 is the initial state
and adds nothing. TAO sees J / J_scale with J_scale = sum_{i>=1} ||d_i||^2.

Control vector (PETSc Vec on ``comm``): rank 0 holds s * delta first, then
each rank holds g^1..g^N of its owned boundary dofs (step-major); in
"data-boundary" mode only s * delta. The scale s (``fem.delta_scale``, or
automatic) equalises the curvature of J along delta and along a smooth g
direction: without it the delta direction is several hundred times stiffer
than a unit g direction and L-BFGS crawls along the D-g valley.
"""

from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger(__name__)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


class ControlProblem:
    """Reduced functional of the controls (delta, g) with its discrete-adjoint gradient.

    Args:
        model: :class:`glymphmpi.fem.forward.DiffusionModel`.
        data: (p, n_owned) scans sampled at the owned dofs.
        cfg: :class:`glymphmpi.fem.config.FemConfig`.
    """

    def __init__(self, model, data: np.ndarray, cfg):
        from petsc4py import PETSc

        self.PETSc = PETSc
        self.model = model
        self.cfg = cfg
        self.comm = model.comm
        self.data = data
        grid = model.grid
        self.N = grid.n_steps
        self.full = cfg.mode == "boundary-control"
        self.nd = 1 if self.comm.rank == 0 else 0
        self.nb = model.nb_local
        self.c0 = data[0].copy()
        # initial / data g: scans interpolated linearly in time at boundary nodes
        db = data[:, model.bidx]
        self.g_data = np.empty((self.N + 1, self.nb))
        obs_t = grid.t[grid.obs_step]
        idx = np.searchsorted(obs_t, grid.t, side="right") - 1
        idx = np.clip(idx, 0, obs_t.size - 2)
        # linear between scans, constant after the last one
        w = np.clip((grid.t - obs_t[idx]) / (obs_t[idx + 1] - obs_t[idx]), 0.0, 1.0)[:, None]
        self.g_data[:] = (1 - w) * db[idx] + w * db[idx + 1]
        self.J_scale = sum(model.quad(model.M, data[i]) for i in range(1, data.shape[0]))
        if self.J_scale <= 0:
            self.J_scale = 1.0
        self.nloc = self.nd + (self.N * self.nb if self.full else 0)
        self.evaluations = 0
        self.last: dict = {}
        self.ds = 1.0 if cfg.delta_scale is None else float(cfg.delta_scale)
        # the optimiser sees u = gs * g (elementwise): gs = sqrt of an estimate of the Hessian's diagonal
        self.g_extra = None
        self.gs = self._g_scale() if (self.full and (cfg.g_scaling == "diagonal" or cfg.optimizer == "projection"))\
            else None

    def _g_scale(self) -> np.ndarray:
        """(N, nb) sqrt of the diagonal of J's Hessian w.r.t. g, estimated (exact for the regularisation).

        Regularisation: tau_n (alpha Mg_ii + gamma Kg_ii) + beta Mg_ii (1/tau_n + 1/tau_{n+1}); misfit:
        2 M_ii at the scan steps, where a boundary value is observed directly. Between scans the misfit
        reaches g only through diffusion into the interior, which this leaves out. Variables with a
        very different curvature (scan steps vs. the steps between them, by up to 1e5 with weak
        regularisation) make L-BFGS crawl; scaled by this, every g variable has unit curvature.
        """
        m, cfg, tau = self.model, self.cfg, self.model.grid.tau
        dMg = m.Mg.getDiagonal().array[m.bidx]
        dKg = m.Kg.getDiagonal().array[m.bidx]
        dM = m.M.getDiagonal().array[m.bidx]
        diag = np.zeros((self.N + 1, self.nb))  # row n: step n (row 0, the first scan, is no control)
        for n in range(1, self.N + 1):
            diag[n] = tau[n] * (cfg.alpha * dMg + cfg.gamma * dKg) + cfg.beta * dMg / tau[n]
            if n < self.N:
                diag[n] += cfg.beta * dMg / tau[n + 1]
        for n in m.grid.obs_step[1:]:
            diag[n] += 2.0 * dM
        self._known_diag = diag[1:self.N + 1] / self.J_scale
        return self._scale_from(self._known_diag)

    @staticmethod
    def _scale_from(diag: np.ndarray) -> np.ndarray:
        floor = 1e-12 * max(float(diag.max(initial=0.0)), 1e-300)
        return np.sqrt(np.maximum(diag, floor))

    def probe_g_scale(self, x, seed: int = 12345) -> None:
        """Add the misfit's curvature between scans to the g scaling, measured at ``x``.

        One Hessian product with a random +-1 vector z (two gradients: J is
        quadratic in g) gives z_i (Hz)_i, whose mean over a time step's
        boundary nodes is the mean diagonal of the Hessian there (the
        off-diagonal terms average out over thousands of nodes). What exceeds
        the known part (regularisation and direct observation) is the
        curvature through diffusion into the interior, added uniformly to
        that step. Without it, weakly regularised steps between scans get a
        scale far too small and the inner CG stalls. ``x`` keeps its physical g.
        """
        if self.gs is None:
            return
        _, g = self.split(x)
        # +-1 drawn per voxel of the image grid and step: the same z on any number of ranks
        vox = self.model.vm.owned_voxel[self.model.bidx]
        nvox = int(np.prod(self.model.vm.shape))
        rng = np.random.default_rng(seed)
        z = np.empty((self.N, self.nb))
        for n in range(self.N):
            z[n] = 2.0 * rng.integers(0, 2, size=nvox, dtype=np.int8)[vox] - 1.0
        grads = []
        xw, gw = x.duplicate(), x.duplicate()
        for gg in (g[1:], g[1:] + z):
            x.copy(xw)
            arr = xw.array  # every rank takes the array: PETSc's cached norms stay consistent
            arr[self.nd:] = self.pack_g(gg)
            self.evaluate(xw, gw)
            grads.append(gw.array_r[self.nd:].reshape(self.N, self.nb) * self.gs)  # d/dg
        hz = grads[1] - grads[0]
        from mpi4py import MPI

        tot = self.comm.allreduce((z * hz).sum(axis=1), op=MPI.SUM)
        known = self.comm.allreduce(self._known_diag.sum(axis=1), op=MPI.SUM)
        count = self.comm.allreduce(self.nb, op=MPI.SUM)
        extra = np.maximum(tot - known, 0.0) / max(count, 1)
        self.g_extra = extra
        self.gs = self._scale_from(self._known_diag + extra[:, None])
        arr = x.array
        arr[self.nd:] = self.pack_g(g[1:])
        for v in (xw, gw):
            v.destroy()
        log.info("g scaling: diffusive misfit curvature between scans %.3g..%.3g (per node, normalised)",
                 float(extra.min()), float(extra.max()))

    def set_g_extra(self, extra) -> None:
        """Restore the probed curvature (:meth:`probe_g_scale`'s ``g_extra``, (N,)) on resume."""
        if self.gs is None:
            return
        self.g_extra = np.asarray(extra, dtype=np.float64)
        self.gs = self._scale_from(self._known_diag + self.g_extra[:, None])

    def set_weights(self, cfg, x=None, g_extra=None) -> None:
        """Switch to ``cfg``'s regularisation weights (a point of the regularisation path).

        The g scaling follows the new weights (keeping the probed diffusive
        curvature, or taking ``g_extra`` as the new one); ``x``, when given, keeps its physical g.
        """
        g = self.split(x)[1][1:].copy() if (x is not None and self.full) else None
        self.cfg = cfg
        if self.gs is not None:
            if g_extra is not None:
                self.g_extra = np.asarray(g_extra, dtype=np.float64)
            extra = getattr(self, "g_extra", None)
            self._g_scale()
            self.gs = self._scale_from(self._known_diag + (extra[:, None] if extra is not None else 0.0))
        if g is not None:
            arr = x.array
            arr[self.nd:] = self.pack_g(g)

    def pack_g(self, g_steps: np.ndarray) -> np.ndarray:
        """Control-vector entries of g^1..g^N ((N, nb) physical values)."""
        return (g_steps * self.gs if self.gs is not None else g_steps).ravel()

    def unpack_g(self, arr: np.ndarray) -> np.ndarray:
        """(N, nb) physical g^1..g^N from the control-vector entries."""
        g = arr.reshape(self.N, self.nb)
        return g / self.gs if self.gs is not None else g

    # ----------------------------------------------------------- layout
    def create_vec(self):
        x = self.PETSc.Vec().createMPI((self.nloc, self.PETSc.DECIDE), comm=self.comm)
        x.set(0.0)
        return x

    def initial(self):
        x = self.create_vec()
        arr = x.array
        if self.nd:
            arr[0] = self.cfg.delta0 * self.ds
        if self.full:
            arr[self.nd:] = self.pack_g(self.g_data[1:])
        x.array[:] = arr
        return x

    def split(self, x) -> tuple[float, np.ndarray]:
        """(delta on every rank, g (N+1, nb_local) with g[0] = data)."""
        arr = x.array_r
        delta = self.comm.bcast(float(arr[0]) / self.ds if self.nd else None, root=0)
        if self.full:
            g = np.empty((self.N + 1, self.nb))
            g[0] = self.g_data[0]
            g[1:] = self.unpack_g(arr[self.nd:])
        else:
            g = self.g_data
        return delta, g

    def D_of(self, delta: float) -> tuple[float, float]:
        """(D, dD/ddelta)."""
        if self.cfg.d_param == "direct":
            return delta, 1.0
        s = sigmoid(delta)
        return self.cfg.d_min + s * self.cfg.d_max, self.cfg.d_max * s * (1.0 - s)

    def auto_scale(self, x, eps: float = 1e-3) -> float:
        """Set s = sqrt(curvature along delta / curvature along uniform g) at ``x``.

        Two extra gradient evaluations (finite differences of the gradient
        along unit directions). Keeps ``x``'s delta unchanged. Returns s.
        """
        if not self.full or self.cfg.delta_scale is not None:
            return self.ds
        delta, _ = self.split(x)
        g0, g1, d = x.duplicate(), x.duplicate(), x.duplicate()
        self.evaluate(x, g0)
        curv = []
        for kind in ("delta", "g"):
            d.set(0.0)
            arr = d.array  # every rank takes the array: PETSc's cached norms stay consistent
            if kind == "delta":
                arr[: self.nd] = 1.0
            else:
                arr[self.nd:] = 1.0
            d.normalize()
            xe = x.copy()
            xe.axpy(eps, d)
            self.evaluate(xe, g1)
            g1.axpy(-1.0, g0)
            curv.append(abs(g1.dot(d)) / eps)
            xe.destroy()
        ratio = curv[0] / curv[1] if curv[1] > 0 else 1.0
        self.ds *= float(np.sqrt(max(ratio, 1e-300)))
        arr = x.array  # on every rank (see above)
        arr[: self.nd] = delta * self.ds
        for v in (g0, g1, d):
            v.destroy()
        log.info("control scaling: delta curvature %.3g, g curvature %.3g -> delta scale %.3g",
                 curv[0], curv[1], self.ds)
        return self.ds

    # ----------------------------------------------------------- functional
    def regularisation(self, g: np.ndarray) -> tuple[float, np.ndarray]:
        """(R, dR/dg (N+1, nb) with row 0 zero)."""
        m = self.model
        a, b, c = self.cfg.alpha, self.cfg.beta, self.cfg.gamma
        tau = m.grid.tau
        R = 0.0
        dR = np.zeros_like(g)
        full = np.zeros(m.n_owned)
        for n in range(1, self.N + 1):
            full[:] = 0.0
            full[m.bidx] = g[n]
            Mg_g = m.apply(m.Mg, full)[m.bidx]
            Kg_g = m.apply(m.Kg, full)[m.bidx]
            full[m.bidx] = (g[n] - g[n - 1]) / tau[n]
            Mg_dg = m.apply(m.Mg, full)[m.bidx]
            R += 0.5 * tau[n] * (a * np.dot(g[n], Mg_g) + c * np.dot(g[n], Kg_g)) \
                + 0.5 * tau[n] * b * np.dot((g[n] - g[n - 1]) / tau[n], Mg_dg)
            dR[n] += tau[n] * (a * Mg_g + c * Kg_g) + b * Mg_dg
            if n > 1:
                dR[n - 1] -= b * Mg_dg
        from mpi4py import MPI

        R = self.comm.allreduce(R, op=MPI.SUM)
        return R, dR

    def evaluate(self, x, grad=None) -> float:
        """Normalised J(x) / J_scale; fills ``grad`` (same layout) when given."""
        m = self.model
        delta, g = self.split(x)
        D, dD_ddelta = self.D_of(delta)
        states = m.forward(D, self.c0, g)
        misfits = []
        jc = {}
        for i, n in enumerate(m.grid.obs_step):
            if i == 0:
                misfits.append(0.0)
                continue
            r = states[n] - self.data[i]
            misfits.append(m.quad(m.M, r))
            jc[int(n)] = 2.0 * m.apply(m.M, r)
        J = float(sum(misfits))
        R = 0.0
        if self.full:
            R, dR = self.regularisation(g)
            J += R
        self.evaluations += 1
        self.last = {"D": D, "delta": delta, "J": J, "R": R, "misfits": misfits, "states": states, "g": g}
        if grad is not None:
            dg, dD = m.adjoint(D, states, jc)
            arr = np.empty(self.nloc)
            if self.nd:
                arr[0] = dD * dD_ddelta / self.J_scale / self.ds
            if self.full:
                dgs = (dg[1:] + dR[1:]) / self.J_scale
                arr[self.nd:] = (dgs / self.gs if self.gs is not None else dgs).ravel()
            grad.array[:] = arr
        return J / self.J_scale
