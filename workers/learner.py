"""The learner group: N Ray actors, one :class:`rlflow.learner.Learner` each, forming one torch.distributed
process group (gloo on CPU, NCCL on GPU). Every rank reads the whole batch from the object store, replays its
share of the chunks, and the gradients are all-reduced, so the group takes the same optimizer steps as one
process would on the whole batch. Rank 0 publishes weights and checkpoints.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist

from rlflow import builders, fsdp
from rlflow.config import Config, ConfigError, validate
from rlflow.learner import NonFiniteError, StatState, merge_stats
from rlflow.run import ResumableError, keeps_previous
from rlflow.system import keep_freed_memory
from rlflow.types import LearnerState, Rollout
from workers.messages import WeightUpdate, array_to_tensor, from_wire, state_to_update, tensor_to_array
from workers.placement import GpuSlot, Placement, gpu_slot, shared_gpus
from workers.weight_sync import WeightGroup, live_weights, weight_state, weights_digest


class LearnerError(ResumableError):
    """A learner rank failed: the step is lost; the last checkpoint is intact and ``--resume`` continues it."""


class LearnerWorker:
    """One rank. Call :meth:`join` on every rank (concurrently) before :meth:`update`."""

    def __init__(self, cfg: dict[str, Any], rank: int, world_size: int, threads: int = 0):
        keep_freed_memory()
        self.threads = threads or os.cpu_count() or 1
        torch.set_num_threads(self.threads)
        self.cfg: Config = validate(cfg)
        self.rank, self.world_size = rank, world_size
        self.policy = builders.build_policy(self.cfg.model, self.cfg.seed)
        self.policy.set_resolution(self.cfg.sampling.height, self.cfg.sampling.width)
        self.learner = builders.build_learner(self.policy, self.cfg, rank=rank, world_size=world_size)
        self.weight_group: WeightGroup | None = None

    @staticmethod
    def address() -> tuple[str, int]:
        """This node's IP and a free TCP port (rank 0 hosts the rendezvous)."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def join(self, master: str, port: int, backend: str) -> int:
        if self.world_size > 1:
            dist.init_process_group(
                backend, init_method=f"tcp://{master}:{port}", rank=self.rank, world_size=self.world_size,
                timeout=timedelta(minutes=10),
            )
            if self.cfg.ray.strategy == "fsdp2":
                self.learner.shard()
        return self.rank

    def update(self, chunks: list[Any], adv: np.ndarray, seed: int) -> StatState:
        """One update on the step's batch (``chunks``: ObjectRefs of wire rollout chunks, in batch order)."""
        torch.set_num_threads(self.threads)  # per calling thread: Ray may run methods off the init thread
        return self.learner.update_raw(_batch(chunks), array_to_tensor(adv), seed=seed)

    def gradient(self, chunks: list[Any], adv: np.ndarray, seed: int = 0) -> np.ndarray:
        """The all-reduced gradient of the whole batch's loss (one mini-batch, no optimizer step)."""
        torch.set_num_threads(self.threads)
        return tensor_to_array(self.learner.gradient(_batch(chunks), array_to_tensor(adv), seed=seed))[0]

    def publish(self, kind: str, version: int | None = None) -> list[Any]:
        """Put this rank's weights (of the current policy version, or of a kept older ``version``) in the object
        store; returns ``[ref]`` (a list, so the driver gets the reference, not the data)."""
        version, state = self._weights(version, lambda p, k: weight_state(p, k, self.learner.sample_with), kind)
        return [ray.put(state_to_update(state, version, kind))] if self.rank == 0 else []

    def join_weight_group(self, host: str, port: int, world_size: int, backend: str) -> int:
        """Host the weight-broadcast group as its rank 0 (blocks until every sampler has joined)."""
        self.weight_group = WeightGroup(host, port, 0, world_size, backend)
        return 0

    def broadcast_weights(self, kind: str, version: int | None = None) -> int:
        """Broadcast the weights of the current (or a kept older) ``version`` to the weight group."""
        version, state = self._weights(version, lambda p, k: live_weights(p, k, self.learner.sample_with), kind)
        if self.rank != 0:
            return version
        if self.weight_group is None:
            raise RuntimeError("learner rank 0 is in no weight group")
        return self.weight_group.broadcast(state, version)

    @torch.no_grad()
    def _weights(
        self, version: int | None, pick: Callable[[Any, str], dict[str, torch.Tensor]], kind: str
    ) -> tuple[int, dict[str, torch.Tensor]]:
        """``(version, pick(policy, kind) at that version)`` (default: the current one); a sharded rank gathers
        whole tensors (collective: every rank calls it). The live tensors of an older version are snapshot
        values only inside :meth:`Learner.at_version`, so the gather or a copy happens there."""
        version = self.learner.version if version is None else version
        with self.learner.at_version(version):
            state = pick(self.policy, kind)
            if self.learner.sharded:
                state = fsdp.full_state(state)
            elif version != self.learner.version:
                state = {k: v.detach().clone() for k, v in state.items()}
        return version, state

    def version(self) -> int:
        return self.learner.version

    def describe(self) -> dict[str, Any]:
        """``sharded`` and how many trainable values this rank holds (``local``) of the model's ``total``."""
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in self.learner.params)
        return {"rank": self.rank, "sharded": self.learner.sharded, "local": local,
                "total": sum(p.numel() for p in self.learner.params)}

    def digest(self) -> tuple[int, str]:
        """``(version, hash of the sampling weights)``: what the samplers should hold after a sync."""
        adapter = self.learner.sample_with
        full = fsdp.full_lora_state(self.policy, adapter) if self.learner.sharded else self.policy.lora_state_dict(adapter)
        return self.learner.version, weights_digest(self.policy, full)

    def state(self) -> LearnerState:
        return self.learner.state(with_previous=keeps_previous(self.cfg))

    def load_state(self, state: LearnerState) -> None:
        self.learner.load_state(state)

    def pid(self) -> int:
        return os.getpid()

    def gpu_slot(self) -> GpuSlot:
        return gpu_slot()


def _batch(chunks: list[Any]) -> Rollout:
    """The step's batch from the object-store chunks (ObjectRefs of wire rollouts, in batch order)."""
    return Rollout.cat([from_wire(c) for c in ray.get(chunks)])


LearnerActor = ray.remote(LearnerWorker)


class LearnerGroup:
    """Driver-side handle of the ranks."""

    def __init__(self, cfg: Config, placement: Placement, *, name_prefix: str, threads: int = 0):
        raw = cfg.model_dump(mode="json")
        n = cfg.ray.num_learners
        res = cfg.ray.learner
        self.actors = [
            LearnerActor.options(  # type: ignore[attr-defined]
                name=f"{name_prefix}-learner-{r}", num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_restarts=0,
                scheduling_strategy=placement.strategy("learner", r),
            ).remote(raw, r, n, threads)
            for r in range(n)
        ]
        self.sharded = cfg.ray.strategy == "fsdp2" and n > 1  # then rank 0's publish and saves gather from all
        try:
            self._start(cfg, n)
        except BaseException:
            self.shutdown()
            raise

    def _start(self, cfg: Config, n: int) -> None:
        res = cfg.ray.learner
        backend = cfg.ray.backend if cfg.ray.backend != "auto" else ("nccl" if res.num_gpus > 0 else "gloo")
        if backend == "nccl" and n > 1:
            slots = self._call([a.gpu_slot.remote() for a in self.actors], "start")
            shared = shared_gpus({f"learner {r}": slot for r, slot in enumerate(slots)})
            if shared:
                raise ConfigError(
                    f"ray.num_learners {n} with ray.learner.num_gpus {res.num_gpus:g}: {shared[0]}, and NCCL refuses "
                    "two ranks of a group on one GPU: give each learner a whole GPU (ray.learner.num_gpus: 1) on a "
                    "cluster with enough of them, or set ray.backend: gloo"
                )
        master, port = self._call(self.actors[0].address.remote(), "start")
        self._call([a.join.remote(master, port, backend) for a in self.actors], "join the process group")

    def _call(self, refs: Any, what: str) -> Any:
        try:
            return ray.get(refs)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as err:
            if (bad := actor_config_error(err)) is not None:
                raise bad from None
            if isinstance(cause := getattr(err, "cause", None), NonFiniteError):  # not a fault: resuming repeats it
                raise NonFiniteError(str(cause)) from None
            raise LearnerError(f"learner group failed to {what}: {short_error(err)}") from None

    def update(self, chunk_refs: list[Any], adv: np.ndarray, seed: int) -> list[Any]:
        """Start the update on every rank; returns the refs (wait with :meth:`finish_update`)."""
        return [a.update.remote(chunk_refs, adv, seed) for a in self.actors]

    def finish_update(self, refs: list[Any], step: int) -> dict[str, float]:
        return merge_stats(self._call(refs, f"update at step {step}"))

    def gradient(self, chunk_refs: list[Any], adv: np.ndarray, seed: int = 0) -> list[np.ndarray]:
        return self._call([a.gradient.remote(chunk_refs, adv, seed) for a in self.actors], "compute gradients")

    def publish(self, kind: str, version: int | None = None) -> Any:
        """The ObjectRef of rank 0's :class:`WeightUpdate` (the data stays in the object store)."""
        return self._call([a.publish.remote(kind, version) for a in self._savers()], "publish weights")[0][0]

    def weight_group_address(self) -> tuple[str, int]:
        return self._call(self.actors[0].address.remote(), "open the weight group")

    def join_weight_group(self, host: str, port: int, world_size: int, backend: str) -> Any:
        """Rank 0 hosts the weight group; returns the call's ref (it finishes once every sampler joined)."""
        return self.actors[0].join_weight_group.remote(host, port, world_size, backend)

    def broadcast(self, kind: str, version: int | None = None) -> Any:
        """Start rank 0's broadcast of ``version`` (default: current); returns the call's ref."""
        return [a.broadcast_weights.remote(kind, version) for a in self._savers()][0]

    def _savers(self) -> list[Any]:
        """The ranks that take part in publishing and saving: all of them when sharded, else rank 0."""
        return self.actors if self.sharded else self.actors[:1]

    def state(self) -> LearnerState:
        return self._call([a.state.remote() for a in self._savers()], "save a checkpoint")[0]

    def load_state(self, state: LearnerState) -> None:
        self._call([a.load_state.remote(state) for a in self.actors], "load the checkpoint")

    def digests(self) -> list[tuple[int, str]]:
        return self._call([a.digest.remote() for a in self.actors], "report weights")

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)


def actor_config_error(err: Exception) -> ConfigError | None:
    """The :class:`ConfigError` an actor raised, in a method or in its constructor, or None.

    Ray keeps a failed constructor's error only as text (the traceback's last line names the type)."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, ConfigError):
        return ConfigError(str(cause))
    lines = str(err).strip().splitlines()
    prefix = f"{ConfigError.__module__}.{ConfigError.__qualname__}: "
    if getattr(err, "actor_init_failed", False) and lines and lines[-1].startswith(prefix):
        return ConfigError(lines[-1][len(prefix):])
    return None


def short_error(err: Exception) -> str:
    """A Ray error in one line: the remote exception (type and message) or the last line of the text."""
    cause = getattr(err, "cause", None)
    return f"{type(cause).__name__}: {cause}" if cause is not None else str(err).strip().splitlines()[-1]


__all__ = ["LearnerError", "actor_config_error", "LearnerGroup", "LearnerWorker", "WeightUpdate"]
