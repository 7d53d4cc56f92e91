"""One policy step of a model: its velocity, then a stateless step kernel of :mod:`rlflow.sde`. Rollouts and
re-scoring both go through :func:`policy_step`, so they agree to the bit on the same inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlflow.models.base import Conditioning, FlowPolicy
from rlflow.sde import sde_step
from rlflow.types import StepOut


@dataclass(frozen=True)
class StepSettings:
    """How one policy step is computed; shared by rollout and re-scoring so both agree to the bit."""

    noise_level: float = 0.7
    kind: str = "sde"
    guidance_scale: float = 1.0


def policy_step(
    policy: FlowPolicy,
    x: Tensor,
    t: float,
    t_next: float,
    t_max: float,
    cond: Conditioning,
    step: StepSettings,
    *,
    stochastic: bool,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
) -> StepOut:
    """Velocity at ``(x, t)`` then one :func:`rlflow.sde.sde_step` (``"ode"`` when not ``stochastic``)."""
    tt = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
    v = policy.velocity(x, tt, cond, guidance_scale=step.guidance_scale)
    return sde_step(
        x, v, t, t_next, noise_level=step.noise_level, t_max=t_max,
        kind=step.kind if stochastic else "ode", noise=noise, prev_sample=prev_sample,
    )
