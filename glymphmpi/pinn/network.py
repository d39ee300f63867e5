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
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from glymphmpi.errors import InputError


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


    def residual_streams(self, xt: torch.Tensor, D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c, dc/dt - D lap_x c) at (N, 4) points, each (N,), physical units; differentiable in the
        parameters and in ``D`` (a 0-dim tensor).

        The residual is linear in the time derivative and the Laplacian, and both travel linearly
        through the affine maps, so for the tanh network one stream ``R = z_t - D lap z`` replaces the
        two (``R' = a1 R_z - D a2 |grad_x z|^2`` through an activation): five streams per layer
        instead of six, a sixth less work than :meth:`derivatives`. Other activations (and
        ``compiled``) fall back to :meth:`derivatives`.
        """
        if self.act_name != "tanh" or len(self.layers) <= 2 or self.compiled:
            c, ct, lap = self.derivatives(xt)
            return c, ct - D * lap
        s = self.in_scale
        first = self.layers[0]
        z = first(self.scaled(xt))                       # (N, W)
        w0 = first.weight * s                            # (W, 4)
        a, a1, a2 = _tanh(z)
        S = torch.cat((a.unsqueeze(0), a1.unsqueeze(0) * w0.T[:3].unsqueeze(1),
                       (a1 * w0[:, 3] - D * (a2 * (w0[:, :3] ** 2).sum(1))).unsqueeze(0)), dim=0)
        for lin in self.layers[1:-1]:
            S = _TanhResidualLayer.apply(S, lin.weight, lin.bias, D)
        wl, bl = self.layers[-1].weight, self.layers[-1].bias
        y = torch.mm(S.reshape(-1, S.shape[-1]), wl.T).view(S.shape[0], S.shape[1]) * self.out_scale
        return y[0] + bl * self.out_scale, y[4]


class _TanhResidualLayer(torch.autograd.Function):
    """One hidden tanh layer on the five streams [value, d/dx, d/dy, d/dz, R = d/dt - D lap].

    Forward: ``Z = S W^T`` (bias on the value), a = tanh z, outputs a, a1 grad_x z and
    a1 R_z - D a2 Q (Q = |grad_x z|^2). Backward for incoming G (the six-stream rules of
    :class:`_TanhLaplacianLayer` with G_t = G_R, G_l = -D G_R):
    dz = G_a a1 + a2 (<G_gx, grad_x z> + G_R R_z) - D G_R a3 Q, d grad_x z = a1 G_gx - 2 D a2 G_R grad_x z,
    d R_z = a1 G_R, dD = -sum G_R a2 Q. Checked against autograd in the tests.
    """

    @staticmethod
    def forward(ctx, S, weight, bias, D):
        w_out, w_in = weight.shape
        Z = torch.mm(S.reshape(-1, w_in), weight.T).view(S.shape[0], S.shape[1], w_out)
        Dv = float(D)
        z = Z[0].add_(bias)
        out = torch.empty_like(Z)
        a = torch.tanh(z)
        out[0].copy_(a)
        a1 = torch.mul(a, a).neg_().add_(1.0)
        for k in range(1, 5):
            torch.mul(Z[k], a1, out=out[k])
        Q = torch.mul(Z[1], Z[1])
        Q.addcmul_(Z[2], Z[2]).addcmul_(Z[3], Z[3])
        aQ = torch.mul(a, Q).mul_(a1)                    # a a1 Q = -a2 Q / 2
        out[4].add_(aQ, alpha=2.0 * Dv)                  # a1 R_z - D a2 Q
        ctx.save_for_backward(S, weight, Z, a, Q)
        ctx.D = Dv
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, G):
        S, weight, Z, a, Q = ctx.saved_tensors
        Dv = ctx.D
        G = G.contiguous()
        a1 = torch.mul(a, a).neg_().add_(1.0)
        a2 = torch.mul(a, a1).mul_(-2.0)
        a3 = torch.mul(a1, a1).addcmul_(a, a2).mul_(-2.0)
        dZ = torch.empty_like(G)
        m = torch.mul(G[4], a2).mul_(-2.0 * Dv)          # -2 D a2 G_R
        for k in range(1, 5):
            torch.mul(G[k], a1, out=dZ[k])
            if k < 4:
                dZ[k].addcmul_(Z[k], m)
        P = torch.mul(G[1], Z[1])
        P.addcmul_(G[2], Z[2]).addcmul_(G[3], Z[3]).addcmul_(G[4], Z[4])
        d0 = torch.mul(G[0], a1, out=dZ[0])
        d0.addcmul_(a2, P)
        t = torch.mul(a3, Q).mul_(-Dv)
        d0.addcmul_(G[4], t)
        gD = -(torch.mul(G[4], a2).mul_(Q)).sum() if ctx.needs_input_grad[3] else None
        dS, dW = _affine_backward(dZ, S, weight, ctx.needs_input_grad[0])
        return dS, dW, dZ[0].sum(0), gD


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
        c_data = self.net(x_data)
        _, res = self.net.residual_streams(x_pde, self.dcoef().to(x_pde.dtype))
        return c_data, res

    def residual(self, x_pde: torch.Tensor) -> torch.Tensor:
        _, ct, lap = self.net.derivatives(x_pde)
        return ct - self.dcoef().to(lap.dtype) * lap
