"""Flow-DPPO (ALGORITHMS.md section 3): an exact-KL trust region against anchors (step means and log-probs)
replayed at the rollout's weights before the first optimizer step; no ratio clipping, no reference KL."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from rlflow.algos.base import AlgoSection, LossModel, MicroBatch, PolicySpec, RolloutSpec, register_algorithm
from rlflow.algos.grpo import step_terms
from rlflow.algos.losses import dppo_loss
from rlflow.models.base import FlowPolicy
from rlflow.types import Rollout


class DPPOConfig(AlgoSection):
    name: Literal["dppo"] = "dppo"
    kl_threshold: float = Field(1e-5, gt=0, description="tau of the trust region (mean-reduced KL)")


@dataclass(frozen=True)
class DPPO:
    kl_threshold: float = 1e-5
    name: str = "dppo"
    rollout: RolloutSpec = RolloutSpec(stochastic=True)
    policies: PolicySpec = PolicySpec(anchors=True)

    def num_terms(self, rollout: Rollout) -> int:
        return step_terms(rollout)

    @torch.no_grad()
    def prepare(self, model: LossModel, mb: MicroBatch) -> dict[str, Tensor]:
        """``logp_old`` ``[n, S]`` and ``mean_old`` ``[n, S, ...]`` (CPU), replayed at the rollout's weights."""
        outs = [model.replay(mb, j) for j in range(self.num_terms(mb.rollout))]
        return {"logp_old": torch.stack([o.log_prob.cpu() for o in outs], 1),
                "mean_old": torch.stack([o.mean.cpu() for o in outs], 1)}

    def loss(self, model: LossModel, mb: MicroBatch, term: int) -> tuple[Tensor, dict[str, Tensor]]:
        new = model.replay(mb, term)
        dev = model.device
        return dppo_loss(new.log_prob, mb.prepared["logp_old"][:, term].to(dev), new.mean,
                         mb.prepared["mean_old"][:, term].to(dev), new.std, mb.adv, kl_threshold=self.kl_threshold)

    def after_update(self, policy: FlowPolicy, optimizer_steps: int) -> dict[str, float]:
        return {}


register_algorithm("dppo", DPPOConfig, lambda c: DPPO(kl_threshold=c.kl_threshold))
