"""The learner: the algorithm's micro-batch loss over a rollout batch, and AdamW on the LoRA.

It knows nothing of any one algorithm: it reads the algorithm's declarations (extra adapters, anchors, the
adapter the samplers sample with), runs its ``prepare`` and ``loss`` per micro-batch and term, and its
``after_update``. Micro-batches follow the sampler's chunks (same samples, same order), so a replay at the
rollout weights reproduces the rollout log-probs bit for bit; an optimizer step accumulates gradients over a
shuffled set of chunks (``minibatches`` disjoint sets per rollout batch).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from rlflow.algos.base import Algorithm, LossModel, MicroBatch
from rlflow.models.base import Conditioning, FlowPolicy
from rlflow.policy_step import StepSettings
from rlflow.sampler import chunks
from rlflow.types import LearnerState, Rollout


class NonFiniteError(RuntimeError):
    """A loss or a gradient is NaN or inf: the update stopped before its optimizer step (nothing was changed by
    that mini-batch, so nothing non-finite can reach the samplers or a checkpoint)."""


@dataclass(frozen=True)
class LearnerSettings:
    lr: float = 3e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    minibatches: int = 2
    micro_batch: int = 32


class Learner:
    """Owns the optimizer of ``policy``'s trainable (LoRA) parameters and the algorithm's extra adapters.

    With ``world_size > 1`` the learner is rank ``rank`` of a data-parallel group (``torch.distributed``
    must be initialised): every rank sees the whole batch, runs only its share of each mini-batch's
    chunks, and the summed gradients are all-reduced before clipping, so every rank takes the same optimizer
    step as a single process on the whole batch. After :meth:`shard` (FSDP2) the weights, gradients and
    optimizer state are sharded instead and FSDP sums the gradients; every rank then runs the same number of
    forwards and backwards (a rank with fewer chunks runs a zero-weighted one), as FSDP's collectives need.
    ``version`` counts updates (policy versions); the sampling weights of the last ``keep_versions`` versions
    are kept (a one-step-off batch is replayed, or re-sampled, at the version that made it).
    """

    def __init__(
        self, policy: FlowPolicy, algo: Algorithm, settings: LearnerSettings, step: StepSettings,
        *, rank: int = 0, world_size: int = 1, keep_versions: int = 2,
    ):
        self.policy, self.algo, self.settings, self.step = policy, algo, settings, step
        self.rank, self.world_size, self.keep_versions = rank, world_size, keep_versions
        for name in algo.policies.extra_adapters:
            policy.add_adapter_copy(name)
        self.sample_with = algo.policies.sample_with
        self.model = LossModel(policy, step)
        self.params = policy.trainable_parameters()
        if not self.params:
            raise ValueError("the policy has no trainable parameters: add a LoRA first")
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=settings.weight_decay)
        self.version = 0
        self.optimizer_steps = 0
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
        passes pad it to the largest part (all ranks must run the same forwards)."""
        mine = [i for pos, i in enumerate(indices) if pos % self.world_size == self.rank]
        pad = (-(-len(indices) // self.world_size) - len(mine)) if self.sharded else 0
        return mine, pad

    def micro_batch(self, rollout: Rollout, sl: slice, cond: Conditioning, adv: Tensor, seed: int) -> MicroBatch:
        return MicroBatch(rollout.index(sl), cond.index(sl), adv[sl].to(self.model.device), seed)

    @torch.no_grad()
    def prepare(self, mbs: list[MicroBatch], pad: int, fallback: MicroBatch) -> tuple[list[MicroBatch], MicroBatch | None]:
        """Each micro-batch with what the algorithm prepares at the rollout's weights (its anchors, when it
        declares ``anchors``), and the one-sample micro-batch of this rank's ``pad`` zero-weighted passes (a
        sharded rank keeps step with the others: it runs ``pad`` prepare passes here too), or ``None``."""
        dummy = self._dummy(mbs[0] if mbs else fallback) if pad else None
        if not self.algo.policies.anchors:
            return mbs, dummy
        with self.at_version(fallback.rollout.policy_version):
            out = [dataclasses.replace(mb, prepared=self.algo.prepare(self.model, mb)) for mb in mbs]
            if dummy is not None:
                for _ in range(pad):
                    prepared = self.algo.prepare(self.model, dummy)
                dummy = dataclasses.replace(dummy, prepared=prepared)
        return out, dummy

    @staticmethod
    def _dummy(mb: MicroBatch) -> MicroBatch:
        one = slice(0, min(1, mb.size))
        return MicroBatch(mb.rollout.index(one), mb.cond.index(one), mb.adv[one], mb.seed)

    @contextlib.contextmanager
    def at_version(self, version: int) -> Iterator[None]:
        """Inside the block the sampling adapter holds its weights of ``version`` (current, or a kept one)."""
        if version == self.version:
            yield
            return
        if version not in self._snapshots:
            raise KeyError(f"policy version {version} is not kept (kept: {sorted(self._snapshots)}, current {self.version})")
        current = self.policy.lora_state_dict(self.sample_with)
        self.policy.load_lora_state_dict(self._snapshots[version], self.sample_with)
        try:
            yield
        finally:
            self.policy.load_lora_state_dict(current, self.sample_with)

    def has_version(self, version: int) -> bool:
        return version == self.version or version in self._snapshots

    def update(self, rollout: Rollout, adv: Tensor, *, seed: int) -> dict[str, float]:
        """One pass over the batch: ``minibatches`` optimizer steps. Returns aggregated stats."""
        return merge_stats([self.update_raw(rollout, adv, seed=seed)])

    def update_raw(self, rollout: Rollout, adv: Tensor, *, seed: int) -> StatState:
        """:meth:`update` returning this rank's un-normalised stats (combine ranks with :func:`merge_stats`)."""
        self.policy.transformer.train()
        try:
            return self._update(rollout, adv, seed)
        finally:
            self.policy.transformer.eval()

    def _update(self, rollout: Rollout, adv: Tensor, seed: int) -> StatState:
        cond = self.policy.encode(rollout.conditions)
        spans = chunks(rollout.num_samples, self.settings.micro_batch)
        order = np.random.default_rng(seed).permutation(len(spans))
        groups = [[int(i) for i in g] for g in np.array_split(order, min(self.settings.minibatches, len(spans))) if len(g)]
        shares = [self._share(g) for g in groups]
        owned = [i for mine, _ in shares for i in mine]
        prepared, dummy = self.prepare([self.micro_batch(rollout, spans[i], cond, adv, seed) for i in owned],
                                       sum(pad for _, pad in shares), self.micro_batch(rollout, spans[0], cond, adv, seed))
        mbs = dict(zip(owned, prepared, strict=True))
        self._snapshot()
        terms = self.algo.num_terms(rollout)
        acc = _StatAccumulator()
        for group, (mine, pad) in zip(groups, shares, strict=True):
            count = sum(spans[i].stop - spans[i].start for i in group) * terms
            self.optimizer.zero_grad(set_to_none=True)
            bad: str | None = None
            for i in mine:
                problem = self._accumulate(mbs[i], terms, count, acc)
                bad = bad or problem  # the first one
            for _ in range(pad):
                self._accumulate(dummy, terms, count, acc, weight=0.0)  # type: ignore[arg-type]
            self._allreduce_grads()
            grad_norm = self._clip(bad)
            self.optimizer.step()
            self.optimizer_steps += 1
            if self.rank == 0:
                acc.add({"grad_norm": grad_norm.detach()}, 1)
        self.version += 1
        after = self.algo.after_update(self.policy, self.optimizer_steps)
        if self.rank == 0:
            acc.add({k: torch.tensor(v) for k, v in after.items()}, 1)
        return acc.state()

    def gradient(self, rollout: Rollout, adv: Tensor, *, seed: int = 0) -> Tensor:
        """The (all-reduced) gradient of the whole batch's loss as one mini-batch, flattened; no optimizer
        step. With ranks, each runs its share of the chunks, as in :meth:`update`."""
        cond = self.policy.encode(rollout.conditions)
        spans = chunks(rollout.num_samples, self.settings.micro_batch)
        owned, pad = self._share(list(range(len(spans))))
        mbs, dummy = self.prepare([self.micro_batch(rollout, spans[i], cond, adv, seed) for i in owned], pad,
                                  self.micro_batch(rollout, spans[0], cond, adv, seed))
        self.optimizer.zero_grad(set_to_none=True)
        terms = self.algo.num_terms(rollout)
        count = rollout.num_samples * terms
        for mb in mbs:
            self._accumulate(mb, terms, count, _StatAccumulator())
        for _ in range(pad):
            self._accumulate(dummy, terms, count, _StatAccumulator(), weight=0.0)  # type: ignore[arg-type]
        self._allreduce_grads()
        if self.sharded:
            from rlflow import fsdp

            flat = fsdp.flat_grad(self.params)
        else:
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params])
        self.optimizer.zero_grad(set_to_none=True)
        return flat.detach().cpu()

    def _clip(self, bad_loss: str | None = None) -> Tensor:
        """Clip the (reduced) gradients to ``grad_clip``; returns their norm. Raises :class:`NonFiniteError`
        first when a loss (``bad_loss``: this rank's first) or a gradient is not finite, on every rank alike."""
        self._check_finite(bad_loss)
        if self.sharded:
            from rlflow import fsdp

            norm = fsdp.clip_grad_norm_(self.params, self.settings.grad_clip)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.settings.grad_clip)
        if not torch.isfinite(norm):
            raise NonFiniteError(f"the gradient norm overflowed to {float(norm)}; no optimizer step was taken")
        return norm

    def _check_finite(self, bad_loss: str | None) -> None:
        """Raise :class:`NonFiniteError` naming the loss term or the parameter when a loss or a gradient of
        this optimizer step is NaN or inf. Checked before clipping (which would spread a NaN over every
        gradient); with ranks, a flag is all-reduced so that all of them stop together."""
        problem = bad_loss or self._nonfinite_gradient()
        if self.world_size > 1:
            flag = torch.tensor([0.0 if problem is None else 1.0], device=self.model.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and problem is None:
                problem = "a loss or a gradient of another learner rank is not finite"
        if problem is not None:
            raise NonFiniteError(f"{problem}; no optimizer step was taken")

    def _nonfinite_gradient(self) -> str | None:
        grads = [p.grad for p in self.params if p.grad is not None]
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        if not local or bool(torch.stack([torch.isfinite(g).all() for g in local]).all()):
            return None
        names = {id(p): n for n, p in self.policy.transformer.named_parameters()}
        for p in self.params:
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad  # type: ignore[union-attr]
            if g is not None and not bool(torch.isfinite(g).all()):
                bad = int((~torch.isfinite(g)).sum())
                return f"the gradient of {names.get(id(p), 'a trainable parameter')} has {bad} non-finite value(s)"
        return "a gradient is not finite"

    def _snapshot(self) -> None:
        """Keep the sampling weights of the current version (batches sampled at it may arrive later)."""
        self._snapshots[self.version] = {
            k: v.detach().clone() for k, v in self.policy.lora_state_dict(self.sample_with).items()}
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
        self, mb: MicroBatch, terms: int, count: int, acc: _StatAccumulator, weight: float = 1.0
    ) -> str | None:
        """Backpropagate the micro-batch's loss, each term scaled by its share ``n / count`` of the mini-batch
        (times ``weight``: 0 for a padding pass, which adds no gradient and no stats). Returns what is wrong
        with the first term whose loss is NaN or inf (naming it and its non-finite stats), else None."""
        bad = None
        for j in range(terms):
            loss, stats = self.algo.loss(self.model, mb, j)
            if bad is None and weight and not bool(torch.isfinite(loss.detach())):
                nonfinite = sorted(k for k, v in stats.items() if not bool(torch.isfinite(v).all()))
                bad = (f"the {self.algo.name} loss is {float(loss.detach())} (term {j} of the micro-batch of samples "
                       f"{mb.rollout.offset}..{mb.rollout.offset + mb.size - 1}; non-finite stats: "
                       f"{', '.join(nonfinite) or 'none'})")
            (loss * (weight * mb.size / count)).backward()
            if weight:
                acc.add(stats, mb.size)
        return bad

    def state(self, *, with_previous: bool = False) -> LearnerState:
        """Whole tensors in the one-process layout (sharded: gathered, so every rank must call it);
        ``with_previous`` adds the sampling weights of version ``version - 1`` when they are kept."""
        from rlflow import fsdp

        whole = fsdp.full_state if self.sharded else dict
        previous = self._snapshots.get(self.version - 1) if with_previous else None
        return LearnerState(
            lora=fsdp.full_lora_state(self.policy) if self.sharded else self.policy.lora_state_dict(),
            optimizer=fsdp.full_optimizer_state(self.optimizer) if self.sharded else self.optimizer.state_dict(),
            version=self.version, optimizer_steps=self.optimizer_steps,
            adapters={a: (fsdp.full_lora_state(self.policy, a) if self.sharded else self.policy.lora_state_dict(a))
                      for a in self.algo.policies.extra_adapters},
            previous=None if previous is None else whole(previous),
        )

    def load_state(self, state: LearnerState) -> None:
        """Load whole tensors (also into a sharded learner: each rank keeps its slice)."""
        from rlflow import fsdp

        missing = [a for a in self.algo.policies.extra_adapters if a not in state.adapters]
        if missing:
            raise ValueError(f"the checkpoint has no weights of the {self.algo.name} adapter(s) {missing}")
        if self.sharded:
            fsdp.load_full_lora_state(self.policy, state.lora)
            fsdp.load_full_optimizer_state(self.optimizer, state.optimizer)
            for a in self.algo.policies.extra_adapters:
                fsdp.load_full_lora_state(self.policy, state.adapters[a], a)
        else:
            self.policy.load_lora_state_dict(state.lora)
            self.optimizer.load_state_dict(state.optimizer)
            for a in self.algo.policies.extra_adapters:
                self.policy.load_lora_state_dict(state.adapters[a], a)
        self.version, self.optimizer_steps = state.version, state.optimizer_steps
        self._snapshots.clear()
        if state.previous is not None:
            self._snapshots[self.version - 1] = {k: v.detach().clone() for k, v in state.previous.items()}


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
