"""One rOMT loop (rho0 -> target): set-up, Gauss-Newton, the loop's result dict."""

from __future__ import annotations

import logging
import time

import numpy as np
from mpi4py import MPI

from glymphmpi.errors import InputError
from glymphmpi.parallel import tune_malloc
from glymphmpi.romt.config import RomtConfig
from glymphmpi.romt.crop import RISK_TOLERANCE, crop_box, edge_distance, mass_at_risk, uncrop
from glymphmpi.romt.gn import GNState, LoopProblem, gauss_newton
from glymphmpi.romt.grid import ActiveLaplacian, default_workers
from glymphmpi.romt.runtime import single_threaded_blas
from glymphmpi.romt.scale import REFERENCE_INTENSITY
from glymphmpi.romt.transport import Transport

log = logging.getLogger(__name__)

SOURCE_RHO_FLOOR = 1e-2  # unbalanced: r^2 weighted by rho + 1% of the reference intensity (see UnbalancedProblem)


def active_set(mask: np.ndarray, dilation: int) -> np.ndarray:
    """Boolean (ni, nj, nk) cells whose velocity is unknown: the mask dilated (negative: all)."""
    if dilation < 0:
        return np.ones(mask.shape, bool)
    from scipy import ndimage

    act = mask.astype(bool)
    if dilation > 0:
        act = ndimage.binary_dilation(act, structure=ndimage.generate_binary_structure(3, 1),
                                      iterations=dilation)
    return act


def check_images(images: np.ndarray, names=None) -> None:
    """Raise InputError for fewer than 2 images, non-finite or all-zero ones."""
    if images.ndim != 4:
        raise InputError(f"rOMT needs a series of 3D images, got an array of shape {images.shape}")
    if images.shape[0] < 2:
        raise InputError(f"rOMT needs at least 2 scans, got {images.shape[0]}")
    for i, img in enumerate(images):
        where = names[i] if names is not None else None
        if not np.all(np.isfinite(img)):
            raise InputError(f"scan {i} has non-finite values", where)
        if np.any(img < 0):
            raise InputError(f"scan {i} has negative values (rOMT transports a density)", where)
        if not np.any(img > 0):
            raise InputError(f"scan {i} is all zero (inside the mask)", where)


def smooth_images(images: np.ndarray, mask: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of each image inside ``mask`` by normalised convolution
    (``G*(x m) / G*m`` on the mask, 0 outside): constants inside the mask are kept and no
    mass is smeared across its boundary."""
    if sigma <= 0:
        return images
    from scipy import ndimage

    m = np.asarray(mask, dtype=np.float64)
    w = ndimage.gaussian_filter(m, sigma, mode="constant")
    out = np.empty_like(images, dtype=np.float64)
    for i, img in enumerate(images):
        g = ndimage.gaussian_filter(np.asarray(img, dtype=np.float64) * m, sigma, mode="constant")
        out[i] = np.where(m > 0, g / np.maximum(w, 1e-12), 0.0)
    return out


def drift_velocity(rho0: np.ndarray, target: np.ndarray, T: float) -> np.ndarray:
    """(3,) uniform velocity moving the centre of mass of rho0 to that of target in model time T."""
    coms = []
    for r in (rho0, target):
        m = float(r.sum())
        coms.append(np.array([float((r.sum(axis=tuple(e for e in range(3) if e != d))
                                     * np.arange(r.shape[d])).sum()) / m for d in range(3)]))
    return (coms[1] - coms[0]) / T


def solve_loop(rho0: np.ndarray, target: np.ndarray, cfg: RomtConfig, active: np.ndarray,
               comm=MPI.COMM_SELF, state: dict | None = None, on_iteration=None, label: str = "",
               workers: int | None = None, source_region: np.ndarray | None = None,
               warm: dict | None = None) -> dict:
    """Solve one loop (rho0 -> target).

    Args:
        rho0, target: (ni, nj, nk) densities.
        cfg: settings.
        active: (ni, nj, nk) bool, where velocities are unknowns.
        comm: communicator whose ranks share this loop's particles (COMM_SELF: serial).
        state: resumable state from a checkpoint (``u`` full (nt, 3, M), ...), or None.
        on_iteration: ``f(state_fn, iteration)`` after each GN iteration (state_fn() gives
            the state with the full velocity).
        workers: scipy.fft threads (default: cores / ranks).
        source_region: (ni, nj, nk) chi of the unbalanced model (``cfg.model == "unbalanced"``):
            where the relative source may act (restricted to ``active``); None: all of ``active``.
        warm: start from a previous solution on the whole grid (or, when its objective is lower,
            from its velocity without its source, or from ``cfg.init``):
            ``velocity`` (nt, 3, ni, nj, nk), unbalanced also ``source`` (nt, ni, nj, nk) or None,
            and ``g0_norm``, the first solve's initial gradient norm (the gradient tolerance
            stays relative to it, so a warm start that is already converged stops at once).
    Returns:
        dict with velocity (nt, 3, ni, nj, nk) float32, density (nt+1, ni, nj, nk)
        float32, rho_end (N,) float64, objective_history, gn_iterations,
        pcg_iterations, kinetic, fit, smooth, objective, mass_error, misfit_rel,
        stop_reason, runtime_s; unbalanced: also source (nt, ni, nj, nk) float32, the
        relative source r per model time. Identical on the ranks of ``comm``.
    """
    if cfg.tune_malloc:
        tune_malloc()
    box = crop_box(active, (rho0, target), cfg.crop_margin)
    full_shape = rho0.shape
    chi = None
    if cfg.model == "unbalanced":
        chi = np.ascontiguousarray((active if source_region is None else source_region & active)[box])
    if warm is not None:
        src = warm.get("source")
        warm = {"velocity": np.asarray(warm["velocity"])[(slice(None), slice(None), *box)],
                "source": None if src is None else np.asarray(src)[(slice(None), *box)],
                "g0_norm": float(warm.get("g0_norm", 0.0))}
    with single_threaded_blas():
        res = _solve_box(np.ascontiguousarray(rho0[box]), np.ascontiguousarray(target[box]), cfg,
                         np.ascontiguousarray(active[box]), comm, state, on_iteration, label, workers, chi, warm)
    if tuple(res["density"].shape[1:]) != tuple(full_shape):
        risk, need = mass_at_risk(res["velocity"], res["density"], cfg.dt, cfg.crop_margin,
                                  edge_distance(box, full_shape), RISK_TOLERANCE)
        res = uncrop(res, box, full_shape, cfg.nt, cfg.crop_margin)
        # reported by glymphmpi.romt.results.loop_warnings (summary, log and report, whichever rank solved it)
        res["mass_at_risk"] = risk
        res["crop_margin_needed"] = need if risk > RISK_TOLERANCE else 0
        if risk > 0:
            log.debug("%sparticles carrying %.2e of the mass jumped as far as the crop edge in one step", label, risk)
    return res


def _solve_box(rho0, target, cfg, active, comm, state, on_iteration, label, workers, chi=None, warm=None) -> dict:
    t0 = time.perf_counter()
    c0 = time.process_time()
    shape = rho0.shape
    workers = workers or (cfg.fft_workers or default_workers(comm.size))
    act_flat = np.flatnonzero(active.ravel())
    tr = Transport(shape, act_flat, cfg.dt, cfg.sigma, cfg.boundary, comm=comm, workers=workers)
    lap = ActiveLaplacian(shape, act_flat, tr.pc.lo, tr.pc.hi)
    if chi is None:
        prob = LoopProblem(tr, rho0, target, cfg.nt, cfg.beta, cfg.gamma, lap)
    else:
        from glymphmpi.romt.unbalanced import UnbalancedProblem

        prob = UnbalancedProblem(tr, rho0, target, cfg.nt, cfg.beta, cfg.gamma, lap,
                                 chi.ravel()[act_flat].astype(np.float64), cfg.alpha,
                                 rho_floor=SOURCE_RHO_FLOOR * REFERENCE_INTENSITY,
                                 source_per_loop=cfg.source_time == "loop")
    if cfg.backend == "torch":  # the same problem on torch tensors (glymphmpi.romt.backend_torch)
        from glymphmpi.romt.backend_torch import torch_problem

        prob = torch_problem(prob, cfg.device, cfg.precision, threads=workers)
    ncomp = prob.u_shape[1]
    lo, hi = tr.pc.lo, tr.pc.hi
    if state is not None:
        u_full = np.asarray(state["u"], dtype=np.float64)
        if u_full.shape != (cfg.nt, ncomp, act_flat.size):
            raise InputError(f"checkpoint velocity has shape {u_full.shape}, expected "
                             f"{(cfg.nt, ncomp, act_flat.size)}; run with --fresh")
        gs = GNState(u=u_full[:, :, lo:hi].copy(), history=list(state["history"]),
                     iterations=int(state["iterations"]), pcg_iterations=int(state["pcg_iterations"]),
                     g0_norm=float(state["g0_norm"]), done=bool(state["done"]), reason=str(state["reason"]),
                     step_rel=float(state.get("step_rel", float("inf"))),
                     phi_ref=float(state.get("phi_ref", 0.0)))
    else:
        cold = prob.zeros()
        if cfg.init == "drift":
            cold[:, :3] = drift_velocity(rho0, target, cfg.nt * cfg.dt)[None, :, None]
        if warm is None:
            gs = GNState(u=cold)
        else:
            # the previous solution is usually the best start, but not always: on the rat, loop 0's source
            # (mass +65%) applied to loop 1 (+31%) started at 500x loop 0's final objective. Start from
            # the candidate with the lowest objective (identical on all ranks): the previous solution,
            # its velocity without its source, or the cold start; the gradient tolerance keeps the
            # first solve's scale
            u_w = prob.zeros()
            u_w[:, :3] = np.asarray(warm["velocity"]).reshape(cfg.nt, 3, -1)[:, :, act_flat[lo:hi]]
            cands = [("the previous solution", u_w)]
            if ncomp == 4 and warm.get("source") is not None:
                u_v = u_w.copy()
                u_w[:, 3] = np.asarray(warm["source"]).reshape(cfg.nt, -1)[:, act_flat[lo:hi]]
                cands.append(("the previous velocity without its source", u_v))
            cands.append((f"the {cfg.init} start", cold))
            vals = [prob.objective(u).total for _, u in cands]
            best = int(np.argmin(vals))
            log.info("%sstarting from %s (objective %.4g; candidates %s)", label, cands[best][0], vals[best],
                     ", ".join(f"{v:.4g}" for v in vals))
            gs = GNState(u=cands[best][1], g0_norm=warm["g0_norm"], phi_ref=vals[-1])

    def full_u(u):
        return tr.pc.allgather(u.reshape(-1, u.shape[-1])).reshape(cfg.nt, ncomp, act_flat.size)

    def callback(st: GNState):
        if on_iteration is not None:
            on_iteration(lambda: {"u": full_u(st.u), "history": np.asarray(st.history),
                                  "iterations": st.iterations, "pcg_iterations": st.pcg_iterations,
                                  "g0_norm": st.g0_norm, "done": st.done, "reason": st.reason,
                                  "step_rel": st.step_rel, "phi_ref": st.phi_ref},
                         st.iterations)

    gs = gauss_newton(prob, gs, cfg.max_iterations, cfg.gn_gtol, cfg.gn_ftol, cfg.pcg_max_iterations, cfg.pcg_rtol,
                      cfg.ls_max_halvings, cfg.armijo_c, on_iteration=callback, label=label, tau=cfg.gn_tol)
    lin = prob.forward(gs.u)
    u = full_u(gs.u)
    n = int(np.prod(shape))
    vel = np.zeros((cfg.nt, 3, n), dtype=np.float32)
    vel[:, :, act_flat] = u[:, :3]
    dens = np.stack([r.reshape(shape) for r in lin.rhos]).astype(np.float32)
    m0 = float(lin.rhos[0].sum())
    rho_end = lin.rhos[-1]
    tn = float(np.linalg.norm(prob.target))
    out = {
        "velocity": vel.reshape(cfg.nt, 3, *shape),
        "density": dens,
        "rho_end": rho_end.copy(),
        "objective_history": np.asarray(gs.history, dtype=np.float64),
        "gn_iterations": int(gs.iterations),
        "pcg_iterations": int(gs.pcg_iterations),
        "kinetic": lin.terms.kinetic,
        "fit": lin.terms.fit,
        "smooth": lin.terms.smooth,
        "objective": lin.terms.total,
        "mass_error": float((rho_end.sum() - m0) / m0),
        "target_mass_change": float((prob.target.sum() - m0) / m0),
        "misfit_rel": float(np.linalg.norm(rho_end - prob.target) / tn) if tn > 0 else 0.0,
        "stop_reason": gs.reason,
        "g0_norm": float(gs.g0_norm),
        "runtime_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - c0,
        "active_voxels": int(act_flat.size),
    }
    if ncomp == 4:
        src = np.zeros((cfg.nt, n), dtype=np.float32)
        src[:, act_flat] = u[:, 3] * chi.ravel()[act_flat]
        out["source"] = src.reshape(cfg.nt, *shape)
        out["source_cost"] = lin.terms.source
    return out
