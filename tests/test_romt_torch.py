"""rOMT on torch (``romt.backend = "torch"``, issue 18 §3): the same numbers as the numpy backend.

float64 on the CPU: every operator (forward densities, objective terms, gradient, J x, J^T y,
Gauss-Newton Hessian, preconditioner, PCG step) equals the numpy one to 1e-10 relative, for the
balanced and the unbalanced model, open and closed boundaries, and both diffusion methods
(the Neumann series at the default dt sigma, the DCT at a large one); a whole Gauss-Newton solve
gives the same velocities to 1e-9; under ``mpirun -n 2`` (particles split over the ranks) the
same as the serial numpy solve. The torch operators pass the dot-product test on their own.
float32: the dot-product test at float32 round-off and the forward densities within 1e-5.
GPU: two identical solves give bit-identical velocities (skipped without CUDA).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from mpi4py import MPI

torch = pytest.importorskip("torch")

from glymphmpi.romt.config import RomtConfig  # noqa: E402
from glymphmpi.romt.gn import LoopProblem  # noqa: E402
from glymphmpi.romt.grid import ActiveLaplacian, DiffusionSolver  # noqa: E402
from glymphmpi.romt.loop import solve_loop  # noqa: E402
from glymphmpi.romt.transport import Transport  # noqa: E402
from glymphmpi.romt.unbalanced import UnbalancedProblem  # noqa: E402

SHAPE = (9, 8, 7)
NT = 3
SERIES_SIGMA = 0.002  # dt sigma = 8e-4: the default, Neumann series
DCT_SIGMA = 0.05  # dt sigma = 0.02: too many series terms, DCT


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _pair(boundary="open", unbalanced=False, sigma=SERIES_SIGMA, comm=MPI.COMM_SELF, precision="float64",
          seed=0):
    """(numpy problem, torch problem, data) on a random active set with random densities."""
    from glymphmpi.romt.backend_torch import torch_problem

    rng = np.random.default_rng(seed)  # the same numbers on every rank
    n = int(np.prod(SHAPE))
    act = np.flatnonzero(rng.random(n) < 0.8)
    nc = 4 if unbalanced else 3
    u = rng.standard_normal((NT, nc, act.size))
    if unbalanced:
        u[:, 3] *= 0.3
    x = rng.standard_normal((NT, nc, act.size))
    y = rng.standard_normal(n)
    rho0, tgt = rng.random(n), rng.random(n)
    chi = (rng.random(act.size) < 0.7).astype(np.float64)
    tr = Transport(SHAPE, act, 0.4, sigma, boundary=boundary, comm=comm)
    lap = ActiveLaplacian(SHAPE, act, tr.pc.lo, tr.pc.hi)
    if unbalanced:
        p = UnbalancedProblem(tr, rho0, tgt, NT, 50.0, 3.0, lap, chi, 10.0, rho_floor=0.01)
    else:
        p = LoopProblem(tr, rho0, tgt, NT, 50.0, 3.0, lap)
    q = torch_problem(p, "cpu", precision, threads=1)
    lo, hi = tr.pc.lo, tr.pc.hi
    return p, q, dict(u=np.ascontiguousarray(u[:, :, lo:hi]), x=np.ascontiguousarray(x[:, :, lo:hi]), y=y,
                      u_full=u, x_full=x, act=act, rho0=rho0, tgt=tgt, chi=chi)


CASES = [pytest.param(b, m, s, id=f"{b}-{'unbalanced' if m else 'balanced'}-{'series' if s == SERIES_SIGMA else 'dct'}")
         for b in ("open", "closed") for m in (False, True) for s in (SERIES_SIGMA, DCT_SIGMA)]


def test_romt_imports_without_torch():
    """The numpy backend never imports torch (it is imported only for romt.backend = torch)."""
    code = ("import sys; import glymphmpi.romt.solve, glymphmpi.romt.loop, glymphmpi.romt.schedule, "
            "glymphmpi.romt.config; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("sigma, method", [(SERIES_SIGMA, "series"), (DCT_SIGMA, "dct")])
def test_diffusion_equals_numpy(sigma, method):
    """(I - dt sigma Lap)^{-1} on torch equals the numpy solver (same method), and L L^{-1} x = x."""
    from glymphmpi.romt.backend_torch import TorchDiffusion, neumann_laplacian

    ds = DiffusionSolver(SHAPE, 0.4 * sigma)
    assert getattr(ds, "method", "dct") == method
    td = TorchDiffusion(ds, torch.device("cpu"), torch.float64)
    x = np.random.default_rng(1).standard_normal(SHAPE)
    got = td.apply(torch.as_tensor(x)).numpy()
    assert rel(got, ds.apply(x)) <= 1e-13
    back = got - 0.4 * sigma * neumann_laplacian(torch.as_tensor(got)).numpy()  # L (L^{-1} x)
    assert rel(back, x) <= 1e-13
    from glymphmpi.romt.grid import neumann_laplacian as np_laplacian

    assert rel(neumann_laplacian(torch.as_tensor(x)).numpy(), np_laplacian(x)) <= 1e-13


@pytest.mark.parametrize("boundary, unbalanced, sigma", CASES)
def test_operators_equal_numpy(boundary, unbalanced, sigma):
    """float64 CPU: densities, objective terms, gradient, J x, J^T y, H x, preconditioner, energy norm and
    the PCG step of the torch problem equal the numpy problem's to 1e-10 relative."""
    p, q, d = _pair(boundary, unbalanced, sigma)
    u, x, y = d["u"], d["x"], d["y"]
    ln, lt = p.forward(u), q.forward(u)
    assert len(lt.rhos) == NT + 1
    for a, b in zip(lt.rhos, ln.rhos):
        assert rel(a, b) <= 1e-10
    for name in ("kinetic", "fit", "smooth", "source"):
        a, b = getattr(lt.terms, name), getattr(ln.terms, name)
        assert abs(a - b) <= 1e-10 * abs(b), name
    assert (ln.terms.source > 0) == unbalanced
    assert rel(q.gradient(u, lt), p.gradient(u, ln)) <= 1e-10
    assert rel(q.jvp(x, lt), p.jvp(x, ln)) <= 1e-10
    assert rel(q.vjp(y, lt), p.vjp(y, ln)) <= 1e-10
    assert rel(q.hessp(x, lt), p.hessp(x, ln)) <= 1e-10
    assert rel(q.preconditioner(lt), p.preconditioner(ln)) <= 1e-10
    assert abs(q.energy_norm2(x, lt) - p.energy_norm2(x, ln)) <= 1e-10 * p.energy_norm2(x, ln)
    assert abs(q.objective(u).total - ln.terms.total) <= 1e-10 * ln.terms.total
    g = p.gradient(u, ln)
    sn, itn = p.pcg(g, ln, 6, 1e-6)
    st, itt = q.pcg(g, lt, 6, 1e-6)
    assert itn == itt and rel(st, sn) <= 1e-10


def test_source_per_loop_operators_equal_numpy():
    """One source per loop (romt.source_time = "loop"): the torch problem's tied gradient, H x,
    preconditioner and PCG step equal the numpy problem's (float64, CPU)."""
    p, _, d = _pair("open", True, SERIES_SIGMA)
    p.source_per_loop = True
    from glymphmpi.romt.backend_torch import torch_problem

    q = torch_problem(p, "cpu", "float64", threads=1)
    u, x = d["u"].copy(), d["x"].copy()
    u[:, 3], x[:, 3] = u[0, 3], x[0, 3]
    ln, lt = p.forward(u), q.forward(u)
    g = p.gradient(u, ln)
    assert np.all(g[:, 3] == g[0, 3])
    assert rel(q.gradient(u, lt), g) <= 1e-10
    assert rel(q.hessp(x, lt), p.hessp(x, ln)) <= 1e-10
    assert rel(q.preconditioner(lt), p.preconditioner(ln)) <= 1e-10
    sn, itn = p.pcg(g, ln, 6, 1e-6)
    st, itt = q.pcg(g, lt, 6, 1e-6)
    assert itn == itt and rel(st, sn) <= 1e-10 and np.allclose(sn[:, 3], sn[0, 3], rtol=1e-13, atol=0)


@pytest.mark.parametrize("unbalanced", [False, True], ids=["balanced", "unbalanced"])
@pytest.mark.parametrize("boundary", ["open", "closed"])
def test_torch_dot_product(boundary, unbalanced):
    """<J x, y> = <x, J^T y> for the torch operators alone (tensors in and out), and the Gauss-Newton
    Hessian is symmetric: <H x, z> = <x, H z>."""
    _, q, d = _pair(boundary, unbalanced, seed=3)
    lin = q.forward_t(q._t(d["u"]))
    x, y = q._t(d["x"]), q._t(d["y"])
    a = float(torch.dot(q.jvp_t(x, lin), y))
    b = q.dot(x, q.vjp_t(y, lin))
    assert abs(a - b) <= 1e-12 * abs(a)
    z = q._t(np.random.default_rng(4).standard_normal(q.u_shape))
    hx, hz = q.hessp_t(x, lin), q.hessp_t(z, lin)
    h1, h2 = q.dot(hx, z), q.dot(x, hz)
    # round-off of an inner product scales with the norms, not with the (cancelling) result
    scale = math.sqrt(q.dot(hx, hx) * q.dot(z, z)) + math.sqrt(q.dot(x, x) * q.dot(hz, hz))
    assert abs(h1 - h2) <= 1e-12 * scale


def test_torch_gradient_taylor():
    """The torch gradient is the derivative of the torch objective: the first-order Taylor remainder
    falls like eps^2 (ratio ~4 per halving)."""
    _, q, d = _pair("open", True, seed=5)
    u, x = d["u"], d["x"] * 0.1
    lin = q.forward(u)
    phi0, g = lin.terms.total, q.gradient(u, lin)
    gx = float(np.vdot(g, x))
    rem = [abs(q.objective(u + e * x).total - phi0 - e * gx) for e in (1e-2, 5e-3, 2.5e-3)]
    assert 3.5 < rem[0] / rem[1] < 4.5 and 3.5 < rem[1] / rem[2] < 4.5


def test_float32_within_tolerance():
    """precision = float32: the densities within 1e-5 of float64 numpy, J and J^T adjoint to float32
    round-off (2e-5), the gradient within 1e-4."""
    p, q, d = _pair("open", False, precision="float32")
    assert q.dtype == torch.float32
    ln, lt = p.forward(d["u"]), q.forward(d["u"])
    assert rel(lt.rhos[-1], ln.rhos[-1]) <= 1e-5
    assert rel(q.gradient(d["u"], lt), p.gradient(d["u"], ln)) <= 1e-4
    a = float(np.dot(q.jvp(d["x"], lt), d["y"]))
    b = float(np.vdot(d["x"], q.vjp(d["y"], lt)))
    assert abs(a - b) <= 2e-5 * abs(a)


def test_float32_gauss_newton_loop():
    """precision = float32 through a whole loop: the objective history within 1e-3 and the velocities
    within 1e-3 of the largest of the float64 numpy solve's (measured: 4e-5, 3e-5)."""
    imgs = _spheres()
    act = np.ones(imgs.shape[1:], bool)
    ref = solve_loop(imgs[0], imgs[1], RomtConfig(model="unbalanced", max_iterations=3, fft_workers=1), act)
    got = solve_loop(imgs[0], imgs[1], RomtConfig(backend="torch", device="cpu", precision="float32",
                                                  model="unbalanced", max_iterations=3, fft_workers=1), act)
    assert got["gn_iterations"] == ref["gn_iterations"]
    np.testing.assert_allclose(got["objective_history"], ref["objective_history"], rtol=1e-3)
    assert np.abs(got["velocity"] - ref["velocity"]).max() <= 1e-3 * np.abs(ref["velocity"]).max()
    assert abs(got["misfit_rel"] - ref["misfit_rel"]) <= 1e-3 * ref["misfit_rel"]


def test_ranks_take_their_own_gpu(monkeypatch):
    """cuda: MPI rank r on a node takes cuda:(r % GPUs): the local rank comes from the launcher."""
    from glymphmpi.romt.backend_torch import local_rank

    for key in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID",
                "PMI_LOCAL_RANK", "PALS_LOCAL_RANKID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_LOCALID", "5")
    assert local_rank() == 5
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "3")  # the MPI launcher's own variable first
    assert local_rank() == 3
    if torch.cuda.is_available():
        from glymphmpi.romt.backend_torch import resolve_device

        assert resolve_device("cuda").index == 3 % torch.cuda.device_count()


def test_device_settings():
    from glymphmpi.errors import InputError
    from glymphmpi.romt.backend_torch import resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InputError, match="romt.device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA device"):
            resolve_device("cuda")


def _spheres(n=12, k=2):
    from glymphmpi.synth.gaussian_spheres import gaussian_spheres

    imgs, _ = gaussian_spheres(n, k)
    return imgs


@pytest.mark.parametrize("model, boundary", [("balanced", "open"), ("unbalanced", "closed")])
def test_gauss_newton_loop_equals_numpy(model, boundary):
    """A whole loop (drift start, Gauss-Newton with PCG and Armijo) on the Gaussian spheres: the same
    iterations, objective history and velocities (to 1e-9) with either backend."""
    imgs = _spheres()
    act = np.ones(imgs.shape[1:], bool)
    out = {}
    for be in ("numpy", "torch"):
        cfg = RomtConfig(backend=be, device="cpu", model=model, boundary=boundary, max_iterations=3,
                         fft_workers=1)
        out[be] = solve_loop(imgs[0], imgs[1], cfg, act)
    a, b = out["torch"], out["numpy"]
    assert a["gn_iterations"] == b["gn_iterations"] == 3 and a["pcg_iterations"] == b["pcg_iterations"]
    np.testing.assert_allclose(a["objective_history"], b["objective_history"], rtol=1e-9)
    assert b["objective_history"][-1] < 0.5 * b["objective_history"][0]  # the solve did move
    va, vb = a["velocity"].astype(np.float64), b["velocity"].astype(np.float64)
    assert np.abs(va - vb).max() <= 1e-9 * np.abs(vb).max() + 1e-7  # float32 storage: ~1 ulp
    assert rel(a["rho_end"], b["rho_end"]) <= 1e-9
    if model == "unbalanced":
        assert rel(a["source"], b["source"]) <= 1e-6


@pytest.mark.mpi
def test_torch_particle_split_equals_serial_numpy(comm):
    """Under mpirun -n 2 the torch problem splits the particles over the ranks (host Allreduce and
    Allgatherv): its operators equal the serial numpy problem's, and so does a Gauss-Newton loop."""
    p1, _, d = _pair("open", True, comm=MPI.COMM_SELF, seed=7)
    _, q, dq = _pair("open", True, comm=comm, seed=7)
    lo, hi = q.pc.lo, q.pc.hi
    l1, lt = p1.forward(d["u"]), q.forward(dq["u"])
    assert rel(lt.rhos[-1], l1.rhos[-1]) <= 1e-12
    assert abs(lt.terms.total - l1.terms.total) <= 1e-12 * l1.terms.total
    assert rel(q.gradient(dq["u"], lt), p1.gradient(d["u"], l1)[:, :, lo:hi]) <= 1e-10
    assert rel(q.jvp(dq["x"], lt), p1.jvp(d["x"], l1)) <= 1e-10
    assert rel(q.hessp(dq["x"], lt), p1.hessp(d["x"], l1)[:, :, lo:hi]) <= 1e-10
    a = float(np.dot(q.jvp(dq["x"], lt), dq["y"]))
    assert abs(a - q.dot(dq["x"], q.vjp(dq["y"], lt))) <= 1e-10 * abs(a)

    imgs = _spheres()
    act = np.ones(imgs.shape[1:], bool)
    cfg = RomtConfig(backend="torch", device="cpu", max_iterations=3, fft_workers=1)
    res = solve_loop(imgs[0], imgs[1], cfg, act, comm=comm)
    ref = solve_loop(imgs[0], imgs[1], RomtConfig(max_iterations=3, fft_workers=1), act)
    assert res["gn_iterations"] == ref["gn_iterations"]
    np.testing.assert_allclose(res["objective_history"], ref["objective_history"], rtol=1e-9)
    vb = ref["velocity"].astype(np.float64)
    assert np.abs(res["velocity"].astype(np.float64) - vb).max() <= 1e-9 * np.abs(vb).max() + 1e-7
    comm.Barrier()


def test_cli_romt_backend_torch(glymph, tmp_path):
    """`glymph romt --set romt.backend=torch` runs, records the backend with the run's settings, and
    gives the numpy run's velocities."""
    import h5py

    from glymphmpi.synth import gaussian_spheres

    subj = gaussian_spheres.write(tmp_path / "g", n=12, n_images=2, sid="g12")
    fast = ["--no-post", "--set", "romt.max_iterations=2", "--set", "romt.pcg_max_iterations=10",
            "--set", "romt.fft_workers=1"]
    vel = {}
    for be in ("numpy", "torch"):
        out = tmp_path / be
        r = glymph("romt", subj, "--out", out, *fast, "--set", f"romt.backend={be}", "--set", "romt.device=cpu")
        assert r.returncode == 0, r.stderr
        assert json.loads((out / "summary.json").read_text())["status"] == "complete"
        with h5py.File(out / "results.h5") as fh:
            cfg = json.loads(fh.attrs["config"])
            vel[be] = fh["loops/000/velocity"][()].astype(np.float64)
        assert cfg["RomtConfig"]["backend"] == be
    assert np.abs(vel["torch"] - vel["numpy"]).max() <= 1e-9 * np.abs(vel["numpy"]).max() + 1e-7
    r = glymph("romt", subj, "--out", tmp_path / "bad", *fast, "--set", "romt.backend=jax")
    assert r.returncode == 2 and "backend" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.gpu
def test_gpu_loop_is_deterministic_and_equals_cpu():
    """CUDA: two identical solves give the same velocities bit for bit (deterministic scatter), and they
    agree with the CPU numpy solve to 1e-9 (float64)."""
    if not torch.cuda.is_available():
        pytest.skip(f"needs a CUDA GPU (torch {torch.__version__} sees none)")
    imgs = _spheres(16)
    act = np.ones(imgs.shape[1:], bool)
    runs = []
    for _ in range(2):
        cfg = RomtConfig(backend="torch", device="cuda", model="unbalanced", max_iterations=3)
        runs.append(solve_loop(imgs[0], imgs[1], cfg, act))
    assert np.array_equal(runs[0]["velocity"], runs[1]["velocity"])
    assert np.array_equal(runs[0]["rho_end"], runs[1]["rho_end"])
    assert np.array_equal(runs[0]["objective_history"], runs[1]["objective_history"])
    ref = solve_loop(imgs[0], imgs[1], RomtConfig(model="unbalanced", max_iterations=3), act)
    np.testing.assert_allclose(runs[0]["objective_history"], ref["objective_history"], rtol=1e-9)
