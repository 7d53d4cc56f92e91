"""Batched rollouts: a seeded set of stochastic (trained) steps inside an otherwise deterministic ODE.

The sampler only samples: it records what the learner needs to replay the trained steps (states, the
sampled next states, means and log-probs) and never computes losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from rlflow.models.base import Conditioning, FlowPolicy
from rlflow.sde import sde_step
from rlflow.types import StepOut, Trajectories


@dataclass(frozen=True)
class StepSettings:
    """How one policy step is computed; shared by rollout and re-scoring so both agree to the bit."""

    noise_level: float = 0.7
    kind: str = "sde"
    guidance_scale: float = 1.0


@dataclass(frozen=True)
class SamplerSettings:
    """Rollout geometry.

    num_steps: grid steps K. sde_steps: how many steps are stochastic and trained, drawn per rollout batch
    from indices ``[sde_lo, sde_hi)`` (as a contiguous window when ``contiguous``). chunk_size: samples per
    forward pass; the learner replays in the same chunks so re-scored log-probs match bit for bit.
    shared_noise: the samples of a group start from the same initial noise, so they share the ODE prefix
    and differ only through the SDE steps (Flow-GRPO-Fast's branching): the group's reward spread then
    comes from the trained actions, not from the starting noise, which cuts the advantage variance.
    """

    height: int
    width: int
    num_steps: int = 10
    sde_steps: int = 3
    sde_lo: int = 0
    sde_hi: int = 5
    contiguous: bool = False
    chunk_size: int = 32
    shared_noise: bool = False
    step: StepSettings = StepSettings()


def choose_sde_steps(seed: int, s: SamplerSettings) -> list[int]:
    """The trained step indices of one rollout batch, drawn from a seeded RNG (sorted)."""
    rng = np.random.default_rng(seed)
    if s.contiguous:
        start = int(rng.integers(s.sde_lo, s.sde_hi - s.sde_steps + 1))
        return list(range(start, start + s.sde_steps))
    return sorted(int(i) for i in rng.choice(np.arange(s.sde_lo, s.sde_hi), size=s.sde_steps, replace=False))


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


def chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def stream_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for the random stream ``keys`` of a rollout batch seeded ``seed``."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


_X0, _NOISE = 0, 1


class Sampler:
    """Runs rollouts of a :class:`FlowPolicy` (no grad).

    Every sample draws its noise from its own stream, keyed by the batch seed and the sample's index in the
    whole rollout batch (its group id for group-shared initial noise). A batch split into chunks across any
    number of sampler processes is therefore bit-identical to the batch sampled in one call, and a chunk
    redone after a crash reproduces the lost one exactly.
    """

    def __init__(self, policy: FlowPolicy, settings: SamplerSettings):
        self.policy = policy.set_resolution(settings.height, settings.width)
        self.settings = settings
        self.grid = policy.schedule(settings.num_steps)

    @torch.no_grad()
    def rollout(
        self, prompts: list[str], group_ids: Tensor, *, seed: int, policy_version: int = 0,
        trained: list[int] | None = None, offset: int = 0,
    ) -> Trajectories:
        """Sample ``len(prompts)`` trajectories; the ``trained`` steps (default :func:`choose_sde_steps` of
        ``seed``) are stochastic and recorded. ``offset``: index of ``prompts[0]`` in the whole rollout batch."""
        s = self.settings
        trained = choose_sde_steps(seed, s) if trained is None else sorted(trained)
        gens = [torch.Generator().manual_seed(stream_seed(seed, _NOISE, offset + i)) for i in range(len(prompts))]
        x0 = self._initial_noise(seed, group_ids, offset)
        cond = self.policy.encode_prompts(prompts)
        grid, t_max = self.grid.tolist(), float(self.grid[1])
        rec: dict[str, list[Tensor]] = {"x": [], "x_next": [], "mean": [], "log_prob": [], "final": []}
        for sl in chunks(len(prompts), s.chunk_size):
            x, c = x0[sl].to(self._device), cond.index(sl)
            xs, nxt, means, lps = [], [], [], []
            for k in range(s.num_steps):
                sto = k in trained
                noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens[sl]]).to(x.device) if sto else None
                out = policy_step(self.policy, x, grid[k], grid[k + 1], t_max, c, s.step, stochastic=sto, noise=noise)
                if sto:
                    xs.append(x.float())
                    nxt.append(out.prev_sample)
                    means.append(out.mean)
                    lps.append(out.log_prob)
                x = out.prev_sample
            rec["x"].append(torch.stack(xs, 1).cpu())
            rec["x_next"].append(torch.stack(nxt, 1).cpu())
            rec["mean"].append(torch.stack(means, 1).cpu())
            rec["log_prob"].append(torch.stack(lps, 1).cpu())
            rec["final"].append(x.cpu())
        final = torch.cat(rec["final"])
        idx = torch.tensor(trained, dtype=torch.long)
        return Trajectories(
            prompts=list(prompts), group_ids=group_ids, x=torch.cat(rec["x"]), x_next=torch.cat(rec["x_next"]),
            t=self.grid[idx], t_next=self.grid[idx + 1], log_prob=torch.cat(rec["log_prob"]),
            mean=torch.cat(rec["mean"]), final=final, images=self.policy.decode(final.to(self._device)).cpu(),
            step_index=idx, t_max=t_max, policy_version=policy_version,
        )

    def _initial_noise(self, seed: int, group_ids: Tensor, offset: int) -> Tensor:
        """``[B, ...]`` fp32 starting noise: one stream per sample, or per group id with ``shared_noise``."""
        shape = self.policy.latent_shape(self.settings.height, self.settings.width)
        keys = group_ids.tolist() if self.settings.shared_noise else range(offset, offset + len(group_ids))
        stream = 2 if self.settings.shared_noise else _X0
        return torch.stack([
            torch.randn(shape, generator=torch.Generator().manual_seed(stream_seed(seed, stream, int(k)))) for k in keys
        ])

    @torch.no_grad()
    def sample(self, prompts: list[str], seeds: list[int], *, num_steps: int) -> Tensor:
        """Deterministic ODE samples ``[B, 3, H, W]`` in ``[0, 1]``; sample i starts from the noise of ``seeds[i]``."""
        s = self.settings
        shape = self.policy.latent_shape(s.height, s.width)
        grid = self.policy.schedule(num_steps).tolist()
        x0 = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(sd)) for sd in seeds])
        cond = self.policy.encode_prompts(prompts)
        images = []
        for sl in chunks(len(prompts), s.chunk_size):
            x, c = x0[sl].to(self._device), cond.index(sl)
            for k in range(num_steps):
                x = policy_step(self.policy, x, grid[k], grid[k + 1], grid[1], c, s.step, stochastic=False).prev_sample
            images.append(self.policy.decode(x).cpu())
        return torch.cat(images)

    @property
    def _device(self) -> torch.device:
        return next(self.policy.transformer.parameters()).device
