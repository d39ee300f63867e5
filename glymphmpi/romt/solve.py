"""rOMT over a series of images: loops, modes, ranks, checkpoints, results.

Scheduling over MPI ranks (``comm``):

* ``parallel`` mode: loops are independent (each starts from its measured
  image). The ranks are split into ``G = min(K, n_loops)`` groups of
  contiguous ranks; loops are dealt to groups in balanced contiguous blocks
  (:func:`glymphmpi.parallel.split_evenly`), so one group may hold several
  loops. With more ranks than loops a group has several ranks, which then
  share that loop's particles as in sequential mode.
* ``sequential`` mode: loop k starts from loop k-1's final interpolated
  density, so loops run in order; all K ranks work on every loop by
  splitting its particles (active voxels) into K blocks: each rank pushes
  and differentiates its own particles, the scattered densities are summed
  with Allreduce and per-particle values exchanged with Allgatherv; the grid
  operations (DCT diffusion solve) are replicated. Results agree with the
  one-rank run to round-off (only the order of the sums differs).

Persistence (when a :class:`LoopStore` is given): a finished loop is written
to ``OUT/romt_loops/loop_XXX.h5`` by its group's first rank (float64 end
density included, so that a resumed sequential run continues bit-for-bit);
after every Gauss-Newton iteration the group's state (full velocity of the
loop in progress, history, counters) goes to its checkpoint file
(``checkpoint.h5`` in sequential mode, ``checkpoint.groupGofN.h5`` in parallel
mode). World rank 0 gathers the loops from these files into results.h5.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np

from glymphmpi.errors import InputError, Preempted
from glymphmpi.romt.config import RomtConfig
from glymphmpi.romt.gn import GNState, LoopProblem, gauss_newton
from glymphmpi.romt.grid import ActiveLaplacian, default_workers
from glymphmpi.romt.transport import Transport

log = logging.getLogger(__name__)

NUMERIC_KEYS = ("nt", "dt", "sigma", "beta", "gamma", "boundary", "mode", "gn_max_iter", "gn_gtol",
                "gn_ftol", "pcg_max_iter", "pcg_rtol", "ls_max_halvings", "armijo_c", "init",
                "mask_dilation", "mask_images", "crop_margin")


def config_key(cfg: RomtConfig) -> str:
    """Hash of the settings that change the numbers (not threads or checkpoint frequency)."""
    d = {k: getattr(cfg, k) for k in NUMERIC_KEYS}
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


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


# ------------------------------------------------------------------ one loop
def drift_velocity(rho0: np.ndarray, target: np.ndarray, T: float) -> np.ndarray:
    """(3,) uniform velocity moving the centre of mass of rho0 to that of target in model time T."""
    coms = []
    for r in (rho0, target):
        m = float(r.sum())
        coms.append(np.array([float((r.sum(axis=tuple(e for e in range(3) if e != d))
                                     * np.arange(r.shape[d])).sum()) / m for d in range(3)]))
    return (coms[1] - coms[0]) / T


def solve_loop(rho0: np.ndarray, target: np.ndarray, cfg: RomtConfig, active: np.ndarray, comm=None,
               state: dict | None = None, on_iteration=None, label: str = "", workers: int | None = None
               ) -> dict:
    """Solve one loop (rho0 -> target).

    Args:
        rho0, target: (ni, nj, nk) densities.
        cfg: settings.
        active: (ni, nj, nk) bool, where velocities are unknowns.
        comm: communicator whose ranks share this loop's particles (None: serial).
        state: resumable state from a checkpoint (``u`` full (nt, 3, M), ...), or None.
        on_iteration: ``f(state_dict)`` after each GN iteration (state with the full velocity).
        workers: scipy.fft threads (default: cores / ranks).
    Returns:
        dict with velocity (nt, 3, ni, nj, nk) float32, density (nt+1, ni, nj, nk)
        float32, rho_end (N,) float64, objective_history, gn_iterations,
        pcg_iterations, kinetic, fit, smooth, objective, mass_error, misfit_rel,
        stop_reason, runtime_s. Identical on the ranks of ``comm``.
    """
    if cfg.tune_malloc:
        tune_malloc()
    box = crop_box(active, (rho0, target), cfg.crop_margin)
    full_shape = rho0.shape
    with _single_threaded_blas():
        res = _solve_loop(np.ascontiguousarray(rho0[box]), np.ascontiguousarray(target[box]), cfg,
                          np.ascontiguousarray(active[box]), comm, state, on_iteration, label, workers)
    if tuple(res["density"].shape[1:]) != tuple(full_shape):
        res = _uncrop(res, box, full_shape, cfg)
    return res


def crop_box(active: np.ndarray, images, margin: int) -> tuple:
    """Slices of the computational box: the bounding box of the active set and of the
    images' support, widened by ``margin`` voxels (negative: the whole grid).

    Outside it nothing moves (v = 0) and there is no mass, so only the diffusion of
    the step could carry mass there: with ``dt sigma`` ~ 1e-3 the share that crosses
    ``margin`` = 6 voxels in nt = 10 steps is below ~1e-13 (C(10, 6) (dt sigma)^6), so
    the cropped solve equals the whole-grid one to round-off while the DCT, the
    dominant cost at brain scale, runs on fewer voxels. A particle would have to
    move more than ``margin - 1`` voxels in one step to reach the crop edge.
    """
    shape = active.shape
    if margin < 0:
        return tuple(slice(0, n) for n in shape)
    occ = active.copy()
    for img in images:
        occ |= img != 0
    box = []
    for d in range(3):
        axes = tuple(e for e in range(3) if e != d)
        idx = np.flatnonzero(occ.any(axis=axes))
        if idx.size == 0:
            return tuple(slice(0, n) for n in shape)
        lo = max(0, int(idx[0]) - margin)
        hi = min(shape[d], int(idx[-1]) + margin + 1)
        length = fft_friendly_length(hi - lo, shape[d])
        lo = max(0, min(lo - (length - (hi - lo)) // 2, shape[d] - length))
        box.append(slice(lo, lo + length))
    return tuple(box)


def _largest_prime_factor(n: int) -> int:
    p, f = n, 2
    best = 1
    while f * f <= p:
        while p % f == 0:
            best, p = f, p // f
        f += 1
    return max(best, p) if p > 1 else best


def fft_friendly_length(need: int, limit: int) -> int:
    """The smallest length in [need, limit] whose prime factors are all <= 13 (a fast DCT
    size: measured 2x faster at 104 or 108 than at 103 or 106), else the one with the
    smallest largest prime factor."""
    cands = list(range(need, limit + 1))
    for n in cands:
        if _largest_prime_factor(n) <= 13:
            return n
    return min(cands, key=lambda n: (_largest_prime_factor(n), n))


def _uncrop(res: dict, box: tuple, shape: tuple, cfg: RomtConfig) -> dict:
    """Embed a loop solved on ``box`` into the whole grid (zero velocity and no mass outside)."""
    vel = np.zeros((cfg.nt, 3, *shape), dtype=np.float32)
    vel[(slice(None), slice(None), *box)] = res["velocity"]
    dens = np.zeros((cfg.nt + 1, *shape), dtype=np.float32)
    dens[(slice(None), *box)] = res["density"]
    end = np.zeros(shape)
    end[box] = res["rho_end"].reshape(res["density"].shape[1:])
    out = dict(res)
    out.update(velocity=vel, density=dens, rho_end=end.ravel())
    # mass carried by particles that jump further than the margin allows (could reach the crop edge)
    at_risk = 0.0
    for k in range(cfg.nt):
        fast = cfg.dt * np.abs(res["velocity"][k]).max(axis=0) > cfg.crop_margin - 1
        at_risk += float(res["density"][k][fast].sum(dtype=np.float64))
    total = float(res["density"][0].sum(dtype=np.float64))
    if at_risk > 1e-10 * total:
        log.warning("particles carrying %.2e of the mass moved more than %d voxels in one step: "
                    "raise romt.crop_margin or set it to -1", at_risk / total, cfg.crop_margin - 1)
    return out


_MALLOC_TUNED = False


def tune_malloc() -> bool:
    """Keep freed memory in the process heap (glibc ``mallopt``) instead of returning it.

    The solver makes many short-lived arrays of 1-100 MB; by default glibc
    maps each with mmap and unmaps it on free, so every step pays page faults
    for fresh memory (measured: the linearisation, tangent weights and
    adjoint gather ran 3-4x slower, mostly in the kernel). Raising the mmap
    and trim thresholds makes the heap reuse that memory. Process-wide, once;
    returns False where glibc is not present (nothing changes then).
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.debug("no glibc mallopt: allocator left as it is")
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    ok = mallopt(m_mmap_threshold, 1 << 30) and mallopt(m_trim_threshold, 2 ** 31 - 1) \
        and mallopt(m_top_pad, 64 << 20)
    _MALLOC_TUNED = bool(ok)
    return _MALLOC_TUNED


def _single_threaded_blas():
    """BLAS (only used for dot products here) on one thread: OpenBLAS threads spin and
    steal the cores from scipy.fft and from other ranks. A no-op without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn/nilearn
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _solve_loop(rho0, target, cfg, active, comm, state, on_iteration, label, workers) -> dict:
    t0 = time.perf_counter()
    c0 = time.process_time()
    shape = rho0.shape
    size = 1 if comm is None else comm.size
    workers = workers or (cfg.fft_workers or default_workers(size))
    act_flat = np.flatnonzero(active.ravel())
    tr = Transport(shape, act_flat, cfg.dt, cfg.sigma, cfg.boundary, comm=comm, workers=workers)
    lap = ActiveLaplacian(shape, act_flat, tr.pc.lo, tr.pc.hi)
    prob = LoopProblem(tr, rho0, target, cfg.nt, cfg.beta, cfg.gamma, lap)
    lo, hi = tr.pc.lo, tr.pc.hi
    if state is not None:
        u_full = np.asarray(state["u"], dtype=np.float64)
        if u_full.shape != (cfg.nt, 3, act_flat.size):
            raise InputError(f"checkpoint velocity has shape {u_full.shape}, expected "
                             f"{(cfg.nt, 3, act_flat.size)}; run with --fresh")
        gs = GNState(u=u_full[:, :, lo:hi].copy(), history=list(state["history"]),
                     iterations=int(state["iterations"]), pcg_iterations=int(state["pcg_iterations"]),
                     g0_norm=float(state["g0_norm"]), done=bool(state["done"]), reason=str(state["reason"]))
    else:
        gs = GNState(u=prob.zeros())
        if cfg.init == "drift":
            gs.u[:] = drift_velocity(rho0, target, cfg.nt * cfg.dt)[None, :, None]

    def full_u(u):
        return tr.pc.allgather(u.reshape(-1, u.shape[-1])).reshape(cfg.nt, 3, act_flat.size)

    def callback(st: GNState):
        if on_iteration is not None:
            on_iteration(lambda: {"u": full_u(st.u), "history": np.asarray(st.history),
                                  "iterations": st.iterations, "pcg_iterations": st.pcg_iterations,
                                  "g0_norm": st.g0_norm, "done": st.done, "reason": st.reason},
                         st.iterations)

    gs = gauss_newton(prob, gs, cfg.gn_max_iter, cfg.gn_gtol, cfg.gn_ftol, cfg.pcg_max_iter, cfg.pcg_rtol,
                      cfg.ls_max_halvings, cfg.armijo_c, on_iteration=callback, label=label)
    lin = prob.forward(gs.u)
    u = full_u(gs.u)
    n = int(np.prod(shape))
    vel = np.zeros((cfg.nt, 3, n), dtype=np.float32)
    vel[:, :, act_flat] = u
    dens = np.stack([r.reshape(shape) for r in lin.rhos]).astype(np.float32)
    m0 = float(lin.rhos[0].sum())
    rho_end = lin.rhos[-1]
    tn = float(np.linalg.norm(prob.target))
    res = {
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
        "misfit_rel": float(np.linalg.norm(rho_end - prob.target) / tn) if tn > 0 else 0.0,
        "stop_reason": gs.reason,
        "runtime_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - c0,
        "active_voxels": int(act_flat.size),
    }
    return res


# ------------------------------------------------------------------ persistence
class LoopStore:
    """Finished-loop files and per-group checkpoints in a run directory.

    Args:
        rundir: the :class:`glymphmpi.store.RunDir`.
        key: :func:`config_key` of the run (a mismatch on resume is an error).
        every: checkpoint every this many GN iterations.
    """

    def __init__(self, rundir, key: str, every: int = 1):
        self.rundir = rundir
        self.key = key
        self.every = every
        self.dir = Path(rundir.root) / "romt_loops"

    def loop_path(self, k: int) -> Path:
        return self.dir / f"loop_{k:03d}.h5"

    def load_loop(self, k: int) -> dict | None:
        from glymphmpi.io import read_h5_tree

        p = self.loop_path(k)
        if not p.exists():
            return None
        try:
            tree, attrs = read_h5_tree(p)
        except Exception as exc:  # a damaged file: recompute the loop
            log.warning("%s: unreadable (%s); recomputing loop %d", p, exc, k)
            return None
        if attrs.get("config_key") != self.key:
            raise InputError("finished loop from a different configuration; use --fresh", p)
        return tree

    def save_loop(self, k: int, res: dict, writer: bool) -> None:
        from glymphmpi.io import write_h5_tree

        if writer:
            write_h5_tree(self.loop_path(k), res, {"config_key": self.key, "loop": k})

    def checkpointer(self, name: str, comm):
        from glymphmpi.store import Checkpointer

        return Checkpointer(Path(self.rundir.root) / name, every=self.every, comm=comm)

    def states(self) -> dict:
        """Loop index -> newest saved in-progress state, over every checkpoint file."""
        from glymphmpi.io import read_h5_tree

        best: dict = {}
        for p in sorted(Path(self.rundir.root).glob("checkpoint*.h5")):
            try:
                tree, _ = read_h5_tree(p)
            except Exception as exc:
                log.warning("%s: unreadable checkpoint (%s); ignored", p, exc)
                continue
            st = tree["state"]
            if st.get("config_key") != self.key:
                raise InputError("checkpoint from a different configuration; use --fresh", p)
            k = int(st["loop"])
            if k not in best or int(st["iterations"]) > int(best[k]["iterations"]):
                best[k] = st
        return best

    def cleanup(self) -> None:
        import shutil

        for p in Path(self.rundir.root).glob("checkpoint*.h5"):
            p.unlink()
        shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------------ series
def groups_for(n_loops: int, size: int, mode: str) -> int:
    """Number of rank groups: all ranks together in sequential mode, min(K, loops) in parallel."""
    return 1 if mode == "sequential" else max(1, min(size, n_loops))


def solve_series(images: np.ndarray, cfg: RomtConfig, active: np.ndarray, comm=None,
                 store: LoopStore | None = None, keep_arrays: bool = True) -> tuple[list, dict]:
    """Solve every loop of a series.

    Args:
        images: (p, ni, nj, nk) densities (p >= 2).
        cfg: settings (mode decides how loops start and are scheduled).
        active: (ni, nj, nk) bool.
        comm: world communicator or None.
        store: persistence (checkpoints, finished-loop files) or None. With a
            store, finished loops are not kept in memory: rank 0 reads them
            back from their files at the end.
        keep_arrays: False drops velocity/density from the returned loops
            (scalars and histories only; for benchmarks at scale).
    Returns:
        (loops, info): loops is the list of per-loop dicts (see
        :func:`solve_loop`) on world rank 0, [] elsewhere; info has n_groups
        and the solve time.
    """
    check_images(images)
    n_loops = images.shape[0] - 1
    size = 1 if comm is None else comm.size
    rank = 0 if comm is None else comm.rank
    n_groups = groups_for(n_loops, size, cfg.mode)
    group = rank * n_groups // size
    gcomm = None
    if comm is not None and size > 1:
        gcomm = comm.Split(color=group, key=rank)
    grank = 0 if gcomm is None else gcomm.rank
    from glymphmpi.parallel import split_evenly

    my_loops = split_evenly(n_loops, n_groups, group)
    states = store.states() if store is not None else {}
    ck = None
    if store is not None:
        name = "checkpoint.h5" if n_groups == 1 else f"checkpoint.group{group}of{n_groups}.h5"
        ck = store.checkpointer(name, gcomm)
    results: dict = {}
    preempted = None
    t_start = time.perf_counter()
    workers = cfg.fft_workers or default_workers(size)
    try:
        prev_end = None
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

                def on_it(state_fn, it, k=k):
                    if ck is not None:
                        def full_state():
                            s = state_fn()
                            s.update(loop=k, config_key=store.key)
                            return s
                        ck.step(it, full_state)

                res = solve_loop(rho0, images[k + 1], cfg, active, comm=gcomm, state=st, on_iteration=on_it,
                                 label=f"loop {k}: ", workers=workers)
                if store is not None:
                    store.save_loop(k, res, writer=grank == 0)
                    if gcomm is not None:
                        gcomm.Barrier()
                log.info("loop %d: %d GN / %d PCG iterations, misfit %.3g, mass error %.2e, %.1f s (%s)",
                         k, res["gn_iterations"], res["pcg_iterations"], res["misfit_rel"],
                         res["mass_error"], res["runtime_s"], res["stop_reason"])
            prev_end = np.asarray(res["rho_end"], dtype=np.float64)
            if store is None or not keep_arrays:
                results[k] = res if keep_arrays else _scalars(res)
            del res
    except Preempted as exc:
        preempted = exc
    if comm is not None and size > 1:
        from glymphmpi.parallel import any_rank

        if any_rank(comm, preempted is not None):
            raise preempted or Preempted("stopped by a signal on another rank; checkpoints written")
    elif preempted is not None:
        raise preempted
    # gather the loops on world rank 0
    if comm is not None and size > 1:
        out = []
        if store is not None and keep_arrays:  # finished loops are on disk: rank 0 reads them
            if rank == 0:
                out = [store.load_loop(k) for k in range(n_loops)]
        else:
            items = comm.gather(results if grank == 0 else {}, root=0)
            if rank == 0:
                merged = {}
                for d in items:
                    merged.update(d)
                out = [merged[k] for k in range(n_loops)]
    elif store is not None and keep_arrays:
        out = [store.load_loop(k) for k in range(n_loops)]
    else:
        out = [results[k] for k in range(n_loops)]
    info = {"n_groups": n_groups, "solve_s": time.perf_counter() - t_start}
    if gcomm is not None:
        gcomm.Free()
    return out, info


def _scalars(res: dict) -> dict:
    """A loop result without its grid arrays (velocity, density, end density)."""
    return {k: v for k, v in res.items() if k not in ("velocity", "density", "rho_end")}


# ------------------------------------------------------------------ results
def speeds_mm_per_h(velocity: np.ndarray, density: np.ndarray, voxel_size_mm, hours_per_model_time: float,
                    threshold: float = 0.01) -> tuple[float, float]:
    """(max, density-weighted mean) speed in mm/h over voxels with density > threshold * max.

    velocity (nt, 3, ...) model units; density (nt+1, ...) (the step-start densities are used).
    """
    vs = np.asarray(voxel_size_mm, dtype=np.float64).reshape(1, 3, *([1] * (velocity.ndim - 2)))
    sp = np.sqrt(((velocity.astype(np.float64) * vs) ** 2).sum(axis=1)) / hours_per_model_time
    rho = density[:-1].astype(np.float64)
    sel = rho > threshold * rho.max()
    if not np.any(sel):
        return 0.0, 0.0
    return float(sp[sel].max()), float((sp[sel] * rho[sel]).sum() / rho[sel].sum())


def build_results_tree(loops: list, subject, cfg: RomtConfig, n_ranks: int) -> tuple[dict, dict]:
    """results.h5 tree (contract in the module glymphmpi.romt) and the summary fields."""
    times = np.asarray(subject.times_h, dtype=np.float64)
    vox = np.asarray(subject.voxel_size_mm, dtype=np.float64)
    tree_loops = {}
    smax, smean, misfit, gn, pcg, secs = [], [], [], [], [], []
    for k, res in enumerate(loops):
        t0, t1 = float(times[k]), float(times[k + 1])
        hpm = (t1 - t0) / (cfg.nt * cfg.dt)
        mx, mean = speeds_mm_per_h(res["velocity"], res["density"], vox, hpm)
        smax.append(mx)
        smean.append(mean)
        misfit.append(float(res["misfit_rel"]))
        gn.append(int(res["gn_iterations"]))
        pcg.append(int(res["pcg_iterations"]))
        secs.append(float(res["runtime_s"]))
        tree_loops[f"{k:03d}"] = {
            "velocity": np.asarray(res["velocity"], dtype=np.float32),
            "density": np.asarray(res["density"], dtype=np.float32),
            "t0_h": t0, "t1_h": t1, "hours_per_model_time": hpm,
            "velocity_mm_per_h_factor": vox / hpm,
            "objective_history": np.asarray(res["objective_history"], dtype=np.float64),
            "gn_iterations": int(res["gn_iterations"]), "pcg_iterations": int(res["pcg_iterations"]),
            "kinetic": float(res["kinetic"]), "fit": float(res["fit"]), "smooth": float(res["smooth"]),
            "objective": float(res["objective"]),
            "mass_error": float(res["mass_error"]), "misfit_rel": float(res["misfit_rel"]),
            "stop_reason": str(res["stop_reason"]), "runtime_s": float(res["runtime_s"]),
            "speed_max_mm_per_h": mx, "speed_mean_mm_per_h": mean,
        }
    tree = {
        "params": {
            "nt": cfg.nt, "dt": cfg.dt, "sigma": cfg.sigma, "beta": cfg.beta, "gamma": cfg.gamma,
            "mode": cfg.mode, "boundary": cfg.boundary, "voxel_size_mm": vox,
            "affine": np.asarray(subject.affine, dtype=np.float64),
            "shape": np.asarray(subject.shape, dtype=np.int64), "times_h": times, "n_loops": len(loops),
        },
        "mask": subject.mask.astype(np.uint8),
        "loops": tree_loops,
    }
    fields = {
        "n_loops": len(loops), "mode": cfg.mode, "boundary": cfg.boundary,
        "final_misfit_rel": misfit, "gn_iterations": gn, "pcg_iterations": pcg,
        "seconds_per_loop": [round(s, 3) for s in secs],
        "mass_error": [float(r["mass_error"]) for r in loops],
        "speed_max_mm_per_h": float(max(smax)) if smax else 0.0,
        "speed_mean_mm_per_h": float(np.mean(smean)) if smean else 0.0,
        "speed_max_mm_per_h_per_loop": smax, "speed_mean_mm_per_h_per_loop": smean,
    }
    return tree, fields


RESULTS_ATTRS = {
    "velocity_units": "model units: voxels per model time along the index axes i, j, k",
    "velocity_to_mm_per_h": "v_mm_per_h[d] = v[d] * voxel_size_mm[d] / hours_per_model_time, "
                            "hours_per_model_time = (t1_h - t0_h) / (nt * dt); per loop the (3,) "
                            "factor voxel_size_mm / hours_per_model_time is velocity_mm_per_h_factor",
    "density_units": "the scans' units (interpolated densities rho_0..rho_nt of each loop)",
    "speed_fields": "speed_*_mm_per_h over voxels with density > 1% of the loop's max; mean weighted by density",
}


def run(subject, cfg: RomtConfig, rundir, comm=None) -> dict:
    """The ``glymph romt`` solve: every loop, results.h5, summary fields.

    Args:
        subject: a loaded :class:`glymphmpi.subject.Subject`.
        cfg: settings.
        rundir: prepared :class:`glymphmpi.store.RunDir`.
        comm: world communicator or None.
    """
    images = np.asarray(subject.scans, dtype=np.float64)
    if images.shape[0] < 2:
        raise InputError(f"rOMT needs at least 2 scans, got {images.shape[0]}", subject.path)
    if cfg.mask_images:
        images = images * subject.mask
    names = [str(p) for p in subject.scan_paths] if subject.scan_paths else None
    check_images(images, names)
    active = active_set(subject.mask, cfg.mask_dilation)
    store = LoopStore(rundir, config_key(cfg), cfg.checkpoint_every)
    size = 1 if comm is None else comm.size
    if getattr(rundir, "fresh", False) and rundir.rank == 0:  # --fresh/--force: no finished loops either
        import shutil

        shutil.rmtree(store.dir, ignore_errors=True)
    if comm is not None and size > 1:
        comm.Barrier()
    loops, info = solve_series(images, cfg, active, comm=comm, store=store)
    fields = {}
    if (0 if comm is None else comm.rank) == 0:
        tree, fields = build_results_tree(loops, subject, cfg, size)
        rundir.write_results(tree, config=cfg, subject_id=subject.id, extra_attrs=RESULTS_ATTRS)
        fields["n_groups"] = info["n_groups"]
        fields["solve_s"] = round(info["solve_s"], 3)
        fields["active_voxels"] = int(active.sum())
    if comm is not None and size > 1:
        fields = comm.bcast(fields, root=0)
        comm.Barrier()
    if (0 if comm is None else comm.rank) == 0:
        store.cleanup()
    return fields


def config_dict(cfg: RomtConfig) -> dict:
    return dataclasses.asdict(cfg)
