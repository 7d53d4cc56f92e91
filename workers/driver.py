"""The Ray driver: the training loop as named stages over actors.

    rollout   the step's batch is cut into chunks spread over the sampler actors
    score     each finished chunk goes to the reward pool at once, so scoring overlaps sampling
    advantages  group advantages on the driver (rewards are small)
    update    every learner rank reads the chunks from the object store; gradients are all-reduced
    sync      rank 0 publishes its weights (one object-store entry); every sampler loads them
    log / checkpoint   MLflow metrics, image grids, resumable checkpoints (rlflow.run.RunRecorder)

With ``ray.pipeline: one_step_off`` the rollout of step k+1 is launched as soon as the weights it samples
with exist (version k, right after the sync of update k-1), so it overlaps the scoring and the update of
step k (policy lag 1, logged); the learner replays DPPO's anchors at the rollout's version from a LoRA
snapshot, so the trust region is measured against the policy that sampled. Checkpoints keep that previous
version, so a resumed one-step-off run repeats an uninterrupted one exactly.
Trajectories never pass through the driver: it holds object references and fetches only small statuses,
rewards and evaluation images.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError

from rlflow import builders
from rlflow.algos import group_advantages
from rlflow.config import Config, ConfigError
from rlflow.run import RunRecorder, StepBatch, StepTimes, run_loop, step_batch, step_seed
from rlflow.sampler import choose_sde_steps, chunks
from rlflow.types import RewardOutput
from workers.learner import LearnerError, LearnerGroup, actor_config_error, short_error
from workers.messages import ChunkStatus, array_to_tensor, concat_rewards
from workers.placement import Placement, shared_gpus
from workers.reward_server import RewardPool
from workers.runtime import ActorGone, actor_threads, await_alive
from workers.sampler import SamplerActor


class SamplerError(RuntimeError):
    """Rollout chunks could not be produced (sampler actors kept dying or raised)."""


@dataclass
class _Chunk:
    index: int
    span: slice
    sampler: int
    refs: tuple[Any, Any, Any] = (None, None, None)  # packed trajectories, images, ChunkStatus
    status: ChunkStatus | None = None
    attempts: int = 0


@dataclass
class _Rollout:
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


class RayTrainer:
    """Runs (or resumes) one training run in ``run_dir`` on the connected Ray cluster."""

    def __init__(
        self, cfg: Config, run_dir: Path, *, tags: dict[str, str] | None = None, run_id: str | None = None,
    ):
        self.cfg = cfg
        self.task = builders.build_task(cfg.data)
        self.settings = builders.sampler_settings(cfg.sampling)
        self.prefix = f"rlflow-{uuid.uuid4().hex[:8]}"
        self.placement = Placement(cfg.ray, name=self.prefix)
        self.samplers: list[Any] = []
        self.learners: LearnerGroup | None = None
        self.rewards: RewardPool | None = None
        try:
            self._start_actors()
            shared = self._shared_gpus()
            self.transport = weight_transport(cfg, shared)
            self.rec = RunRecorder(cfg, run_dir, tags=tags, run_id=run_id)
        except BaseException:
            self.shutdown()
            raise
        if shared and self.transport == "object_store":
            print(f"rlflow: weights go through the object store, not NCCL: {shared[0]}", file=sys.stderr)
        self.rec.tracker.set_tags({**_cluster_tags(), "rlflow.weight_transport": self.transport})
        if self.rec.resume is not None:
            self._learners().load_state_dict(self.rec.resume)
        self.weights: dict[int, Any] = {}  # published versions: object refs (object_store) or the version
        self._inflight: dict[int, _Rollout] = {}  # launched rollouts of later steps (one_step_off)
        self._broadcasts: list[Any] = []  # rank 0's broadcast calls in the current weight group
        self._regroups = 0
        if self.transport == "collective":
            self._form_weight_group(wait=True)
        self.stage_sync(wait=True)
        previous = self.state.policy_version - 1
        if cfg.ray.pipeline == "one_step_off" and self.rec.resume is not None and "previous" in self.rec.resume:
            self.weights[previous] = self._publish(previous)

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

    def _start_actors(self) -> None:
        cfg = self.cfg
        raw = cfg.model_dump(mode="json")
        self.rewards = RewardPool(
            cfg.reward, name_prefix=self.prefix, threads=actor_threads(cfg, cfg.reward.num_cpus),
            reserved=self.placement.plan.total(),
        )
        res = cfg.ray.sampler
        self.samplers = [
            SamplerActor.options(  # type: ignore[attr-defined]
                name=f"{self.prefix}-sampler-{i}", num_cpus=res.num_cpus, num_gpus=res.num_gpus,
                max_restarts=cfg.ray.max_restarts, max_task_retries=0,
                scheduling_strategy=self.placement.strategy("sampler", i),
            ).remote(raw, i, actor_threads(cfg, res.num_cpus))
            for i in range(cfg.ray.num_samplers)
        ]
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

    # ---- properties shared with the in-process Trainer
    @property
    def state(self):  # type: ignore[no-untyped-def]
        return self.rec.state

    @property
    def tracker(self):  # type: ignore[no-untyped-def]
        return self.rec.tracker

    @property
    def run_dir(self) -> Path:
        return self.rec.run_dir

    @property
    def resumed_from(self) -> Path | None:
        return self.rec.resumed_from

    # ---- stage: rollout ---------------------------------------------------------------------------
    def stage_rollout(self, step: int, version: int | None = None) -> _Rollout:
        """Launch step ``step``'s chunks with the weights of ``version`` (default: the latest published);
        returns at once (collect with :meth:`stage_score`)."""
        batch = step_batch(self.cfg, self.task, step)
        seed = step_seed(self.cfg.seed, step, 1)
        spans = chunks(len(batch.prompts), self.settings.chunk_size)
        ns = len(self.samplers)
        latest = max(self.weights)
        roll = _Rollout(
            step=step, version=latest if version is None else version, batch=batch, seed=seed,
            trained=choose_sde_steps(seed, self.settings),
            chunks=[_Chunk(i, sl, sampler=i % ns) for i, sl in enumerate(spans)],
        )
        older = roll.version != latest
        if older:  # actors run calls in order: switch to the old weights for these chunks, then back
            self._send_weights(roll.version)
        for c in roll.chunks:
            self._submit_chunk(roll, c)
        if older:
            self._send_weights(latest)
        return roll

    def _submit_chunk(self, roll: _Rollout, c: _Chunk) -> None:
        sl = c.span
        c.refs = tuple(self.samplers[c.sampler].rollout.options(num_returns=3).remote(
            roll.batch.prompts[sl], roll.batch.group_ids[sl].numpy(), roll.seed, roll.trained, sl.start,
        ))

    def _redo_chunk(self, roll: _Rollout, c: _Chunk, why: str) -> None:
        """A chunk lost with its sampler (or made with the wrong weights) is redone, bit for bit, after the
        sampler is given the rollout's weights again."""
        c.attempts += 1
        roll.redone += 1
        if c.attempts > self.cfg.ray.max_chunk_retries:
            raise SamplerError(
                f"step {roll.step}: rollout chunk {c.index} failed {c.attempts} times (last: {why}); "
                f"ray.max_chunk_retries={self.cfg.ray.max_chunk_retries}"
            )
        c.sampler = (c.sampler + 1) % len(self.samplers) if len(self.samplers) > 1 else c.sampler
        actor = self.samplers[c.sampler]
        try:
            await_alive(actor, f"sampler {c.sampler}")
        except ActorGone as err:
            raise SamplerError(f"step {roll.step}: rollout chunk {c.index} lost: {err}") from None
        if self.transport == "collective":  # a dead member breaks the group: every member joins a new one
            self._regroup(f"step {roll.step}")
        self._send_weights(roll.version, [c.sampler])
        self._submit_chunk(roll, c)
        latest = max(self.weights)
        if latest != roll.version:
            self._send_weights(latest, [c.sampler])

    def _poll_rollout(self, roll: _Rollout) -> None:
        """Note finished chunks, send them to the reward pool, redo lost ones."""
        refs = roll.open_status_refs()
        done = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else set()
        for c in roll.chunks:
            if c.status is not None or c.refs[2] not in done:
                continue
            try:
                status: ChunkStatus = ray.get(c.refs[2])
            except RayActorError as err:
                self._redo_chunk(roll, c, f"sampler {c.sampler} died: {type(err).__name__}")
                continue
            if status.policy_version != roll.version:
                self._redo_chunk(roll, c, f"sampler {c.sampler} had weights v{status.policy_version}, not v{roll.version}")
                continue
            c.status = status
            if self.cfg.ray.pipeline != "sequential":
                self._score_chunk(roll, c)
        if not roll.open_status_refs() and not roll.chunks_done:
            roll.chunks_done = time.perf_counter()
            if self.cfg.ray.pipeline == "sequential":
                for c in roll.chunks:
                    self._score_chunk(roll, c)
        self.rewards.poll()  # type: ignore[union-attr]

    def _score_chunk(self, roll: _Rollout, c: _Chunk) -> None:
        self.rewards.submit((roll.step, c.index), c.refs[1], roll.batch.prompts[c.span])  # type: ignore[union-attr]

    def _wait(self, rolls: list[_Rollout], until: Callable[[], list[Any]]) -> None:
        """Block until ``until()`` returns no references, meanwhile keeping ``rolls`` moving (finished chunks
        go to scoring, lost ones are redone)."""
        while True:
            for roll in rolls:
                self._poll_rollout(roll)
            refs = until()
            if not refs:
                return
            extra = [r for roll in rolls for r in roll.open_status_refs()] + self.rewards.pending_refs()  # type: ignore[union-attr]
            deadline = self.rewards.next_deadline()  # type: ignore[union-attr]
            timeout = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
            ray.wait(list(dict.fromkeys(refs + extra)), num_returns=1, timeout=timeout)

    # ---- stage: score -----------------------------------------------------------------------------
    def stage_score(self, roll: _Rollout) -> tuple[list[Any], RewardOutput, float]:
        """Wait for the rollout and its scores: ``(chunk refs in batch order, rewards, seconds from the last
        chunk to the last score)``."""
        pool = self.rewards
        assert pool is not None

        def missing() -> list[Any]:
            return roll.open_status_refs() or pool.pending_refs()

        self._wait([roll, *self._inflight.values()], missing)
        rewards = concat_rewards([pool.pop((roll.step, c.index)) for c in roll.chunks])
        return [c.refs[0] for c in roll.chunks], rewards, time.perf_counter() - roll.chunks_done

    # ---- stages: advantages, update, sync -----------------------------------------------------------
    def stage_advantages(self, rewards: RewardOutput, batch: StepBatch) -> torch.Tensor:
        return group_advantages(rewards.score, batch.group_ids, global_std=self.cfg.algo.global_std)

    def stage_update(self, chunk_refs: list[Any], adv: torch.Tensor, step: int) -> dict[str, float]:
        """Run the update on every learner rank; rollouts in flight keep moving meanwhile."""
        assert self.learners is not None
        refs = self.learners.update(chunk_refs, adv.numpy(), step_seed(self.cfg.seed, step, 2))
        self._wait(list(self._inflight.values()), lambda: _not_ready(refs))
        stats = self.learners.finish_update(refs, step)
        self.state.policy_version += 1
        return stats

    def stage_sync(self, *, wait: bool = False) -> None:
        """Rank 0 publishes version ``policy_version``; every sampler loads it after its queued rollouts."""
        version = self.state.policy_version
        if self.transport == "collective":
            self._check_broadcasts()
        self.weights[version] = self._publish(version)
        for v in [v for v in self.weights if v < version - 1]:
            del self.weights[v]
        acks = self._send_weights(version)
        if wait:
            got = ray.get(acks)
            if got != [version] * len(self.samplers):
                raise SamplerError(f"weight sync to version {version} failed: samplers report {got}")

    # ---- weight transport ---------------------------------------------------------------------------
    def _publish(self, version: int) -> Any:
        """object_store: rank 0 puts ``version`` (current, or a kept older one) in the store; its ref.
        collective: nothing to put (rank 0 broadcasts on each send); the version itself."""
        if self.transport == "collective":
            return version
        return self._learners().publish(self.cfg.ray.weight_sync, version)

    def _send_weights(self, version: int, only: list[int] | None = None) -> list[Any]:
        """Queue the load of ``version`` on samplers (after their queued calls); returns their acks. A
        broadcast goes to every sampler, whatever ``only`` says (all members take part in a collective)."""
        kind = self.cfg.ray.weight_sync
        if self.transport == "collective":
            self._broadcasts.append(self._learners().broadcast(kind, version))
            return [s.receive_weights.remote(kind) for s in self.samplers]
        idx = range(len(self.samplers)) if only is None else only
        return [self.samplers[i].set_weights.remote(self.weights[version]) for i in idx]

    def _form_weight_group(self, *, wait: bool) -> None:
        """Learner rank 0 and every sampler form a fresh broadcast group (joins queue behind their work)."""
        refs = form_weight_group(self.cfg, self._learners(), self.samplers)
        self._broadcasts = []  # failures of the old group's broadcasts are expected now: forget them
        if wait:
            try:
                ray.get(refs)
            except (RayActorError, ray.exceptions.RayTaskError) as err:
                raise SamplerError(f"the weight broadcast group could not form: {err}") from None

    def _regroup(self, where: str) -> None:
        self._regroups += 1
        if self._regroups > self.cfg.ray.max_restarts * max(1, len(self.samplers)) + 1:
            raise SamplerError(f"{where}: the weight broadcast group broke {self._regroups} times")
        for i, s in enumerate(self.samplers):
            try:
                await_alive(s, f"sampler {i}")
            except ActorGone as err:
                raise SamplerError(f"{where}: {err}") from None
        self._form_weight_group(wait=False)

    def _check_broadcasts(self) -> None:
        """Rank 0's finished broadcasts; one that failed (a member died when no chunk noticed) regroups and
        sends the latest weights again."""
        done, self._broadcasts = _split_ready(self._broadcasts)
        for ref in done:
            try:
                ray.get(ref)
            except (RayActorError, ray.exceptions.RayTaskError) as err:
                if isinstance(err, ray.exceptions.RayTaskError) and "Connection closed" not in str(err):
                    raise SamplerError(f"weight broadcast failed: {short_error(err)}") from None
                self._regroup("weight sync")
                if self.weights:
                    self._send_weights(max(self.weights))
                return

    def stage_checkpoint(self) -> Path:
        assert self.learners is not None
        return self.rec.checkpoint(self.learners.state_dict())

    # ---- evaluation ---------------------------------------------------------------------------------
    def sample(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """Deterministic eval samples, chunks spread over the samplers (the latest synced weights)."""
        spans = chunks(len(prompts), self.settings.chunk_size)
        out: list[np.ndarray | None] = [None] * len(spans)
        for attempt in range(self.cfg.ray.max_chunk_retries + 1):
            todo = [i for i, o in enumerate(out) if o is None]
            refs = {i: self.samplers[(i + attempt) % len(self.samplers)].sample.remote(
                prompts[spans[i]], seeds[spans[i]], self.cfg.train.eval_steps) for i in todo}
            for i, ref in refs.items():
                try:
                    out[i] = ray.get(ref)
                except RayActorError:
                    await_alive(self.samplers[(i + attempt) % len(self.samplers)], "sampler")
                    if self.transport == "collective":
                        self._regroup("evaluation")
                    self._send_weights(max(self.weights))
            if all(o is not None for o in out):
                return torch.cat([array_to_tensor(o) for o in out if o is not None])
        raise SamplerError("evaluation sampling failed: sampler actors kept dying")

    def evaluate(self) -> dict[str, float]:
        prompts, seeds = self.task.eval_set()
        return self.task.eval_metrics(self.sample(prompts, seeds), prompts, self._pool_reward)

    def _pool_reward(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        assert self.rewards is not None
        return self.rewards.score([(("eval", uuid.uuid4().hex), ray.put(images.numpy()), prompts)])[0]

    # ---- loop ---------------------------------------------------------------------------------------
    def run(self, progress: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
        """Train until ``train.steps``; returns the summary. Actors are shut down at the end."""
        try:
            return run_loop(self, progress)
        except LearnerError as err:
            raise LearnerError(f"{err}; {self._resume_hint()}") from None
        finally:
            self.shutdown()

    def _resume_hint(self) -> str:
        from rlflow.checkpoint import latest_checkpoint

        ckpt = latest_checkpoint(self.run_dir)
        where = f"the last checkpoint is {ckpt.name}" if ckpt else "no checkpoint was written yet"
        return f"{where}; continue with: rlflow train --resume {self.run_dir}"

    def train_step(self) -> dict[str, float]:
        cfg, step = self.cfg, self.state.step
        t0 = time.perf_counter()
        one_off = cfg.ray.pipeline == "one_step_off"
        roll = self._inflight.pop(step, None)
        if roll is None:  # first step, or the first after a resume (which samples with the kept version)
            previous = self.state.policy_version - 1
            roll = self.stage_rollout(step, previous if one_off and previous in self.weights else None)
        if one_off and step + 1 < cfg.train.steps:
            self._inflight[step + 1] = self.stage_rollout(step + 1)  # version k: overlaps scoring and update
        chunk_refs, rewards, reward_wait = self.stage_score(roll)
        t1 = time.perf_counter()
        exposed = max(0.0, t1 - max(roll.chunks_done, t0))  # waited on scores alone: latency not hidden
        adv = self.stage_advantages(rewards, roll.batch)
        stats = self.stage_update(chunk_refs, adv, step)
        t2 = time.perf_counter()
        self.stage_sync()
        t3 = time.perf_counter()
        self.state.step = step + 1
        times = StepTimes(rollout=roll.chunks_done - roll.launched, reward=reward_wait, update=t2 - t1, sync=t3 - t2)
        metrics = self.rec.step_metrics(rewards, stats, roll.version, len(roll.batch.prompts), times)
        busy = [0.0] * len(self.samplers)
        for c in roll.chunks:
            if c.status is not None:
                busy[c.status.sampler] += c.status.seconds
        metrics.update({
            "time/wait_rollout": t1 - t0, "time/reward_exposed": exposed, "time/sampler_compute": max(busy),
            "faults/chunks_redone": float(roll.redone),
        })
        self._after_step(metrics, t0)
        return metrics

    def _after_step(self, metrics: dict[str, float], t0: float) -> None:
        cfg = self.cfg
        if self.rec.due(cfg.train.eval_every) or self.state.step == cfg.train.steps:
            te = time.perf_counter()
            metrics.update({f"eval/{k}": v for k, v in self.evaluate().items()})
            metrics["time/eval"] = time.perf_counter() - te
        metrics["time/step"] = time.perf_counter() - t0
        self.rec.log_step(metrics)
        if self.rec.due(cfg.train.log_images_every):
            self.rec.log_images(self.task, self.sample, self.state.step)
        if self.rec.due(cfg.train.checkpoint_every) or self.state.step == cfg.train.steps:
            self.stage_checkpoint()

    def shutdown(self) -> None:
        """Kill the actors and release the placement group (idempotent)."""
        for a in self.samplers:
            ray.kill(a, no_restart=True)
        self.samplers = []
        if self.learners is not None:
            self.learners.shutdown()
            self.learners = None
        if self.rewards is not None:
            self.rewards.shutdown()
            self.rewards = None
        if self.placement is not None:
            self.placement.remove()
            self.placement = None  # type: ignore[assignment]


def _not_ready(refs: list[Any]) -> list[Any]:
    return _split_ready(refs)[1]


def _split_ready(refs: list[Any]) -> tuple[list[Any], list[Any]]:
    """``(finished, not finished)`` without waiting."""
    done = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else set()
    return [r for r in refs if r in done], [r for r in refs if r not in done]


def form_weight_group(cfg: Config, learners: LearnerGroup, samplers: list[Any]) -> list[Any]:
    """Start learner rank 0 (as rank 0) and ``samplers`` (ranks 1..) joining a new weight-broadcast group:
    :func:`weight_group_backend`. Returns the join calls' refs."""
    backend = weight_group_backend(cfg)
    host, port = learners.weight_group_address()
    world = 1 + len(samplers)
    return [learners.join_weight_group(host, port, world, backend)] + [
        s.join_weight_group.remote(host, port, i + 1, world, backend) for i, s in enumerate(samplers)
    ]


def weight_group_backend(cfg: Config) -> str:
    """``ray.backend``, or (auto) NCCL when samplers and learners have GPUs, else gloo."""
    r = cfg.ray
    return r.backend if r.backend != "auto" else ("nccl" if r.on_gpus else "gloo")


def weight_transport(cfg: Config, shared: list[str] | None = None) -> str:
    """``ray.weight_transport`` resolved: ``auto`` is ``collective`` when samplers and learners have GPUs of
    their own (disaggregated), else ``object_store``. ``shared``: members of the NCCL weight group that Ray
    placed on one GPU (:func:`shared_gpus`; fractional ``num_gpus`` on a node with too few GPUs): NCCL refuses
    them, so ``auto`` falls back to the object store and an explicit ``collective`` is an error."""
    r = cfg.ray
    if shared and r.weight_transport == "collective" and weight_group_backend(cfg) == "nccl":
        raise ConfigError(
            f"ray.weight_transport 'collective': {shared[0]}, and NCCL refuses two ranks of a group on one GPU: "
            "give samplers and learners GPUs of their own (ray.sampler.num_gpus and ray.learner.num_gpus: 1, on "
            "enough GPUs), or use weight_transport 'object_store' or 'auto'"
        )
    if r.weight_transport != "auto":
        return r.weight_transport
    return "collective" if r.on_gpus and r.placement == "disaggregated" and not shared else "object_store"


def _cluster_tags() -> dict[str, str]:
    ctx = ray.get_runtime_context()
    return {"rlflow.runtime": "ray", "rlflow.ray_gcs_address": ctx.gcs_address}
