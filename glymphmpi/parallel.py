"""Communicator helpers, torch.distributed environment mapping and the process's allocator and
OpenMP thread settings.

Library code takes a communicator argument, always present (``COMM_SELF`` in
serial, as DOLFINx does); only the runner builds one (:func:`mpi_comm`).
mpi4py comes from Debian and is always present in the venv.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys


def mpi_comm(serial: bool = False):
    """The communicator of an MPI method: ``MPI.COMM_WORLD`` when the launcher started several
    ranks, else ``MPI.COMM_SELF`` (also when ``serial``)."""
    from mpi4py import MPI

    return MPI.COMM_WORLD if not serial and launcher_env()["world_size"] > 1 else MPI.COMM_SELF


def split_evenly(n_items: int, size: int, rank: int) -> list[int]:
    """Balanced contiguous block of ``range(n_items)`` owned by ``rank``.

    The first ``n_items % size`` ranks get one extra item; a rank may get none.
    """
    base, extra = divmod(n_items, size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return list(range(start, stop))


def any_rank(comm, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (collective)."""
    from mpi4py import MPI

    return bool(comm.allreduce(bool(flag), op=MPI.LOR))


def launcher_env() -> dict:
    """Rank/size as given by the launcher: torchrun, Open MPI or SLURM."""
    env = os.environ
    for rk, sz, lrk in (
        ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
        ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
        ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    ):
        if rk in env and sz in env:
            return {"rank": int(env[rk]), "world_size": int(env[sz]),
                    "local_rank": int(env.get(lrk, 0)), "source": rk}
    return {"rank": 0, "world_size": 1, "local_rank": 0, "source": "none"}


def abort_mpi_world(code: int) -> None:
    """``MPI_Abort`` on COMM_WORLD when this process runs MPI with other ranks (else nothing).

    For an internal failure on some ranks only: the others would otherwise wait in their next
    collective forever (a coupled rOMT run whose rank 0 failed after the solve held rank 1 at
    100% CPU until it was killed). Input errors are raised on every rank and exit normally.
    """
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized() or mpi.COMM_WORLD.size < 2:
        return
    for h in logging.getLogger().handlers:  # the traceback reaches the log before the job is torn down
        h.flush()
    sys.stderr.flush()
    mpi.COMM_WORLD.Abort(code)


def torch_dist_env(default_port: int | None = None) -> dict:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT for torch.distributed.

    Maps Open MPI and SLURM variables; the port defaults to one derived from
    the SLURM job id (or the parent pid) so concurrent runs do not collide.
    Returns the resulting values; sets them in ``os.environ``.
    """
    info = launcher_env()
    os.environ.setdefault("RANK", str(info["rank"]))
    os.environ.setdefault("WORLD_SIZE", str(info["world_size"]))
    os.environ.setdefault("LOCAL_RANK", str(info["local_rank"]))
    if "MASTER_ADDR" not in os.environ:
        nodelist = os.environ.get("SLURM_JOB_NODELIST", "")
        os.environ["MASTER_ADDR"] = _first_host(nodelist) if nodelist else "127.0.0.1"
    if "MASTER_PORT" not in os.environ:
        seed = int(os.environ.get("SLURM_JOB_ID", os.getppid()))
        os.environ["MASTER_PORT"] = str(default_port or 20000 + seed % 20000)
    return {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


def _first_host(nodelist: str) -> str:
    """First host of a SLURM nodelist such as ``node[01-04,07],gpu3``."""
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        first = rest.split("-")[0].split(",")[0].rstrip("]")
        return prefix + first
    return head or socket.gethostname()


def available_memory_bytes() -> float:
    """MemAvailable of this machine in bytes (``/proc/meminfo``); inf where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024.0
    except OSError:
        pass
    return math.inf


def ranks_on_this_node(comm) -> int:
    """How many ranks of ``comm`` share this node's memory (collective)."""
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return int(node.size)
    finally:
        node.Free()


_OMP_PASSIVE: list = [None]


def passive_omp_threads() -> bool:
    """Make PyTorch's OpenMP threads sleep, not spin, between parallel regions (``OMP_WAIT_POLICY=PASSIVE``)
    unless the user set ``OMP_WAIT_POLICY``. Must run before ``import torch``: its bundled libgomp reads
    the variable when it loads. Returns whether PASSIVE is in force (False when torch was imported first
    or the user chose otherwise).

    The PINN's CPU kernels alternate PyTorch's matrix products (OpenMP pool) with fused numba kernels
    (numba's own workqueue pool). With libgomp's default policy PyTorch's threads keep spinning after each
    product, so on 2 cores numba's threads were preempted about 240 times per step of 8,192 points
    (involuntary context switches; DeepXDE's step: 7) and the step's median was 118-131 ms, best 96-102 ms.
    With PASSIVE: 76-98 switches, median 97-108 ms; ``benchmarks/pinn_throughput.py`` (2 threads, three
    alternated runs each) 1.89-1.98x DeepXDE's median without, 2.33-2.53x with (DeepXDE in the same
    process, whose step was unchanged within the noise).
    """
    import sys

    if _OMP_PASSIVE[0] is None:
        if "OMP_WAIT_POLICY" not in os.environ and "torch" not in sys.modules:
            os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        _OMP_PASSIVE[0] = (os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
                           and "torch" not in sys.modules)
    return _OMP_PASSIVE[0]


_MALLOC_TUNED: list = [None]


def tune_malloc() -> bool:
    """Keep freed memory in the process heap (glibc ``mallopt``) instead of returning it (once per process).

    The rOMT solver and the PINN's training steps make many short-lived arrays of 1-100 MB; by
    default glibc maps each with mmap and unmaps it on free, so every step pays page faults for
    fresh memory. Measured: rOMT's linearisation, tangent weights and adjoint gather ran 3-4x
    slower, mostly in the kernel; a PINN step of 8,192 points page-faulted 10,000-23,000 times
    (30-100 ms of system time; best step 172 ms, 98 ms with this setting). Raising the mmap and
    trim thresholds makes the heap reuse that memory (PyTorch's CPU tuning guide gets the same by
    preloading jemalloc or tcmalloc). Process-wide. Nothing changes where the user set
    ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` (theirs wins) or where glibc is not
    present. Returns whether the setting is in force.
    """
    if _MALLOC_TUNED[0] is None:
        import ctypes
        import ctypes.util

        ok = False
        if not ({"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ)):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = libc.mallopt
                libc.gnu_get_libc_version  # glibc only  # noqa: B018
            except (OSError, AttributeError):
                mallopt = None
            if mallopt is not None:
                m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
                ok = bool(mallopt(m_mmap_threshold, 1 << 30) and mallopt(m_trim_threshold, 2 ** 31 - 1)
                          and mallopt(m_top_pad, 64 << 20))
        _MALLOC_TUNED[0] = ok
    return _MALLOC_TUNED[0]
