"""Flow-GRPO (ALGORITHMS.md section 2): ratio clipping around the rollout log-probs, optional exact KL to the
base model. Rollouts record a seeded window of SDE steps; the loss replays them at the current weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from rlflow.algos.base import AlgoSection, LossModel, MicroBatch, PolicySpec, RolloutSpec, register_algorithm
from rlflow.algos.losses import grpo_loss
from rlflow.models.base import FlowPolicy
from rlflow.sde import step_kl
from rlflow.types import Rollout


class GRPOConfig(AlgoSection):
    name: Literal["grpo"] = "grpo"
    clip_range: float = Field(1e-4, gt=0, description="eps_c of the ratio clip (1e-5 CFG-free / Fast)")
    adv_clip: float = Field(5.0, gt=0)
    beta: float = Field(0.0, ge=0, description="coefficient of the exact KL to the base model")


def step_terms(rollout: Rollout) -> int:
    """The trained steps of a rollout that recorded them (GRPO and DPPO train one term per step)."""
    if rollout.steps is None:
        raise ValueError("this algorithm trains on recorded SDE steps, but the rollout recorded none")
    return rollout.steps.num_steps


@dataclass(frozen=True)
class GRPO:
    clip_range: float = 1e-4
    adv_clip: float = 5.0
    beta: float = 0.0
    name: str = "grpo"
    rollout: RolloutSpec = RolloutSpec(stochastic=True)

    @property
    def policies(self) -> PolicySpec:
        return PolicySpec(reference=self.beta > 0)

    def num_terms(self, rollout: Rollout) -> int:
        return step_terms(rollout)

    def prepare(self, model: LossModel, mb: MicroBatch) -> dict[str, Tensor]:
        return {}

    def loss(self, model: LossModel, mb: MicroBatch, term: int) -> tuple[Tensor, dict[str, Tensor]]:
        new = model.replay(mb, term)
        kl = None
        if self.beta > 0:
            with torch.no_grad(), model.reference():
                kl = step_kl(new.mean, model.replay(mb, term).mean, new.std)
        logp_old = mb.rollout.steps.log_prob[:, term].to(model.device)  # type: ignore[union-attr]
        return grpo_loss(new.log_prob, logp_old, mb.adv, clip_range=self.clip_range, adv_clip=self.adv_clip,
                         kl=kl, beta=self.beta)

    def after_update(self, policy: FlowPolicy, optimizer_steps: int) -> dict[str, float]:
        return {}


register_algorithm("grpo", GRPOConfig, lambda c: GRPO(clip_range=c.clip_range, adv_clip=c.adv_clip, beta=c.beta))
