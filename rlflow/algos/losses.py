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


def _check_nft_inputs(
    v: Tensor, v_old: Tensor, v_ref: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, adv: Tensor, beta: float
) -> None:
    if v.ndim < 1:
        raise ValueError(f"nft_loss: argument 'v' must be [B, ...], got shape {tuple(v.shape)}")
    for name, x in (("v_old", v_old), ("v_ref", v_ref), ("x0", x0), ("x_t", x_t)):
        if x.shape != v.shape:
            raise ValueError(
                f"nft_loss: argument '{name}' has shape {tuple(x.shape)}, expected the shape of v {tuple(v.shape)}"
            )
    batch = (v.shape[0],)
    for name, x in (("t", t), ("adv", adv)):
        if x.shape != batch:
            raise ValueError(f"nft_loss: argument '{name}' has shape {tuple(x.shape)}, expected [B] = {batch}")
    if not beta > 0:
        raise ValueError(f"nft_loss: argument 'beta' must be > 0, got {beta}")


def nft_loss(
    v: Tensor,
    v_old: Tensor,
    v_ref: Tensor,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    adv: Tensor,
    *,
    beta: float,
    adv_clip: float = 5.0,
    kl_coef: float = 1e-4,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DiffusionNFT: flow matching on the forward process towards implicit positive / negative policies.

    Shapes: ``v, v_old, v_ref, x0, x_t``: ``[B, ...]`` (equal shapes, any trailing dims, ``D`` elements per
    sample); ``t, adv``: ``[B]``. ``v`` is the trained velocity at ``(x_t, t)`` and carries the gradient;
    ``v_old`` (the sampling policy) and ``v_ref`` (the reference policy) are detached here. ``x_t`` is
    the noised ``x0`` at time ``t`` (``x_t = (1 - t) x0 + t eps``, so ``x0 = x_t - t v`` for the true
    velocity). Any float dtype is accepted; all arithmetic is in float32, the adaptive weights in float64
    (as in the authors' code), and the returned tensors are float32. ``D``-reductions are MEANs::

        r     = clip(0.5 + clip(A, -adv_clip, adv_clip) / (2 adv_clip), 0, 1)      optimality probability
        v+    = beta v + (1 - beta) v_old = v_old + beta (v - v_old)              implicit positive policy
        v-    = (1 + beta) v_old - beta v = v_old - beta (v - v_old)              implicit negative policy
        x0+-  = x_t - t v+-
        w+-   = stopgrad(max(mean_D |x0+- - x0|, 1e-5))                          adaptive weights, float64
        L+-   = mean_D (x0+- - x0)^2 / w+-                                       per sample
        policy_loss = adv_clip * mean_B[(r L+ + (1 - r) L-) / beta]
        kl_ref      = mean_B mean_D (v - v_ref)^2
        loss        = policy_loss + kl_coef * kl_ref

    ``v+-`` are computed in the ``v_old +- beta (v - v_old)`` form, which equals the above and makes
    ``v+ == v-`` exact at ``v == v_old``. Stats (detached scalars): ``loss``, ``policy_loss``, ``kl_ref``
    (before ``kl_coef``), ``pos_loss`` (``mean_B L+``), ``neg_loss`` (``mean_B L-``), ``r_mean`` and
    ``old_deviation`` (``mean (v - v_old)^2``).
    """
    _check_nft_inputs(v, v_old, v_ref, x0, x_t, t, adv, beta)
    if not adv_clip > 0:
        raise ValueError(f"nft_loss: argument 'adv_clip' must be > 0, got {adv_clip}")
    b = v.shape[0]
    # flatten to [B, D] so a [B] input (D = 1) reduces per sample, not over everything
    v_f = v.float().reshape(b, -1)
    v_old_f = v_old.detach().float().reshape(b, -1)
    v_ref_f = v_ref.detach().float().reshape(b, -1)
    x0_f = x0.float().reshape(b, -1)
    x_t_f = x_t.float().reshape(b, -1)
    t_f = t.float().reshape(b, 1)

    a = torch.clamp(adv.float(), -adv_clip, adv_clip)
    r = torch.clamp(0.5 + a / (2.0 * adv_clip), 0.0, 1.0)

    delta = v_f - v_old_f
    x0_pos = x_t_f - t_f * (v_old_f + beta * delta)
    x0_neg = x_t_f - t_f * (v_old_f - beta * delta)
    with torch.no_grad():
        w_pos = (x0_pos.double() - x0_f.double()).abs().mean(dim=1, keepdim=True).clamp(min=1e-5).float()
        w_neg = (x0_neg.double() - x0_f.double()).abs().mean(dim=1, keepdim=True).clamp(min=1e-5).float()
    pos = ((x0_pos - x0_f) ** 2 / w_pos).mean(dim=1)
    neg = ((x0_neg - x0_f) ** 2 / w_neg).mean(dim=1)
    policy_loss = adv_clip * ((r * pos + (1.0 - r) * neg) / beta).mean()
    kl = ((v_f - v_ref_f) ** 2).mean(dim=1).mean()
    loss = policy_loss + kl_coef * kl
    stats = {
        "loss": loss.detach(),
        "policy_loss": policy_loss.detach(),
        "kl_ref": kl.detach(),
        "pos_loss": pos.detach().mean(),
        "neg_loss": neg.detach().mean(),
        "r_mean": r.detach().mean(),
        "old_deviation": (delta.detach() ** 2).mean(),
    }
    return loss, stats
