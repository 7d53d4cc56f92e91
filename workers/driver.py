"""The Ray executor: the stages of the one loop (:class:`rlflow.run.Run`) on actors.

    rollout   the step's batch is cut into chunks spread over the sampler actors
    score     finished chunks go to the reward pool (each at once, or after the whole rollout: the
              pipeline's ``scores_each_chunk``), so scoring overlaps sampling
    update    every learner rank reads the chunks from the object store; gradients are all-reduced
    sync      the weight transport (:mod:`workers.transport`) gives every sampler the new sampling weights

Every launched rollout keeps moving while the driver waits on anything (finished chunks are scored, lost
ones are redone), so a one-step-off rollout overlaps the scoring and the update of the step before it.
Trajectories never pass through the driver: it holds object references and fetches only small statuses,
rewards and evaluation samples.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError

from rlflow import builders
from rlflow.config import Config
from rlflow.run import Collected, Run, StepBatch, build_pipeline
from rlflow.sampler import choose_sde_steps, chunks
from rlflow.types import Conditions, LearnerState, Media, RewardOutput
from workers.learner import LearnerGroup, actor_config_error
from workers.messages import ChunkStatus, from_wire, to_wire
from workers.placement import Placement, shared_gpus
from workers.reward_server import RewardPanel
from workers.runtime import ActorGone, actor_threads, await_alive
from workers.sampler import SamplerActor
from workers.transport import (
    TRANSPORTS,
    SamplerError,
    Transport,
    split_ready,
    weight_group_backend,
    weight_transport,
)

__all__ = ["RayExecutor", "RayTrainer", "SamplerError", "weight_transport"]


@dataclass
class _Chunk:
    index: int
    span: slice
    sampler: int
    refs: tuple[Any, Any, Any] = (None, None, None)  # wire rollout, wire media, ChunkStatus
    status: ChunkStatus | None = None
    attempts: int = 0


@dataclass
class RayJob:
    """One step's rollout in flight."""

    step: int
    version: int
    batch: StepBatch
    seed: int
    trained: list[int]
    chunks: list[_Chunk]
    launched: float = field(default_factory=time.perf_counter)
    chunks_done: float = 0.0
    redone: int = 0

    def open_status_refs(self) -> list[Any]:
        return [c.refs[2] for c in self.chunks if c.status is None]


class RayExecutor:
    """Sampler actors, a reward pool per reward (:class:`RewardPanel`) and a learner group on the connected
    Ray cluster."""

    def __init__(self, cfg: Config, *, scores_each_chunk: bool = True) -> None:
        self.cfg = cfg
        self.settings = builders.sampler_settings(cfg.sampling)
        self.spec = builders.build_algo(cfg).rollout
        self.prefix = f"rlflow-{uuid.uuid4().hex[:8]}"
        self.placement: Placement | None = Placement(cfg.ray, name=self.prefix)
        self.samplers: list[Any] = []
        self.learners: LearnerGroup | None = None
        self.rewards: RewardPanel | None = None
        self._open: dict[int, RayJob] = {}  # launched, not yet collected
        self._has_previous = False
        self._on_chunk: Callable[[RayJob, _Chunk], None] = self._score_chunk if scores_each_chunk else _nothing
        self._on_rollout: Callable[[RayJob], None] = _nothing if scores_each_chunk else self._score_all
        try:
            self._start_actors()
            shared = self._shared_gpus()
            self.transport: Transport = TRANSPORTS[weight_transport(cfg, shared)](cfg, self._learners(), self.samplers)
        except BaseException:
            self.shutdown()
            raise
        if shared and self.transport.name == "object_store":
            print(f"rlflow: weights go through the object store, not NCCL: {shared[0]}", file=sys.stderr)

    def _start_actors(self) -> None:
        cfg = self.cfg
        assert self.placement is not None
        raw = cfg.model_dump(mode="json")
        self.rewards = RewardPanel(
            cfg.reward, name_prefix=self.prefix, threads=lambda cpus: actor_threads(cfg, cpus),
            reserved=self.placement.plan.total(),
        )
        res = cfg.ray.sampler
        self.samplers.extend(
            SamplerActor.options(  # type: ignore[attr-defined]
                name=f"{self.prefix}-sampler-{i}", num_cpus=res.num_cpus, num_gpus=res.num_gpus,
                max_restarts=cfg.ray.max_restarts, max_task_retries=0,
                scheduling_strategy=self.placement.strategy("sampler", i),
            ).remote(raw, i, actor_threads(cfg, res.num_cpus))
            for i in range(cfg.ray.num_samplers)
        )
        self.learners = LearnerGroup(
            cfg, self.placement, name_prefix=self.prefix, threads=actor_threads(cfg, cfg.ray.learner.num_cpus)
        )
        try:
            ray.get([s.pid.remote() for s in self.samplers])
        except RayActorError as err:
            if (bad := actor_config_error(err)) is not None:
                raise bad from None
            raise SamplerError(f"sampler actors could not start: {err}") from None
        self.rewards.ready()

    def _shared_gpus(self) -> list[str]:
        """Members of the would-be NCCL weight group that Ray gave the same GPU (see :func:`shared_gpus`)."""
        if weight_group_backend(self.cfg) != "nccl" or weight_transport(self.cfg) != "collective":
            return []
        members = {"learner 0": self._learners().actors[0]} | {f"sampler {i}": s for i, s in enumerate(self.samplers)}
        slots = ray.get([a.gpu_slot.remote() for a in members.values()])
        return shared_gpus(dict(zip(members, slots, strict=True)))

    def _learners(self) -> LearnerGroup:
        if self.learners is None:
            raise RuntimeError("the learner group is shut down")
        return self.learners

    def _pool(self) -> RewardPanel:
        if self.rewards is None:
            raise RuntimeError("the reward pool is shut down")
        return self.rewards

    def tags(self) -> dict[str, str]:
        ctx = ray.get_runtime_context()
        return {"rlflow.runtime": "ray", "rlflow.ray_gcs_address": ctx.gcs_address,
                "rlflow.weight_transport": self.transport.name}

    def start(self, version: int) -> None:
        self.transport.form(wait=True)
        self.sync(version, wait=True)
        if self._has_previous:  # a resumed one-step-off run samples its first batch with the kept version
            self.transport.publish(version - 1)

    def has_version(self, version: int) -> bool:
        return self.transport.has(version)

    # ---- rollout ------------------------------------------------------------------------------------
    def launch(self, step: int, batch: StepBatch, seed: int, version: int) -> RayJob:
        """Submit the chunks of step ``step`` with the weights of ``version``; returns at once."""
        spans = chunks(batch.num_samples, self.settings.chunk_size)
        ns = len(self.samplers)
        job = RayJob(step=step, version=version, batch=batch, seed=seed,
                     trained=choose_sde_steps(seed, self.settings, self.spec),
                     chunks=[_Chunk(i, sl, sampler=i % ns) for i, sl in enumerate(spans)])
        latest = self.transport.latest
        if version != latest:  # actors run calls in order: switch to the old weights for these chunks, then back
            self.transport.send(version)
        for c in job.chunks:
            self._submit_chunk(job, c)
        if version != latest:
            self.transport.send(latest)
        self._open[step] = job
        return job

    def _submit_chunk(self, job: RayJob, c: _Chunk) -> None:
        sl = c.span
        c.refs = tuple(self.samplers[c.sampler].rollout.options(num_returns=3).remote(
            to_wire(job.batch.conditions.index(sl)), job.batch.group_ids[sl].numpy(), job.seed, job.trained, sl.start,
        ))

    def _redo_chunk(self, job: RayJob, c: _Chunk, why: str) -> None:
        """A chunk lost with its sampler (or made with the wrong weights) is redone, bit for bit, after the
        sampler is given the rollout's weights again."""
        c.attempts += 1
        job.redone += 1
        if c.attempts > self.cfg.ray.max_chunk_retries:
            raise SamplerError(
                f"step {job.step}: rollout chunk {c.index} failed {c.attempts} times (last: {why}); "
                f"ray.max_chunk_retries={self.cfg.ray.max_chunk_retries}"
            )
        c.sampler = (c.sampler + 1) % len(self.samplers)
        try:
            await_alive(self.samplers[c.sampler], f"sampler {c.sampler}")
        except ActorGone as err:
            raise SamplerError(f"step {job.step}: rollout chunk {c.index} lost: {err}") from None
        self.transport.member_lost(f"step {job.step}")
        self.transport.send(job.version, [c.sampler])
        self._submit_chunk(job, c)
        if self.transport.latest != job.version:
            self.transport.send(self.transport.latest, [c.sampler])

    def _poll(self, job: RayJob) -> None:
        """Note finished chunks (scoring them as the pipeline says), redo lost ones."""
        done = set(split_ready(job.open_status_refs())[0])
        for c in job.chunks:
            if c.status is not None or c.refs[2] not in done:
                continue
            try:
                status: ChunkStatus = ray.get(c.refs[2])
            except RayActorError as err:
                self._redo_chunk(job, c, f"sampler {c.sampler} died: {type(err).__name__}")
                continue
            if status.policy_version != job.version:
                self._redo_chunk(job, c, f"sampler {c.sampler} had weights v{status.policy_version}, not v{job.version}")
                continue
            c.status = status
            self._on_chunk(job, c)
        if not job.open_status_refs() and not job.chunks_done:
            job.chunks_done = time.perf_counter()
            self._on_rollout(job)
        self._pool().poll()

    def _score_chunk(self, job: RayJob, c: _Chunk) -> None:
        self._pool().submit((job.step, c.index), c.refs[1], job.batch.conditions.index(c.span))

    def _score_all(self, job: RayJob) -> None:
        for c in job.chunks:
            self._score_chunk(job, c)

    def _wait(self, until: Callable[[], list[Any]]) -> None:
        """Block until ``until()`` returns no references, meanwhile keeping every open rollout moving."""
        pool = self._pool()
        while True:
            for job in list(self._open.values()):
                self._poll(job)
            refs = until()
            if not refs:
                return
            extra = [r for job in self._open.values() for r in job.open_status_refs()] + pool.pending_refs()
            deadline = pool.next_deadline()
            timeout = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
            ray.wait(list(dict.fromkeys(refs + extra)), num_returns=1, timeout=timeout)

    # ---- score --------------------------------------------------------------------------------------
    def collect(self, job: RayJob) -> Collected:
        """Wait for the rollout and its scores; the chunk references go on to the update."""
        pool = self._pool()
        t0 = time.perf_counter()
        self._wait(lambda: job.open_status_refs() or pool.pending_refs())
        del self._open[job.step]
        rewards = RewardOutput.cat([pool.pop((job.step, c.index)) for c in job.chunks])
        now = time.perf_counter()
        busy = [0.0] * len(self.samplers)
        for c in job.chunks:
            if c.status is not None:
                busy[c.status.sampler] += c.status.seconds
        metrics = {
            "time/reward_exposed": max(0.0, now - max(job.chunks_done, t0)),  # waited on scores alone
            "time/sampler_compute": max(busy), "faults/chunks_redone": float(job.redone),
        }
        return Collected([c.refs[0] for c in job.chunks], rewards, job.version, job.chunks_done - job.launched,
                         now - job.chunks_done, metrics)

    # ---- update, sync -------------------------------------------------------------------------------
    def update(self, got: Collected, adv: torch.Tensor, seed: int, step: int) -> dict[str, float]:
        """Run the update on every learner rank; open rollouts keep moving meanwhile."""
        learners = self._learners()
        refs = learners.update(got.rollout, adv.numpy(), seed)
        self._wait(lambda: split_ready(refs)[1])
        return learners.finish_update(refs, step)

    def sync(self, version: int, *, wait: bool = False) -> None:
        """Rank 0 publishes ``version``; every sampler loads it after its queued rollouts."""
        self.transport.check()
        self.transport.publish(version)
        acks = self.transport.send(version)
        if wait:
            got = ray.get(acks)
            if got != [version] * len(self.samplers):
                raise SamplerError(f"weight sync to version {version} failed: samplers report {got}")

    # ---- evaluation ---------------------------------------------------------------------------------
    def sample(self, conditions: Conditions, seeds: list[int]) -> Media:
        """Deterministic eval samples, chunks spread over the samplers (the latest synced weights)."""
        spans = chunks(len(conditions), self.settings.chunk_size)
        out: list[Media | None] = [None] * len(spans)
        for attempt in range(self.cfg.ray.max_chunk_retries + 1):
            todo = [i for i, o in enumerate(out) if o is None]
            refs = {i: self.samplers[(i + attempt) % len(self.samplers)].sample.remote(
                to_wire(conditions.index(spans[i])), seeds[spans[i]], self.cfg.train.eval_steps) for i in todo}
            for i, ref in refs.items():
                try:
                    out[i] = from_wire(ray.get(ref))
                except RayActorError:
                    await_alive(self.samplers[(i + attempt) % len(self.samplers)], "sampler")
                    self.transport.member_lost("evaluation")
                    self.transport.send(self.transport.latest)
            if all(o is not None for o in out):
                return Media.cat([o for o in out if o is not None])
        raise SamplerError("evaluation sampling failed: sampler actors kept dying")

    def score(self, media: Media, conditions: Conditions) -> RewardOutput:
        return self._pool().score([(("eval", uuid.uuid4().hex), ray.put(to_wire(media)), conditions)])[0]

    # ---- state --------------------------------------------------------------------------------------
    def learner_state(self) -> LearnerState:
        return self._learners().state()

    def load_learner_state(self, state: LearnerState) -> None:
        self._learners().load_state(state)
        self._has_previous = state.previous is not None

    def shutdown(self) -> None:
        """Kill the actors and release the placement group (idempotent)."""
        for a in self.samplers:
            ray.kill(a, no_restart=True)
        self.samplers.clear()
        if self.learners is not None:
            self.learners.shutdown()
            self.learners = None
        if self.rewards is not None:
            self.rewards.shutdown()
            self.rewards = None
        if self.placement is not None:
            self.placement.remove()
            self.placement = None


def _nothing(*_: Any) -> None:
    return None


class RayTrainer(Run):
    """Runs (or resumes) one training run in ``run_dir`` on the connected Ray cluster: the one loop over a
    :class:`RayExecutor`. Actors are shut down when the run ends."""

    executor: RayExecutor

    def __init__(
        self, cfg: Config, run_dir: Path, *, tags: dict[str, str] | None = None, run_id: str | None = None,
    ):
        pipeline = build_pipeline(cfg)
        executor = RayExecutor(cfg, scores_each_chunk=pipeline.scores_each_chunk)
        super().__init__(cfg, executor, run_dir, pipeline=pipeline, tags=tags, run_id=run_id)
