"""The FEM method end to end: mesh, data, TAO, outputs (``glymph fem``).

:func:`estimate` is the numerical core (no files); :func:`solve` is the
registry's ``solve`` (checkpoints, results.h5, XDMF, NIfTI maps); the figure is
the registry's hook :func:`glymphmpi.report.fem_figures.figures`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from glymphmpi.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class FemResult:
    """What an estimation returns (arrays hold this rank's owned dofs)."""

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


def estimate(subject, cfg, comm, checkpointer=None, quiet: bool = True) -> FemResult:
    """Fit D (and g) to a subject's scans.

    Args:
        subject: :class:`glymphmpi.subject.Subject`.
        cfg: :class:`glymphmpi.fem.config.FemConfig`.
        comm: MPI communicator.
        checkpointer: optional :class:`glymphmpi.store.Checkpointer`; controls
            and history are saved every ``checkpoint_every`` iterations and
            loaded at the start when present.
    """
    from glymphmpi.fem.forward import DiffusionModel, TimeGrid
    from glymphmpi.fem.mesh import build_mesh
    from glymphmpi.fem.problem import ControlProblem
    from glymphmpi.fem.tao import run_tao
    from glymphmpi.fem.transfer import sample

    t_start = time.time()
    where = subject.path
    grid = TimeGrid.build(subject.times_h, cfg.dt_h, cfg.t_end_h, where)
    vm = build_mesh(subject.mask, subject.affine, comm, where=subject.mask_path)
    model = DiffusionModel(vm, grid, cfg.theta, cfg.lumped_mass, cfg.petsc_prefix, cfg.petsc_options)
    data = sample(subject.scans, vm.owned_voxel)
    problem = ControlProblem(model, data, cfg)
    controls = Controls(problem)
    x = problem.initial()
    history = _new_history()
    start = 0
    if checkpointer is not None:
        loaded = checkpointer.load()
        if loaded is not None:
            state, start = loaded
            controls.scatter(state["controls"], x, checkpointer.path)
            history = {k: list(v) for k, v in state["history"].items()}
            log.info("resuming from %s at iteration %d", checkpointer.path, start)
    if cfg.optimizer == "tao":
        problem.auto_scale(x)
    log.info("%s: %d time steps of %.3g-%.3g h (theta = %g), %d controls", cfg.mode, grid.n_steps,
             grid.tau[1:].min(), grid.tau[1:].max(), cfg.theta, x.getSize())

    def state_fn(xv):
        return lambda: {"controls": controls.gather(xv), "history": history}

    t_opt = time.time()

    def on_iteration(it, xv, f, gnorm):
        delta, _ = problem.split(xv)
        D, _ = problem.D_of(delta)
        last = problem.last
        misfit = last["misfits"] if last and last.get("delta") == delta else [float("nan")] * len(data)
        R = last.get("R", float("nan")) if last and last.get("delta") == delta else float("nan")
        if history["iteration"] and history["iteration"][-1] >= it:
            for k in history:
                history[k] = history[k][:-1]
        for k, v in (("iteration", it), ("J", f * problem.J_scale), ("J_normalised", f), ("gnorm", gnorm),
                     ("D", D), ("R", R), ("misfit", list(misfit)), ("wall_s", time.time() - t_start)):
            history[k].append(v)
        if not quiet or it % 10 == 0:
            log.info("it %3d  J = %.6e  |grad| = %.3e  D = %.6f mm^2/h", it, f * problem.J_scale, gnorm, D)
        if checkpointer is not None:
            checkpointer.step(it, state_fn(xv))
        w = cfg.d_window
        Ds = history["D"]
        return bool(cfg.d_rtol > 0 and problem.full and len(Ds) > w and it - start >= w
                    and (max(Ds[-w - 1:]) - min(Ds[-w - 1:])) <= cfg.d_rtol * Ds[-1])

    ev0, ksp0, sol0 = problem.evaluations, model.ksp_iterations, model.solves
    if problem.full and cfg.optimizer == "projection":
        from glymphmpi.fem.projection import run_projection

        out = run_projection(problem, cfg, x, start_iteration=start, on_iteration=on_iteration)
    else:
        out = run_tao(problem, cfg, x, start_iteration=start, on_iteration=on_iteration)
    opt_s = time.time() - t_opt
    n_eval = problem.evaluations - ev0
    ksp_per = (model.ksp_iterations - ksp0) / max(model.solves - sol0, 1)
    problem.evaluate(x)  # final state at the solution
    last = problem.last
    norms = [model.quad(model.M, data[i]) for i in range(data.shape[0])]
    log.info("D = %.6f mm^2/h after %d iterations (%s), %d evaluations, %.1f s", last["D"], out["iterations"],
             out["reason"], n_eval, opt_s)
    return FemResult(D=last["D"], delta=last["delta"], iterations=out["iterations"], reason=out["reason"],
                     J=last["J"], R=last["R"], misfits=list(last["misfits"]), data_norms=norms,
                     history=history, states=last["states"], g=last["g"], evaluations=n_eval,
                     seconds=time.time() - t_start, eval_seconds=opt_s / max(n_eval, 1),
                     ksp_iterations_per_solve=ksp_per, vm=vm, model=model, problem=problem)


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
        }
        attrs = {"history_units": "J: (conc)^2 mm^3 + regularisation; D: mm^2/h"}
        rundir.write_results(tree, cfg, subject.id, attrs)
    comm.Barrier()
    ckpt.remove()
    model.destroy()
    return {
        "D_mm2_per_h": res.D, "mode": cfg.mode, "iterations": res.iterations, "tao_reason": res.reason,
        "evaluations": res.evaluations, "misfit_per_scan": res.misfits, "relative_misfit_per_scan": rel,
        "J": res.J, "regularisation": res.R, "time_steps": grid.n_steps, "dt_h": cfg.dt_h,
        "theta": cfg.theta, "mesh_nodes": vm.n_nodes, "mesh_cells": vm.n_cells,
        "boundary_nodes": vm.n_boundary, "estimation_s": round(res.seconds, 3),
        "forward_adjoint_s": round(res.eval_seconds, 4),
        "ksp_iterations_per_solve": round(res.ksp_iterations_per_solve, 2), "ranks": comm.size,
    }
