"""The network c(x, t; theta), the diffusion coefficient D(delta) and the PDE residual.

Inputs are physical (x, y, z in mm, t in h), scaled affinely to [-1, 1] from
a bounding box inside the network; the output is multiplied by the data's
magnitude. Derivatives are taken through both scalings, so the residual
``dc/dt - D lap c`` is in physical units (concentration per hour).

Second derivatives are computed by forward propagation of the value, the
gradient with respect to (x, y, z, t) and the spatial Laplacian through the
layers (one batched matrix product per layer for all three), which is exact
and needs no per-point or per-component backward passes. For an affine layer
``z = W h + b``: ``grad z = W grad h`` and ``lap z = W lap h``; for the
activation ``a = s(z)``: ``grad a = s'(z) grad z`` and
``lap a = s''(z) |grad_x z|^2 + s'(z) lap z``. The reference
:func:`derivatives_autograd` (reverse mode with ``create_graph``) is used to
check it.

A training step uses :meth:`PinnNet.fused_data_residual`: the data points ride
along as extra value rows of the same stacked (5 n + n_d, W) tensor, so the data
and the PDE term share one matrix product per layer, and the first and hidden
layers have hand-written backward passes (no autograd graph of elementwise
operations); tanh is evaluated as 2 sigmoid(2 z) - 1, which PyTorch's CPU kernels
compute 2-4x faster than tanh itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from glymphmpi.errors import InputError
from glymphmpi.pinn import cpu_kernels


def _tanh(z):
    a = torch.tanh(z)
    a1 = 1.0 - a * a
    return a, a1, -2.0 * a * a1


def _sin(z):
    a = torch.sin(z)
    return a, torch.cos(z), -a


def _silu(z):
    s = torch.sigmoid(z)
    a = z * s
    ds = s * (1.0 - s)
    return a, s + z * ds, ds * (2.0 + z * (1.0 - 2.0 * s))


ACTIVATIONS: dict[str, Callable] = {"tanh": _tanh, "sin": _sin, "silu": _silu}
"""name -> function z -> (s(z), s'(z), s''(z))."""


def activation(name: str) -> Callable:
    """The activation triple of a name; raises with the valid names."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise InputError(f"unknown activation {name!r} (valid: {', '.join(ACTIVATIONS)})") from None


class PinnNet(nn.Module):
    """Fully connected network c(x, t) with input and output scaling.

    Args:
        depth: hidden layers.
        width: neurons per hidden layer.
        act: activation name (see :data:`ACTIVATIONS`).
        lo, hi: (4,) bounding box of the inputs (x, y, z in mm, t in h);
            mapped to [-x_scale, x_scale] in space and [-t_scale, t_scale] in time.
        out_scale: the output is ``out_scale * N(x_scaled)`` (the data's magnitude).
        compiled: ``torch.compile`` the elementwise work of the fused tanh layers
            (fused loops; a one-off compile of tens of seconds).
    """

    def __init__(self, depth: int, width: int, act: str, lo, hi, out_scale: float = 1.0,
                 compiled: bool = False, x_scale: float = 1.0, t_scale: float = 1.0):
        super().__init__()
        self.compiled = bool(compiled)
        self.act_name = act
        self._act = activation(act)
        lo = torch.as_tensor(lo, dtype=torch.float64)
        hi = torch.as_tensor(hi, dtype=torch.float64)
        if lo.shape != (4,) or hi.shape != (4,) or bool(torch.any(hi <= lo)):
            raise InputError("network input box needs lo < hi in all four coordinates")
        dt = torch.get_default_dtype()  # buffers follow .to(dtype) / .double() with the weights
        half = torch.tensor([x_scale, x_scale, x_scale, t_scale], dtype=torch.float64)
        self.register_buffer("in_lo", lo.to(dt))
        self.register_buffer("in_half", half.to(dt))  # the box maps to [-half, half]
        self.register_buffer("in_scale", (2.0 * half / (hi - lo)).to(dt))
        self.register_buffer("out_scale", torch.tensor(float(out_scale), dtype=dt))
        sizes = [4] + [width] * depth + [1]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        for lin in self.layers:  # Glorot-normal weights, zero biases
            nn.init.xavier_normal_(lin.weight)
            nn.init.zeros_(lin.bias)

    def scaled(self, xt: torch.Tensor) -> torch.Tensor:
        return (xt - self.in_lo) * self.in_scale - self.in_half

    def forward(self, xt: torch.Tensor) -> torch.Tensor:
        """c at (N, 4) points (mm, h) -> (N,)."""
        h = self.scaled(xt)
        for lin in self.layers[:-1]:
            h = self._act(lin(h))[0]
        return self.layers[-1](h).squeeze(-1) * self.out_scale

    def derivatives(self, xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c, dc/dt, lap_x c) at (N, 4) points, each (N,), in physical units.

        Forward propagation of value, gradient and Laplacian (module docstring);
        differentiable with respect to the parameters.
        """
        s = self.in_scale
        first = self.layers[0]
        z = first(self.scaled(xt))                       # (N, W)
        w0 = first.weight * s                            # (W, 4): d z / d(x, y, z, t), same for all points
        a, a1, a2 = self._act(z)
        h = a
        gx = a1.unsqueeze(0) * w0.T[:3].unsqueeze(1)     # (3, N, W) spatial gradient
        gt = a1 * w0[:, 3]                               # (N, W) time derivative
        lh = a2 * (w0[:, :3] ** 2).sum(1)                # (N, W) spatial Laplacian
        if self.act_name == "tanh" and len(self.layers) > 2:
            # fused path: streams stacked as (6, N, W) = [c, d/dx, d/dy, d/dz, d/dt, lap]
            S = torch.cat((h.unsqueeze(0), gx, gt.unsqueeze(0), lh.unsqueeze(0)), dim=0)
            for lin in self.layers[1:-1]:
                S = _TanhLaplacianLayer.apply(S, lin.weight, lin.bias, self.compiled)
            wl, bl = self.layers[-1].weight, self.layers[-1].bias  # (1, W), (1,)
            # the output layer on all streams at once: selecting three streams of the (6, N, W) tensor
            # would make autograd zero-fill and accumulate full-size gradients
            y = torch.mm(S.reshape(-1, S.shape[-1]), wl.T).view(S.shape[0], S.shape[1]) * self.out_scale
            return y[0] + bl * self.out_scale, y[4], y[5]
        else:
            for lin in self.layers[1:-1]:
                wt = lin.weight.T
                z = torch.addmm(lin.bias, h, wt)
                gzx = gx @ wt                            # (3, N, W): one (3N, W) x (W, W) product
                gzt = gt @ wt
                lz = lh @ wt
                a, a1, a2 = self._act(z)
                h = a
                gx = a1 * gzx
                gt = a1 * gzt
                lh = a2 * (gzx * gzx).sum(0) + a1 * lz
        wl, bl = self.layers[-1].weight.T, self.layers[-1].bias  # (W, 1), (1,)
        c = torch.addmm(bl, h, wl).squeeze(-1) * self.out_scale
        return c, (gt @ wl).squeeze(-1) * self.out_scale, (lh @ wl).squeeze(-1) * self.out_scale


    def fused_data_residual(self, x_pde: torch.Tensor, x_data: torch.Tensor, D: torch.Tensor):
        """(c at the PDE points, c at the data points, R = dc/dt - D lap_x c at the PDE points), physical
        units, in ONE pass through the network; differentiable in the parameters and in ``D`` (0-dim).

        Tanh networks of two or more hidden layers only (see :meth:`residual_streams` for the rest).
        The rows of every layer are one (5 n + n_d, W) tensor: the values at the n PDE points and the
        n_d data points, then the three spatial gradients and the residual stream at the PDE points,
        so each layer is one matrix product forward and two backward for the data and the PDE term
        alike, with hand-written backward passes (:class:`_FirstTanhLayer`, :class:`_FusedTanhLayer`).
        """
        n, nd = x_pde.shape[0], x_data.shape[0]
        m = n + nd
        U = self.scaled(torch.cat((x_pde, x_data), 0))  # the inputs carry no gradient
        first = self.layers[0]
        D = D.to(U.dtype)
        S = _FirstTanhLayer.apply(U, first.weight, first.bias, self.in_scale, D, n, m)
        for lin in self.layers[1:-1]:
            S = _FusedTanhLayer.apply(S, lin.weight, lin.bias, D, n, m)
        wl, bl = self.layers[-1].weight, self.layers[-1].bias   # (1, W), (1,)
        # the output layer on all rows at once (selecting rows of S would zero-fill full-size gradients)
        y = torch.mv(S, wl[0])
        c = (y[:m] + bl) * self.out_scale
        return c[:n], c[n:], y[m + 3 * n:] * self.out_scale

    def residual_streams(self, xt: torch.Tensor, D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c, dc/dt - D lap_x c) at (N, 4) points, each (N,), physical units; differentiable in the
        parameters and in ``D`` (a 0-dim tensor).

        The residual is linear in the time derivative and the Laplacian, and both travel linearly
        through the affine maps, so for the tanh network one stream ``R = z_t - D lap z`` replaces the
        two (``R' = a1 R_z - D a2 |grad_x z|^2`` through an activation): five streams per layer
        instead of six, a sixth less work than :meth:`derivatives`. Other activations (and
        ``compiled``) fall back to :meth:`derivatives`.
        """
        if not self.fused_ok:
            c, ct, lap = self.derivatives(xt)
            return c, ct - D * lap
        c, _, r = self.fused_data_residual(xt, xt[:0], D)
        return c, r

    @property
    def fused_ok(self) -> bool:
        """Whether :meth:`fused_data_residual` applies (tanh, >= 2 hidden layers, not compiled)."""
        return self.act_name == "tanh" and len(self.layers) > 2 and not self.compiled


CPU_KERNELS = True
"""Whether the hidden tanh layers run their elementwise work in the fused numba kernels of
:mod:`glymphmpi.pinn.cpu_kernels` on the CPU (else PyTorch's eager operations; CUDA always
uses PyTorch)."""


def _fused_cpu(t: torch.Tensor) -> bool:
    return CPU_KERNELS and t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)


_CONST: dict = {}


def _const(value: float, like: torch.Tensor) -> torch.Tensor:
    """A cached 0-dim tensor of ``value`` with the dtype and device of ``like`` (a broadcast operand)."""
    key = (value, like.dtype, like.device)
    t = _CONST.get(key)
    if t is None:
        t = _CONST[key] = torch.tensor(value, dtype=like.dtype, device=like.device)
    return t


ONEDNN_MIN_ROWS = 16384
"""Rows from which :func:`_mm_nt` uses oneDNN (a training minibatch of 512 + 512 points, 3,072 rows, was
as fast with MKL: 12.3 vs 11.6 ms per step, best of 401)."""
_ONEDNN: list = [None]  # whether oneDNN's inner product serves S W^T here (checked once, on first use)


def _onednn_ok() -> bool:
    """Whether :func:`_mm_nt` may use oneDNN: PyTorch built with it, and on a first small product
    equal to ``torch.mm`` to float32 rounding (checked once per process)."""
    if _ONEDNN[0] is None:
        ok = False
        op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
        if op is not None and torch.backends.mkldnn.is_available():
            g = torch.Generator().manual_seed(0)
            a, w = torch.randn(97, 64, generator=g), torch.randn(48, 64, generator=g)
            try:
                got = op(a, w, None, "none", [], "")
                ok = bool(torch.allclose(got, torch.mm(a, w.T), rtol=1e-5, atol=1e-4))
            except RuntimeError:
                ok = False
        _ONEDNN[0] = ok
    return _ONEDNN[0]


def _mm_nt(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A B^T`` for contiguous A (rows, k) and B (out, k). float32 on the CPU goes through oneDNN's
    inner product (``torch.ops.mkldnn._linear_pointwise``, the kernel ``torch.compile`` emits for
    linear layers) where :func:`_onednn_ok`: on the AMD EPYC CPUs of our 2-core machines MKL's sgemm,
    what ``torch.mm`` calls, took 1.1-1.6x as long for these tall, narrow products (40,960 x 64 by
    64 x 64: 5.0 vs 3.5 ms on 2 threads, 8.5 vs 5.4 ms on 1, best of 21; a whole step of 8,192 PDE and
    8,192 data points 151 vs 178 ms median, interleaved), oneDNN's JIT-generated AVX2 kernels beating
    MKL's on a non-Intel CPU. Fewer than :data:`ONEDNN_MIN_ROWS` rows, other dtypes and devices:
    ``torch.mm``."""
    if (A.dtype == torch.float32 and A.device.type == "cpu" and A.shape[0] >= ONEDNN_MIN_ROWS
            and A.is_contiguous() and _onednn_ok()):
        return torch.ops.mkldnn._linear_pointwise(A, B.contiguous(), None, "none", [], "")
    return torch.mm(A, B.T)


def _tanh_into(z2: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """tanh(z) written into ``out`` from ``z2 = 2 z``, as 2 sigmoid(2 z) - 1: the same function to
    rounding (a few ulp of 1 in absolute terms), and 2x (512 rows) to 4x (8192 rows) faster than
    torch.tanh on CPUs, whose vectorised tanh is much slower than its sigmoid."""
    torch.sigmoid(z2, out=out)
    return torch.add(_const(-1.0, out), out, alpha=2.0, out=out)


class _FirstTanhLayer(torch.autograd.Function):
    """The first hidden layer of :meth:`PinnNet.fused_data_residual`, hand-written backward.

    ``U`` (m, 4): scaled inputs, the n PDE points first, then the data points; ``z = U W^T + b``;
    w0 = W diag(s) is d z / d(x, y, z, t) in physical units. Outputs (m + 4 n, W): a = tanh z (all
    m rows), a1 w0_j (j = x, y, z) and R = a1 w0_t - D a2 q (PDE rows), a1 = 1 - a^2,
    a2 = -2 a a1, q = sum_j w0_j^2. It is the hidden layer of :class:`_FusedTanhLayer` with
    constant input streams (grad_x z = w0_j, R_z = w0_t, Q = q), so the same backward rules hold,
    plus the gradients of w0 itself: d w0_j = sum_rows(G_j a1) + 4 D w0_j sum_rows(G_R a a1),
    d w0_t = sum_rows(G_R a1), dD = 2 q . sum_rows(G_R a a1); dW = dz^T U + d w0 diag(s).
    """

    @staticmethod
    def forward(ctx, U, weight, bias, s, D, n, m):
        W = weight.shape[0]
        z2 = torch.addmm(bias, U, weight.T, beta=2.0, alpha=2.0)  # 2 z, (m, W)
        out = torch.empty((m + 4 * n, W), dtype=z2.dtype, device=z2.device)
        a = _tanh_into(z2, out[:m])
        w0T = (weight * s).T.contiguous()                         # (4, W)
        q = (w0T[:3] * w0T[:3]).sum(0)                            # (W,)
        ctx.n, ctx.m = n, m
        ctx.fused_cpu = _fused_cpu(out)
        if ctx.fused_cpu:  # the stream rows in one pass (glymphmpi.pinn.cpu_kernels)
            cpu_kernels.first_rows_forward(out.numpy(), w0T.detach().numpy(), q.detach().numpy(), n, m,
                                           2.0 * float(D), torch.get_num_threads())
            ctx.save_for_backward(U, weight, s, D, out, w0T, q)
            return out
        a1 = torch.addcmul(_const(1.0, a), a, a, value=-1.0)       # 1 - a^2
        a1p = a1[:n]
        torch.mul(a1p, w0T.unsqueeze(1), out=out[m:].view(4, n, W))
        w = torch.mul(a[:n], a1p)                                  # a a1
        D2 = D * 2.0
        out[m + 3 * n:].addcmul_(w, q * D2)                        # a1 w0_t + 2 D a a1 q
        ctx.save_for_backward(U, weight, s, D, out, a1, w, w0T, q)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, G):
        if ctx.fused_cpu:
            return _FirstTanhLayer._backward_cpu(ctx, G)
        U, weight, s, D, out, a1, w, w0T, q = ctx.saved_tensors
        n, m = ctx.n, ctx.m
        W = weight.shape[0]
        G = G.contiguous()
        a = out[:m]
        ap, a1p = a[:n], a1[:n]
        GS = G[m:].view(4, n, W)                                   # G_x, G_y, G_z, G_R
        GR = GS[3]
        sw = torch.mul(GR, w).sum(0)                               # sum_rows G_R a a1   (W,)
        dw0T = torch.mul(GS, a1p).sum(1)                           # (4, W): sum_rows G_k a1
        dw0T[:3].addcmul_(w0T[:3], (4.0 * D) * sw)
        gD = 2.0 * torch.dot(q, sw) if ctx.needs_input_grad[4] else None
        dz = torch.empty_like(G[:m])
        P = torch.mul(GS, w0T.unsqueeze(1)).sum(0)                 # sum_k G_k d_k z    (n, W)
        u = torch.mul(GR, q)
        v = torch.add(_const(-2.0, a1p), a1p, alpha=3.0)           # 3 a1 - 2
        d0 = torch.mul(u, v, out=dz[:n]).mul_(2.0 * D)
        d0.add_(G[:n]).addcmul_(ap, P, value=-2.0).mul_(a1p)
        torch.mul(G[n:m], a1[n:], out=dz[n:])
        dW = torch.mm(dz.T, U).addcmul_(dw0T.T, s) if ctx.needs_input_grad[1] else None
        db = dz.sum(0) if ctx.needs_input_grad[2] else None
        return None, dW, db, None, gD, None, None

    @staticmethod
    def _backward_cpu(ctx, G):
        """The backward with the elementwise part and the column sums in one pass
        (:func:`cpu_kernels.first_rows_backward`)."""
        U, weight, s, D, out, w0T, q = ctx.saved_tensors
        n, m = ctx.n, ctx.m
        G = G.detach().contiguous()
        dz = torch.empty((m, weight.shape[0]), dtype=G.dtype)
        sums = torch.from_numpy(cpu_kernels.first_rows_backward(
            G.numpy(), out.numpy(), dz.numpy(), w0T.detach().numpy(), q.detach().numpy(), n, m, float(D),
            torch.get_num_threads())).to(G.dtype)
        dw0T, sw = sums[:4], sums[4]
        dw0T[:3].addcmul_(w0T[:3], (4.0 * D) * sw)
        gD = 2.0 * torch.dot(q, sw) if ctx.needs_input_grad[4] else None
        dW = torch.mm(dz.T, U).addcmul_(dw0T.T, s) if ctx.needs_input_grad[1] else None
        db = dz.sum(0) if ctx.needs_input_grad[2] else None
        return None, dW, db, None, gD, None, None


class _FusedTanhLayer(torch.autograd.Function):
    """A hidden tanh layer of :meth:`PinnNet.fused_data_residual` on the stacked rows
    [values (m = n + n_d) | d/dx, d/dy, d/dz (n each) | R = d/dt - D lap (n)], hand-written backward.

    Forward: ``Z = S W^T`` (bias on the value rows), a = tanh z, outputs a, a1 grad_x z and
    R' = a1 R_z - D a2 Q = a1 R_z + 2 D a a1 Q (Q = |grad_x z|^2, PDE rows). Backward for incoming G,
    with a3 = -2 a1 (3 a1 - 2) and P = <G_gx, grad_x z> + G_R R_z (PDE rows):
    dz = a1 (G_a - 2 a P + 2 D (3 a1 - 2) Q G_R) (data rows: a1 G_a), d grad_x z = a1 (G_gx + 4 D a G_R grad_x z),
    d R_z = a1 G_R, dD = 2 sum G_R a a1 Q; dS = dZ W, dW = dZ^T S, db = sum dz.
    Checked against autograd in the tests.
    """

    @staticmethod
    def forward(ctx, S, weight, bias, D, n, m):
        W = weight.shape[0]
        Z = _mm_nt(S, weight)                                      # (m + 4 n, W)
        out = torch.empty_like(Z)
        z2 = torch.add(bias * 2.0, Z[:m], alpha=2.0, out=Z[:m])   # 2 z (Z's value rows are not needed later)
        a = _tanh_into(z2, out[:m])
        ctx.n, ctx.m = n, m
        ctx.fused_cpu = _fused_cpu(Z)
        if ctx.fused_cpu:  # the stream rows in one pass (glymphmpi.pinn.cpu_kernels)
            cpu_kernels.pde_rows_forward(Z.numpy(), out.numpy(), n, m, 2.0 * float(D), torch.get_num_threads())
            ctx.save_for_backward(S, weight, D, Z, out)
            return out
        a1 = torch.addcmul(_const(1.0, a), a, a, value=-1.0)
        a1p = a1[:n]
        torch.mul(Z[m:].view(4, n, W), a1p, out=out[m:].view(4, n, W))
        Zg = Z[m:m + 3 * n].view(3, n, W)
        Q = torch.mul(Zg[0], Zg[0]).addcmul_(Zg[1], Zg[1]).addcmul_(Zg[2], Zg[2])
        w = torch.mul(a[:n], a1p)                                  # a a1
        out[m + 3 * n:].addcmul_(torch.mul(w, Q), D * 2.0)         # + 2 D a a1 Q
        ctx.save_for_backward(S, weight, D, Z, out, a1, Q, w)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, G):
        if ctx.fused_cpu:
            return _FusedTanhLayer._backward_cpu(ctx, G)
        S, weight, D, Z, out, a1, Q, w = ctx.saved_tensors
        n, m = ctx.n, ctx.m
        W = weight.shape[0]
        G = G.contiguous()
        a = out[:m]
        ap, a1p = a[:n], a1[:n]
        GR = G[m + 3 * n:]
        dZ = torch.empty_like(G)
        dZg = dZ[m:m + 3 * n].view(3, n, W)
        mG = torch.mul(ap, GR).mul_(4.0 * D)                       # 4 D a G_R
        torch.addcmul(G[m:m + 3 * n].view(3, n, W), Z[m:m + 3 * n].view(3, n, W), mG, out=dZg)
        dZg.mul_(a1p)
        torch.mul(GR, a1p, out=dZ[m + 3 * n:])
        P = torch.mul(G[m:], Z[m:]).view(4, n, W).sum(0)           # <G_gx, grad_x z> + G_R R_z
        u = torch.mul(GR, Q)
        v = torch.add(_const(-2.0, a1p), a1p, alpha=3.0)           # 3 a1 - 2
        d0 = torch.mul(u, v, out=dZ[:n]).mul_(2.0 * D)
        d0.add_(G[:n]).addcmul_(ap, P, value=-2.0).mul_(a1p)
        torch.mul(G[n:m], a1[n:], out=dZ[n:m])
        gD = 2.0 * torch.dot(u.view(-1), w.view(-1)) if ctx.needs_input_grad[3] else None
        dS = torch.mm(dZ, weight) if ctx.needs_input_grad[0] else None
        dW = torch.mm(dZ.T, S) if ctx.needs_input_grad[1] else None
        db = dZ[:m].sum(0) if ctx.needs_input_grad[2] else None
        return dS, dW, db, gD, None, None

    @staticmethod
    def _backward_cpu(ctx, G):
        """The backward with the elementwise part in one pass (:func:`cpu_kernels.rows_backward`)."""
        S, weight, D, Z, out = ctx.saved_tensors
        G = G.detach().contiguous()
        dZ = torch.empty_like(G)
        gd = cpu_kernels.rows_backward(G.numpy(), Z.numpy(), out.numpy(), dZ.numpy(), ctx.n, ctx.m, float(D),
                                       torch.get_num_threads())
        gD = torch.tensor(gd, dtype=D.dtype) if ctx.needs_input_grad[3] else None
        dS = _mm_nt(dZ, weight.T) if ctx.needs_input_grad[0] else None
        dW = torch.mm(dZ.T, S) if ctx.needs_input_grad[1] else None
        db = dZ[:ctx.m].sum(0) if ctx.needs_input_grad[2] else None
        return dS, dW, db, gD, None, None


class _TanhLaplacianLayer(torch.autograd.Function):
    """One hidden layer (affine map, then tanh) acting on the stacked streams, hand-written backward.

    ``S`` is (6, N, W_in): value, d/dx, d/dy, d/dz, d/dt and spatial Laplacian
    of the previous layer's outputs. ``Z = S W^T`` (bias on the value only) in
    one (6N, W_in) x (W_in, W_out) product; then, with a = tanh z,
    a1 = 1 - a^2, a2 = -2 a a1, a3 = -2 (a1^2 + a a2) and Q = |grad_x z|^2,
    the outputs are a, a1 grad_x z, a1 z_t, a2 Q + a1 lap z. For incoming
    gradients G: dz = G_a a1 + a2 (<G_gx, grad_x z> + G_t z_t) + G_l (a3 Q + a2 lap z),
    d grad_x z = a1 G_gx + 2 a2 G_l grad_x z, d z_t = a1 G_t, d lap z = a1 G_l;
    then dS = dZ W, dW = dZ^T S (one product each over all six streams), db = sum dz.
    Checked against autograd in the tests (parameter gradients).
    """

    @staticmethod
    def forward(ctx, S, weight, bias, compiled):
        w_out, w_in = weight.shape
        Z = torch.mm(S.reshape(-1, w_in), weight.T).view(S.shape[0], S.shape[1], w_out)
        fwd, _ = _elementwise(compiled)
        out, a, Q = fwd(Z, bias)
        ctx.save_for_backward(S, weight, Z, a, Q)
        ctx.compiled = compiled
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, G):
        S, weight, Z, a, Q = ctx.saved_tensors
        _, bwd = _elementwise(ctx.compiled)
        dZ = bwd(G.contiguous(), Z, a, Q)
        dS, dW = _affine_backward(dZ, S, weight, ctx.needs_input_grad[0])
        return dS, dW, dZ[0].sum(0), None


def _affine_backward(dZ, S, weight, want_dS: bool):
    """Gradients of ``Z = S W^T`` over all stacked streams: (dS = dZ W or None, dW = dZ^T S)."""
    w_out, w_in = weight.shape
    dZ2 = dZ.view(-1, w_out)
    dS = torch.mm(dZ2, weight).view(S.shape) if want_dS else None
    return dS, torch.mm(dZ2.T, S.reshape(-1, w_in))


def _tanh_fwd_elem(Z, bias):
    """Elementwise part of the fused layer's forward: (outputs (6, N, W), a, Q)."""
    z = Z[0] + bias
    gzx, gzt, lz = Z[1:4], Z[4], Z[5]
    a = torch.tanh(z)
    a1 = 1.0 - a * a
    a2 = -2.0 * a * a1
    Q = (gzx * gzx).sum(0)
    out = torch.cat((a.unsqueeze(0), gzx * a1, (gzt * a1).unsqueeze(0), (a2 * Q + a1 * lz).unsqueeze(0)), 0)
    return out, a, Q


def _tanh_bwd_elem(G, Z, a, Q):
    """Elementwise part of the fused layer's backward: dZ (6, N, W) (class docstring)."""
    gzx, gzt, lz = Z[1:4], Z[4], Z[5]
    a1 = 1.0 - a * a
    a2 = -2.0 * a * a1
    a3 = -2.0 * (a1 * a1 + a * a2)
    Ggx, Gt, Gl = G[1:4], G[4], G[5]
    d0 = G[0] * a1 + a2 * ((Ggx * gzx).sum(0) + Gt * gzt) + Gl * (a3 * Q + a2 * lz)
    d1 = a1 * Ggx + (2.0 * Gl * a2) * gzx
    return torch.cat((d0.unsqueeze(0), d1, (Gt * a1).unsqueeze(0), (Gl * a1).unsqueeze(0)), 0)


def _tanh_fwd_lean(Z, bias):
    """:func:`_tanh_fwd_elem` with fewer passes over memory (eager default): results written in place
    into one preallocated tensor, no concatenation. Overwrites ``Z[0]`` with z + bias (the backward
    needs only the derivative streams ``Z[1:]``)."""
    z = Z[0].add_(bias)
    out = torch.empty_like(Z)
    a = torch.tanh(z)
    out[0].copy_(a)  # a kept apart: a saved view of the output would be refused by autograd
    a1 = torch.mul(a, a).neg_().add_(1.0)                      # 1 - a^2
    for k in range(1, 5):  # a1 grad_x z, a1 z_t (stream by stream: broadcasting kernels are slower)
        torch.mul(Z[k], a1, out=out[k])
    Q = torch.mul(Z[1], Z[1])
    Q.addcmul_(Z[2], Z[2]).addcmul_(Z[3], Z[3])                # |grad_x z|^2
    t = torch.mul(a, Q)
    torch.mul(t.mul_(-2.0).add_(Z[5]), a1, out=out[5])         # a1 (lap z - 2 a Q) = a2 Q + a1 lap z
    return out, a, Q


def _tanh_bwd_lean(G, Z, a, Q):
    """:func:`_tanh_bwd_elem` with fewer passes over memory (eager default)."""
    a1 = torch.mul(a, a).neg_().add_(1.0)
    a2 = torch.mul(a, a1).mul_(-2.0)                           # -2 a a1
    a3 = torch.mul(a1, a1).addcmul_(a, a2).mul_(-2.0)           # -2 (a1^2 + a a2)
    dZ = torch.empty_like(G)
    m = torch.mul(G[5], a2).mul_(2.0)                          # 2 a2 G_l
    for k in range(1, 6):                                      # a1 G_gx, a1 G_t, a1 G_l
        torch.mul(G[k], a1, out=dZ[k])
        if k < 4:
            dZ[k].addcmul_(Z[k], m)                            # + 2 a2 G_l grad_x z
    P = torch.mul(G[1], Z[1])
    P.addcmul_(G[2], Z[2]).addcmul_(G[3], Z[3]).addcmul_(G[4], Z[4])  # <G_gx, grad_x z> + G_t z_t
    d0 = torch.mul(G[0], a1, out=dZ[0])
    d0.addcmul_(a2, P)
    t = torch.mul(a3, Q).addcmul_(a2, Z[5])                    # a3 Q + a2 lap z
    d0.addcmul_(G[5], t)
    return dZ


_COMPILED: dict = {}


class CompiledKernelError(RuntimeError):
    """torch.compile produced elementwise kernels that disagree with eager PyTorch."""


def _checked(compiled_fn, eager_fn, name: str):
    """Run ``compiled_fn``; the first call per dtype is compared with ``eager_fn`` on the same inputs.

    Inductor's CPU kernels were seen to compute wrong values in a process that had
    imported PETSc/DOLFINx before compiling; a wrong kernel must never train a model.
    """
    verified: set = set()

    def call(*args):
        out = compiled_fn(*args)
        dtype = args[0].dtype
        if dtype not in verified:
            ref = eager_fn(*args)
            outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
            tol = 1e-9 if dtype == torch.float64 else 1e-4
            for o, r in zip(outs, refs):
                scale = float(r.abs().max()) if r.numel() else 0.0
                if not torch.allclose(o, r, rtol=tol, atol=tol * max(scale, 1e-30)):
                    raise CompiledKernelError(
                        f"pinn.compile: the compiled {name} kernel disagrees with eager PyTorch "
                        f"(max difference {float((o - r).abs().max()):.3g}); run with pinn.compile=false "
                        "(seen when PETSc/DOLFINx were imported in the same process)")
            verified.add(dtype)
        return out

    return call


def _elementwise(compiled: bool):
    """(forward, backward) elementwise kernels; ``torch.compile``d (fused loops) when asked.

    Compiled kernels are verified against the eager ones on their first call per dtype.
    """
    if not compiled:
        return _tanh_fwd_lean, _tanh_bwd_lean
    if not _COMPILED:
        _COMPILED["fwd"] = _checked(torch.compile(_tanh_fwd_elem, dynamic=True), _tanh_fwd_elem, "forward")
        _COMPILED["bwd"] = _checked(torch.compile(_tanh_bwd_elem, dynamic=True), _tanh_bwd_elem, "backward")
    return _COMPILED["fwd"], _COMPILED["bwd"]


def derivatives_autograd(net: nn.Module, xt: torch.Tensor, create_graph: bool = True):
    """Reference (c, dc/dt, lap c) by reverse-mode autograd over the batch (no loop over points)."""
    xt = xt.detach().requires_grad_(True)
    c = net(xt)
    g = torch.autograd.grad(c.sum(), xt, create_graph=True)[0]
    lap = 0.0
    for j in range(3):  # three spatial components, each a batched backward pass
        lap = lap + torch.autograd.grad(g[:, j].sum(), xt, create_graph=create_graph)[0][:, j]
    return c, g[:, 3], lap


class DiffusionCoefficient(nn.Module):
    """D(delta) = d_min + sigmoid(delta) d_max (``sigmoid``) or D = delta (``direct``), mm^2/h."""

    def __init__(self, kind: str = "sigmoid", delta0: float = 0.0, d_min: float = 0.1, d_max: float = 1.2):
        super().__init__()
        if kind not in ("sigmoid", "direct"):
            raise InputError(f"unknown D parametrisation {kind!r} (valid: sigmoid, direct)")
        self.kind, self.d_min, self.d_max = kind, float(d_min), float(d_max)
        self.delta = nn.Parameter(torch.tensor(float(delta0), dtype=torch.float64))

    def forward(self) -> torch.Tensor:
        if self.kind == "sigmoid":
            return self.d_min + torch.sigmoid(self.delta) * self.d_max
        return self.delta

    @staticmethod
    def delta_for(D: float, d_min: float = 0.1, d_max: float = 1.2) -> float:
        """The delta that gives D under the sigmoid parametrisation."""
        u = (D - d_min) / d_max
        if not 0 < u < 1:
            raise InputError(f"D = {D} is outside ({d_min}, {d_min + d_max}) mm^2/h")
        return math.log(u / (1.0 - u))


class PinnModel(nn.Module):
    """Network + D; ``forward`` gives what the loss needs (so that DDP sees one forward).

    Returns ``(c at data points (Nd,), residual dc/dt - D lap c at PDE points (Np,))``.
    """

    def __init__(self, net: PinnNet, dcoef: DiffusionCoefficient):
        super().__init__()
        self.net = net
        self.dcoef = dcoef

    def forward(self, x_data: torch.Tensor, x_pde: torch.Tensor):
        D = self.dcoef().to(x_pde.dtype)
        if self.net.fused_ok:  # the data and the PDE points in one pass (one product per layer)
            _, c_data, res = self.net.fused_data_residual(x_pde, x_data, D)
            return c_data, res
        c_data = self.net(x_data)
        _, res = self.net.residual_streams(x_pde, D)
        return c_data, res

    def residual(self, x_pde: torch.Tensor) -> torch.Tensor:
        """dc/dt - D lap c at (N, 4) points (the five-stream path where it applies)."""
        return self.net.residual_streams(x_pde, self.dcoef().to(x_pde.dtype))[1]
