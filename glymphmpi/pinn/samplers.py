"""PDE collocation points: interior voxels with jitter, uniform times, RAR and RAE.

Following Zapf et al. 2022, the PDE is imposed only in the interior of the
domain: voxel centres of the mask eroded by one voxel (all six neighbours
inside), each moved by a uniform jitter within its voxel, at times uniform
over the scan interval. The boundary layer, where tracer enters, carries data
only.

* RAR (residual-based adaptive refinement): draw a candidate pool, evaluate
  |residual| there and append the ``n_add`` candidates with the largest values.
* RAE (residual-based adaptive exchange): replace the ``fraction`` of the
  current points with the smallest |residual| by the same number of pool
  candidates with the largest |residual|; the count stays the same.

All draws use one ``torch.Generator`` that is identical on every rank, so
every rank holds the same global point set (each trains on its own shard).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class InteriorSampler:
    """Draws (x, y, z, t) points in interior voxels.

    Attributes:
        centres: (n, 3) world coordinates (mm) of the interior voxel centres.
        linear: (3, 3) voxel-index -> mm linear part of the affine (jitter of
            +-0.5 voxel along each index axis is mapped through it).
        t0, t1: time interval (h).
    """

    centres: torch.Tensor
    linear: torch.Tensor
    t0: float
    t1: float

    @classmethod
    def from_mask(cls, interior: np.ndarray, affine: np.ndarray, t0: float, t1: float,
                  dtype=torch.float32) -> InteriorSampler:
        ijk = np.argwhere(interior).astype(np.float64)
        xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
        return cls(torch.as_tensor(xyz, dtype=dtype), torch.as_tensor(affine[:3, :3], dtype=dtype),
                   float(t0), float(t1))

    @property
    def n_voxels(self) -> int:
        return int(self.centres.shape[0])

    def draw(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """(n, 4) points: random interior voxel, uniform jitter in it, uniform time."""
        dtype = self.centres.dtype
        idx = torch.randint(0, self.n_voxels, (n,), generator=gen)
        jit = torch.rand((n, 3), generator=gen, dtype=torch.float64).to(dtype) - 0.5
        t = self.t0 + (self.t1 - self.t0) * torch.rand((n, 1), generator=gen, dtype=torch.float64).to(dtype)
        return torch.cat((self.centres[idx] + jit @ self.linear.T, t), dim=1)


ResidualFn = Callable[[torch.Tensor], torch.Tensor]
"""(N, 4) points -> (N,) |residual| (identical on every rank)."""


def rar_add(points: torch.Tensor, sampler: InteriorSampler, residual: ResidualFn, pool: int,
            n_add: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual-based adaptive refinement: append the worst ``n_add`` of ``pool`` candidates.

    Returns:
        (new point set (N + n_add, 4), the added points (n_add, 4)).
    """
    cand = sampler.draw(pool, gen)
    r = residual(cand)
    k = min(int(n_add), pool)
    top = torch.topk(r, k, largest=True, sorted=False).indices
    added = cand[top]
    return torch.cat((points, added), dim=0), added


def rae_exchange(points: torch.Tensor, sampler: InteriorSampler, residual: ResidualFn, pool: int,
                 fraction: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residual-based adaptive exchange: the lowest-residual ``fraction`` is replaced.

    Returns:
        (new point set (N, 4), removed points (k, 4), inserted points (k, 4)).
    """
    n = points.shape[0]
    k = min(max(1, int(round(fraction * n))), pool)
    r_cur = residual(points)
    low = torch.topk(r_cur, k, largest=False, sorted=False).indices
    cand = sampler.draw(pool, gen)
    r = residual(cand)
    top = torch.topk(r, k, largest=True, sorted=False).indices
    new = points.clone()
    removed = points[low].clone()
    new[low] = cand[top]
    return new, removed, cand[top]
