"""Data-parallel PINN training: two CPU processes (gloo) against one.

Each epoch's global minibatches are the same on one or two processes (the
permutations come from a generator identical on every rank; each rank trains
on its shard), so D after training agrees up to floating-point summation
order. In float64 over a few epochs that is far below 1e-8 relative; the
ranks themselves must agree exactly (DDP all-reduces the same gradients).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from glymphmpi.pinn.analytic import heat_kernel_box  # noqa: E402
from glymphmpi.pinn.config import PinnConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
SETS = ["--set", "pinn.depth=2", "--set", "pinn.width=16", "--set", "pinn.batches=3", "--set", "pinn.epochs=6",
        "--set", "pinn.dtype=float64", "--set", "pinn.pde_points=1001", "--set", "pinn.rar_epochs=[3]",
        "--set", "pinn.rar_add=51", "--set", "pinn.rar_pool=499", "--set", "pinn.rae_epochs=[4]",
        "--set", "pinn.residual_times=10", "--set", "pinn.figures=false", "--set", "pinn.maps=false",
        "--set", "pinn.lbfgs_steps=3"]


@pytest.fixture(scope="module")
def hk_subject(tmp_path_factory):
    from glymphmpi.subject import write_subject

    scans, mask, affine, times = heat_kernel_box(n=6, D=0.5, tau=8.0)
    return write_subject(tmp_path_factory.mktemp("hk6ddp"), "hk6", times, scans, mask, affine)


def _clean_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    for k in list(env):  # no inherited launcher identity
        if k.startswith(("OMPI_COMM_WORLD", "PMIX_", "OMPI_MCA_ess", "OMPI_MCA_orte", "SLURM_")) or k in (
                "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k)
    env.update({"OMP_NUM_THREADS": "1", "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                "OMPI_MCA_rmaps_base_oversubscribe": "1"}, **(extra or {}))
    return env


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def serial_D(hk_subject, tmp_path_factory):
    out = tmp_path_factory.mktemp("serial") / "run"
    r = subprocess.run([sys.executable, "-m", "glymphmpi", "pinn", str(hk_subject), "--out", str(out), *SETS],
                       capture_output=True, text=True, env=_clean_env(), cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    s = _summary(out)
    assert s["world_size"] == 1
    return s["D_mm2_per_h"]


def test_torchrun_two_processes_match_one_process(hk_subject, serial_D, tmp_path):
    torchrun = VENV_BIN / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not in the venv")
    out = tmp_path / "ddp"
    r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "glymphmpi", "pinn",
                        str(hk_subject), "--out", str(out), *SETS],
                       capture_output=True, text=True, env=_clean_env(), cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    s = _summary(out)
    assert s["world_size"] == 2 and s["backend"] == "gloo" and s["status"] == "complete"
    assert s["max_rank_difference"] == 0.0  # identical network and D on both ranks
    assert s["D_mm2_per_h"] == pytest.approx(serial_D, rel=1e-8)
    assert s["D_mm2_per_h"] != pytest.approx(0.7, abs=1e-4)  # D moved from its start
    assert s["pde_points_final"] == 1001 + 51


def test_mpirun_two_processes_match_one_process(hk_subject, serial_D, tmp_path):
    if shutil.which("mpirun") is None:
        pytest.skip("no mpirun")
    out = tmp_path / "mpi"
    r = subprocess.run(["mpirun", "-n", "2", sys.executable, "-m", "glymphmpi", "pinn", str(hk_subject),
                        "--out", str(out), *SETS],
                       capture_output=True, text=True, env=_clean_env(), cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    s = _summary(out)
    assert s["world_size"] == 2 and s["max_rank_difference"] == 0.0
    assert s["D_mm2_per_h"] == pytest.approx(serial_D, rel=1e-8)


def test_slurm_environment_two_processes_match_one_process(hk_subject, serial_D, tmp_path):
    """Rank and size from SLURM's variables (as ``srun -n 2`` sets them), without a SLURM."""
    import socket

    with socket.socket() as sk:  # a free port for the rendezvous
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    out = tmp_path / "slurm"
    procs = [subprocess.Popen([sys.executable, "-m", "glymphmpi", "pinn", str(hk_subject), "--out", str(out),
                               *SETS], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env=_clean_env({"SLURM_PROCID": str(r), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(r),
                                              "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "localhost",
                                              "MASTER_PORT": str(port)}))
             for r in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    s = _summary(out)
    assert s["world_size"] == 2 and s["max_rank_difference"] == 0.0
    assert s["D_mm2_per_h"] == pytest.approx(serial_D, rel=1e-8)


@pytest.mark.mpi
def test_ddp_in_process_under_mpirun(comm):
    """Under ``mpirun -n 2``: in-process DDP over gloo equals each rank's own one-process run."""
    if comm.size != 2:
        pytest.skip("needs exactly 2 MPI ranks")
    from glymphmpi.pinn.distributed import DistContext, init_distributed, teardown
    from glymphmpi.pinn.trainer import build_problem, fit

    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    port = comm.bcast(29500 + (os.getpid() % 5000) if comm.rank == 0 else None, root=0)
    os.environ["MASTER_PORT"] = str(port)
    try:
        ctx = init_distributed("cpu")
        assert ctx.size == 2 and ctx.backend == "gloo"
        scans, mask, affine, times = heat_kernel_box(n=6, D=0.5, tau=8.0)
        pb = build_problem(scans, mask, affine, times)
        cfg = PinnConfig(depth=2, width=16, batches=3, epochs=5, dtype="float64", pde_points=777,
                         rar_epochs=(2,), rar_add=20, rar_pool=300, residual_times=5, checkpoint_every=0,
                         ensemble=1)
        (par,) = fit(pb, cfg, ctx, quiet=True)
        (ser,) = fit(pb, cfg, DistContext(), quiet=True)
        Ds = comm.allgather(par.D)
        assert Ds[0] == Ds[1] and par.rank_spread == 0.0
        assert par.D == pytest.approx(ser.D, rel=1e-8)
        assert np.allclose(par.history["loss"], ser.history["loss"], rtol=1e-8)
        assert np.allclose(par.residual_t, ser.residual_t, rtol=1e-8)
        teardown(ctx)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
