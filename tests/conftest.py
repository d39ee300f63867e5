"""Shared fixtures. Tests marked ``mpi`` run serially and again under
``mpirun -n 2`` (``make test-mpi``); use the ``comm`` and ``mpi_tmp_path``
fixtures in them so that every rank sees the same directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
os.environ.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


@pytest.fixture(scope="session")
def comm():
    from mpi4py import MPI

    return MPI.COMM_WORLD


@pytest.fixture
def mpi_tmp_path(comm, tmp_path):
    """A temporary directory chosen on rank 0 and shared by all ranks."""
    path = comm.bcast(str(tmp_path) if comm.rank == 0 else None, root=0)
    comm.Barrier()
    return Path(path)


def run_glymph(*args, cwd=None, env=None, timeout=600, mpi: int = 0):
    """Run the CLI in a subprocess; returns CompletedProcess (text)."""
    cmd = [PY, "-m", "glymphmpi", *map(str, args)]
    if mpi:
        cmd = ["mpirun", "-n", str(mpi), *cmd]
    from glymphmpi.cohort.environment import scrubbed

    full_env = dict(os.environ) if mpi else scrubbed()  # a child must not inherit the parent's MPI rank
    full_env.update(env or {})
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def glymph():
    return run_glymph


@pytest.fixture(scope="session")
def small_phantom(tmp_path_factory):
    """A small noise-free brain-diffusion subject (block 16^3), written once."""
    from glymphmpi.synth import brain_diffusion as bd

    out = tmp_path_factory.mktemp("phantom16")
    spec = bd.PhantomSpec(block=(16, 16, 16), dt_h=0.1)
    path = bd.write(out, spec, sid="ph16")
    return path
