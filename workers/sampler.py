"""Sampler actors: a thin Ray wrapper around :class:`rlflow.sampler.Sampler`.

Each actor loads the policy from the run config, takes weight updates from learner rank 0 (tagged with a
policy version) and rolls out chunks of a step's batch. Per-sample noise streams make a chunk's result
independent of which actor runs it, so a chunk lost with a dead actor is redone bit for bit elsewhere.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import ray
import torch

from rlflow import builders
from rlflow.config import validate
from rlflow.system import keep_freed_memory
from rlflow.types import Conditions, Media, Rollout
from workers.messages import ChunkStatus, WeightUpdate, from_wire, to_wire, update_to_state
from workers.placement import GpuSlot, gpu_slot
from workers.weight_sync import WeightGroup, apply_update, live_weights, weights_digest


class SamplerWorker:
    """One sampler process. ``index`` names it in statuses; ``threads``: torch CPU threads (0 = all cores)."""

    def __init__(self, cfg: dict[str, Any], index: int, threads: int = 0):
        keep_freed_memory()
        self.threads = threads or os.cpu_count() or 1
        torch.set_num_threads(self.threads)
        self.cfg = validate(cfg)
        self.index = index
        self.policy = builders.build_policy(self.cfg.model, self.cfg.seed)
        self.sampler = builders.build_sampler(self.policy, self.cfg)
        self.version = 0
        self.weight_group: WeightGroup | None = None

    def join_weight_group(self, host: str, port: int, rank: int, world_size: int, backend: str) -> int:
        """Join the weight-broadcast group (``ray.weight_transport: collective``) as ``rank``."""
        self.weight_group = WeightGroup(host, port, rank, world_size, backend)
        return rank

    def receive_weights(self, kind: str) -> int:
        """Receive rank 0's next broadcast into this policy's tensors; returns the version now in use."""
        if self.weight_group is None:
            raise RuntimeError(f"sampler {self.index} is in no weight group (join_weight_group first)")
        self.version = self.weight_group.broadcast(live_weights(self.policy, kind), -1)
        return self.version

    def set_weights(self, update: WeightUpdate) -> int:
        """Load published weights; returns the version now in use."""
        apply_update(self.policy, update_to_state(update), update.kind)
        self.version = update.version
        return self.version

    def rollout(
        self, conditions: Conditions, group_ids: np.ndarray, seed: int, trained: list[int], offset: int
    ) -> tuple[Rollout, Media, ChunkStatus]:
        """One chunk: ``(wire Rollout, wire Media, status)`` (three object-store entries: the learner reads the
        first, the reward server the second, the driver only the small third)."""
        t0 = time.perf_counter()
        torch.set_num_threads(self.threads)  # per calling thread: Ray may run methods off the init thread
        roll = self.sampler.rollout(
            from_wire(conditions), torch.from_numpy(np.array(group_ids, copy=True)), seed=seed,
            policy_version=self.version, trained=trained, offset=offset,
        )
        status = ChunkStatus(self.index, self.version, roll.num_samples, time.perf_counter() - t0)
        return to_wire(roll), to_wire(roll.media), status

    def sample(self, conditions: Conditions, seeds: list[int], num_steps: int) -> Media:
        """Deterministic ODE samples (evaluation), as wire :class:`Media`."""
        torch.set_num_threads(self.threads)
        return to_wire(self.sampler.sample(from_wire(conditions), seeds, num_steps=num_steps))

    def digest(self) -> tuple[int, str]:
        """``(version, hash of the trainable weights)``: checks that a sync reached this actor."""
        return self.version, weights_digest(self.policy)

    def pid(self) -> int:
        return os.getpid()

    def gpu_slot(self) -> GpuSlot:
        return gpu_slot()


# A plain (single-threaded) actor: a threaded one (concurrency groups) ran the CPU rollout ~1.6x slower
# here, measured. Health pings may queue behind a rollout; the driver only pings a sampler after it died.
SamplerActor = ray.remote(SamplerWorker)
