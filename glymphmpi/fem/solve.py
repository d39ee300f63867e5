"""The FEM method end to end: mesh, data, TAO, outputs (``glymph fem``).

:func:`estimate` is the numerical core (no files); :func:`solve` is the
registry's ``solve`` (checkpoints, results.h5, XDMF, NIfTI maps); the figure is
the registry's hook :func:`glymphmpi.report.fem_figures.figures`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from glymphmpi.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class FemResult:
    """What an estimation returns (arrays hold this rank's owned dofs, in the input's units)."""

    D: float
    delta: float
    iterations: int
    reason: str
    J: float
    R: float
    misfits: list
    data_norms: list
    history: dict
    states: np.ndarray
    g: np.ndarray
    evaluations: int
    seconds: float
    eval_seconds: float
    ksp_iterations_per_solve: float
    vm: object = None
    model: object = None
    problem: object = None
    converged: bool = True
    warnings: list = field(default_factory=list)
    ci95: list | None = None
    selection: dict = field(default_factory=dict)
    data_scale: float = 1.0
    dt_h: float = 0.0


#: every data-boundary run says what its D is (measured: the BIDS demo's noise-free 12 mm phantom, scans
#: every 4 h, true D 0.72: data-boundary D = 0.843, +17%, "converged")
DATA_BOUNDARY_WARNING = ("fem.mode = data-boundary: the boundary concentration is the scans' boundary values "
                         "interpolated linearly in time, so D is biased wherever it is not linear between scans "
                         "(+17% on a noise-free phantom scanned every 4 h) and has no interval; "
                         "fem.mode = boundary-control (the default) fits it")


def _new_history() -> dict:
    return {"iteration": [], "J": [], "J_normalised": [], "gnorm": [], "D": [], "R": [], "misfit": [],
            "wall_s": []}


class Controls:
    """Partition-independent form of the controls, for checkpoints.

    The boundary values are stored by global boundary voxel index, so a run
    can resume on another number of ranks.
    """

    def __init__(self, problem):
        self.p = problem
        m = problem.model
        self.bvox = m.vm.owned_voxel[m.bidx]

    def gather(self, x) -> dict:
        p = self.p
        delta, g = p.split(x)
        out = {"delta": float(delta)}
        if p.full:
            parts = p.comm.gather((self.bvox, g[1:]), root=0)
            if p.comm.rank == 0:
                vox = np.concatenate([v for v, _ in parts])
                vals = np.concatenate([gv for _, gv in parts], axis=1)
                order = np.argsort(vox)
                out["bvox"] = vox[order]
                out["g"] = vals[:, order]
        return out

    def scatter(self, state: dict, x, where=None) -> None:
        p = self.p
        arr = x.array
        if p.nd:
            arr[0] = float(state["delta"]) * p.ds
        if p.full:
            g = np.asarray(state["g"])
            bvox = np.asarray(state["bvox"])
            pos = np.searchsorted(bvox, self.bvox)
            ok = (g.shape[0] == p.N) and np.all(pos < bvox.size) and np.all(bvox[np.minimum(pos, bvox.size - 1)]
                                                                            == self.bvox)
            if not p.comm.allreduce(bool(ok), op=_land()):
                raise InputError("checkpoint does not match this mesh and time grid (other dt_h or "
                                 "subject?); rerun with --fresh", where)
            arr[p.nd:] = p.pack_g(g[:, pos])
        x.array[:] = arr


def _land():
    from mpi4py import MPI

    return MPI.LAND


def _check_finite(cfg) -> None:
    """No NaN/Inf setting reaches PETSc (the config layer checks too; this is the FEM's own guard)."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        items = v.items() if isinstance(v, dict) else [(None, v)]
        for k, val in items:
            if isinstance(val, float) and not math.isfinite(val):
                name = f"fem.{f.name}" + (f".{k}" if k is not None else "")
                raise InputError(f"{name}: must be finite, got {val}")
            if isinstance(val, str) and k is not None and val.strip().lower() in ("nan", "inf", "+inf", "-inf",
                                                                                  "infinity", "-infinity"):
                raise InputError(f"fem.{f.name}.{k}: must be finite, got {val}")


def _near_bound(cfg, D: float) -> str | None:
    if cfg.d_param != "sigmoid":
        return None
    lo, hi = cfg.d_min, cfg.d_min + cfg.d_max
    tol = 0.02 * cfg.d_max
    if D - lo < tol or hi - D < tol:
        return (f"D = {D:.4g} mm^2/h lies at a bound of its parametrisation [{lo:g}, {hi:g}] mm^2/h "
                f"(fem.d_min, fem.d_min + fem.d_max): not an estimate of D; widen the bounds or check the data")
    return None


def _scaled_cfg(cfg, base, s: float):
    return dataclasses.replace(cfg, alpha=base.alpha * s, beta=base.beta * s, gamma=base.gamma * s)


def estimate(subject, cfg, comm, checkpointer=None, quiet: bool = True) -> FemResult:
    """Fit D (and g) to a subject's scans.

    With ``fem.regularization = "auto"`` (boundary-control mode, some weight
    > 0) the common scale of the weights is chosen from the data along a path
    of scales (see :mod:`glymphmpi.fem.auto`), an interval for D is computed and
    the time step is checked by a solve with half of it.

    Args:
        subject: :class:`glymphmpi.subject.Subject`.
        cfg: :class:`glymphmpi.fem.config.FemConfig`.
        comm: MPI communicator.
        checkpointer: optional :class:`glymphmpi.store.Checkpointer`; controls,
            history and the optimiser's and the path's state are saved every
            ``checkpoint_every`` iterations and loaded at the start when present.
    Raises:
        InputError: bad settings or data (one line), including settings whose
            time series would not fit in memory.
    """
    from glymphmpi.fem import auto as A
    from glymphmpi.fem.forward import DiffusionModel, TimeGrid
    from glymphmpi.fem.mesh import build_mesh
    from glymphmpi.fem.problem import ControlProblem
    from glymphmpi.fem.projection import NoiseProbes
    from glymphmpi.fem.transfer import sample

    t_start = time.time()
    where = subject.path
    _check_finite(cfg)
    dt = cfg.dt_h if cfg.dt_h is not None else A.auto_dt(subject.times_h)
    TimeGrid.build(subject.times_h, math.inf, None, where)  # the cheap checks (scan count, order) first
    A.check_memory(subject.times_h, dt, cfg.t_end_h, subject.mask)
    grid = TimeGrid.build(subject.times_h, dt, cfg.t_end_h, where)
    scale = A.data_scale(subject.scans, subject.mask, where)
    vm = build_mesh(subject.mask, subject.affine, comm, where=subject.mask_path)
    base = dataclasses.replace(cfg, dt_h=dt)
    auto = (cfg.regularization == "auto" and cfg.mode == "boundary-control"
            and max(cfg.alpha, cfg.beta, cfg.gamma) > 0)
    run_cfg = dataclasses.replace(base, optimizer="projection") if auto else base
    model = DiffusionModel(vm, grid, cfg.theta, cfg.lumped_mass, cfg.petsc_prefix, cfg.petsc_options)
    data = sample(subject.scans, vm.owned_voxel) / scale
    problem = ControlProblem(model, data, run_cfg)
    controls = Controls(problem)
    x = problem.initial()
    history = _new_history()
    meta = {"phase": "path", "records": [], "scale": None, "offset": 0, "solver": {}, "g_extra": None,
            "refined": False}
    start = 0
    if checkpointer is not None:
        loaded = checkpointer.load()
        if loaded is not None:
            state, start = loaded
            if "meta" in state:
                meta.update(json.loads(state["meta"]))
            if meta["scale"] is not None:
                problem.set_weights(_scaled_cfg(run_cfg, base, meta["scale"]))
            if meta["g_extra"] is not None:
                problem.set_g_extra(meta["g_extra"])
            controls.scatter(state["controls"], x, checkpointer.path)
            history = {k: list(v) for k, v in state["history"].items()}
            log.info("resuming from %s at iteration %d", checkpointer.path, start)
    if run_cfg.optimizer == "tao" and not (problem.full and run_cfg.optimizer == "projection"):
        problem.auto_scale(x)
    log.info("%s: %d time steps of %.3g-%.3g h (theta = %g), %d controls, data scale %.4g", cfg.mode,
             grid.n_steps, grid.tau[1:].min(), grid.tau[1:].max(), cfg.theta, x.getSize(), scale)

    def state_fn(xv):
        def make():
            meta["g_extra"] = None if problem.g_extra is None else [float(v) for v in problem.g_extra]
            return {"controls": controls.gather(xv), "history": history, "meta": json.dumps(meta)}
        return make

    t_opt = time.time()
    counters = {"evaluations": problem.evaluations, "ksp": model.ksp_iterations, "solves": model.solves}

    def optimise(stage_cfg, start_local: int, correction=None):
        """One optimisation at ``stage_cfg``'s weights; iterations numbered from meta["offset"].

        ``correction``: a :class:`glymphmpi.fem.projection.NoiseProbes`: solve the noise-corrected
        estimating equation instead of minimising J in D (projection optimiser only).
        """
        offset = meta["offset"]
        solver_state = meta["solver"]

        def on_iteration(it, xv, f, gnorm):
            it_g = offset + it
            delta, _ = problem.split(xv)
            D, _ = problem.D_of(delta)
            last = problem.last
            same = bool(last) and last.get("delta") == delta
            misfit = last["misfits"] if same else [float("nan")] * len(data)
            R = last.get("R", float("nan")) if same else float("nan")
            if history["iteration"] and history["iteration"][-1] >= it_g:
                for k in history:
                    history[k] = history[k][:-1]
            s2 = scale ** 2  # history (and the checkpoint) in the input's units
            for k, v in (("iteration", it_g), ("J", f * problem.J_scale * s2), ("J_normalised", f), ("gnorm", gnorm),
                         ("D", D), ("R", R * s2), ("misfit", [m * s2 for m in misfit]),
                         ("wall_s", time.time() - t_start)):
                history[k].append(v)
            if not quiet or it_g % 10 == 0:
                log.info("it %3d  J = %.6e  |grad| = %.3e  D = %.6f mm^2/h", it_g, f * problem.J_scale * s2, gnorm, D)
            if checkpointer is not None:
                checkpointer.step(it_g, state_fn(xv))
            w = stage_cfg.d_window
            Ds = history["D"]
            return bool(stage_cfg.d_rtol > 0 and problem.full and len(Ds) > w and it - start_local >= w
                        and (max(Ds[-w - 1:]) - min(Ds[-w - 1:])) <= stage_cfg.d_rtol * Ds[-1])

        if problem.full and stage_cfg.optimizer == "projection":
            from glymphmpi.fem.projection import run_projection

            return run_projection(problem, stage_cfg, x, start_iteration=start_local, on_iteration=on_iteration,
                                  solver_state=solver_state, correction=correction)
        from glymphmpi.fem.tao import run_tao

        return run_tao(problem, stage_cfg, x, start_iteration=start_local, on_iteration=on_iteration)

    warnings: list = []
    converged = True
    selection: dict = {}
    ci = None
    n_obs = len(grid.obs_step)
    if not auto:
        out = optimise(run_cfg, start)
        if not out["reason"].startswith("CONVERGED"):
            converged = False
            warnings.append(f"the optimiser stopped on its iteration limit ({out['reason']} after "
                            f"{out['iterations']} iterations): D is not converged")
        total_its = out["iterations"]
        final_cfg = run_cfg
        if cfg.mode == "data-boundary":
            warnings.append(DATA_BOUNDARY_WARNING)
        if cfg.mode == "boundary-control":
            selection = {"rule": "fixed weights (fem.regularization = \"fixed\")" if max(
                cfg.alpha, cfg.beta, cfg.gamma) > 0 else "no regularisation (all weights 0)"}
    else:
        sigma, noise_rule = A.noise_level(subject.times_h, subject.scans, subject.mask,
                                          cfg.noise_sigma, scale)
        m_int = model.quad(model.M, model.pin.array)
        target = None if sigma is None else sigma ** 2 * m_int * (n_obs - 1)
        records = meta["records"]

        rule_name = cfg.regularization_rule
        if rule_name in ("noise", "corrected") and sigma is None:
            rule_name = "l-curve"
        if rule_name == "corrected" and sigma == 0.0:  # nothing to correct: the noise-free path
            rule_name = "discrepancy"
        if rule_name == "discrepancy" and sigma is None:
            rule_name = "l-curve"
        s_noise = A.noise_scale(sigma) if rule_name == "noise" else None
        probes = None  # rule "corrected": the noise probes, kept (warm) along the path and for the interval
        if rule_name == "corrected":
            s_noise = A.corrected_scale(sigma)
            probes = NoiseProbes(problem, run_cfg, cfg.noise_probes, sigma ** 2, seed=cfg.noise_probe_seed)

        def next_scale():
            done = [r["scale"] for r in records]
            if rule_name in ("noise", "corrected"):  # one decade stronger (warm start, bias term), the rule's
                rest = [v for v in (10.0 * s_noise, s_noise)
                        if not any(math.isclose(v, d, rel_tol=1e-9) for d in done)]
                return rest[0] if rest else None
            if rule_name == "l-curve":  # L-curve: every decade
                rest = [s for s in A.PATH_SCALES if s not in done]
                return rest[0] if rest else None
            if sigma == 0.0:  # noise-free: one warm-up decade, then the weakest scale
                rest = [s for s in A.PATH_SCALES[-2:] if s not in done]
                return rest[0] if rest else None
            if meta["refined"]:  # the interpolated scale was solved: done
                return None
            if records and records[-1]["misfit"] <= target:
                s, _ = A.morozov_pick([r for r in records if not r.get("refine")], target)
                meta["refined"] = True
                return s
            rest = [s for s in A.PATH_SCALES if s not in done]
            return rest[0] if rest else None

        resumed_stage = meta["phase"] == "path" and meta["scale"] is not None
        while meta["phase"] == "path":
            if resumed_stage:
                s, start_local = meta["scale"], start - meta["offset"]
                resumed_stage = False
            else:
                s = next_scale()
                if s is None:
                    break
                meta.update(scale=s, solver={}, offset=history["iteration"][-1] + 1 if history["iteration"] else 0)
                start_local = 0
            stage_cfg = _scaled_cfg(run_cfg, base, s)
            problem.set_weights(stage_cfg, x)
            log.info("regularisation scale %.3g: (alpha, beta, gamma) = (%.3g, %.3g, %.3g)", s, stage_cfg.alpha,
                     stage_cfg.beta, stage_cfg.gamma)
            if probes is not None:
                probes.set_weights(stage_cfg)
                capped0 = probes.inner_capped
            out = optimise(stage_cfg, start_local, probes)
            if probes is not None:
                out["inner_capped"] = int(out.get("inner_capped", 0)) + probes.inner_capped - capped0
            problem.evaluate(x)
            last = problem.last
            records.append({"scale": s, "D": float(last["D"]), "misfit": float(sum(last["misfits"])),
                            "R": float(last["R"]), "reason": out["reason"], "iterations": int(out["iterations"]),
                            "inner_capped": int(out.get("inner_capped", 0)),
                            "refine": bool(meta["refined"] and s not in A.PATH_SCALES),
                            "corrected": probes is not None})
            log.info("scale %.3g: D = %.6f, misfit %.4g (noise level %s), R = %.4g, %s", s, last["D"],
                     records[-1]["misfit"], "unknown" if target is None else f"{target:.4g}", last["R"],
                     out["reason"])
            meta["offset"] = history["iteration"][-1] + 1 if history["iteration"] else 0
            meta["scale"] = None
        # choose
        if meta["phase"] == "path":
            if rule_name == "corrected":
                kc = len(records) - 1
                rule = (f"noise-corrected estimating equation j'(delta) - sigma^2 T'(delta) = 0 ({cfg.noise_probes} "
                        f"noise probes) at scale {A.CORRECTED_SCALE_PER_SIGMA2:g} x (sigma / robust intensity)^2 = "
                        f"{s_noise:.3g} (clipped to [{A.PATH_SCALES[-1]:g}, 1]); " + noise_rule)
            elif rule_name == "noise":
                kc = len(records) - 1
                rule = (f"noise rule: scale = {A.SCALE_PER_SIGMA2:g} x (sigma / robust intensity)^2 = "
                        f"{s_noise:.3g} (clipped to [{A.PATH_SCALES[-1]:g}, 1]); " + noise_rule)
            elif rule_name == "l-curve":
                kc = A.lcurve_pick(records)
                rule = "L-curve corner (" + noise_rule + ")"
            elif sigma == 0.0:
                kc = len(records) - 1
                rule = "noise level zero (" + noise_rule + "): the weakest scale of the path"
            else:
                _, rule = A.morozov_pick([r for r in records if not r.get("refine")], target)
                kc = len(records) - 1
                if "not reached" in rule:
                    warnings.append("the discrepancy principle was not reached: even the weakest regularisation "
                                    "misfits the data more than the noise level (model error dominates)")
                rule = rule + "; " + noise_rule
            meta.update(phase="final", chosen=kc, rule=rule)
        kc = meta["chosen"]
        chosen = records[kc]
        final_cfg = _scaled_cfg(run_cfg, base, chosen["scale"])
        if kc != len(records) - 1 and meta.get("resolved") is None:  # L-curve corner: back to its scale
            meta.update(scale=chosen["scale"], solver={}, offset=history["iteration"][-1] + 1)
            problem.set_weights(final_cfg, x)
            out = optimise(final_cfg, 0)
            meta["resolved"] = out["reason"]
        problem.set_weights(final_cfg, x)
        for r in records:
            if not str(r["reason"]).startswith("CONVERGED"):
                converged = converged and r is not chosen
                warnings.append(f"scale {r['scale']:.3g}: the optimiser stopped on its iteration limit "
                                f"({r['reason']})" + (" at the chosen scale: D is not converged" if r is chosen
                                                      else ""))
            if r["inner_capped"]:
                warnings.append(f"scale {r['scale']:.3g}: {r['inner_capped']} inner CG solve(s) for g hit "
                                f"fem.inner_max_iterations")
        low = A.low_noise_warning(sigma, [r for r in records if not r.get("refine")], subject.times_h)
        if low:
            warnings.append(low)
        elif rule_name == "corrected":
            gap = A.scan_gap_warning(subject.times_h)
            if gap:
                warnings.append(gap)
        total_its = history["iteration"][-1] if history["iteration"] else 0
        # interval: Laplace approximation of j(delta) = min_g J, widened by the measured sensitivity
        sigma_ci = sigma
        if sigma is None:  # no noise level: the residual's at the chosen scale (interior nodes, scans >= 1)
            sigma_ci = math.sqrt(max(chosen["misfit"], 0.0) / max(m_int * (n_obs - 1), 1e-300))
        ci, extra = _interval(problem, final_cfg, x, meta, sigma_ci, vm, subject, records, kc, grid, data, comm,
                              checkpointer, state_fn, history, dt, warnings,
                              probes=probes if chosen.get("corrected") else None)
        if probes is not None:
            extra["probe_inner_iterations"] = probes.inner_iterations
            probes.close()
        if sigma is None:
            extra["noise_sigma_from_residual"] = sigma_ci * scale
        if target is not None and rule_name in ("noise", "corrected") and target > 0:
            extra["misfit_over_noise_level"] = chosen["misfit"] / target
        selection = {"rule": meta["rule"], "scale": chosen["scale"],
                     "weights": [final_cfg.alpha, final_cfg.beta, final_cfg.gamma],
                     "weight_ratios_from": [cfg.alpha, cfg.beta, cfg.gamma],
                     "noise_sigma": None if sigma is None else sigma * scale,
                     "target_misfit": None if target is None else target * scale ** 2,
                     "path": [{**r, "misfit": r["misfit"] * scale ** 2, "R": r["R"] * scale ** 2} for r in records],
                     **extra}
    opt_s = time.time() - t_opt
    n_eval = problem.evaluations - counters["evaluations"]
    ksp_per = (model.ksp_iterations - counters["ksp"]) / max(model.solves - counters["solves"], 1)
    problem.evaluate(x)  # final state at the solution
    last = problem.last
    norms = [model.quad(model.M, data[i]) * scale ** 2 for i in range(data.shape[0])]
    bound = _near_bound(cfg, last["D"])
    if bound:
        warnings.append(bound)
    for w in warnings:
        if comm.rank == 0:
            log.warning("%s", w)
    s2 = scale ** 2
    log.info("D = %.6f mm^2/h after %d iterations, %d evaluations, %.1f s%s", last["D"], total_its, n_eval, opt_s,
             "" if ci is None else f"; 95% interval [{ci[0]:.4f}, {ci[1]:.4f}]")
    reason = "CONVERGED" if converged else "NOT_CONVERGED"
    if not auto:
        reason = out["reason"]
    return FemResult(D=last["D"], delta=last["delta"], iterations=total_its, reason=reason,
                     J=last["J"] * s2, R=last["R"] * s2, misfits=[m * s2 for m in last["misfits"]], data_norms=norms,
                     history=history, states=last["states"] * scale, g=last["g"] * scale, evaluations=n_eval,
                     seconds=time.time() - t_start, eval_seconds=opt_s / max(n_eval, 1),
                     ksp_iterations_per_solve=ksp_per, vm=vm, model=model, problem=problem,
                     converged=converged, warnings=warnings, ci95=ci, selection=selection, data_scale=scale, dt_h=dt)


def _interval(problem, cfg, x, meta, sigma, vm, subject, records, kc, grid, data, comm, checkpointer, state_fn,
              history, dt, warnings, probes=None):
    """(D_ci95 [lo, hi], details): Laplace (noise) part widened by the measured sensitivity (see fem.auto).

    ``probes``: the :class:`glymphmpi.fem.projection.NoiseProbes` when D solves the noise-corrected
    equation F = j' - sigma^2 T' = 0: the noise part then comes from F's slope and the probes' spread
    (see fem.auto), and the time-step check solves the corrected equation on the finer grid.
    """
    from glymphmpi.fem import auto as A
    from glymphmpi.fem.projection import ReducedFunctional

    delta, _ = problem.split(x)
    D, dDdd = problem.D_of(delta)
    out = {}
    sd = 0.0
    # curvature of j(delta) = min_g J by a central difference of dj/ddelta (three inner solves): the Laplace
    # approximation's precision and the Newton step of the time-step check
    h = 0.02 if cfg.d_param == "sigmoid" else 0.01 * max(abs(delta), 1e-3)
    rf = ReducedFunctional(problem, cfg, x, atol=meta["solver"].get("atol"))
    try:
        _, pp = rf(delta + h)
        _, pm = rf(delta - h)
        _, p0 = rf(delta)  # back to the solution (x holds its g again)
        if probes is not None:  # the search's last evaluation was at the estimate
            t0 = probes.last[1] if probes.last is not None and probes.last[0] == delta else probes.slopes(delta)
            tp, tm = probes.slopes(delta + h), probes.slopes(delta - h)
    finally:
        rf.close()
    jpp = (pp - pm) / (2.0 * h) * problem.J_scale
    out["curvature_j_delta"] = jpp
    slope, target = jpp, 0.0
    v = float(abs(np.linalg.det(np.asarray(subject.affine)[:3, :3])))
    if probes is not None:
        s2 = sigma ** 2
        target = s2 * float(np.mean(t0))
        slope = jpp - s2 * (float(np.mean(tp)) - float(np.mean(tm))) / (2.0 * h)
        var_probe = float(np.var(t0, ddof=1)) if len(t0) > 1 else 0.0
        out.update(noise_correction={"probes": len(t0), "sigma2_T_prime": target, "probe_sd": math.sqrt(var_probe),
                                     "residual": p0 * problem.J_scale - target, "slope": slope})
        if slope > 0:
            var_d = (2.0 * s2 * v * slope + s2 ** 2 * var_probe * (1.0 + 1.0 / len(t0))) / slope ** 2
            sd = abs(dDdd) * math.sqrt(var_d)
        else:
            warnings.append(f"the noise-corrected estimating equation does not increase in D at the estimate "
                            f"(slope {slope:.3g}): the data do not determine D, and the interval is the whole "
                            f"range of D's parametrisation [{cfg.d_min:g}, {cfg.d_max:g}]")
            sd = float("nan")
    elif sigma is not None and sigma > 0:
        if jpp > 0:
            sd = abs(dDdd) * math.sqrt(2.0 * sigma ** 2 * v / jpp)
        else:
            warnings.append(f"the reduced functional is not convex in D at the estimate: the data do not "
                            f"determine D, and the interval is the whole range of D's parametrisation "
                            f"[{cfg.d_min:g}, {cfg.d_max:g}]")
            sd = float("nan")
    # sensitivity to the regularisation scale: change of D per half decade around the chosen scale
    sc = records[kc]["scale"]
    b_reg = 0.0
    for r in records:
        ld = abs(math.log10(r["scale"] / sc))
        if 1e-9 < ld <= 1.0 + 1e-9:
            b_reg = max(b_reg, abs(r["D"] - D) * 0.5 / ld)
    b_dt = 0.0
    if cfg.check_dt:
        D_half = _half_step_D(problem, cfg, x, grid, data, dt, slope, checkpointer, state_fn, history, target)
        b_dt = abs(D_half - D)
        out["D_half_dt"] = D_half
        if math.isfinite(sd) and b_dt > 1.96 * sd and sd > 0:
            warnings.append(f"halving the time step changes D by {b_dt:.3g} mm^2/h, more than the noise "
                            f"interval's half-width {1.96 * sd:.3g}: the interval includes it")
    bias = max(b_reg, b_dt)
    if b_reg > A.REG_SENSITIVITY_WARN * abs(D):
        warnings.append(f"D depends on the regularisation scale: half its change over the decade to the next "
                        f"stronger scale is {b_reg:.3g} mm^2/h ({100 * b_reg / abs(D):.1f}% of D); the interval "
                        f"includes it, and D itself may be off by that much")
    # no curvature: nothing bounds D but its parametrisation (never a narrow interval made of the bias alone)
    ci = A.interval(D, sd, bias) if math.isfinite(sd) else [float(cfg.d_min), float(cfg.d_max)]
    out.update(D_sd_noise=sd if math.isfinite(sd) else None, bias_regularisation=b_reg, bias_time_step=b_dt,
               interval_rule="D -+ (1.96 sd_noise + max(|D(dt/2) - D|, dD per half decade of scale))" + (
                   "; sd_noise from the slope of j' - sigma^2 T' and the probes' spread" if probes is not None
                   else "; sd_noise by the Laplace approximation"))
    return ci, out


def _half_step_D(problem, cfg, x, grid, data, dt, jpp, checkpointer=None, state_fn=None, history=None,
                 target: float = 0.0):
    """D with half the time step: a Newton and a secant step of the reduced functional on the finer grid.

    Solves j_half'(delta) = ``target`` (unnormalised; the noise correction sigma^2 T' at the estimate
    when D solves the corrected equation, taken as unchanged by the time step), ``jpp`` its slope.

    g is interpolated in time from the solution, the finer grid's best g for
    the estimate's delta is one inner solve warm-started from it, the Newton
    point delta_1 = delta - j_half'(delta) / j''(delta) uses the coarse grid's
    curvature (measured alone: 87% of the change on the tests' subject), and
    one secant step through (delta, delta_1) corrects for the finer grid's
    curvature. Two inner solves instead of a whole outer search.
    """
    from glymphmpi.fem.forward import DiffusionModel, TimeGrid
    from glymphmpi.fem.problem import ControlProblem
    from glymphmpi.fem.projection import ReducedFunctional

    model = problem.model
    times = grid.t[grid.obs_step]
    fine = TimeGrid.build(times, dt / 2.0, float(grid.t[-1]) if grid.t[-1] > times[-1] else None)
    fm = DiffusionModel(model.vm, fine, cfg.theta, cfg.lumped_mass, cfg.petsc_prefix, cfg.petsc_options)
    try:
        fp = ControlProblem(fm, data, cfg)
        if checkpointer is not None:  # a pending stop signal ends the run here, with the coarse solution saved
            checkpointer.step(history["iteration"][-1] if history["iteration"] else 0, state_fn(x))
        delta, g = problem.split(x)
        gf = np.empty((fine.n_steps + 1, g.shape[1]))
        for j in range(g.shape[1]):
            gf[:, j] = np.interp(fine.t, grid.t, g[:, j])
        xf = fp.initial()
        arr = xf.array
        if fp.nd:
            arr[0] = delta * fp.ds
        arr[fp.nd:] = fp.pack_g(gf[1:])
        if cfg.inner_probe:
            fp.probe_g_scale(xf)
        rf = ReducedFunctional(fp, cfg, xf)
        try:
            _, p0 = rf(delta)
            p0 = p0 - target / fp.J_scale
            d1 = delta - (p0 * fp.J_scale / jpp if jpp > 0 else 0.0)
            d2 = d1
            if d1 != delta:  # one secant step through the Newton point (the curvatures of the grids differ)
                _, p1 = rf(d1)
                p1 = p1 - target / fp.J_scale
                d2 = d1 - p1 * (d1 - delta) / (p1 - p0) if p1 != p0 else d1
        finally:
            rf.close()
        D_half = fp.D_of(d2)[0]
        log.info("time-step check: D = %.6f with dt = %.4g h (Newton + secant step from D = %.6f)", D_half,
                 dt / 2.0, fp.D_of(delta)[0])
        xf.destroy()
    finally:
        fm.destroy()
    return D_half


def write_xdmf(path_c, path_g, res: FemResult, every: int = 1) -> None:
    """c(t) and g(t) as XDMF time series (ParaView) on the distributed mesh."""
    from dolfinx import fem, io

    vm, model = res.vm, res.model
    grid = model.grid
    steps = sorted(set(range(0, grid.n_steps + 1, every)) | set(int(s) for s in grid.obs_step))
    for path, name in ((path_c, "c"), (path_g, "g")):
        u = fem.Function(vm.V)
        u.name = name
        with io.XDMFFile(vm.mesh.comm, str(path), "w") as xdmf:
            xdmf.write_mesh(vm.mesh)
            for n in steps:
                u.x.array[:] = 0.0
                if name == "c":
                    u.x.array[: vm.n_owned] = res.states[n]
                else:
                    u.x.array[model.bidx] = res.g[n]
                u.x.scatter_forward()
                xdmf.write_function(u, float(grid.t[n]))


def solve(subject, cfg, rundir, comm) -> dict:
    """``run_method`` callback: estimate and write every output; returns summary fields."""
    from glymphmpi.fem.transfer import to_voxels

    ckpt = rundir.checkpointer(every=cfg.checkpoint_every)
    from glymphmpi.log import quiet as quiet_mode

    res = estimate(subject, cfg, comm, checkpointer=ckpt, quiet=quiet_mode())
    vm, model = res.vm, res.model
    grid = model.grid
    obs = [int(s) for s in grid.obs_step]
    fit = to_voxels(res.states[obs], vm.owned_voxel, subject.mask, vm.nodes, comm)
    write_xdmf(rundir.vtk / "c.xdmf", rundir.vtk / "g.xdmf", res, cfg.vtk_every)
    rel = [float(np.sqrt(m / n)) if n > 0 else 0.0 for m, n in zip(res.misfits, res.data_norms)]
    if comm.rank == 0:
        for i, _t in enumerate(subject.times_h):
            rundir.write_map(f"fit_{i:02d}", fit[i], subject.affine)
            rundir.write_map(f"misfit_{i:02d}", (fit[i] - subject.scans[i]) * subject.mask, subject.affine)
        rundir.write_map("meshed_voxels", vm.nodes.astype(np.uint8), subject.affine)
        tree = {
            "D_mm2_per_h": res.D, "delta": res.delta, "J": res.J, "regularisation": res.R,
            "misfit_per_scan": np.asarray(res.misfits), "relative_misfit_per_scan": np.asarray(rel),
            "times_h": np.asarray(subject.times_h), "step_times_h": grid.t,
            "history": {k: np.asarray(v, dtype=np.float64) for k, v in res.history.items()},
            "mesh": {"cells": vm.n_cells, "nodes": vm.n_nodes, "boundary_nodes": vm.n_boundary,
                     "unmeshed_voxels": vm.unmeshed,
                     "description": "hexahedra between voxel centres (cells whose 8 corner voxels are in "
                                    "the mask), Q1; nodes = voxels"},
            "fit_at_scans": fit.astype(np.float32),
            "D_ci95_mm2_per_h": np.asarray(res.ci95 if res.ci95 is not None else [np.nan, np.nan]),
            "regularization": json.dumps(res.selection), "warnings": json.dumps(res.warnings),
            "converged": bool(res.converged), "data_scale": res.data_scale,
        }
        attrs = {"history_units": "J: (conc)^2 mm^3 + regularisation; D: mm^2/h"}
        rundir.write_results(tree, cfg, subject.id, attrs)
    comm.Barrier()
    ckpt.remove()
    model.destroy()
    return {
        "D_mm2_per_h": res.D, "mode": cfg.mode, "iterations": res.iterations, "tao_reason": res.reason,
        "evaluations": res.evaluations, "misfit_per_scan": res.misfits, "relative_misfit_per_scan": rel,
        "J": res.J, "regularisation": res.R, "time_steps": grid.n_steps, "dt_h": res.dt_h,
        "converged": res.converged, "warnings": list(res.warnings),
        "D_ci95_mm2_per_h": None if res.ci95 is None else [float(v) for v in res.ci95],
        "regularization": res.selection, "data_scale": res.data_scale,
        "theta": cfg.theta, "mesh_nodes": vm.n_nodes, "mesh_cells": vm.n_cells,
        "boundary_nodes": vm.n_boundary, "estimation_s": round(res.seconds, 3),
        "forward_adjoint_s": round(res.eval_seconds, 4),
        "ksp_iterations_per_solve": round(res.ksp_iterations_per_solve, 2), "ranks": comm.size,
    }
