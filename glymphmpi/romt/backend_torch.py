"""rOMT on torch (CPU or CUDA): the operators of :mod:`~glymphmpi.romt.transport`,
:mod:`~glymphmpi.romt.grid`, :mod:`~glymphmpi.romt.gn` and :mod:`~glymphmpi.romt.unbalanced`
on tensors of one device (``romt.backend = "torch"``).

The same formulas in the same array layouts as the numpy classes, so that the results agree
with the numpy backend to round-off (float64). Gauss-Newton itself
(:func:`~glymphmpi.romt.gn.gauss_newton`) is unchanged: it holds the unknowns as host numpy
arrays and calls the problem's methods, which take and return numpy (``forward``,
``objective``, ``gradient``, ``jvp``, ``vjp``, ``hessp``, ``energy_norm2``,
``preconditioner``); everything between (the recursions, and all of PCG) runs on the device
(the ``*_t`` methods take and return tensors).

Determinism on CUDA: the only reduction with colliding indices is the particle scatter
(``index_add_``), run under ``torch.use_deterministic_algorithms(True)`` (a sort-based kernel
instead of atomics); the active-set Laplacian is a gather stencil (no sparse library), the
diffusion a dense per-axis DCT (``matmul``) or a Horner series of the 7-point Laplacian built
from slices, and the reductions (sum, dot) are torch's, which have a fixed order for a given
size and device. MPI: reductions go through the numpy :class:`~glymphmpi.romt.transport.ParticleComm`
on host copies; each rank takes ``cuda:(local rank % devices)``.

torch is imported by this module only; :mod:`glymphmpi.romt` imports it only for the torch backend.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os

import numpy as np

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (before CUDA starts)

import torch  # noqa: E402

from glymphmpi.errors import InputError  # noqa: E402
from glymphmpi.romt.gn import LoopProblem, Terms  # noqa: E402

DTYPES = {"float64": torch.float64, "float32": torch.float32}
log = logging.getLogger(__name__)
_ANNOUNCED: set = set()


# ---------------------------------------------------------------- device
def local_rank() -> int:
    """This process's rank among the MPI ranks of its node (from the launcher's environment;
    no collective call, since loops may be solved on sub-communicators at different times)."""
    for key in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK",
                "SLURM_LOCALID", "PMI_LOCAL_RANK", "PALS_LOCAL_RANKID"):
        val = os.environ.get(key)
        if val is not None and val.strip().isdigit():
            return int(val)
    try:
        from mpi4py import MPI

        return MPI.COMM_WORLD.rank
    except Exception:  # pragma: no cover - mpi4py is a dependency
        return 0


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` (CUDA when torch sees a GPU, else CPU), ``cpu``, ``cuda`` (this rank's GPU:
    cuda:(local rank % device count)) or ``cuda:N``. A CUDA request without a GPU is an
    InputError (no silent fallback to the CPU)."""
    spec = str(spec).strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InputError(f"romt.device = {spec!r}, but torch {torch.__version__} sees no CUDA device")
        count = torch.cuda.device_count()
        if spec == "cuda":
            return torch.device("cuda", local_rank() % count)
        idx = spec[5:]
        if not idx.isdigit() or int(idx) >= count:
            raise InputError(f"romt.device = {spec!r}: this machine has CUDA devices 0..{count - 1}")
        return torch.device("cuda", int(idx))
    raise InputError(f"romt.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}")


@contextlib.contextmanager
def deterministic(on: bool):
    """``torch.use_deterministic_algorithms(True)`` inside the block (restored after)."""
    if not on:
        yield
        return
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def _at(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[idx]`` for a 1-D index (index_select: 2.7x faster than advanced indexing on the CPU)."""
    return torch.index_select(x, 0, idx)


# ---------------------------------------------------------------- grid operators
def neumann_laplacian(x: torch.Tensor) -> torch.Tensor:
    """7-point Laplacian with zero-flux (replicate) boundaries of x (ni, nj, nk)."""
    out = torch.zeros_like(x)
    for d in range(3):
        n = x.shape[d]
        if n < 2:
            continue
        g = x.narrow(d, 1, n - 1) - x.narrow(d, 0, n - 1)  # forward differences (flux)
        out.narrow(d, 0, n - 1).add_(g)
        out.narrow(d, 1, n - 1).sub_(g)
    return out


def dct_matrix(n: int, dtype, device) -> torch.Tensor:
    """(n, n) orthonormal DCT-II matrix (scipy's ``dct(type=2, norm='ortho')``); its transpose inverts it."""
    k = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    c = np.sqrt(2.0 / n) * np.cos(np.pi * k * (2 * j + 1) / (2.0 * n))
    c[0] /= np.sqrt(2.0)
    return torch.as_tensor(c, dtype=dtype, device=device)


class TorchDiffusion:
    """``(I - dt sigma Lap_N)^{-1}`` on tensors: the operator of a numpy
    :class:`~glymphmpi.romt.grid.DiffusionSolver` (the same method): ``series`` applies the
    truncated Neumann series ``sum_{k<=K} (a Lap)^k`` (K = ``solver.terms``) by Horner with the slice Laplacian,
    ``dct`` the orthonormal DCT-II as dense per-axis matrices (N (ni + nj + nk) multiply-adds
    each way; exact like scipy's, deterministic on CUDA)."""

    def __init__(self, solver, device, dtype):
        self.shape = tuple(solver.shape)
        self.dt_sigma = float(solver.dt_sigma)
        self.method = getattr(solver, "method", "dct")
        self.terms = int(getattr(solver, "terms", 0))
        if self.method not in ("dct", "series"):
            raise ValueError(f"unknown diffusion method {self.method!r}")
        if self.method == "dct" and self.dt_sigma != 0.0:
            self.c = [dct_matrix(n, dtype, device) for n in self.shape]
            self.inv_symbol = torch.as_tensor(np.asarray(solver.inv_symbol), dtype=dtype, device=device)

    def _dct(self, a: torch.Tensor, inverse: bool) -> torch.Tensor:
        c0, c1, c2 = (c.T if inverse else c for c in self.c)
        a = torch.einsum("ia,ajk->ijk", c0, a)
        a = torch.einsum("jb,ibk->ijk", c1, a)
        return torch.einsum("kc,ijc->ijk", c2, a)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``L^{-1} x`` for x (N,) or (ni, nj, nk); the same shape (new tensor)."""
        if self.dt_sigma == 0.0:
            return x.clone()
        a = x.reshape(self.shape)
        if self.method == "dct":
            out = self._dct(self._dct(a, False) * self.inv_symbol, True)
        else:
            out = a.clone()  # sum_{k=0}^{K} (a Lap)^k x by Horner: K stencil passes
            for _ in range(self.terms):
                out = torch.add(a, neumann_laplacian(out), alpha=self.dt_sigma)
        return out.reshape(x.shape)


class TorchLaplacian:
    """``G^T G`` on the active set (this rank's rows), as a gather stencil: row i is
    ``deg_i v_i - sum_{active grid neighbours j} v_j`` (:func:`~glymphmpi.romt.grid.active_laplacian`)."""

    def __init__(self, shape, active_flat: np.ndarray, lo: int, hi: int, device, dtype):
        shape = tuple(int(s) for s in shape)
        active_flat = np.asarray(active_flat, dtype=np.int64)
        m = active_flat.size
        pos = np.full(int(np.prod(shape)), m, dtype=np.int64)  # m: the appended zero
        pos[active_flat] = np.arange(m)
        own = active_flat[lo:hi]
        ijk = np.unravel_index(own, shape)
        strides = (shape[1] * shape[2], shape[2], 1)
        deg = np.zeros(own.size)
        nbr = []
        for d in range(3):
            for s in (-1, 1):
                nb = ijk[d] + s
                inside = (nb >= 0) & (nb < shape[d])
                deg += inside
                nbr.append(np.where(inside, pos[np.where(inside, own + s * strides[d], 0)], m))
        self.m = m
        self.lo, self.hi = int(lo), int(hi)
        self.nbr = torch.as_tensor(np.stack(nbr), device=device)  # (6, hi - lo)
        self.diagonal_np = deg
        self.diagonal = torch.as_tensor(deg, dtype=dtype, device=device)

    def apply(self, full: torch.Tensor) -> torch.Tensor:
        """(R, M) values on all active voxels -> (R, hi - lo) rows of this rank."""
        ext = torch.cat([full, full.new_zeros(full.shape[0], 1)], dim=1)
        out = full[:, self.lo:self.hi] * self.diagonal
        for j in range(6):
            out = out - torch.index_select(ext, 1, self.nbr[j])
        return out


# ---------------------------------------------------------------- transport
class TorchStepData:
    """:class:`~glymphmpi.romt.transport.StepData` on tensors (the same layout)."""

    __slots__ = ("idx", "b", "s")

    def __init__(self, idx, b, s):
        self.idx, self.b, self.s = idx, b, s

    def weights(self, r):
        b = self.b
        w = (b[0] * r)[:, None, None, :] * b[1][None, :, None, :] * b[2][None, None, :, :]
        return w.reshape(-1)

    def tangent_weights(self, r, q, x):
        b, s = self.b, self.s
        bx = [s[d] * (q * x[d]) for d in range(3)]
        p01 = (b[0] * r + bx[0])[:, None, :] * b[1][None, :, :] + b[0][:, None, :] * bx[1][None, :, :]
        q01 = b[0][:, None, :] * b[1][None, :, :]
        w = p01[:, :, None, :] * b[2][None, None, :, :] + q01[:, :, None, :] * bx[2][None, None, :, :]
        return w.reshape(-1)

    def gather(self, mu, q, want_dv: bool = True):
        b, s = self.b, self.s
        g = _at(mu, self.idx).reshape(2, 2, 2, -1)
        gb = g[:, :, 0] * b[2][0] + g[:, :, 1] * b[2][1]
        gbb = gb[:, 0] * b[1][0] + gb[:, 1] * b[1][1]
        st = gbb[0] * b[0][0] + gbb[1] * b[0][1]
        if not want_dv:
            return st, None
        gs = g[:, :, 0] * s[2][0] + g[:, :, 1] * s[2][1]
        gsb = gb[:, 0] * s[1][0] + gb[:, 1] * s[1][1]
        gbs = gs[:, 0] * b[1][0] + gs[:, 1] * b[1][1]
        dv = torch.stack([(gbb[0] * s[0][0] + gbb[1] * s[0][1]) * q,
                          (gsb[0] * b[0][0] + gsb[1] * b[0][1]) * q,
                          (gbs[0] * b[0][0] + gbs[1] * b[0][1]) * q])
        return st, dv


class TorchTransport:
    """The step operator of a numpy :class:`~glymphmpi.romt.transport.Transport` on a device
    (the same grid, active set, particle split, boundary and diffusion)."""

    def __init__(self, tr, device, dtype):
        self.np_transport = tr
        self.device, self.dtype = device, dtype
        self.cuda = device.type == "cuda"
        self.shape, self.n, self.dt, self.boundary = tr.shape, tr.n, tr.dt, tr.boundary
        self.pc = tr.pc
        self.active, self.local = tr.active, tr.local
        self.active_t = torch.as_tensor(tr.active, device=device)
        self.local_t = torch.as_tensor(tr.local, device=device)
        self.x = torch.as_tensor(tr.x, dtype=dtype, device=device)
        self.keep = torch.as_tensor(tr.keep, dtype=dtype, device=device)
        self.diffusion = TorchDiffusion(tr.diffusion, device, dtype)
        self.strides = tr.strides
        self.upper = torch.as_tensor([s - 1 for s in self.shape], dtype=dtype, device=device)[:, None]

    @property
    def m_local(self) -> int:
        return self.local.size

    # host <-> device for the MPI reductions
    def allreduce_(self, t: torch.Tensor) -> torch.Tensor:
        if self.pc.serial:
            return t
        a = t.detach().cpu().numpy().astype(np.float64)
        self.pc.allreduce_(a)
        return torch.as_tensor(a, dtype=t.dtype, device=t.device)

    def allgather(self, t: torch.Tensor) -> torch.Tensor:
        if self.pc.serial:
            return t
        a = np.ascontiguousarray(t.detach().cpu().numpy().astype(np.float64))
        return torch.as_tensor(self.pc.allgather(a), dtype=t.dtype, device=t.device)

    def linearize(self, v: torch.Tensor) -> TorchStepData:
        y = self.x + self.dt * v
        f = torch.floor(y)
        w = y - f
        f = f.long()
        ml = y.shape[1]
        b = torch.empty((3, 2, ml), dtype=self.dtype, device=self.device)
        s = torch.empty_like(b)
        cc = torch.empty((3, 2, ml), dtype=torch.long, device=self.device)
        for d in range(3):
            nd = self.shape[d]
            for o in (0, 1):
                c = f[d] + o
                valid = ((c >= 0) & (c < nd)).to(self.dtype)
                b[d, o] = (w[d] if o else 1.0 - w[d]) * valid
                s[d, o] = (1.0 if o else -1.0) * valid
                cc[d, o] = torch.clamp(c, 0, nd - 1) * self.strides[d]
        if self.boundary == "closed":  # a leaving particle: all factors and derivatives 0
            inside = torch.all((y >= 0) & (y <= self.upper), dim=0).to(self.dtype)
            b *= inside
            s *= inside
        idx = (cc[0][:, None, None, :] + cc[1][None, :, None, :] + cc[2][None, None, :, :]).reshape(-1)
        return TorchStepData(idx, b, s)

    def scatter(self, sd: TorchStepData, weights, base):
        out = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        with deterministic(self.cuda):
            out.index_add_(0, sd.idx, weights)
        out = self.allreduce_(out)
        out += base * self.keep
        return out

    def push(self, rho, sd):
        return self.scatter(sd, sd.weights(_at(rho, self.local_t)), rho)

    def step(self, rho, sd):
        return self.diffusion.apply(self.push(rho, sd))

    def tangent_step(self, delta, rho, sd, x):
        w = sd.tangent_weights(_at(delta, self.local_t), self.dt * _at(rho, self.local_t), x)
        return self.diffusion.apply(self.scatter(sd, w, delta))

    def adjoint_step(self, lam, rho, sd, extra=None, want_dv: bool = True):
        mu = self.diffusion.apply(lam)
        st, dv = sd.gather(mu, self.dt * _at(rho, self.local_t), want_dv)
        if extra is not None:
            st = st + extra
        out = mu * self.keep
        out.index_copy_(0, self.active_t, self.allgather(st))
        return out, dv


# ---------------------------------------------------------------- problems
class TorchLinearization:
    """Forward states on the device (``rhos_t``, ``steps``) and the terms; ``rhos`` gives the
    densities as host numpy arrays (made on first use) for the caller's result dict."""

    def __init__(self, rhos_t, steps, terms):
        self.rhos_t, self.steps, self.terms = rhos_t, steps, terms
        self._rhos = None

    @property
    def rhos(self):
        if self._rhos is None:
            self._rhos = [r.detach().cpu().numpy().astype(np.float64) for r in self.rhos_t]
        return self._rhos


class TorchLoopProblem:
    """:class:`~glymphmpi.romt.gn.LoopProblem` on a device, built from a numpy one.

    Public methods take and return host numpy arrays (what
    :func:`~glymphmpi.romt.gn.gauss_newton` and the tests use); ``*_t`` ones tensors.

    Args:
        ref: the numpy problem (its transport, data, weights and particle split).
        device: torch device.
        dtype: ``torch.float64`` (default; equal to numpy to round-off) or ``torch.float32``.
    """

    ncomp = 3

    def __init__(self, ref: LoopProblem, device, dtype=torch.float64):
        self.ref = ref
        self.device, self.dtype = torch.device(device), dtype
        self.tr = TorchTransport(ref.tr, self.device, dtype)
        self.pc = ref.pc
        self.nt, self.dt, self.beta, self.gamma = ref.nt, ref.dt, ref.beta, ref.gamma
        self.rho0 = ref.rho0
        self.target = ref.target
        self.rho0_t = self._t(ref.rho0)
        self.target_t = self._t(ref.target)
        self.lap = TorchLaplacian(ref.tr.shape, ref.tr.active, self.pc.lo, self.pc.hi, self.device, dtype)
        self.lap_diag = self.lap.diagonal
        self.backend = "torch"

    def describe(self) -> str:
        name = str(self.device)
        if self.device.type == "cuda":
            name += f" ({torch.cuda.get_device_name(self.device)})"
        return f"torch {torch.__version__} on {name}, {str(self.dtype).replace('torch.', '')}"

    # ------------------------------------------------------------ conversions
    def _t(self, a) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a), dtype=self.dtype, device=self.device)

    @staticmethod
    def _np(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().numpy().astype(np.float64)

    @property
    def u_shape(self) -> tuple:
        return (self.nt, self.ncomp, self.tr.m_local)

    def zeros(self) -> np.ndarray:
        return np.zeros(self.u_shape)

    def dot(self, a, b) -> float:
        if isinstance(a, torch.Tensor):
            return self.pc.sum(float(torch.vdot(a.reshape(-1), b.reshape(-1))))
        return self.pc.sum(float(np.vdot(a, b)))

    def _ldot(self, a, b) -> torch.Tensor:
        """Local dot product (a 0-d tensor, no reduction over ranks)."""
        return torch.vdot(a.reshape(-1), b.reshape(-1))

    def _lap_apply_t(self, u):
        full = self.tr.allgather(u.reshape(-1, u.shape[-1]))
        return self.lap.apply(full).reshape(u.shape)

    # ------------------------------------------------------------ forward
    def forward_t(self, u, store: bool = True) -> TorchLinearization:
        rho = self.rho0_t
        rhos, steps = [rho], []
        loc = self.tr.local_t
        kin = []
        for k in range(self.nt):
            sd = self.tr.linearize(u[k])
            kin.append(self._ldot(_at(rho, loc), (u[k] ** 2).sum(dim=0)))
            rho = self.tr.step(rho, sd)
            if store:
                rhos.append(rho)
                steps.append(sd)
        r = rho - self.target_t
        fit = self.beta * float(self._ldot(r, r))
        smooth = 0.5 * self.gamma * self.dt * float(self._ldot(u, self._lap_apply_t(u)))
        kin = self.pc.sum(self.dt * float(torch.stack(kin).sum())) if kin else 0.0
        smooth = self.pc.sum(smooth)
        fit = float(self.pc.bcast(fit))
        if not store:
            rhos = [self.rho0_t, rho]
        return TorchLinearization(rhos, steps, Terms(kin, fit, smooth))

    def forward(self, u, store: bool = True) -> TorchLinearization:
        return self.forward_t(self._t(u), store)

    def objective(self, u) -> Terms:
        return self.forward(u, store=False).terms

    # ------------------------------------------------------------ derivatives (tensors)
    def gradient_t(self, u, lin):
        g = torch.empty((self.nt, 3, self.tr.m_local), dtype=self.dtype, device=self.device)
        lam = 2.0 * self.beta * (lin.rhos_t[-1] - self.target_t)
        loc = self.tr.local_t
        for k in range(self.nt - 1, -1, -1):
            rho_k = lin.rhos_t[k]
            extra = self.dt * (u[k] ** 2).sum(dim=0) if k > 0 else None
            lam, dv = self.tr.adjoint_step(lam, rho_k, lin.steps[k], extra)
            g[k] = dv + 2.0 * self.dt * _at(rho_k, loc) * u[k]
        g += self.gamma * self.dt * self._lap_apply_t(u)
        return g

    def jvp_t(self, x, lin):
        delta = torch.zeros(self.tr.n, dtype=self.dtype, device=self.device)
        for k in range(self.nt):
            delta = self.tr.tangent_step(delta, lin.rhos_t[k], lin.steps[k], x[k])
        return delta

    def vjp_t(self, y, lin):
        out = torch.empty((self.nt, 3, self.tr.m_local), dtype=self.dtype, device=self.device)
        lam = y
        for k in range(self.nt - 1, -1, -1):
            lam, out[k] = self.tr.adjoint_step(lam, lin.rhos_t[k], lin.steps[k])
        return out

    def hessp_t(self, x, lin):
        loc = self.tr.local_t
        out = 2.0 * self.beta * self.vjp_t(self.jvp_t(x, lin), lin)
        for k in range(self.nt):
            out[k] += 2.0 * self.dt * _at(lin.rhos_t[k], loc) * x[k]
        out += self.gamma * self.dt * self._lap_apply_t(x)
        return out

    def preconditioner_parts_t(self, lin):
        loc = self.tr.local_t
        b_out = torch.empty(self.u_shape, dtype=self.dtype, device=self.device)
        a_out = torch.empty_like(b_out)
        for k in range(self.nt):
            rho = _at(lin.rhos_t[k], loc)
            q = (lin.steps[k].b ** 2).sum(dim=1)
            for d in range(3):
                others = [e for e in range(3) if e != d]
                jj = 2.0 * q[others[0]] * q[others[1]]
                a_out[k, d] = 2.0 * self.beta * (self.dt * rho) ** 2 * jj
                b_out[k, d] = 2.0 * self.dt * rho + self.gamma * self.dt * self.lap_diag
        return b_out, a_out

    def preconditioner_t(self, lin):
        diag = self._diagonal_t(*self.preconditioner_parts_t(lin))
        top = float(diag.max()) if diag.numel() else 0.0
        return torch.clamp_min(diag, max(1e-10 * max(top, 0.0), 1e-300))

    def _diagonal_t(self, b, a):
        """:meth:`LoopProblem._diagonal` on tensors."""
        return a + b

    def energy_norm2_t(self, x, lin) -> float:
        loc = self.tr.local_t
        parts = [self._ldot(_at(lin.rhos_t[k], loc), (x[k, :3] ** 2).sum(dim=0)) for k in range(self.nt)]
        return self.pc.sum(self.dt * float(torch.stack(parts).sum()))

    # ------------------------------------------------------------ numpy interface
    def gradient(self, u, lin):
        return self._np(self.gradient_t(self._t(u), lin))

    def jvp(self, x, lin):
        return self._np(self.jvp_t(self._t(x), lin))

    def vjp(self, y, lin):
        return self._np(self.vjp_t(self._t(y), lin))

    def hessp(self, x, lin):
        return self._np(self.hessp_t(self._t(x), lin))

    def preconditioner_parts(self, lin):
        return tuple(self._np(p) for p in self.preconditioner_parts_t(lin))

    def preconditioner(self, lin):
        return self._np(self.preconditioner_t(lin))

    def energy_norm2(self, x, lin) -> float:
        return self.energy_norm2_t(self._t(x), lin)

    # ------------------------------------------------------------ PCG (on the device)
    def pcg(self, g, lin, max_iter: int, rtol: float):
        """:meth:`LoopProblem.pcg` on the device: g and the returned step are host arrays."""
        m = self.preconditioner_t(lin)
        r = -self._t(g)
        s = torch.zeros_like(r)
        z = r / m
        p = z.clone()
        rz = self.dot(r, z)
        r0 = math.sqrt(self.dot(r, r))
        it = 0
        for it in range(1, max_iter + 1):
            hp = self.hessp_t(p, lin)
            php = self.dot(p, hp)
            if php <= 0:
                it -= 1
                break
            a = rz / php
            s += a * p
            r -= a * hp
            if math.sqrt(self.dot(r, r)) <= rtol * r0:
                break
            z = r / m
            rz_new = self.dot(r, z)
            p = z + (rz_new / rz) * p
            rz = rz_new
        return self._np(s), it


class TorchUnbalancedProblem(TorchLoopProblem):
    """:class:`~glymphmpi.romt.unbalanced.UnbalancedProblem` on a device (unknowns (nt, 4, Ml))."""

    ncomp = 4

    def __init__(self, ref, device, dtype=torch.float64):
        super().__init__(ref, device, dtype)
        self.alpha = ref.alpha
        self.rho_floor = ref.rho_floor
        self.chi_l = self._t(ref.chi_l)
        self.source_per_loop = ref.source_per_loop

    def _tie(self, g):
        """:meth:`UnbalancedProblem._tie`: with one source per loop, r replaced by its mean over the steps."""
        if self.source_per_loop:
            g[:, 3] = g[:, 3].mean(dim=0)
        return g

    def _diagonal_t(self, b, a):
        """:meth:`UnbalancedProblem._diagonal` on tensors."""
        diag = a + b
        if self.source_per_loop:
            diag[:, 3] = b[:, 3].mean(dim=0) + torch.sqrt(a[:, 3]).sum(dim=0) ** 2 / self.nt
        return diag

    def _lap_apply_t(self, u):
        out = torch.zeros_like(u)
        out[:, :3] = super()._lap_apply_t(u[:, :3].contiguous())
        return out

    def _factor(self, r_local):
        m = torch.ones(self.tr.n, dtype=self.dtype, device=self.device)
        m.index_copy_(0, self.tr.active_t, torch.exp(self.dt * self._chi_all() * self.tr.allgather(r_local)))
        return m

    def _chi_all(self):
        if not hasattr(self, "_chi_full"):
            self._chi_full = self._t(self.ref.chi)
        return self._chi_full

    def _on_active(self, local):
        out = torch.zeros(self.tr.n, dtype=self.dtype, device=self.device)
        out.index_copy_(0, self.tr.active_t, self.tr.allgather(local))
        return out

    def forward_t(self, u, store: bool = True):
        rho = self.rho0_t
        rhos, steps, qs, ms = [rho], [], [], []
        kin, src = [], []
        loc = self.tr.local_t
        for k in range(self.nt):
            v, r = u[k, :3], u[k, 3]
            sd = self.tr.linearize(v)
            rl = _at(rho, loc)
            kin.append(self._ldot(rl, (v ** 2).sum(dim=0)))
            src.append(self._ldot(rl + self.rho_floor, self.chi_l * r ** 2))
            m = self._factor(r)
            q = m * rho
            rho = self.tr.step(q, sd)
            if store:
                rhos.append(rho)
                steps.append(sd)
                qs.append(q)
                ms.append(m)
        res = rho - self.target_t
        fit = self.beta * float(self._ldot(res, res))
        smooth = 0.5 * self.gamma * self.dt * float(self._ldot(u, self._lap_apply_t(u)))
        kin = self.dt * float(torch.stack(kin).sum()) if kin else 0.0
        src = self.alpha * self.dt * float(torch.stack(src).sum()) if src else 0.0
        kin, src, smooth = self.pc.sum(kin), self.pc.sum(src), self.pc.sum(smooth)
        fit = float(self.pc.bcast(fit))
        if not store:
            rhos = [self.rho0_t, rho]
        lin = TorchLinearization(rhos, steps, Terms(kin, fit, smooth, src))
        lin.qs, lin.ms = qs, ms
        return lin

    def _adjoint(self, lam, u, lin):
        out = torch.empty(self.u_shape, dtype=self.dtype, device=self.device)
        loc = self.tr.local_t
        for k in range(self.nt - 1, -1, -1):
            lam_q, dv = self.tr.adjoint_step(lam, lin.qs[k], lin.steps[k])
            out[k, :3] = dv
            out[k, 3] = self.dt * self.chi_l * _at(lin.qs[k], loc) * _at(lam_q, loc)
            lam = lin.ms[k] * lam_q
            if u is not None and k > 0:
                v, r = u[k, :3], u[k, 3]
                lam = lam + self._on_active(self.dt * ((v ** 2).sum(dim=0) + self.alpha * self.chi_l * r ** 2))
        return out

    def gradient_t(self, u, lin):
        g = self._adjoint(2.0 * self.beta * (lin.rhos_t[-1] - self.target_t), u, lin)
        loc = self.tr.local_t
        for k in range(self.nt):
            rl = _at(lin.rhos_t[k], loc)
            g[k, :3] += 2.0 * self.dt * rl * u[k, :3]
            g[k, 3] += 2.0 * self.alpha * self.dt * self.chi_l * (rl + self.rho_floor) * u[k, 3]
        g += self.gamma * self.dt * self._lap_apply_t(u)
        return self._tie(g)

    def jvp_t(self, x, lin):
        delta = torch.zeros(self.tr.n, dtype=self.dtype, device=self.device)
        loc = self.tr.local_t
        for k in range(self.nt):
            dq = lin.ms[k] * delta + self._on_active(self.dt * self.chi_l * _at(lin.qs[k], loc) * x[k, 3])
            delta = self.tr.tangent_step(dq, lin.qs[k], lin.steps[k], x[k, :3])
        return delta

    def vjp_t(self, y, lin):
        return self._adjoint(y, None, lin)

    def hessp_t(self, x, lin):
        loc = self.tr.local_t
        out = 2.0 * self.beta * self.vjp_t(self.jvp_t(x, lin), lin)
        for k in range(self.nt):
            rl = _at(lin.rhos_t[k], loc)
            out[k, :3] += 2.0 * self.dt * rl * x[k, :3]
            out[k, 3] += 2.0 * self.alpha * self.dt * self.chi_l * (rl + self.rho_floor) * x[k, 3]
        out += self.gamma * self.dt * self._lap_apply_t(x)
        return self._tie(out)

    def energy_norm2_t(self, x, lin) -> float:
        loc = self.tr.local_t
        parts = []
        for k in range(self.nt):
            rl = _at(lin.rhos_t[k], loc)
            parts.append(self.dt * self._ldot(rl, (x[k, :3] ** 2).sum(dim=0)))
            parts.append(self.alpha * self.dt * self._ldot(rl + self.rho_floor, self.chi_l * x[k, 3] ** 2))
        return self.pc.sum(float(torch.stack(parts).sum()))

    def preconditioner_parts_t(self, lin):
        loc = self.tr.local_t
        b_out = torch.empty(self.u_shape, dtype=self.dtype, device=self.device)
        a_out = torch.empty_like(b_out)
        for k in range(self.nt):
            rho = _at(lin.rhos_t[k], loc)
            q = _at(lin.qs[k], loc)
            bb = (lin.steps[k].b ** 2).sum(dim=1)
            for d in range(3):
                o = [e for e in range(3) if e != d]
                a_out[k, d] = 2.0 * self.beta * (self.dt * q) ** 2 * 2.0 * bb[o[0]] * bb[o[1]]
                b_out[k, d] = 2.0 * self.dt * rho + self.gamma * self.dt * self.lap_diag
            a_out[k, 3] = 2.0 * self.beta * (self.dt * self.chi_l * q) ** 2 * (bb[0] * bb[1] * bb[2])
            b_out[k, 3] = 2.0 * self.alpha * self.dt * self.chi_l * (rho + self.rho_floor)
        return b_out, a_out


def torch_problem(ref: LoopProblem, device: str = "auto", precision: str = "float64",
                  threads: int | None = None) -> TorchLoopProblem:
    """The torch version of a numpy loop problem (balanced or unbalanced).

    Args:
        ref: :class:`~glymphmpi.romt.gn.LoopProblem` or
            :class:`~glymphmpi.romt.unbalanced.UnbalancedProblem`.
        device: ``auto``, ``cpu``, ``cuda`` (this rank's GPU) or ``cuda:N``.
        precision: ``float64`` or ``float32`` (the tensors on the device; Gauss-Newton's
            iterates stay float64 on the host).
        threads: torch CPU threads (CPU device only; None leaves torch's setting).
    """
    from glymphmpi.romt.unbalanced import UnbalancedProblem

    if precision not in DTYPES:
        raise InputError(f"romt.precision must be one of {sorted(DTYPES)}, got {precision!r}")
    dev = resolve_device(device)
    if dev.type == "cpu" and threads:
        torch.set_num_threads(int(threads))
    cls = TorchUnbalancedProblem if isinstance(ref, UnbalancedProblem) else TorchLoopProblem
    prob = cls(ref, dev, DTYPES[precision])
    desc = prob.describe()
    if desc not in _ANNOUNCED:  # once per process and device
        _ANNOUNCED.add(desc)
        log.info("rOMT backend: %s", desc)
    return prob
