"""Communicator helpers, collective HDF5 and checkpoints: serial and under mpirun -n 2."""

from __future__ import annotations

import numpy as np
import pytest

from glymphmpi.io import write_h5_collective
from glymphmpi.parallel import split_evenly, torch_dist_env
from glymphmpi.store import Checkpointer, RunDir

pytestmark = pytest.mark.mpi


def test_split_evenly_covers_all():
    for n in range(0, 13):
        for size in (1, 2, 3, 5):
            parts = [split_evenly(n, size, r) for r in range(size)]
            assert sum(parts, []) == list(range(n))
            lens = [len(p) for p in parts]
            assert max(lens) - min(lens) <= 1


def test_collective_h5_write(comm, mpi_tmp_path):
    import h5py

    rows = split_evenly(11, comm.size, comm.rank)
    local = np.array([[r, r * 2.0] for r in rows]).reshape(-1, 2)
    path = write_h5_collective(mpi_tmp_path / "c.h5", "x", local, rows[0] if rows else 0, 11, comm,
                               attrs={"note": "t"})
    with h5py.File(path, "r") as fh:
        x = fh["x"][()]
        assert fh.attrs["complete"]
    np.testing.assert_array_equal(x, np.array([[r, 2.0 * r] for r in range(11)]))


def test_checkpointer_shared_and_per_rank(comm, mpi_tmp_path):
    ck = Checkpointer(mpi_tmp_path / "checkpoint.h5", comm=comm)
    ck.save({"v": np.arange(3.0)}, 4)
    state, it = ck.load()
    assert it == 4 and np.all(state["v"] == np.arange(3.0))
    ckr = Checkpointer(mpi_tmp_path / "checkpoint.h5", comm=comm, per_rank=True)
    ckr.save({"rank": comm.rank}, 1)
    assert ckr.load()[0]["rank"] == comm.rank


def test_rundir_collective(comm, mpi_tmp_path):
    rd = RunDir(mpi_tmp_path / "run", comm=comm).prepare()
    s = rd.write_summary("m", "s", {"k": 1})
    assert s["mpi_ranks"] == comm.size
    comm.Barrier()
    assert rd.is_complete()


def test_torch_env_from_openmpi(monkeypatch):
    import os

    # torch_dist_env writes os.environ: give it a private copy so nothing leaks into later tests
    # (a leaked WORLD_SIZE=4 would make every later PINN run wait for 3 missing ranks)
    monkeypatch.setattr(os, "environ", dict(os.environ))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-09],cpu1")
    env = torch_dist_env()
    assert env["RANK"] == "1" and env["WORLD_SIZE"] == "4" and env["MASTER_ADDR"] == "gpu07"
    assert 20000 <= int(env["MASTER_PORT"]) < 40000
