"""The environment of a child run: the one place that scrubs what a child must not inherit.

A launcher that runs inside an MPI rank or a torch-distributed process (a cohort job, the
tests under ``mpirun``, pinn-select inside a cohort) must not pass its own rank, world size
or rendezvous address to the runs it starts: a child would join the parent's world (and wait
for ranks that never come). Used by the local cohort launcher and, through it, pinn-select.
"""

from __future__ import annotations

import os

#: variables of the parent's MPI process (Open MPI, PMIx) that describe *its* rank
MPI_PREFIXES = ("OMPI_COMM_WORLD", "PMIX_", "OMPI_MCA_ess", "OMPI_MCA_orte")
#: torch.distributed's rendezvous variables
TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def scrubbed(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``env`` (default ``os.environ``) without the parent's rank variables."""
    src = dict(os.environ if env is None else env)
    return {k: v for k, v in src.items() if not k.startswith(MPI_PREFIXES) and k not in TORCH_VARS}


def child_env(threads: int = 1, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of one child run: scrubbed, ``threads`` OpenMP/MKL threads, Open MPI
    allowed as root and oversubscribed (containers, CI), yielding when idle, no display."""
    out = scrubbed(env)
    out.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", OMPI_MCA_mpi_yield_when_idle="1",
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), MPLBACKEND="Agg",
               PYTHONUNBUFFERED="1")
    return out
