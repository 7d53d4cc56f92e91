"""Frozen messages passed between the pieces of rlflow. Shapes and dtypes are in each docstring.

``B`` is a batch of samples, ``S`` the number of trained (stochastic) steps of a rollout, ``...`` the
per-sample state shape (``C, H, W`` for image latents).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor


@dataclass(frozen=True)
class StepOut:
    """One policy step ``x_t -> x_t'`` (ALGORITHMS.md section 1).

    prev_sample: ``[B, ...]`` fp32, the new state ``x_t'``.
    mean:        ``[B, ...]`` fp32, the Gaussian mean of the step.
    std:         ``[B, 1, ...]`` fp32, broadcastable to ``mean``; zero for a deterministic step.
    log_prob:    ``[B]`` fp32, log-density of ``prev_sample`` reduced with a MEAN over all non-batch
                 elements (zero for a deterministic step).
    """

    prev_sample: Tensor
    mean: Tensor
    std: Tensor
    log_prob: Tensor


@dataclass(frozen=True)
class Trajectories:
    """A batch of rollouts with the data the learner needs to replay the trained steps.

    prompts:     ``B`` prompt strings.
    group_ids:   ``[B]`` int64; samples of one group share an id (same prompt, same rollout batch).
    x:           ``[B, S, ...]`` fp32, states before each trained step.
    x_next:      ``[B, S, ...]`` fp32, the sampled states after each trained step.
    t, t_next:   ``[S]`` fp32, grid times of each trained step (t = 1 is noise).
    log_prob:    ``[B, S]`` fp32, rollout log-probs (mean-reduced over D).
    mean:        ``[B, S, ...]`` fp32, rollout step means.
    final:       ``[B, ...]`` fp32, the final sample (``t = 0``).
    images:      ``[B, 3, H, W]`` fp32 in ``[0, 1]``, decoded final samples.
    step_index:  ``[S]`` int64, indices of the trained steps on the rollout grid.
    t_max:       the first grid value below 1 (the step kernels use it in place of ``t = 1``).
    policy_version: the weight version that produced this batch.
    """

    prompts: list[str]
    group_ids: Tensor
    x: Tensor
    x_next: Tensor
    t: Tensor
    t_next: Tensor
    log_prob: Tensor
    mean: Tensor
    final: Tensor
    images: Tensor
    step_index: Tensor
    t_max: float
    policy_version: int = 0

    @property
    def num_samples(self) -> int:
        return len(self.prompts)

    @property
    def num_steps(self) -> int:
        return int(self.t.shape[0])


@dataclass(frozen=True)
class RewardOutput:
    """Rewards of a batch.

    score:      ``[B]`` fp32, the scalar reward used for advantages.
    components: name -> ``[B]`` fp32, every component, logged separately.
    """

    score: Tensor
    components: dict[str, Tensor] = field(default_factory=dict)


class RewardFn(Protocol):
    """A reward: images ``[B, 3, H, W]`` in ``[0, 1]`` and their prompts -> :class:`RewardOutput`."""

    def __call__(self, images: Tensor, prompts: list[str]) -> RewardOutput: ...


def check_finite_reward(out: RewardOutput, name: str) -> None:
    """Raise if any reward is NaN or infinite: a broken reward is an error, never a silent zero."""
    for key, value in {"score": out.score, **out.components}.items():
        if not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(f"reward '{name}' returned {bad} non-finite value(s) in '{key}'")
