"""rOMT over MPI ranks: the same results for 1 and K ranks.

Sequential mode splits every loop's particles over the ranks (sums in a
different order), parallel mode deals whole loops to ranks in turn; both must agree
with the serial solve. Tolerance 1e-8 relative on the velocities: only the
order of floating-point sums differs, amplified by a few Gauss-Newton
iterations; larger differences would mean a missing or doubled contribution.
"""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from glymphmpi.romt.config import RomtConfig
from glymphmpi.romt.schedule import solve_series


def _series(n=12, p=4):
    from glymphmpi.synth.gaussian_spheres import gaussian_spheres

    imgs, _ = gaussian_spheres(n, p)
    return imgs


@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_loops_over_ranks_match_serial(comm, mode):
    imgs = _series()
    cfg = RomtConfig(mode=mode, max_iterations=3, pcg_max_iterations=10, mask_dilation=-1)
    act = np.ones(imgs.shape[1:], bool)
    loops, info = solve_series(imgs, cfg, act, comm=comm)
    if comm.rank == 0:
        ref, _ = solve_series(imgs, cfg, act, comm=MPI.COMM_SELF)
        assert len(loops) == len(ref) == 3
        assert info["n_groups"] == (1 if mode == "sequential" else min(comm.size, 3))
        for a, b in zip(loops, ref):
            assert np.abs(a["velocity"] - b["velocity"]).max() <= 1e-8 * np.abs(b["velocity"]).max() + 1e-7
            assert np.allclose(a["objective_history"], b["objective_history"], rtol=1e-8)
            assert a["gn_iterations"] == b["gn_iterations"]
        if mode == "sequential":  # loop k+1 starts where loop k ended
            assert np.allclose(loops[1]["density"][0], loops[0]["density"][-1])
    else:
        assert loops == []
    comm.Barrier()


@pytest.mark.mpi
def test_particle_split_dot_product(comm):
    """J vs J^T with the particles split over the ranks (Allreduce/Allgatherv paths)."""
    from glymphmpi.romt.gn import LoopProblem
    from glymphmpi.romt.grid import ActiveLaplacian
    from glymphmpi.romt.transport import Transport

    shape = (9, 8, 7)
    rng = np.random.default_rng(0)  # same numbers on every rank
    n = int(np.prod(shape))
    act = np.flatnonzero(rng.random(n) < 0.8)
    u_full = rng.standard_normal((3, 3, act.size))
    x_full = rng.standard_normal((3, 3, act.size))
    y = rng.standard_normal(n)
    rho0, tgt = rng.random(n), rng.random(n)
    tr = Transport(shape, act, 0.4, 0.05, comm=comm)
    lo, hi = tr.pc.lo, tr.pc.hi
    prob = LoopProblem(tr, rho0, tgt, 3, 50.0, 3.0, ActiveLaplacian(shape, act, lo, hi))
    lin = prob.forward(np.ascontiguousarray(u_full[:, :, lo:hi]))
    jx = prob.jvp(np.ascontiguousarray(x_full[:, :, lo:hi]), lin)
    jty = prob.vjp(y, lin)
    a = float(jx @ y)
    b = prob.dot(x_full[:, :, lo:hi], jty)
    assert abs(a - b) <= 1e-10 * abs(a)
    # and the same as the serial operator
    tr1 = Transport(shape, act, 0.4, 0.05)
    p1 = LoopProblem(tr1, rho0, tgt, 3, 50.0, 3.0, ActiveLaplacian(shape, act))
    lin1 = p1.forward(u_full)
    assert np.allclose(p1.jvp(x_full, lin1), jx, rtol=1e-12, atol=1e-12)
    assert abs(lin1.terms.total - lin.terms.total) <= 1e-12 * lin1.terms.total
    g1 = p1.gradient(u_full, lin1)
    g = prob.gradient(np.ascontiguousarray(u_full[:, :, lo:hi]), lin)
    assert np.allclose(g, g1[:, :, lo:hi], rtol=1e-10, atol=1e-10 * np.abs(g1).max())


def test_cli_two_ranks_match_one(glymph, tmp_path):
    """`mpirun -n 2 glymph romt` (parallel and sequential) gives the 1-rank results.h5."""
    import shutil

    import h5py

    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed")
    from glymphmpi.synth import gaussian_spheres

    subj = gaussian_spheres.write(tmp_path / "g", n=12, n_images=4, sid="g12")
    args = ["--no-post", "--set", "romt.max_iterations=2", "--set", "romt.pcg_max_iterations=10"]
    for mode in ("parallel", "sequential"):
        r1 = glymph("romt", subj, "--out", tmp_path / f"one-{mode}", "--mode", mode, *args)
        assert r1.returncode == 0, r1.stderr
        r2 = glymph("romt", subj, "--out", tmp_path / f"two-{mode}", "--mode", mode, *args, mpi=2)
        assert r2.returncode == 0, r2.stderr + r2.stdout
        with h5py.File(tmp_path / f"one-{mode}" / "results.h5") as f1, \
                h5py.File(tmp_path / f"two-{mode}" / "results.h5") as f2:
            assert f2.attrs["mpi_size"] == 2
            for k in ("000", "001", "002"):
                a, b = f1[f"loops/{k}/velocity"][()], f2[f"loops/{k}/velocity"][()]
                assert np.abs(a - b).max() <= 1e-6 * np.abs(a).max()


@pytest.mark.mpi
@pytest.mark.parametrize("model", ["balanced", "unbalanced"])
def test_coupled_mode_reaches_the_sequential_chain(comm, model):
    """Coupled parallel loops (blocks of loops solved in parallel, sweeps until no block's start moves)
    end on the sequential chain: with coupled_warm = false every loop is solved as sequential mode solves
    it, from its predecessor's final density, so with one rank per group the velocities are sequential
    mode's on one rank to round-off; by default (warm re-solves) near them. With a coupled_rtol above the
    start change after sweep 0 the second block keeps its sweep-0 solve (from its measured image): one
    sweep, close to the chain but not on it."""
    from glymphmpi.synth.gaussian_spheres import gaussian_spheres

    imgs, _ = gaussian_spheres(12, 4)
    act = np.ones(imgs.shape[1:], bool)
    exact = {"mode": "coupled", "model": model, "coupled_warm": False}
    cpl, info = solve_series(imgs, RomtConfig(coupled_rtol=1e-4, **exact), act, comm=comm)
    loose, info_loose = solve_series(imgs, RomtConfig(coupled_rtol=0.5, **exact), act, comm=comm)
    groups = min(comm.size, 3)
    assert info["n_groups"] == groups
    sweeps = info["coupled_sweeps"]
    assert len(sweeps) == groups and sweeps[-1]["resolve_next"] == 0  # one sweep per block to settle
    assert sweeps[0]["solved"] == 3 and sum(w["solved"] for w in sweeps) == 3 + sum(range(groups))
    assert len(info_loose["coupled_sweeps"]) == 1
    warm, info_warm = solve_series(imgs, RomtConfig(mode="coupled", model=model, coupled_rtol=1e-4), act,
                                   comm=comm)  # the default: coupled_warm
    assert info_warm["coupled_sweeps"][-1]["resolve_next"] == 0
    failure = None
    if comm.rank == 0:  # checked on rank 0, asserted on every rank (a failure must not leave rank 1 waiting)
        try:
            _check_coupled_against_sequential(imgs, act, model, cpl, loose, warm, groups)
        except AssertionError as exc:
            failure = f"{exc!r}"
    failure = comm.bcast(failure, root=0)
    assert failure is None, failure


def _check_coupled_against_sequential(imgs, act, model, cpl, loose, warm, groups):
    from glymphmpi.parallel import split_evenly

    seq, _ = solve_series(imgs, RomtConfig(mode="sequential", model=model), act, comm=MPI.COMM_SELF)
    for k in range(1, 3):
        prev_end, start = cpl[k - 1]["density"][-1].astype(np.float64), cpl[k]["density"][0]
        assert np.linalg.norm(start - prev_end) <= 2e-7 * np.linalg.norm(prev_end)  # float32 storage
    for a, b in zip(cpl, seq):
        assert a["stop_reason"] == b["stop_reason"] and a["gn_iterations"] == b["gn_iterations"]
        dv = np.linalg.norm(a["velocity"].astype(np.float64) - b["velocity"]) / np.linalg.norm(b["velocity"])
        assert dv < 1e-6, dv  # float32 storage of the one-rank chain's velocities
    if groups > 1:  # the last block started from its measured image and kept that solve
        k = split_evenly(3, groups, groups - 1)[0]
        dv = np.linalg.norm(loose[k]["velocity"].astype(np.float64) - seq[k]["velocity"]) / \
            np.linalg.norm(seq[k]["velocity"])
        assert 1e-6 < dv < 0.3, dv
        # coupled_warm: re-solves start from the loop's own last solution; the chain holds to coupled_rtol,
        # the velocities are near sequential mode's but not on them
        for k in range(1, 3):
            prev_end, start = warm[k - 1]["density"][-1].astype(np.float64), warm[k]["density"][0]
            assert np.linalg.norm(start - prev_end) <= 1e-4 * np.linalg.norm(prev_end) + 1e-12
        dv = max(np.linalg.norm(a["velocity"].astype(np.float64) - b["velocity"]) / np.linalg.norm(b["velocity"])
                 for a, b in zip(warm, seq))
        assert 1e-6 < dv < 0.08, dv


def test_parallel_mode_deals_loops_in_turn():
    """Parallel mode deals loop k to group k mod G: every loop once, and the costly early loops of
    a real series spread over all groups (not the first block to one rank)."""
    from glymphmpi.romt.schedule import parallel_loops

    for n_loops in range(1, 16):
        for groups in range(1, min(n_loops, 5) + 1):
            parts = [parallel_loops(n_loops, groups, g) for g in range(groups)]
            assert sorted(k for p in parts for k in p) == list(range(n_loops))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parallel_loops(14, 2, 0) == [0, 2, 4, 6, 8, 10, 12]
    assert parallel_loops(14, 2, 1)[:2] == [1, 3]
