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
                    warm = _warm_from(prev)
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
    """Coupled parallel loops: the sequential chain, solved by blocks of loops in parallel (block
    Gauss-Seidel / parareal-style sweeps).

    Group g holds a contiguous block of loops. In every sweep each group solves its block in
    order as sequential mode does (loop k starts from loop k-1's final density; a first solve
    from ``init``, with ``warm_start`` from its predecessor's velocity inside the block), the block's
    first loop from the final density of the previous group's last loop as it stood after the
    previous sweep (sweep 0: from its measured image). A loop whose start density moved by at
    most ``romt.coupled_rtol`` (relative L2) since its last solve keeps that solve. After sweep s
    blocks 0..s are the sequential chain, so there are at most G sweeps; the run stops earlier
    when no block's start moved.

    Re-solves (``romt.coupled_warm``, default) start from the loop's own last solution, and take
    few Gauss-Newton iterations. A loop's velocity at the stop depends on where the iterations
    started (the rat's loop 3, same start density, warm vs cold: 39% apart, relative L2), so the
    result is near the sequential chain, not on it: rat, 6 loops on 2 ranks, 335 s and 15% from
    sequential mode on one rank (23% from it on 2 ranks; the two sequential runs are 20% apart
    from round-off alone, because each loop's Gauss-Newton amplifies a 1e-14 change to 14%).
    With ``coupled_warm = false`` every solve is sequential mode's, and a loop given the same
    start density on one rank gives the same bits: coupled mode is then sequential mode on one
    rank per loop exactly (rat: 0.0000 in every loop), in about that mode's time (504 s against
    489 s), because no block's start settles after a re-solve and every block is re-solved once
    its predecessor is final. It saves time where the ends settle (the spheres: one sweep). The
    old scheme (Jacobi sweeps of warm re-solves, every loop from its measured image) took 6
    sweeps on the rat and ended 27-29% from the chain. A coupled run that is stopped restarts from
    sweep 0 (its per-iteration checkpoints are written, not resumed).

    Returns:
        (this group's final loop results (on its first rank), per-sweep records
        [{"sweep", "solved", "max_change", "seconds", "resolve_next"}] identical on all ranks).
    """
    n_loops = images.shape[0] - 1
    my_loops = split_evenly(n_loops, n_groups, group)  # contiguous, never empty (n_groups <= n_loops)
    shape = images.shape[1:]
    workers = cfg.fft_workers or default_workers(comm.size)
    ck = None
    if store is not None:
        ck = store.checkpointer(f"checkpoint.group{group}of{n_groups}.h5", gcomm)
    results: dict = {}
    starts: dict = {}  # start density of each loop's last solve
    head = images[my_loops[0]]  # this sweep's start of the block's first loop
    sweeps = []
    preempted = None
    for sweep in range(n_groups):
        t0 = time.perf_counter()
        solved = 0
        try:
            start, prev = head, None
            for k in my_loops:
                if k in starts and _relative_change(start, starts[k]) <= cfg.coupled_rtol:
                    res = results[k]  # its start did not move: the last solve stands
                else:
                    warm = None
                    if cfg.coupled_warm and k in results:  # the faster, inexact variant: its own last solve
                        warm = _warm_from(results[k])
                    elif cfg.warm_start and prev is not None:  # as sequential mode (inside the block)
                        warm = _warm_from(prev)
                    on_it = _checkpoint_each_iteration(ck, store, k)
                    res = solve_loop(start, images[k + 1], cfg, active, comm=gcomm, on_iteration=on_it,
                                     label=f"sweep {sweep} loop {k}: ", workers=workers,
                                     source_region=source_region, warm=warm)
                    log.info("sweep %d loop %d: %d GN / %d PCG iterations, misfit %.3g, %.1f s (%s)", sweep, k,
                             res["gn_iterations"], res["pcg_iterations"], res["misfit_rel"], res["runtime_s"],
                             res["stop_reason"])
                    results[k], starts[k] = res, start
                    solved += 1
                prev = res
                start = np.asarray(res["rho_end"], dtype=np.float64).reshape(shape)
        except Preempted as exc:
            preempted = exc
        if any_rank(comm, preempted is not None):
            raise preempted or Preempted("stopped by a signal on another rank; checkpoints written")
        # the end of every block's last loop: the next block's head in the next sweep
        last = my_loops[-1]
        ends: dict = {}
        for d in comm.allgather({last: start} if gcomm.rank == 0 else {}):
            ends.update(d)
        change = 0.0
        if my_loops[0] > 0:
            head = ends[my_loops[0] - 1]
            change = _relative_change(head, starts[my_loops[0]])
        moved = change > cfg.coupled_rtol and gcomm.rank == 0
        worst = comm.allreduce(change, op=MPI.MAX)
        resolve = comm.allreduce(int(moved), op=MPI.SUM)
        solved_all = comm.allreduce(solved if gcomm.rank == 0 else 0, op=MPI.SUM)
        sweeps.append({"sweep": sweep, "solved": solved_all, "max_change": worst,
                       "seconds": round(time.perf_counter() - t0, 3), "resolve_next": resolve})
        log.info("coupled sweep %d: %d loop(s) solved, %.1f s; largest change of a block's start %.2e; "
                 "%d block(s) to solve again", sweep, solved_all, time.perf_counter() - t0, worst, resolve)
        if resolve == 0:
            break
    if store is not None and keep_arrays:
        for k in my_loops:
            store.save_loop(k, results[k], writer=gcomm.rank == 0)
    out = {k: (results[k] if keep_arrays else scalars(results[k])) for k in my_loops}
    return out, sweeps


def _warm_from(res: dict) -> dict:
    """The ``warm`` start of :func:`glymphmpi.romt.loop.solve_loop` from a finished loop's result."""
    return {"velocity": res["velocity"], "source": res.get("source"), "g0_norm": float(res["g0_norm"])}


def _relative_change(new: np.ndarray, old: np.ndarray) -> float:
    """||new - old|| / ||new|| (0 for two zero fields)."""
    return float(np.linalg.norm(new - old) / max(np.linalg.norm(new), 1e-300))


def _gather(results: dict, n_loops: int, comm, gcomm, store, keep_arrays) -> list:
    """The loops on world rank 0 ([] elsewhere): read back from the store or gathered."""
    if store is not None and keep_arrays:  # finished loops are on disk: rank 0 reads them
        # once every group has written its files: with only a group barrier, coupled mode's rank 0 read
        # loops another group was still writing (the rat: 225 MB files; none found, the run failed)
        comm.Barrier()
        if comm.rank != 0:
            return []
        loops = [store.load_loop(k) for k in range(n_loops)]
        missing = [k for k, res in enumerate(loops) if res is None]
        if missing:  # never a result with holes: the caller would write a partial run as complete
            raise RuntimeError(f"finished loop file(s) {missing} missing or unreadable in {store.rundir.root}")
        return loops
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
