"""The loss J + w_r L_r of Zapf et al. 2022.

* ``J = mean over (voxel, scan) pairs inside the mask of (c(x_i, t_k) - d_ik)^2``
* ``L_r = mean over PDE points of |dc/dt - D lap c|^p``, p = 1 or 2.

Under data parallelism every rank holds a shard of a global minibatch. Each
rank returns ``sum over its shard / global batch size * world size``; DDP
averages gradients over the ranks, so the gradient is exactly that of the
global minibatch mean, shard sizes need not be equal.
"""

from __future__ import annotations

import torch


def p_at(schedule: str, epoch: int, switch_epoch: int) -> int:
    """Residual exponent p at ``epoch`` under ``schedule`` (``1``, ``2`` or ``2to1``)."""
    if schedule == "1":
        return 1
    if schedule == "2":
        return 2
    if schedule == "2to1":
        return 2 if epoch < switch_epoch else 1
    raise ValueError(f"unknown p schedule {schedule!r} (valid: 1, 2, 2to1)")


def residual_power(res: torch.Tensor, p: int) -> torch.Tensor:
    """|r|^p elementwise."""
    return res.abs() if p == 1 else res * res if p == 2 else res.abs() ** p


def shard_losses(c_pred: torch.Tensor, c_obs: torch.Tensor, res: torch.Tensor, p: int,
                 n_data_global: int, n_pde_global: int, world: int):
    """(J part, L_r part) of one rank's shard, scaled for gradient averaging (module docstring).

    Returns also the unscaled shard sums for the epoch's loss record.
    """
    sq = ((c_pred - c_obs) ** 2).sum()
    rp = residual_power(res, p).sum()
    J = sq * (world / max(1, n_data_global))
    L = rp * (world / max(1, n_pde_global))
    return J, L, sq.detach(), rp.detach()
