"""Batched rollouts: what the algorithm's :class:`RolloutSpec` asks for. A stochastic spec runs a seeded set
of SDE steps inside an otherwise deterministic ODE and records them; an ODE spec keeps only the final samples.

The sampler only samples: it records what the learner needs and never computes losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from rlflow.algos.base import RolloutSpec
from rlflow.models.base import FlowPolicy
from rlflow.policy_step import StepSettings, policy_step
from rlflow.seeding import generator, stream_seed
from rlflow.types import Conditions, Media, Rollout, StepRecord

__all__ = ["Sampler", "SamplerSettings", "StepSettings", "choose_sde_steps", "chunks", "policy_step", "stream_seed"]


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


def choose_sde_steps(seed: int, s: SamplerSettings, spec: RolloutSpec = RolloutSpec(stochastic=True)) -> list[int]:
    """The trained step indices of one rollout batch, drawn from a seeded RNG (sorted); none for an ODE spec."""
    if not spec.stochastic:
        return []
    rng = np.random.default_rng(seed)
    if s.contiguous:
        start = int(rng.integers(s.sde_lo, s.sde_hi - s.sde_steps + 1))
        return list(range(start, start + s.sde_steps))
    return sorted(int(i) for i in rng.choice(np.arange(s.sde_lo, s.sde_hi), size=s.sde_steps, replace=False))


def chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


_X0, _NOISE, _GROUP_X0 = 0, 1, 2


class Sampler:
    """Runs rollouts of a :class:`FlowPolicy` (no grad) with LoRA ``adapter`` active.

    Every sample draws its noise from its own stream, keyed by the batch seed and the sample's index in the
    whole rollout batch (its group id for group-shared initial noise). A batch split into chunks across any
    number of sampler processes is therefore bit-identical to the batch sampled in one call, and a chunk
    redone after a crash reproduces the lost one exactly.
    """

    def __init__(self, policy: FlowPolicy, settings: SamplerSettings, spec: RolloutSpec = RolloutSpec(True),
                 *, adapter: str = "default"):
        self.policy = policy.set_resolution(settings.height, settings.width)
        self.settings, self.spec, self.adapter = settings, spec, adapter
        self.grid = policy.schedule(settings.num_steps)

    def trained_steps(self, seed: int) -> list[int]:
        return choose_sde_steps(seed, self.settings, self.spec)

    @torch.no_grad()
    def rollout(
        self, conditions: Conditions, group_ids: Tensor, *, seed: int, policy_version: int = 0,
        trained: list[int] | None = None, offset: int = 0,
    ) -> Rollout:
        """Sample ``len(conditions)`` trajectories; the ``trained`` steps (default :meth:`trained_steps` of
        ``seed``) are stochastic and recorded. ``offset``: index of sample 0 in the whole rollout batch."""
        s = self.settings
        trained = self.trained_steps(seed) if trained is None else sorted(trained)
        n = len(conditions)
        gens = [generator(seed, _NOISE, offset + i) for i in range(n)]
        x0 = self._initial_noise(seed, group_ids, offset)
        grid, t_max = self.grid.tolist(), float(self.grid[1])
        rec: dict[str, list[Tensor]] = {"x": [], "x_next": [], "mean": [], "log_prob": [], "final": []}
        with self.policy.adapter(self.adapter):
            cond = self.policy.encode(conditions)
            for sl in chunks(n, s.chunk_size):
                x, c = x0[sl].to(self._device), cond.index(sl)
                steps: dict[str, list[Tensor]] = {"x": [], "x_next": [], "mean": [], "log_prob": []}
                for k in range(s.num_steps):
                    sto = k in trained
                    noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens[sl]]).to(x.device) if sto else None
                    out = policy_step(self.policy, x, grid[k], grid[k + 1], t_max, c, s.step, stochastic=sto, noise=noise)
                    if sto:
                        for key, val in (("x", x.float()), ("x_next", out.prev_sample), ("mean", out.mean),
                                         ("log_prob", out.log_prob)):
                            steps[key].append(val)
                    x = out.prev_sample
                if trained:
                    for key, vals in steps.items():
                        rec[key].append(torch.stack(vals, 1).cpu())
                rec["final"].append(x.cpu())
            final = torch.cat(rec["final"])
            images = self.policy.decode(final.to(self._device)).cpu()
        idx = torch.tensor(trained, dtype=torch.long)
        record = StepRecord(
            x=torch.cat(rec["x"]), x_next=torch.cat(rec["x_next"]), mean=torch.cat(rec["mean"]),
            log_prob=torch.cat(rec["log_prob"]), t=self.grid[idx], t_next=self.grid[idx + 1], step_index=idx,
            t_max=t_max,
        ) if trained else None
        return Rollout(conditions=conditions, group_ids=group_ids, final=final, media=Media(images=images),
                       grid=self.grid.clone(), steps=record, offset=offset, policy_version=policy_version)

    def _initial_noise(self, seed: int, group_ids: Tensor, offset: int) -> Tensor:
        """``[B, ...]`` fp32 starting noise: one stream per sample, or per group id with ``shared_noise``."""
        shape = self.policy.latent_shape(self.settings.height, self.settings.width)
        keys = group_ids.tolist() if self.settings.shared_noise else range(offset, offset + len(group_ids))
        stream = _GROUP_X0 if self.settings.shared_noise else _X0
        return torch.stack([torch.randn(shape, generator=generator(seed, stream, int(k))) for k in keys])

    @torch.no_grad()
    def sample(self, conditions: Conditions, seeds: list[int], *, num_steps: int) -> Media:
        """Deterministic ODE samples; sample i starts from the noise of ``seeds[i]``."""
        s = self.settings
        shape = self.policy.latent_shape(s.height, s.width)
        grid = self.policy.schedule(num_steps).tolist()
        x0 = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(sd)) for sd in seeds])
        images = []
        with self.policy.adapter(self.adapter):
            cond = self.policy.encode(conditions)
            for sl in chunks(len(conditions), s.chunk_size):
                x, c = x0[sl].to(self._device), cond.index(sl)
                for k in range(num_steps):
                    x = policy_step(self.policy, x, grid[k], grid[k + 1], grid[1], c, s.step, stochastic=False).prev_sample
                images.append(self.policy.decode(x).cpu())
        return Media(images=torch.cat(images))

    @property
    def _device(self) -> torch.device:
        return next(self.policy.transformer.parameters()).device
