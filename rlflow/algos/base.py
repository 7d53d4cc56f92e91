"""What an algorithm is: the declarations the sampler, the learner and the loop read, and the loss of one
micro-batch. Nothing outside ``rlflow/algos/`` branches on an algorithm's name.

An algorithm declares
- ``rollout`` (:class:`RolloutSpec`): whether a rollout runs a seeded window of stochastic steps and records
  them with means and log-probs (Flow-GRPO, Flow-DPPO), or is a deterministic ODE keeping only the final
  samples (DiffusionNFT);
- ``policies`` (:class:`PolicySpec`): the extra policies its loss reads (the reference = base model; anchors
  replayed at the rollout's weights before the first optimizer step; extra LoRA adapters such as NFT's
  averaged "old" policy) and which adapter's weights the samplers sample with;
- ``num_terms``: how many loss terms each sample contributes (trained steps, or training timesteps);
- ``prepare`` (no grad, at the rollout's weights) and ``loss`` of one micro-batch and term;
- ``after_update``: what happens to its extra policies after an update (NFT's soft update).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from rlflow.models.base import Conditioning, FlowPolicy
from rlflow.policy_step import StepSettings, policy_step
from rlflow.registry import Registry
from rlflow.schema import Section
from rlflow.types import Rollout, StepOut


@dataclass(frozen=True)
class RolloutSpec:
    """stochastic: True draws the sampling config's SDE window per rollout batch, runs those steps
    stochastically and records them (:class:`rlflow.types.StepRecord`); False runs the ODE and keeps the final
    samples only."""

    stochastic: bool


@dataclass(frozen=True)
class PolicySpec:
    """reference: the loss reads the base model (LoRA off). anchors: :meth:`Algorithm.prepare` runs at the
    rollout's policy version before the first optimizer step. extra_adapters: frozen LoRA adapters the learner
    keeps beside the trained one (checkpointed with it). sample_with: the adapter whose weights samplers
    sample with, i.e. what is published to them."""

    reference: bool = False
    anchors: bool = False
    extra_adapters: tuple[str, ...] = ()
    sample_with: str = "default"


@dataclass(frozen=True)
class MicroBatch:
    """One chunk of a step's batch as the loss sees it.

    rollout:  the chunk's samples (``rollout.offset``: index of its first sample in the step's batch).
    cond:     their encoded conditions.
    adv:      ``[n]`` fp32 advantages.
    seed:     the update's seed; per-sample training randomness is keyed by it and the sample's batch index,
              so it does not depend on how the batch was split over chunks or ranks.
    prepared: what :meth:`Algorithm.prepare` returned for this chunk (``{}`` without anchors).
    """

    rollout: Rollout
    cond: Conditioning
    adv: Tensor
    seed: int
    prepared: dict[str, Tensor] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.rollout.num_samples


class LossModel:
    """The policy as a loss sees it: forwards at the current weights, the reference, or another adapter."""

    def __init__(self, policy: FlowPolicy, step: StepSettings) -> None:
        self.policy, self.step = policy, step

    @property
    def device(self) -> torch.device:
        return next(self.policy.transformer.parameters()).device

    def velocity(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """``v(x, t, c)``: ``x`` ``[n, ...]``, ``t`` ``[n]`` fp32."""
        return self.policy.velocity(x, t, cond, guidance_scale=self.step.guidance_scale)

    def replay(self, mb: MicroBatch, j: int) -> StepOut:
        """Re-score recorded step ``j`` of the micro-batch at the current weights."""
        rec = mb.rollout.steps
        if rec is None:
            raise ValueError("this rollout recorded no steps (an ODE rollout): nothing to replay")
        dev = self.device
        return policy_step(
            self.policy, rec.x[:, j].to(dev), float(rec.t[j]), float(rec.t_next[j]), rec.t_max, mb.cond, self.step,
            stochastic=True, prev_sample=rec.x_next[:, j].to(dev),
        )

    def reference(self) -> contextlib.AbstractContextManager[None]:
        return self.policy.reference()

    def adapter(self, name: str) -> contextlib.AbstractContextManager[None]:
        return self.policy.adapter(name)


class Algorithm(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def rollout(self) -> RolloutSpec: ...

    @property
    def policies(self) -> PolicySpec: ...

    def num_terms(self, rollout: Rollout) -> int:
        """Loss terms per sample (the loss of a micro-batch is the mean over its samples and terms)."""
        ...

    def prepare(self, model: LossModel, mb: MicroBatch) -> dict[str, Tensor]:
        """No grad, at the rollout's weights, before the first optimizer step (only with ``anchors``)."""
        ...

    def loss(self, model: LossModel, mb: MicroBatch, term: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean loss of the micro-batch's samples for term ``term`` and detached scalar stats."""
        ...

    def after_update(self, policy: FlowPolicy, optimizer_steps: int) -> dict[str, float]:
        """Called after each update (``optimizer_steps``: taken so far); returns stats to log."""
        ...


class AlgoSection(Section):
    """Keys every algorithm has. ``global_std``: normalise advantages by one batch-wide std (ALGORITHMS.md 0)."""

    name: str
    global_std: bool = True


@dataclass(frozen=True)
class AlgorithmEntry:
    """A registered algorithm: its config section (a pydantic model with ``name: Literal[...]``) and the
    builder of the algorithm object from a validated section."""

    config: type[AlgoSection]
    build: Callable[[Any], Algorithm]


ALGORITHMS: Registry[AlgorithmEntry] = Registry("algorithm", "algo.name")


def register_algorithm(name: str, config: type[AlgoSection], build: Callable[[Any], Algorithm]) -> None:
    ALGORITHMS.add(name, AlgorithmEntry(config, build))


def build_algorithm(section: AlgoSection) -> Algorithm:
    return ALGORITHMS.get(section.name).build(section)

