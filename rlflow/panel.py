"""A reward panel's fusion (ALGORITHMS.md section 7), one implementation for both runtimes.

Members ``i`` with weights ``w_i`` score a batch ``r_i`` (``[B]``). Two fusions (``reward.fusion``):

- reward level (Flow-GRPO / DiffusionNFT): ``R = sum_i w_i r_i``, then the algorithm's group normalisation
  ``A = (R - mean_group(R)) / (std(R) + eps)`` (ALGORITHMS.md section 0);
- advantage level: each member normalised on its own, then weighted,
  ``A = sum_i w_i (r_i - mean_group(r_i)) / (std(r_i) + eps)``, so a member with a wide score range cannot
  drown one with a narrow range. ``std`` is the batch-wide or per-group std as ``algo.global_std`` says.

Either way the logged ``score`` is ``R = sum_i w_i r_i`` and every member's score is a component under its
label (its own components under ``label/name``), so MLflow gets ``reward/<label>_mean`` for each member.
A config without ``reward.panel`` is a panel of one whose output is the reward's own, unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlflow.algos.advantages import group_advantages
from rlflow.config import RewardConfig
from rlflow.types import RewardOutput

__all__ = ["fuse_outputs", "panel_advantages"]


def fuse_outputs(cfg: RewardConfig, outputs: list[RewardOutput]) -> RewardOutput:
    """The panel's :class:`RewardOutput` from its members' ``outputs`` (in ``cfg.members()`` order):
    ``score = sum_i w_i r_i`` (fp32, summed in fp64), components ``{label_i: r_i, label_i/k: member i's
    component k}``. Without a panel, the one reward's output as it is."""
    members = cfg.members()
    if len(outputs) != len(members):
        raise ValueError(f"the reward panel has {len(members)} members but got {len(outputs)} outputs")
    if not cfg.is_panel:
        return outputs[0]
    score = torch.zeros_like(outputs[0].score, dtype=torch.float64)
    components: dict[str, Tensor] = {}
    for (_, m), out in zip(members, outputs, strict=True):
        score += m.weight * out.score.double()
        components[m.component] = out.score.float()
        components.update({f"{m.component}/{k}": v for k, v in out.components.items() if k != m.component})
    return RewardOutput(score=score.float(), components=components)


def panel_advantages(cfg: RewardConfig, rewards: RewardOutput, group_ids: Tensor, *, global_std: bool) -> Tensor:
    """``[B]`` fp32 advantages of a (fused) batch, by ``cfg.fusion``: reward level
    ``A = normalise(sum_i w_i r_i)``; advantage level ``A = sum_i w_i normalise(r_i)``, with
    ``normalise(r) = (r - mean_group(r)) / (std(r) + 1e-4)`` (:func:`group_advantages`), the ``r_i`` read
    from the components under the members' labels. A config without a panel: ``normalise(score)``."""
    if not cfg.is_panel or cfg.fusion == "reward":
        return group_advantages(rewards.score, group_ids, global_std=global_std)
    adv = torch.zeros(rewards.score.shape, dtype=torch.float32)
    for key, m in cfg.members():
        if m.component not in rewards.components:
            raise ValueError(f"{key} '{m.component}': the batch's rewards have no component {m.component!r}")
        adv += m.weight * group_advantages(rewards.components[m.component], group_ids, global_std=global_std)
    return adv
