"""Losses, advantages and the algorithm objects the learner selects by name."""

from rlflow.algos.advantages import group_advantages
from rlflow.algos.losses import dppo_loss, grpo_loss

__all__ = ["group_advantages", "grpo_loss", "dppo_loss"]
