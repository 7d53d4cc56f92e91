"""The likelihood-ratio algorithms as objects the learner selects by name (Flow-GRPO, Flow-DPPO).

Each one says what it needs from the learner (``needs_anchors``: replay the trained steps at the pre-update
weights before the first optimizer step; ``needs_reference``: the base model's step mean) and maps one
replayed (micro-batch, step) to ``(loss, stats)`` with the pure losses of :mod:`rlflow.algos.losses`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from rlflow.algos.losses import dppo_loss, grpo_loss
from rlflow.sde import step_kl
from rlflow.types import StepOut


class PolicyGradientAlgo(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def needs_anchors(self) -> bool: ...

    @property
    def needs_reference(self) -> bool: ...

    def loss(
        self, new: StepOut, logp_old: Tensor, mean_old: Tensor, adv: Tensor, ref_mean: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]: ...


@dataclass(frozen=True)
class GRPO:
    """Flow-GRPO: ratio clipping around the rollout log-probs, optional exact KL to the base model."""

    clip_range: float = 1e-4
    adv_clip: float = 5.0
    beta: float = 0.0
    name: str = "grpo"
    needs_anchors: bool = False

    @property
    def needs_reference(self) -> bool:
        return self.beta > 0

    def loss(self, new: StepOut, logp_old: Tensor, mean_old: Tensor, adv: Tensor, ref_mean: Tensor | None):
        kl = step_kl(new.mean, ref_mean, new.std) if ref_mean is not None else None
        return grpo_loss(new.log_prob, logp_old, adv, clip_range=self.clip_range, adv_clip=self.adv_clip, kl=kl, beta=self.beta)


@dataclass(frozen=True)
class DPPO:
    """Flow-DPPO: exact-KL trust region against frozen anchors replayed at the pre-update weights."""

    kl_threshold: float = 1e-5
    name: str = "dppo"
    needs_anchors: bool = True
    needs_reference: bool = False

    def loss(self, new: StepOut, logp_old: Tensor, mean_old: Tensor, adv: Tensor, ref_mean: Tensor | None):
        return dppo_loss(new.log_prob, logp_old, new.mean, mean_old, new.std, adv, kl_threshold=self.kl_threshold)
