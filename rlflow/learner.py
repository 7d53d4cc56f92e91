"""The learner: replays the trained steps of a rollout batch and optimises the LoRA with AdamW.

Micro-batches follow the sampler's chunks (same samples, same order), so a replay at the rollout weights
reproduces the rollout log-probs bit for bit; an optimizer step accumulates gradients over a shuffled set of
chunks (``minibatches`` disjoint sets per rollout batch).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
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
    """Owns the optimizer of ``policy``'s trainable (LoRA) parameters.

    With ``world_size > 1`` the learner is rank ``rank`` of a data-parallel group (``torch.distributed``
    must be initialised): every rank sees the whole batch, replays only its share of each mini-batch's
    chunks, and the summed gradients are all-reduced before clipping, so every rank takes the same optimizer
    step as a single process on the whole batch. After :meth:`shard` (FSDP2) the weights, gradients and
    optimizer state are sharded instead and FSDP sums the gradients; every rank then runs the same number of
    forwards and backwards (a rank with fewer chunks replays a zero-weighted one), as FSDP's collectives need.
    ``version`` counts optimizer updates (policy versions).
    """

    def __init__(
        self, policy: FlowPolicy, algo: PolicyGradientAlgo, settings: LearnerSettings, step: StepSettings,
        *, rank: int = 0, world_size: int = 1, keep_versions: int = 2,
    ):
        self.policy, self.algo, self.settings, self.step = policy, algo, settings, step
        self.rank, self.world_size, self.keep_versions = rank, world_size, keep_versions
        self.params = policy.trainable_parameters()
        if not self.params:
            raise ValueError("the policy has no trainable parameters: add a LoRA first")
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=settings.weight_decay)
        self.version = 0
        self.sharded = False
        self._snapshots: dict[int, dict[str, Tensor]] = {}

    def shard(self) -> None:
        """Shard the policy over the default process group with FSDP2 (call on every rank, before training)."""
        from rlflow import fsdp

        fsdp.shard_policy(self.policy)
        self.params = self.policy.trainable_parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=self.settings.lr, weight_decay=self.settings.weight_decay)
        self.sharded = True

    def _share(self, indices: list[int]) -> tuple[list[int], int]:
        """This rank's part of ``indices`` (every ``world_size``-th) and, when sharded, how many zero-weighted
        replays pad it to the largest part (all ranks must run the same forwards)."""
        mine = [i for pos, i in enumerate(indices) if pos % self.world_size == self.rank]
        pad = (-(-len(indices) // self.world_size) - len(mine)) if self.sharded else 0
        return mine, pad

    def replay(self, traj: Trajectories, sl: slice, j: int, cond: Conditioning) -> StepOut:
        """Re-score trained step ``j`` of the samples in ``sl`` at the current weights."""
        dev = self.params[0].device
        return policy_step(
            self.policy, traj.x[sl, j].to(dev), float(traj.t[j]), float(traj.t_next[j]), traj.t_max, cond,
            self.step, stochastic=True, prev_sample=traj.x_next[sl, j].to(dev),
        )

    @torch.no_grad()
    def anchors(self, traj: Trajectories, cond: Conditioning, owned: list[slice], pad: int = 0) -> tuple[Tensor, Tensor]:
        """``(logp_old [B, S], mean_old [B, S, ...])`` of the ``owned`` chunks, replayed at the rollout's policy
        version: the current weights, or the LoRA snapshot of an older version when the batch is stale
        (one-step-off pipeline). A version no longer kept falls back to the rollout's recorded values.
        ``pad``: extra replays whose results are dropped (a sharded rank keeps step with the others)."""
        logp, mean = traj.log_prob.clone(), traj.mean.clone()
        if traj.policy_version != self.version and traj.policy_version not in self._snapshots:
            return logp, mean
        with self.at_version(traj.policy_version):
            for sl in owned:
                c = cond.index(sl)
                outs = [self.replay(traj, sl, j, c) for j in range(traj.num_steps)]
                logp[sl] = torch.stack([o.log_prob.cpu() for o in outs], 1)
                mean[sl] = torch.stack([o.mean.cpu() for o in outs], 1)
            dummy = slice(0, min(1, traj.num_samples))
            for _ in range(pad):
                for j in range(traj.num_steps):
                    self.replay(traj, dummy, j, cond.index(dummy))
        return logp, mean

    @contextlib.contextmanager
    def at_version(self, version: int) -> Iterator[None]:
        """Inside the block the policy holds the LoRA of ``version`` (the current one, or a kept snapshot)."""
        if version == self.version:
            yield
            return
        if version not in self._snapshots:
            raise KeyError(f"policy version {version} is not kept (kept: {sorted(self._snapshots)}, current {self.version})")
        current = self.policy.lora_state_dict()
        self.policy.load_lora_state_dict(self._snapshots[version])
        try:
            yield
        finally:
            self.policy.load_lora_state_dict(current)

    def update(self, traj: Trajectories, adv: Tensor, *, seed: int) -> dict[str, float]:
        """One pass over the batch: ``minibatches`` optimizer steps. Returns aggregated stats."""
        return merge_stats([self.update_raw(traj, adv, seed=seed)])

    def update_raw(self, traj: Trajectories, adv: Tensor, *, seed: int) -> StatState:
        """:meth:`update` returning this rank's un-normalised stats (combine ranks with :func:`merge_stats`)."""
        cond = self.policy.encode_prompts(traj.prompts)
        mbs = chunks(traj.num_samples, self.settings.micro_batch)
        order = np.random.default_rng(seed).permutation(len(mbs))
        groups = [g for g in np.array_split(order, min(self.settings.minibatches, len(mbs))) if len(g)]
        shares = [self._share([int(i) for i in g]) for g in groups]
        if self.algo.needs_anchors:
            logp_old, mean_old = self.anchors(
                traj, cond, [mbs[i] for mine, _ in shares for i in mine], sum(pad for _, pad in shares))
        else:
            logp_old, mean_old = traj.log_prob, traj.mean
        self._snapshot()
        acc = _StatAccumulator()
        for group, (owned, pad) in zip(groups, shares, strict=True):
            count = sum(mbs[i].stop - mbs[i].start for i in group) * traj.num_steps
            self.optimizer.zero_grad(set_to_none=True)
            for i in owned:
                self._accumulate(traj, mbs[i], cond, logp_old, mean_old, adv, count, acc)
            for _ in range(pad):
                self._accumulate(traj, mbs[int(group[0])], cond, logp_old, mean_old, adv, count, acc, weight=0.0)
            self._allreduce_grads()
            grad_norm = self._clip()
            self.optimizer.step()
            if self.rank == 0:
                acc.add({"grad_norm": grad_norm.detach()}, 1)
        self.version += 1
        return acc.state()

    def gradient(self, traj: Trajectories, adv: Tensor) -> Tensor:
        """The (all-reduced) gradient of the whole batch's loss as one mini-batch, flattened; no optimizer
        step. With ranks, each replays its share of the chunks, as in :meth:`update`."""
        cond = self.policy.encode_prompts(traj.prompts)
        mbs = chunks(traj.num_samples, self.settings.micro_batch)
        owned, pad = self._share(list(range(len(mbs))))
        logp_old, mean_old = self.anchors(traj, cond, [mbs[i] for i in owned], pad) if self.algo.needs_anchors else (
            traj.log_prob, traj.mean)
        self.optimizer.zero_grad(set_to_none=True)
        count = traj.num_samples * traj.num_steps
        for i in owned:
            self._accumulate(traj, mbs[i], cond, logp_old, mean_old, adv, count, _StatAccumulator())
        for _ in range(pad):
            self._accumulate(traj, mbs[0], cond, logp_old, mean_old, adv, count, _StatAccumulator(), weight=0.0)
        self._allreduce_grads()
        if self.sharded:
            from rlflow import fsdp

            flat = fsdp.flat_grad(self.params)
        else:
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params])
        self.optimizer.zero_grad(set_to_none=True)
        return flat.detach().cpu()

    def _clip(self) -> Tensor:
        if self.sharded:
            from rlflow import fsdp

            return fsdp.clip_grad_norm_(self.params, self.settings.grad_clip)
        return torch.nn.utils.clip_grad_norm_(self.params, self.settings.grad_clip)

    def _snapshot(self) -> None:
        """Keep the LoRA of the current version (anchors of batches sampled at it may arrive later)."""
        self._snapshots[self.version] = {k: v.detach().clone() for k, v in self.policy.lora_state_dict().items()}
        for v in sorted(self._snapshots)[: -self.keep_versions]:
            del self._snapshots[v]

    def _allreduce_grads(self) -> None:
        """Sum the gradients of all ranks (one flat buffer, as DDP's buckets do); FSDP has summed them already."""
        if self.world_size == 1 or self.sharded:
            return
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in self.params])  # type: ignore[union-attr]
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p))  # type: ignore[union-attr]
            offset += n

    def _accumulate(
        self, traj: Trajectories, sl: slice, cond: Conditioning, logp_old: Tensor, mean_old: Tensor,
        adv: Tensor, count: int, acc: _StatAccumulator, weight: float = 1.0,
    ) -> None:
        """Backpropagate the chunk's loss, scaled by its share ``n / count`` of the mini-batch (times
        ``weight``: 0 for a padding replay, which adds no gradient and no stats)."""
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
            (loss * (weight * n / count)).backward()
            if weight:
                acc.add(stats, n)

    def state_dict(self, *, with_previous: bool = False) -> dict[str, Any]:
        """``lora``, ``optimizer`` and ``version``; ``with_previous`` adds ``previous``, the kept LoRA of version
        ``version - 1`` (a one-step-off pipeline samples the next batch with it), when there is one."""
        if self.sharded:  # gathered whole: collective, every rank must call it
            from rlflow import fsdp

            state = {"optimizer": fsdp.full_optimizer_state(self.optimizer), "lora": fsdp.full_lora_state(self.policy),
                     "version": self.version}
            if with_previous and self.version - 1 in self._snapshots:
                state["previous"] = fsdp.full_state(self._snapshots[self.version - 1])
            return state
        state = {"optimizer": self.optimizer.state_dict(), "lora": self.policy.lora_state_dict(), "version": self.version}
        if with_previous and self.version - 1 in self._snapshots:
            state["previous"] = self._snapshots[self.version - 1]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a state dict of whole tensors (also into a sharded learner: each rank keeps its slice)."""
        if self.sharded:
            from rlflow import fsdp

            fsdp.load_full_lora_state(self.policy, state["lora"])
            fsdp.load_full_optimizer_state(self.optimizer, state["optimizer"])
        else:
            self.policy.load_lora_state_dict(state["lora"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.version = int(state.get("version", self.version))
        self._snapshots.clear()
        if state.get("previous") is not None:
            self._snapshots[self.version - 1] = {k: v.detach().clone() for k, v in state["previous"].items()}


@dataclass(frozen=True)
class StatState:
    """Un-normalised stats of one rank: weighted sums, their weights, and extremes (``*_min`` / ``*_max``)."""

    sums: dict[str, float]
    weights: dict[str, float]
    extremes: dict[str, float]


def merge_stats(states: list[StatState]) -> dict[str, float]:
    """Weighted means over ranks; ``*_min`` / ``*_max`` keys keep the extreme."""
    sums: dict[str, float] = defaultdict(float)
    weights: dict[str, float] = defaultdict(float)
    extremes: dict[str, float] = {}
    for st in states:
        for k, v in st.sums.items():
            sums[k] += v
            weights[k] += st.weights[k]
        for k, v in st.extremes.items():
            pick = min if k.endswith("_min") else max
            extremes[k] = pick(extremes.get(k, v), v)
    return {**{k: sums[k] / weights[k] for k in sums if weights[k] > 0}, **extremes}


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

    def state(self) -> StatState:
        return StatState(dict(self.sums), dict(self.weights), dict(self.extremes))
