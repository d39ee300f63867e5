"""Drive PETSc TAO over the distributed control vector, with per-iteration callbacks."""

from __future__ import annotations

import logging
import time

from glymphmpi.fem.forward import object_prefix, petsc_options

log = logging.getLogger(__name__)


def run_tao(problem, cfg, x, start_iteration: int = 0, on_iteration=None) -> dict:
    """Minimise ``problem.evaluate`` from ``x`` (updated in place) with TAO.

    Args:
        problem: :class:`glymphmpi.fem.problem.ControlProblem`.
        cfg: FemConfig (tao_type, tolerances, memory, tao_options).
        x: initial control Vec; holds the solution afterwards.
        start_iteration: iterations done before (on resume); TAO gets
            ``max_iterations - start_iteration`` more.
        on_iteration: ``f(iteration, x, f, gnorm) -> bool`` called by every TAO
            monitor call (iteration counted from ``start_iteration``); a true
            return value stops TAO (reason CONVERGED_USER, reported as
            "CONVERGED_D_STAGNATION"); it may raise (e.g. Preempted): TAO then
            stops and the exception is re-raised.
    Returns:
        {"reason": str, "iterations": int (total), "f": float, "gnorm": float}
    """
    from petsc4py import PETSc

    comm = problem.comm
    opts = {f"tao_{cfg.tao_type}_mat_lmvm_hist_size": cfg.lmvm_memory}
    opts.update(cfg.tao_options)
    tao = PETSc.TAO().create(comm)
    prefix = object_prefix(cfg.petsc_prefix, tao)
    tao.setOptionsPrefix(prefix)
    tao.setType(cfg.tao_type)
    failure: list = []
    stopped: list = []
    grad = x.duplicate()

    def objgrad(tao_, xv, gv):
        if failure:
            return float("nan")
        try:
            return problem.evaluate(xv, gv)
        except BaseException as exc:  # re-raised after TAO returns
            failure.append(exc)
            gv.set(0.0)
            return float("nan")

    def monitor(tao_):
        its = tao_.getIterationNumber()
        f, gnorm, _ = tao_.getSolutionNorm()
        if failure:
            tao_.setConvergedReason(PETSc.TAO.Reason.DIVERGED_USER)
            return
        try:
            if on_iteration is not None and on_iteration(start_iteration + its, tao_.getSolution(), f, gnorm):
                stopped.append(its)
                tao_.setConvergedReason(PETSc.TAO.Reason.CONVERGED_USER)
        except BaseException as exc:
            failure.append(exc)
            tao_.setConvergedReason(PETSc.TAO.Reason.CONVERGED_USER)

    tao.setObjectiveGradient(objgrad, grad)
    tao.setMonitor(monitor)
    tao.setTolerances(gatol=cfg.gatol, grtol=cfg.grtol, gttol=0.0)
    tao.setMaximumIterations(max(0, cfg.max_iterations - start_iteration))
    if cfg.tao_type in ("blmvm", "bqnls", "bncg") and cfg.d_param == "direct":
        lb, ub = x.duplicate(), x.duplicate()
        lb.set(PETSc.NINFINITY)
        ub.set(PETSc.INFINITY)
        arr = lb.array  # on every rank: PETSc's cached norms must change collectively
        arr[: problem.nd] = 1e-6 * problem.ds  # D = delta > 0
        tao.setVariableBounds(lb, ub)
    with petsc_options(prefix, opts):
        tao.setFromOptions()
    tao.setSolution(x)
    t0 = time.time()
    tao.solve()
    reason = tao.getConvergedReason()
    its = tao.getIterationNumber()
    f, gnorm, _ = tao.getSolutionNorm()
    tao.destroy()
    grad.destroy()
    if failure:
        raise failure[0]
    names = {v: k for k, v in vars(PETSc.TAO.Reason).items() if not k.startswith("_")}
    name = "CONVERGED_D_STAGNATION" if stopped else names.get(reason, str(reason))
    out = {"reason": name, "iterations": start_iteration + its,
           "f": float(f), "gnorm": float(gnorm), "seconds": time.time() - t0}
    log.info("TAO %s: %s after %d iterations (f = %.6g, |g| = %.3g)", cfg.tao_type, out["reason"],
             out["iterations"], f, gnorm)
    return out
