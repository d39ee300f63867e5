"""Variable projection: eliminate the boundary control g, then solve a 1D problem in D.

For a fixed D the state is affine in g and J is quadratic in it, so the best
g for that D solves one linear system, H(D) u = b(D), with H the (scaled)
Hessian of J in g. This module solves it with PETSc KSP (CG on a
matrix-free operator: every product is one forward and one adjoint solve,
``H v = grad J(v) - grad J(0)``, exact because J is quadratic in g), warm
started from the previous D's solution. What is left is the reduced
functional j(D) = min_g J(D, g), a smooth function of one variable, whose
derivative is dJ/dD at the inner solution (the inner gradient vanishes
there). Its root is found by a safeguarded secant iteration (bracketing
with the Illinois rule once the sign changes).

Why not L-BFGS on (D, g) together: J has a long curved valley along which a
larger D is traded for a flatter g. L-BFGS walks along it in tiny steps (on
the 24^3 phantom with weak regularisation, 150 iterations moved D only from
0.767 to 0.760 while the valley's floor is at 0.742), and stopping rules
based on D's progress fire long before the bottom. Eliminating g removes the
valley: each outer step lands on its floor.
"""

from __future__ import annotations

import logging
import math
import time

log = logging.getLogger(__name__)


class _Hessian:
    """Matrix-free (scaled) Hessian of J in g at fixed delta, as a PETSc Python Mat context."""

    def __init__(self, problem, x, grad):
        self.p, self.x, self.grad = problem, x, grad
        self.grad0 = None  # (owned g part of) grad J at g = 0 for the current delta
        self.products = 0

    def mult(self, mat, v, y):
        p = self.p
        arr = self.x.array  # every rank takes the array: PETSc's cached norms stay consistent
        arr[p.nd:] = v.array_r
        p.evaluate(self.x, self.grad)
        y.array[:] = self.grad.array_r[p.nd:] - self.grad0
        self.products += 1


class ReducedFunctional:
    """j(delta) = min_g J(delta, g) and dj/ddelta, by an inner CG solve for g warm-started from ``x``.

    ``x`` is updated in place (its g part holds the inner solution of the last
    call). The first solve reduces its residual by ``inner_rtol``; later ones
    stop at that absolute residual (``atol``, kept in :attr:`state` for a
    resume), so every j and dj/ddelta is computed to the same accuracy.
    Call :meth:`close` when done (collective).
    """

    def __init__(self, problem, cfg, x, atol: float | None = None):
        from petsc4py import PETSc

        from glymphmpi.fem.forward import object_prefix, petsc_options

        self.PETSc = PETSc
        self.p, self.cfg, self.x = problem, cfg, x
        comm = problem.comm
        self.grad = x.duplicate()
        ng = problem.nloc - problem.nd
        self.rhs = PETSc.Vec().createMPI((ng, PETSc.DECIDE), comm=comm)
        self.u = self.rhs.duplicate()
        self.H = PETSc.Mat().createPython(((ng, PETSc.DECIDE), (ng, PETSc.DECIDE)), comm=comm)
        self.ctx = _Hessian(problem, x, self.grad)
        self.H.setPythonContext(self.ctx)
        self.H.setUp()
        self.ksp = ksp = PETSc.KSP().create(comm)
        prefix = object_prefix(cfg.petsc_prefix + "inner_", ksp)
        inner = {"ksp_type": "cg", "pc_type": "none", "ksp_rtol": cfg.inner_rtol,
                 "ksp_max_it": cfg.inner_max_iterations, "ksp_converged_use_initial_residual_norm": True,
                 **cfg.inner_options}
        ksp.setOptionsPrefix(prefix)
        ksp.setOperators(self.H)
        with petsc_options(prefix, inner):
            ksp.setFromOptions()
        ksp.setInitialGuessNonzero(True)
        self.atol = None
        if atol is not None:
            self._fix_atol(atol)
        self.inner_iterations = 0
        self.inner_capped = 0  # inner solves stopped by the iteration cap

    def _fix_atol(self, atol: float) -> None:
        _, _, dtol0, maxit0 = self.ksp.getTolerances()
        self.atol = max(float(atol), 1e-300)
        self.ksp.setTolerances(rtol=1e-30, atol=self.atol, divtol=dtol0, max_it=maxit0)

    def __call__(self, delta: float) -> tuple[float, float]:
        PETSc, p, x, ksp, nd = self.PETSc, self.p, self.x, self.ksp, self.p.nd
        arr = x.array
        self.u.array[:] = arr[nd:]
        if nd:
            arr[0] = delta * p.ds
        arr[nd:] = 0.0
        p.evaluate(x, self.grad)  # gradient at g = 0: the affine part
        self.ctx.grad0 = self.grad.array_r[nd:].copy()
        self.rhs.array[:] = -self.ctx.grad0
        ksp.solve(self.rhs, self.u)
        if self.atol is None:
            self._fix_atol(ksp.getResidualNorm())
        reason = ksp.getConvergedReason()
        self.inner_iterations += ksp.getIterationNumber()
        if reason == PETSc.KSP.ConvergedReason.DIVERGED_MAX_IT:
            self.inner_capped += 1
        elif reason < 0:
            raise RuntimeError(f"inner KSP for g failed (reason {reason}); adjust fem.inner_options")
        arr = x.array
        arr[nd:] = self.u.array_r
        f = p.evaluate(x, self.grad)
        dphi = p.comm.bcast(float(self.grad.array_r[0]) * p.ds if nd else None, root=0)
        log.info("  D = %.6f: inner CG %d iterations (%s), j = %.6e, dj/ddelta = %.3e",
                 p.D_of(delta)[0], ksp.getIterationNumber(), reason, f, dphi)
        return f, dphi

    def close(self) -> None:
        self.ksp.destroy()
        self.H.destroy()
        for v in (self.grad, self.rhs, self.u):
            v.destroy()


def run_projection(problem, cfg, x, start_iteration: int = 0, on_iteration=None, solver_state: dict | None = None,
                   correction=None) -> dict:
    """Minimise J over (delta, g) from ``x`` (updated in place) by variable projection.

    Args and return value as :func:`glymphmpi.fem.tao.run_tao`; an iteration
    is one outer step (one value of D with its inner solve).
    ``solver_state``: a dict this function keeps up to date with the outer
    search's memory (bracket, last step, inner tolerance) before every
    ``on_iteration`` call; pass the saved one back on resume and the run
    continues exactly as it would have without the interruption.
    ``correction``: a callable delta -> unnormalised value (a :class:`NoiseProbes`) subtracted from
    dj/ddelta: the search then solves the corrected estimating equation
    j'(delta) - correction(delta) = 0 instead of j'(delta) = 0 (``gnorm`` is its residual).
    """
    t0 = time.time()
    state = solver_state if solver_state is not None else {}
    resumed = bool(state.get("atol"))
    rf0 = ReducedFunctional(problem, cfg, x, atol=state.get("atol") if resumed else None)

    def rf(d: float) -> tuple[float, float]:
        f_, ph = rf0(d)
        if correction is not None:
            ph = ph - correction(d) / problem.J_scale
        return f_, ph

    if cfg.inner_probe and not resumed:
        problem.probe_g_scale(x)
    delta, _ = problem.split(x)
    it = start_iteration
    failure = None
    reason = "DIVERGED_MAXITS"
    f, phi = float("nan"), float("nan")
    try:
        if resumed:
            bracket = {"a": state.get("a"), "b": state.get("b"), "side": state.get("side")}
            prev = state.get("prev")
            step = float(state["step"])
            f, phi = float(state["f"]), float(state["phi"])
        else:
            f, phi = rf(delta)
            bracket = {"a": None, "b": None, "side": None}  # a: phi < 0, b: phi > 0
            prev = None
            step = cfg.outer_step if cfg.d_param == "sigmoid" else cfg.outer_step * max(delta, 1e-3)

        def update(d: float, ph: float) -> None:
            # Illinois rule: when the same end is replaced twice in a row, halve the other end's phi
            side = "a" if ph < 0 else "b"
            other = "b" if side == "a" else "a"
            if bracket["side"] == side and bracket[other] is not None:
                bracket[other] = [bracket[other][0], 0.5 * bracket[other][1]]
            bracket[side] = [d, ph]
            bracket["side"] = side

        def remember() -> None:
            state.update(a=bracket["a"], b=bracket["b"], side=bracket["side"], prev=prev, step=step,
                         f=f, phi=phi, atol=rf0.atol)

        if not resumed:
            update(delta, phi)
            remember()
            if on_iteration is not None:
                on_iteration(it, x, f, abs(phi))
        while it < cfg.max_iterations:
            if phi == 0.0:
                reason = "CONVERGED_GATOL"
                break
            a, b = bracket["a"], bracket["b"]
            if a is not None and b is not None:  # regula falsi inside the bracket
                new = a[0] - a[1] * (b[0] - a[0]) / (b[1] - a[1])
            elif prev is not None and (prev[1] - phi) * (prev[0] - delta) > 0:
                # secant toward the root while unbracketed (positive curvature), at most 4x the last step
                sec = delta - phi * (delta - prev[0]) / (phi - prev[1])
                lim = 4.0 * abs(delta - prev[0])
                new = delta + max(-lim, min(lim, sec - delta))
            else:  # downhill by a growing step
                new = delta - math.copysign(step, phi)
                step *= 2.0
            prev = [delta, phi]
            D_old = problem.D_of(delta)[0]
            delta = new
            f, phi = rf(delta)
            update(delta, phi)
            it += 1
            D_new = problem.D_of(delta)[0]
            remember()
            if on_iteration is not None:
                on_iteration(it, x, f, abs(phi))
            if abs(D_new - D_old) <= cfg.d_rtol * abs(D_new):
                reason = "CONVERGED_D_STEP"
                break
    except BaseException as exc:  # re-raised after the clean-up
        failure = exc
    products = rf0.ctx.products
    inner_its, capped = rf0.inner_iterations, rf0.inner_capped
    rf0.close()
    if failure is not None:
        raise failure
    out = {"reason": reason, "iterations": it, "f": float(f), "gnorm": abs(float(phi)),
           "seconds": time.time() - t0, "inner_iterations": inner_its, "hessian_products": products,
           "inner_capped": capped}
    log.info("variable projection: %s after %d outer iterations, %d inner CG iterations (f = %.6g)",
             reason, it, inner_its, f)
    return out


class NoiseProbes:
    """sigma^2 T'(delta): the slope of the expected noise part of the reduced functional, by K noise probes.

    For fixed D, J is a quadratic form in the data (the initial scan enters
    the state linearly, the best g is linear in the data), so for data
    d = c + e with i.i.d. nodal noise of variance sigma^2,
    E_e[j(delta; d)] = j(delta; c) + sigma^2 T(delta), T(delta) = E_z[j(delta; z)]
    over unit white-noise "data" z (all scans, the initial one included).
    The truth minimises j(.; c) (up to model error), not j(.; d): where the
    number of data the free boundary values can absorb depends on D (it does:
    more diffusion spreads a boundary value's influence, so fewer interior
    noise values can be fitted), T' != 0 moves the minimiser (D biased low at
    weak regularisation; the Neyman-Scott problem of profiling many nuisance
    parameters). The corrected estimating equation is
    j'(delta) - sigma^2 T'(delta) = 0 (Hutchinson's estimator: T' is the mean
    of dj(delta; z_k)/ddelta over the probes).

    Each probe keeps its own inner solution, so the solves at successive
    values of delta are warm-started. The probe fields are drawn per voxel of
    the image grid from ``seed``, so they are the same on any number of ranks
    and on a resume. Call :meth:`close` when done (collective).

    Args:
        problem: the data's :class:`ControlProblem` (its model, weights and g scaling are used).
        sigma2: the noise variance in the problem's (scaled) units; 1 gives T' itself.
    """

    def __init__(self, problem, cfg, probes: int, sigma2: float = 1.0, seed: int = 2026):
        self.problem, self.cfg, self.probes, self.seed = problem, cfg, int(probes), int(seed)
        self.sigma2 = float(sigma2)
        self.items: list = []  # built at the first call, after the optimiser has set the g scaling
        self._stale = False
        self._iterations = 0  # inner iterations of closed ReducedFunctionals
        self._capped = 0
        self.last: tuple | None = None  # (delta, [dj(delta; z_k)/ddelta])

    def _build(self) -> None:
        import numpy as np

        from glymphmpi.fem.problem import ControlProblem

        problem = self.problem
        model = problem.model
        vox = model.vm.owned_voxel
        nvox = int(np.prod(model.vm.shape))
        rng = np.random.default_rng(self.seed)
        try:
            for _ in range(self.probes):
                z = np.stack([rng.standard_normal(nvox)[vox] for _ in range(problem.data.shape[0])])
                pz = ControlProblem(model, z, self.cfg)
                extra = self._g_extra_for(pz)
                if extra is not None:
                    pz.set_g_extra(extra)
                xz = pz.initial()
                arr = xz.array  # every rank takes the array: PETSc's cached norms stay consistent
                arr[pz.nd:] = 0.0
                self.items.append((pz, xz, ReducedFunctional(pz, self._inner_cfg(), xz)))
        except BaseException:
            self.close()
            raise

    #: the probes' inner solves may take this many times ``inner_max_iterations``: each starts cold from
    #: g = 0 (the data's first solve is warm-started from the previous scale), and noise data need more
    #: CG iterations than smooth data (the demo's 3%-noise phantom at s = 0.003: 293 and 295 iterations
    #: where the data's warm solve took 200)
    INNER_CAP_FACTOR = 2

    def _inner_cfg(self):
        import dataclasses

        return dataclasses.replace(self.cfg, inner_max_iterations=self.INNER_CAP_FACTOR * self.cfg.inner_max_iterations)

    def set_weights(self, cfg) -> None:
        """Move to another point of the regularisation path; each probe keeps its g as the next warm start."""
        self.cfg = cfg
        self._stale = True

    def _g_extra_for(self, pz):
        """The data problem's probed diffusive curvature in probe ``pz``'s normalisation, or None."""
        import numpy as np

        if self.problem.g_extra is None:
            return None
        return np.asarray(self.problem.g_extra) * self.problem.J_scale / pz.J_scale

    def _sync(self) -> None:
        """Weights and g scaling from the data's problem (its optimiser may have re-probed g_extra)."""
        for i, (pz, xz, rf) in enumerate(self.items):
            self._iterations += rf.inner_iterations
            self._capped += rf.inner_capped
            rf.close()
            pz.set_weights(self.cfg, xz, g_extra=self._g_extra_for(pz))  # keeps each probe's physical g
            self.items[i] = (pz, xz, ReducedFunctional(pz, self._inner_cfg(), xz))
        self._stale = False

    def slopes(self, delta: float) -> list:
        """[dj(delta; z_k)/ddelta for each probe], unnormalised (per unit noise variance)."""
        if not self.items:
            self._build()
        elif self._stale:
            self._sync()
        out = []
        for pz, _, rf in self.items:
            _, dphi = rf(delta)
            out.append(float(dphi) * pz.J_scale)
        self.last = (float(delta), out)
        return out

    def __call__(self, delta: float) -> float:
        """sigma^2 T'(delta), unnormalised."""
        v = self.slopes(delta)
        return self.sigma2 * sum(v) / len(v)

    @property
    def inner_iterations(self) -> int:
        return self._iterations + sum(rf.inner_iterations for _, _, rf in self.items)

    @property
    def inner_capped(self) -> int:
        return self._capped + sum(rf.inner_capped for _, _, rf in self.items)

    def close(self) -> None:
        for _, xz, rf in self.items:
            rf.close()
            xz.destroy()
        self.items = []


def noise_gradient(problem, cfg, delta: float, probes: int, seed: int = 2026) -> list:
    """[dj(delta; z_k)/ddelta for k < probes] on fresh probes (see :class:`NoiseProbes`), unnormalised."""
    np_ = NoiseProbes(problem, cfg, probes, 1.0, seed)
    try:
        return np_.slopes(delta)
    finally:
        np_.close()
