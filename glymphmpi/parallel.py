"""Communicator helpers and torch.distributed environment mapping.

Library code takes a communicator argument, always present (``COMM_SELF`` in
serial, as DOLFINx does); only the runner builds one (:func:`mpi_comm`).
mpi4py comes from Debian and is always present in the venv.
"""

from __future__ import annotations

import math
import os
import socket


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
