"""Residual diagnostics: |dc/dt - D lap c| at many points, r(t) and the residual norm.

``r(t_k) = mean over voxel centres x_i of |dc/dt - D lap c|(x_i, t_k)`` on a
uniform time grid over the scan interval (default 200 times); its mean over
the grid is the residual norm of Zapf et al. 2022. Evaluation runs without
autograd (the forward Laplacian needs none), in chunks, with the points
sharded over the ranks and gathered.
"""

from __future__ import annotations

import numpy as np
import torch

from glymphmpi.pinn.distributed import SERIAL, DistContext


@torch.no_grad()
def abs_residual(model, pts: torch.Tensor, ctx: DistContext = SERIAL,
                 chunk: int = 65536) -> torch.Tensor:
    """|residual| at (N, 4) points -> (N,), identical on every rank.

    Args:
        model: a :class:`~glymphmpi.pinn.network.PinnModel` (unwrapped).
        pts: points in mm and h, on any device (moved to the model's).
        ctx: the communicator (serial by default).
        chunk: points per forward pass.
    """
    dev = next(model.parameters()).device
    shards = torch.tensor_split(torch.arange(pts.shape[0]), ctx.size)
    mine = shards[ctx.rank]
    out = []
    for piece in torch.split(mine, chunk):
        out.append(model.residual(pts[piece].to(dev)).abs())
    local = torch.cat(out) if out else torch.zeros(0, dtype=pts.dtype, device=dev)
    return ctx.gather_shards(local, [len(s) for s in shards])


@torch.no_grad()
def predict(net, pts: torch.Tensor, chunk: int = 131072) -> torch.Tensor:
    """c at (N, 4) points (one process), chunked."""
    dev = next(net.parameters()).device
    return torch.cat([net(p.to(dev)) for p in torch.split(pts, chunk)]) if pts.shape[0] else \
        torch.zeros(0, device=dev)


def residual_over_time(model, centres: torch.Tensor, t_grid: np.ndarray, ctx: DistContext = SERIAL,
                       chunk: int = 65536) -> tuple[np.ndarray, float]:
    """r(t) on ``t_grid`` (T,) over the voxel ``centres`` (M, 3) and its mean (the residual norm).

    Returns:
        (r (T,) in concentration units per hour, mean of r).
    """
    T, M = len(t_grid), centres.shape[0]
    tt = torch.as_tensor(np.asarray(t_grid), dtype=centres.dtype)
    pts = torch.cat((centres.repeat(T, 1), tt.repeat_interleave(M).unsqueeze(1)), dim=1)
    r = abs_residual(model, pts, ctx, chunk).reshape(T, M).mean(dim=1)
    r = r.double().cpu().numpy()
    return r, float(r.mean())
