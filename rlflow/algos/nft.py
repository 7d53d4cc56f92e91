"""DiffusionNFT (ALGORITHMS.md section 4; arXiv 2509.16117, the authors' NVlabs/DiffusionNFT code).

Likelihood-free: rollouts are deterministic ODE samples of the "old" policy (a frozen second LoRA adapter),
of which only the final clean latents ``x0`` are kept. The loss trains on the forward process: each sample is
noised at ``int(K * timestep_fraction)`` of the K grid times (a per-sample random permutation, fresh noise at
each), and the implicit positive / negative policies around ``v_old`` are fitted to it (:func:`nft_loss`).
After each update the old adapter moves toward the trained one: ``old <- d old + (1 - d) theta``,
``d = clip(decay_rate * (optimizer_steps - decay_start), 0, decay_max)`` (0 before ``decay_start``).

The released code samples with a 2nd-order DPM solver; rlflow's ODE rollout is Euler on the same grid (any
black-box sampler is valid for NFT's data collection). Randomness is keyed by the update's seed and each
sample's index in the step's batch, so a resumed run and a run split over ranks draw the same times and noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from rlflow.algos.base import AlgoSection, LossModel, MicroBatch, PolicySpec, RolloutSpec, register_algorithm
from rlflow.algos.losses import nft_loss
from rlflow.models.base import FlowPolicy
from rlflow.seeding import generator, stream_seed
from rlflow.types import Rollout

OLD = "old"


class NFTConfig(AlgoSection):
    name: Literal["nft"] = "nft"
    beta: float = Field(1.0, gt=0, description="strength of the implicit policies (1.0 single reward, 0.1 multi)")
    adv_clip: float = Field(5.0, gt=0)
    kl_coef: float = Field(1e-4, ge=0, description="coefficient of mean (v - v_ref)^2")
    timestep_fraction: float = Field(0.99, gt=0, le=1, description="share of the K grid times each sample trains at")
    decay_rate: float = Field(0.001, ge=0, description="old-policy decay per optimizer step")
    decay_max: float = Field(0.5, ge=0, lt=1, description="cap of the old-policy decay")
    decay_start: int = Field(0, ge=0, description="optimizer steps before the old policy starts to lag")


@dataclass(frozen=True)
class NFT:
    beta: float = 1.0
    adv_clip: float = 5.0
    kl_coef: float = 1e-4
    timestep_fraction: float = 0.99
    decay_rate: float = 0.001
    decay_max: float = 0.5
    decay_start: int = 0
    name: str = "nft"
    rollout: RolloutSpec = RolloutSpec(stochastic=False)

    @property
    def policies(self) -> PolicySpec:
        return PolicySpec(reference=self.kl_coef > 0, extra_adapters=(OLD,), sample_with=OLD)

    def num_terms(self, rollout: Rollout) -> int:
        return max(1, int((rollout.grid.shape[0] - 1) * self.timestep_fraction))

    def prepare(self, model: LossModel, mb: MicroBatch) -> dict[str, Tensor]:
        return {}

    def times(self, mb: MicroBatch, term: int) -> Tensor:
        """``[n]`` fp32: the grid time each sample trains at in ``term`` (its permutation's ``term``-th entry)."""
        grid = mb.rollout.grid[:-1]
        picks = [int(np.random.default_rng(stream_seed(mb.seed, 0, mb.rollout.offset + i)).permutation(len(grid))[term])
                 for i in range(mb.size)]
        return grid[torch.tensor(picks)].float()

    def noise(self, mb: MicroBatch, term: int) -> Tensor:
        shape = mb.rollout.final.shape[1:]
        return torch.stack([torch.randn(shape, generator=generator(mb.seed, 1, mb.rollout.offset + i, term))
                            for i in range(mb.size)])

    def loss(self, model: LossModel, mb: MicroBatch, term: int) -> tuple[Tensor, dict[str, Tensor]]:
        dev = model.device
        x0 = mb.rollout.final.to(dev).float()
        t = self.times(mb, term).to(dev)
        tb = t.reshape(-1, *([1] * (x0.ndim - 1)))
        x_t = (1 - tb) * x0 + tb * self.noise(mb, term).to(dev)
        v = model.velocity(x_t, t, mb.cond)
        with torch.no_grad():
            with model.adapter(OLD):
                v_old = model.velocity(x_t, t, mb.cond)
            if self.kl_coef > 0:
                with model.reference():
                    v_ref = model.velocity(x_t, t, mb.cond)
            else:
                v_ref = v.detach()
        return nft_loss(v, v_old, v_ref, x0, x_t, t, mb.adv, beta=self.beta, adv_clip=self.adv_clip,
                        kl_coef=self.kl_coef)

    def decay(self, optimizer_steps: int) -> float:
        if optimizer_steps < self.decay_start:
            return 0.0
        return min(self.decay_rate * (optimizer_steps - self.decay_start), self.decay_max)

    @torch.no_grad()
    def after_update(self, policy: FlowPolicy, optimizer_steps: int) -> dict[str, float]:
        """The soft update of the old adapter (elementwise, so sharded parameters update shard by shard)."""
        d = self.decay(optimizer_steps)
        trained, old = policy.adapter_parameters("default"), policy.adapter_parameters(OLD)
        for name, p in trained.items():
            old[name].mul_(d).add_(p.detach(), alpha=1.0 - d)
        return {"old_decay": d}


register_algorithm("nft", NFTConfig, lambda c: NFT(
    beta=c.beta, adv_clip=c.adv_clip, kl_coef=c.kl_coef, timestep_fraction=c.timestep_fraction,
    decay_rate=c.decay_rate, decay_max=c.decay_max, decay_start=c.decay_start,
))
