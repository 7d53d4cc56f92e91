"""The learner: replays the trained steps of a rollout batch and optimises the LoRA with AdamW.

Micro-batches follow the sampler's chunks (same samples, same order), so a replay at the rollout weights
reproduces the rollout log-probs bit for bit; an optimizer step accumulates gradients over a shuffled set of
chunks (``minibatches`` disjoint sets per rollout batch).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rlflow.algos.policy_gradient import PolicyGradientAlgo
from rlflow.models.base import Conditioning, FlowPolicy
from rlflow.sampler import StepSettings, chunks, policy_step
from rlflow.types import StepOut, Trajectories


@dataclass(frozen=True)
class LearnerSettings:
    lr: float = 3e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    minibatches: int = 2
    micro_batch: int = 32


class Learner:
    """Owns the optimizer of ``policy``'s trainable (LoRA) parameters."""

    def __init__(self, policy: FlowPolicy, algo: PolicyGradientAlgo, settings: LearnerSettings, step: StepSettings):
        self.policy, self.algo, self.settings, self.step = policy, algo, settings, step
        self.params = policy.trainable_parameters()
        if not self.params:
            raise ValueError("the policy has no trainable parameters: add a LoRA first")
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=settings.weight_decay)

    def replay(self, traj: Trajectories, sl: slice, j: int, cond: Conditioning) -> StepOut:
        """Re-score trained step ``j`` of the samples in ``sl`` at the current weights."""
        dev = self.params[0].device
        return policy_step(
            self.policy, traj.x[sl, j].to(dev), float(traj.t[j]), float(traj.t_next[j]), traj.t_max, cond,
            self.step, stochastic=True, prev_sample=traj.x_next[sl, j].to(dev),
        )

    @torch.no_grad()
    def anchors(self, traj: Trajectories, cond: Conditioning) -> tuple[Tensor, Tensor]:
        """``(logp_old [B, S], mean_old [B, S, ...])`` replayed at the current (pre-update) weights."""
        logps, means = [], []
        for sl in chunks(traj.num_samples, self.settings.micro_batch):
            c = cond.index(sl)
            outs = [self.replay(traj, sl, j, c) for j in range(traj.num_steps)]
            logps.append(torch.stack([o.log_prob.cpu() for o in outs], 1))
            means.append(torch.stack([o.mean.cpu() for o in outs], 1))
        return torch.cat(logps), torch.cat(means)

    def update(self, traj: Trajectories, adv: Tensor, *, seed: int) -> dict[str, float]:
        """One pass over the batch: ``minibatches`` optimizer steps. Returns aggregated stats."""
        cond = self.policy.encode_prompts(traj.prompts)
        if self.algo.needs_anchors:
            logp_old, mean_old = self.anchors(traj, cond)
        else:
            logp_old, mean_old = traj.log_prob, traj.mean
        mbs = chunks(traj.num_samples, self.settings.micro_batch)
        order = np.random.default_rng(seed).permutation(len(mbs))
        groups = [g for g in np.array_split(order, min(self.settings.minibatches, len(mbs))) if len(g)]
        acc = _StatAccumulator()
        for group in groups:
            count = sum(mbs[i].stop - mbs[i].start for i in group) * traj.num_steps
            self.optimizer.zero_grad(set_to_none=True)
            for i in group:
                self._accumulate(traj, mbs[i], cond, logp_old, mean_old, adv, count, acc)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.settings.grad_clip)
            self.optimizer.step()
            acc.add({"grad_norm": grad_norm.detach()}, 1)
        return acc.result()

    def _accumulate(
        self, traj: Trajectories, sl: slice, cond: Conditioning, logp_old: Tensor, mean_old: Tensor,
        adv: Tensor, count: int, acc: _StatAccumulator,
    ) -> None:
        dev = self.params[0].device
        c = cond.index(sl)
        a = adv[sl].to(dev)
        for j in range(traj.num_steps):
            new = self.replay(traj, sl, j, c)
            ref_mean = None
            if self.algo.needs_reference:
                with torch.no_grad(), self.policy.reference():
                    ref_mean = self.replay(traj, sl, j, c).mean
            loss, stats = self.algo.loss(new, logp_old[sl, j].to(dev), mean_old[sl, j].to(dev), a, ref_mean)
            n = sl.stop - sl.start
            (loss * (n / count)).backward()
            acc.add(stats, n)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "lora": self.policy.lora_state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_lora_state_dict(state["lora"])
        self.optimizer.load_state_dict(state["optimizer"])


class _StatAccumulator:
    """Weighted means of stats; ``*_min`` / ``*_max`` keys keep the extreme instead."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.weights: dict[str, float] = defaultdict(float)
        self.extremes: dict[str, float] = {}

    def add(self, stats: dict[str, Tensor], weight: float) -> None:
        for k, v in stats.items():
            val = float(v)
            if k.endswith("_min") or k.endswith("_max"):
                pick = min if k.endswith("_min") else max
                self.extremes[k] = pick(self.extremes.get(k, val), val)
            else:
                self.sums[k] += val * weight
                self.weights[k] += weight

    def result(self) -> dict[str, float]:
        return {**{k: self.sums[k] / self.weights[k] for k in self.sums}, **self.extremes}
