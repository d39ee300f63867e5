"""Loops of a series over MPI ranks: which rank group solves which loop, in which order.

* ``parallel`` mode: loops are independent (each starts from its measured
  image). The ranks are split into ``G = min(K, n_loops)`` groups of
  contiguous ranks; loops are dealt to groups in turn (loop k to group
  k mod G: :func:`parallel_loops`), so one group may hold several loops.
  With more ranks than loops a group has several ranks, which then share
  that loop's particles as in sequential mode.
* ``sequential`` mode: loop k starts from loop k-1's final interpolated
  density, so loops run in order; all K ranks work on every loop by
  splitting its particles (active voxels) into K blocks: each rank pushes
  and differentiates its own particles, the scattered densities are summed
  with Allreduce and per-particle values exchanged with Allgatherv; the grid
  operations (DCT diffusion solve) are replicated. Results agree with the
  one-rank run to round-off (only the order of the sums differs).

With a :class:`~glymphmpi.romt.loopstore.LoopStore`, finished loops and
per-group checkpoints go to the run directory; world rank 0 reads the loops
back from these files at the end.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from mpi4py import MPI

from glymphmpi.errors import Preempted
from glymphmpi.parallel import any_rank, split_evenly
from glymphmpi.romt.config import RomtConfig
from glymphmpi.romt.grid import default_workers
from glymphmpi.romt.loop import check_images, solve_loop
from glymphmpi.romt.loopstore import LoopStore
from glymphmpi.romt.scale import normalisation_factor

log = logging.getLogger(__name__)


def groups_for(n_loops: int, size: int, mode: str) -> int:
    """Number of rank groups: all ranks together in sequential mode, min(K, loops) in parallel and coupled."""
    return 1 if mode == "sequential" else max(1, min(size, n_loops))


def solve_series(images: np.ndarray, cfg: RomtConfig, active: np.ndarray, comm=MPI.COMM_SELF,
                 store: LoopStore | None = None, keep_arrays: bool = True,
                 source_region: np.ndarray | None = None) -> tuple[list, dict]:
    """Solve every loop of a series.

    Args:
        images: (p, ni, nj, nk) densities (p >= 2).
        cfg: settings (mode decides how loops start and are scheduled).
        active: (ni, nj, nk) bool.
        comm: world communicator (COMM_SELF in serial).
        store: persistence (checkpoints, finished-loop files) or None. With a
            store, finished loops are not kept in memory: rank 0 reads them
            back from their files at the end.
        keep_arrays: False drops velocity/density from the returned loops
            (scalars and histories only; for benchmarks at scale).
        source_region: chi of the unbalanced model (see :func:`glymphmpi.romt.loop.solve_loop`).
    Returns:
        (loops, info): loops is the list of per-loop dicts (see
        :func:`glymphmpi.romt.loop.solve_loop`) on world rank 0, [] elsewhere;
        info has n_groups and the solve time.
    """
    check_images(images)
    scale, factor = normalisation_factor(images)
    images = images * factor  # solved at the reference intensity; densities converted back below
    n_loops = images.shape[0] - 1
    size, rank = comm.size, comm.rank
    n_groups = groups_for(n_loops, size, cfg.mode)
    group = rank * n_groups // size
    gcomm = comm.Split(color=group, key=rank)
    t_start = time.perf_counter()
    try:
        if cfg.mode == "coupled":
            results, sweeps = _solve_coupled(images, cfg, active, comm, gcomm, group, n_groups, store,
                                             keep_arrays, source_region)
        else:
            results = _solve_group(images, cfg, active, comm, gcomm, group, n_groups, store, keep_arrays,
                                   source_region)
            sweeps = None
        out = _gather(results, n_loops, comm, gcomm, store, keep_arrays)
    finally:
        gcomm.Free()
    for res in out:
        to_image_units(res, factor, scale)
    info = {"n_groups": n_groups, "solve_s": time.perf_counter() - t_start, "intensity_scale": scale,
            "intensity_factor": factor}
    if sweeps is not None:
        info["coupled_sweeps"] = sweeps
    return out, info


def to_image_units(res: dict, factor: float, scale: float) -> dict:
    """Densities of a loop solved at the reference intensity back in the images' units (in place).

    Velocities need no conversion; the objective terms stay those of the normalised problem.
    """
    for key in ("density", "rho_end"):
        if key in res:
            res[key] = (np.asarray(res[key]) / factor).astype(np.asarray(res[key]).dtype)
    res["intensity_scale"] = scale
    res["intensity_factor"] = factor
    return res


def _checkpoint_each_iteration(ck, store, k: int):
    """The ``on_iteration`` callback of loop ``k``: a checkpoint of its Gauss-Newton state (tagged
    with the loop and the store's config key) when the checkpointer is due; nothing without one."""
    def on_it(state_fn, it):
        if ck is None:
            return

        def full_state():
            st = state_fn()
            st.update(loop=k, config_key=store.key)
            return st
        ck.step(it, full_state)
    return on_it


def parallel_loops(n_loops: int, n_groups: int, group: int) -> list[int]:
    """The loops of ``group`` in parallel mode: k = group, group + G, ... (dealt in turn; one group: all).

    Not contiguous blocks: on real series the early loops, where tracer still pours in, cost the
    most (the rat's 14 loops: 57, 58, 66, 55, 52, 41, 45 s for loops 0-6, 20-34 s for 7-13), so
    blocks left the second of 2 ranks idle half the time (solve 389 s, its loops done after 185 s)."""
    return list(range(group, n_loops, n_groups))


def _solve_group(images, cfg, active, comm, gcomm, group, n_groups, store, keep_arrays,
                 source_region=None) -> dict:
    """This group's loops, in order; raises Preempted on every rank when any rank was stopped."""
    n_loops = images.shape[0] - 1
    my_loops = parallel_loops(n_loops, n_groups, group)  # one group (sequential mode): every loop, in order
    states = store.states() if store is not None else {}
    ck = None
    if store is not None:
        name = "checkpoint.h5" if n_groups == 1 else f"checkpoint.group{group}of{n_groups}.h5"
        ck = store.checkpointer(name, gcomm)
    results: dict = {}
    preempted = None
    workers = cfg.fft_workers or default_workers(comm.size)
    try:
        prev_end = prev = None
        for k in my_loops:
            done = store.load_loop(k) if store is not None else None
            if done is not None:
                log.info("loop %d: finished before, loaded", k)
                res = done
            else:
                if cfg.mode == "sequential" and k > 0:
                    if prev_end is None:  # (cannot happen: loops run in order)
                        raise RuntimeError("sequential loop without its predecessor")
                    rho0 = prev_end.reshape(images.shape[1:])
                else:
                    rho0 = images[k]
                st = states.get(k)
                if st is not None:
                    log.info("loop %d: resuming after GN iteration %d", k, int(st["iterations"]))

                warm = None
                if cfg.mode == "sequential" and cfg.warm_start and prev is not None:
                    # the flow changes slowly between consecutive loops (the authors' consecutive runs
                    # carry u and r over, too): start from the predecessor's velocity and source
                    warm = {"velocity": prev["velocity"], "source": prev.get("source"),
                            "g0_norm": float(prev["g0_norm"])}
                on_it = _checkpoint_each_iteration(ck, store, k)
                res = solve_loop(rho0, images[k + 1], cfg, active, comm=gcomm, state=st, on_iteration=on_it,
                                 label=f"loop {k}: ", workers=workers, source_region=source_region, warm=warm)
                if store is not None:
                    store.save_loop(k, res, writer=gcomm.rank == 0)
                    gcomm.Barrier()
                log.info("loop %d: %d GN / %d PCG iterations, misfit %.3g, mass change %+.1f%% (scans %+.1f%%), "
                         "%.1f s (%s)", k, res["gn_iterations"], res["pcg_iterations"], res["misfit_rel"],
                         100 * res["mass_error"], 100 * res["target_mass_change"], res["runtime_s"],
                         res["stop_reason"])
            prev_end = np.asarray(res["rho_end"], dtype=np.float64)
            prev = {key: res[key] for key in ("velocity", "source", "g0_norm") if key in res} \
                if cfg.mode == "sequential" and cfg.warm_start else None
            if store is None or not keep_arrays:
                results[k] = res if keep_arrays else scalars(res)
            del res
    except Preempted as exc:
        preempted = exc
    if any_rank(comm, preempted is not None):
        raise preempted or Preempted("stopped by a signal on another rank; checkpoints written")
    return results


def _solve_coupled(images, cfg, active, comm, gcomm, group, n_groups, store, keep_arrays,
                   source_region=None) -> tuple[dict, list]:
    """Coupled parallel loops: a parareal-style fixed point that converges to the sequential chain.

    Sweep 0 solves every loop from its measured image, in parallel over the rank groups. In
    sweep s >= 1 each loop k >= 1 whose start density (the final density of loop k-1 in the
    previous sweep) changed by more than ``romt.coupled_rtol`` (relative L2) since its last
    solve is solved again from that density, warm-started from its previous velocity (and
    source), which takes few Gauss-Newton iterations when the change is small. After sweep s
    loops 0..s start from the same densities as in sequential mode, so at most n_loops - 1
    sweeps make it the sequential chain; it usually stops much earlier. A coupled run that is
    stopped restarts from sweep 0 (its per-iteration checkpoints are written, not resumed).

    Returns:
        (this group's final loop results (on its first rank), per-sweep records
        [{"sweep", "resolved", "max_change", "seconds"}] identical on all ranks).
    """
    n_loops = images.shape[0] - 1
    my_loops = split_evenly(n_loops, n_groups, group)
    workers = cfg.fft_workers or default_workers(comm.size)
    ck = None
    if store is not None:
        ck = store.checkpointer(f"checkpoint.group{group}of{n_groups}.h5", gcomm)
    results: dict = {}
    starts = {k: images[k] for k in my_loops}  # start density of each loop's last solve
    todo = list(my_loops)
    sweeps = []
    preempted = None
    for sweep in range(n_loops):
        t0 = time.perf_counter()
        try:
            for k in todo:
                warm = None
                if k in results:
                    warm = {"velocity": results[k]["velocity"], "source": results[k].get("source"),
                            "g0_norm": results[k]["g0_norm"]}

                on_it = _checkpoint_each_iteration(ck, store, k)
                res = solve_loop(starts[k], images[k + 1], cfg, active, comm=gcomm, on_iteration=on_it,
                                 label=f"sweep {sweep} loop {k}: ", workers=workers, source_region=source_region,
                                 warm=warm)
                log.info("sweep %d loop %d: %d GN / %d PCG iterations, misfit %.3g, %.1f s (%s)", sweep, k,
                         res["gn_iterations"], res["pcg_iterations"], res["misfit_rel"], res["runtime_s"],
                         res["stop_reason"])
                results[k] = res
        except Preempted as exc:
            preempted = exc
        if any_rank(comm, preempted is not None):
            raise preempted or Preempted("stopped by a signal on another rank; checkpoints written")
        # every group's end densities, then the loops whose start moved
        ends = {k: np.asarray(results[k]["rho_end"]).reshape(images.shape[1:])
                for k in my_loops if gcomm.rank == 0}
        merged: dict = {}
        for d in comm.allgather(ends):
            merged.update(d)
        todo, worst = [], 0.0
        for k in my_loops:
            if k == 0:
                continue
            new = merged[k - 1]
            change = float(np.linalg.norm(new - starts[k]) / max(np.linalg.norm(new), 1e-300))
            worst = max(worst, change)
            if change > cfg.coupled_rtol:
                starts[k] = new
                todo.append(k)
        worst = comm.allreduce(worst, op=MPI.MAX)
        resolved = comm.allreduce(len(todo), op=MPI.SUM)
        sweeps.append({"sweep": sweep, "max_change": worst, "seconds": round(time.perf_counter() - t0, 3),
                       "resolve_next": resolved})
        log.info("coupled sweep %d: %.1f s; largest start-density change %.2e; %d loop(s) to solve again",
                 sweep, time.perf_counter() - t0, worst, resolved)
        if resolved == 0:
            break
    if store is not None and keep_arrays:
        for k in my_loops:
            store.save_loop(k, results[k], writer=gcomm.rank == 0)
        gcomm.Barrier()
    out = {k: (results[k] if keep_arrays else scalars(results[k])) for k in my_loops}
    return out, sweeps


def _gather(results: dict, n_loops: int, comm, gcomm, store, keep_arrays) -> list:
    """The loops on world rank 0 ([] elsewhere): read back from the store or gathered."""
    if store is not None and keep_arrays:  # finished loops are on disk: rank 0 reads them
        return [store.load_loop(k) for k in range(n_loops)] if comm.rank == 0 else []
    if comm.size == 1:
        return [results[k] for k in range(n_loops)]
    items = comm.gather(results if gcomm.rank == 0 else {}, root=0)
    if comm.rank != 0:
        return []
    merged = {}
    for d in items:
        merged.update(d)
    return [merged[k] for k in range(n_loops)]


def scalars(res: dict) -> dict:
    """A loop result without its grid arrays (velocity, density, end density)."""
    return {k: v for k, v in res.items() if k not in ("velocity", "density", "rho_end", "source")}
