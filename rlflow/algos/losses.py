"""Policy losses, pure functions of tensors (ALGORITHMS.md sections 2 and 3).

Inputs are flat over (sample, trained step): ``logp, logp_old, adv``: ``[N]``; ``mean, mean_old``:
``[N, ...]``; ``std`` broadcastable to ``mean``. Log-probs and KLs are MEAN-reduced over the per-sample
elements (see :mod:`rlflow.sde`); the thresholds below are calibrated to that. The returned ``loss`` is the
mean over N; ``stats`` are detached scalar tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlflow.sde import step_kl


def _ratio_stats(ratio: Tensor) -> dict[str, Tensor]:
    r = ratio.detach()
    return {"ratio_mean": r.mean(), "ratio_min": r.min(), "ratio_max": r.max()}


def grpo_loss(
    logp: Tensor,
    logp_old: Tensor,
    adv: Tensor,
    *,
    clip_range: float,
    adv_clip: float = 5.0,
    kl: Tensor | None = None,
    beta: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Flow-GRPO: ``mean max(-A~ rho, -A~ clip(rho, 1 - eps_c, 1 + eps_c)) + beta mean KL``.

    ``A~ = clip(A, -adv_clip, adv_clip)``; ``kl``: ``[N]`` exact per-step KL to the reference policy
    (:func:`rlflow.sde.step_kl`), required when ``beta > 0``.
    """
    if beta > 0 and kl is None:
        raise ValueError("grpo_loss: beta > 0 needs the per-step kl to the reference policy")
    ratio = torch.exp(logp - logp_old)
    a = torch.clamp(adv, -adv_clip, adv_clip)
    unclipped = -a * ratio
    clipped = -a * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.maximum(unclipped, clipped).mean()
    loss = policy_loss
    stats = {
        "policy_loss": policy_loss.detach(),
        "clip_frac": ((ratio.detach() - 1.0).abs() > clip_range).float().mean(),
        **_ratio_stats(ratio),
    }
    if kl is not None:
        kl_mean = kl.mean()
        loss = loss + beta * kl_mean
        stats["kl_ref"] = kl_mean.detach()
    stats["loss"] = loss.detach()
    return loss, stats


def dppo_loss(
    logp: Tensor,
    logp_old: Tensor,
    mean: Tensor,
    mean_old: Tensor,
    std: Tensor,
    adv: Tensor,
    *,
    kl_threshold: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Flow-DPPO: exact-KL trust region with an asymmetric mask, no ratio clipping, no reference KL.

    ``kl = mean_D (mean - mean_old)^2 / (2 std^2)``; a (sample, step) is dropped when
    ``kl >= kl_threshold`` and the update keeps moving away from the old policy
    (``rho > 1 and A > 0`` or ``rho < 1 and A < 0``). Dropped entries get exactly zero gradient: the log-ratio
    is replaced with 0 there before ``exp``, so an overflowing ratio cannot produce ``inf * 0 = NaN``.
    """
    log_ratio = logp - logp_old
    kl = step_kl(mean.detach(), mean_old, std)
    with torch.no_grad():
        ratio_d = torch.exp(log_ratio)
        high = kl >= kl_threshold
        outward = ((ratio_d > 1) & (adv > 0)) | ((ratio_d < 1) & (adv < 0))
        drop = high & outward
    ratio = torch.exp(torch.where(drop, torch.zeros_like(log_ratio), log_ratio))
    per_item = torch.where(drop, torch.zeros_like(ratio), -adv * ratio)
    loss = per_item.mean()
    stats = {
        "loss": loss.detach(),
        "masked_frac": drop.float().mean(),
        "kl_mask_frac": high.float().mean(),
        "kl_mean": kl.mean(),
        "kl_max": kl.max(),
        **_ratio_stats(ratio_d),
    }
    return loss, stats
