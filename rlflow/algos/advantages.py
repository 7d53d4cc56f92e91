"""Group-relative advantages (ALGORITHMS.md section 0)."""

from __future__ import annotations

import torch
from torch import Tensor


def group_advantages(rewards: Tensor, group_ids: Tensor, *, global_std: bool = True, eps: float = 1e-4) -> Tensor:
    """``A_i = (R_i - mean_group(R)) / (std + eps)``: ``[N]`` fp32.

    Args:
        rewards: ``[N]`` scalar rewards.
        group_ids: ``[N]`` integer ids; samples sharing an id form one group (G samples of one prompt).
        global_std: divide by the population std of the whole batch (one scalar, the default of every
            published recipe) instead of each group's own population std.
        eps: added to the std.
    """
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"rewards and group_ids must both be [N], got {tuple(rewards.shape)} and {tuple(group_ids.shape)}")
    r = rewards.float()
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max()) + 1 if r.numel() else 0
    counts = torch.zeros(n_groups, dtype=r.dtype, device=r.device).index_add_(0, inverse, torch.ones_like(r))
    means = torch.zeros(n_groups, dtype=r.dtype, device=r.device).index_add_(0, inverse, r) / counts
    centered = r - means[inverse]
    if global_std:
        std = r.std(unbiased=False)
    else:
        var = torch.zeros(n_groups, dtype=r.dtype, device=r.device).index_add_(0, inverse, centered**2) / counts
        std = var.sqrt()[inverse]
    return centered / (std + eps)
