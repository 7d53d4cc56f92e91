"""Weight transport as objects (``ray.weight_transport``): how learner rank 0's sampling weights reach the
sampler actors. The executor's stages call :meth:`publish`, :meth:`send`, :meth:`check` and
:meth:`member_lost` and never ask which transport it is.

``ObjectStoreTransport``: rank 0 ``ray.put``s one :class:`WeightUpdate` per version (kept for the last two
versions) and each sampler loads the reference (the driver only passes it on).
``CollectiveTransport``: rank 0 and the samplers form their own process group and rank 0 broadcasts each
send; a dead member breaks the group, which every member then forms anew.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from rlflow.config import Config, ConfigError
from workers.learner import LearnerGroup, short_error
from workers.runtime import ActorGone, await_alive


class SamplerError(RuntimeError):
    """Rollout chunks could not be produced (sampler actors kept dying or raised)."""


class ObjectStoreTransport:
    name = "object_store"

    def __init__(self, cfg: Config, learners: LearnerGroup, samplers: list[Any]) -> None:
        self.kind, self.learners, self.samplers = cfg.ray.weight_sync, learners, samplers
        self.refs: dict[int, Any] = {}
        self.regroups = 0

    def form(self, *, wait: bool = True) -> None:
        """Nothing to form."""

    def publish(self, version: int) -> None:
        """Rank 0 puts ``version`` (current, or a kept older one) in the store; the two newest stay."""
        self.refs[version] = self.learners.publish(self.kind, version)
        for v in [v for v in self.refs if v < max(self.refs) - 1]:
            del self.refs[v]

    def has(self, version: int) -> bool:
        return version in self.refs

    @property
    def latest(self) -> int:
        return max(self.refs)

    def send(self, version: int, only: list[int] | None = None) -> list[Any]:
        """Queue the load of ``version`` on samplers (after their queued calls); returns their acks."""
        idx = range(len(self.samplers)) if only is None else only
        return [self.samplers[i].set_weights.remote(self.refs[version]) for i in idx]

    def member_lost(self, where: str) -> None:
        """A restarted sampler needs only the next send."""

    def check(self) -> None:
        """Nothing runs in the background."""


class CollectiveTransport:
    name = "collective"

    def __init__(self, cfg: Config, learners: LearnerGroup, samplers: list[Any]) -> None:
        self.cfg, self.kind, self.learners, self.samplers = cfg, cfg.ray.weight_sync, learners, samplers
        self.versions: set[int] = set()
        self.broadcasts: list[Any] = []  # rank 0's broadcast calls in the current group
        self.regroups = 0

    def form(self, *, wait: bool = True) -> None:
        """Learner rank 0 and every sampler form a fresh broadcast group (joins queue behind their work)."""
        refs = form_weight_group(self.cfg, self.learners, self.samplers)
        self.broadcasts = []  # failures of the old group's broadcasts are expected now: forget them
        if wait:
            try:
                ray.get(refs)
            except (RayActorError, RayTaskError) as err:
                raise SamplerError(f"the weight broadcast group could not form: {err}") from None

    def publish(self, version: int) -> None:
        """Nothing to put: rank 0 broadcasts on each send."""
        self.versions = {v for v in self.versions if v >= version - 1} | {version}

    def has(self, version: int) -> bool:
        return version in self.versions

    @property
    def latest(self) -> int:
        return max(self.versions)

    def send(self, version: int, only: list[int] | None = None) -> list[Any]:
        """A broadcast goes to every sampler, whatever ``only`` says (every member takes part)."""
        self.broadcasts.append(self.learners.broadcast(self.kind, version))
        return [s.receive_weights.remote(self.kind) for s in self.samplers]

    def member_lost(self, where: str) -> None:
        """A dead member broke the group: wait for every sampler, then form a new one."""
        self.regroups += 1
        if self.regroups > self.cfg.ray.max_restarts * max(1, len(self.samplers)) + 1:
            raise SamplerError(f"{where}: the weight broadcast group broke {self.regroups} times")
        for i, s in enumerate(self.samplers):
            try:
                await_alive(s, f"sampler {i}")
            except ActorGone as err:
                raise SamplerError(f"{where}: {err}") from None
        self.form(wait=False)

    def check(self) -> None:
        """Rank 0's finished broadcasts; one that failed (a member died when no chunk noticed) regroups and
        sends the latest weights again."""
        done, self.broadcasts = split_ready(self.broadcasts)
        for ref in done:
            try:
                ray.get(ref)
            except (RayActorError, RayTaskError) as err:
                if isinstance(err, RayTaskError) and "Connection closed" not in str(err):
                    raise SamplerError(f"weight broadcast failed: {short_error(err)}") from None
                self.member_lost("weight sync")
                if self.versions:
                    self.send(self.latest)
                return


Transport = ObjectStoreTransport | CollectiveTransport
TRANSPORTS: dict[str, type[ObjectStoreTransport] | type[CollectiveTransport]] = {
    "object_store": ObjectStoreTransport, "collective": CollectiveTransport,
}


def split_ready(refs: list[Any]) -> tuple[list[Any], list[Any]]:
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
    placed on one GPU (:func:`workers.placement.shared_gpus`; fractional ``num_gpus`` on a node with too few
    GPUs): NCCL refuses them, so ``auto`` falls back to the object store and an explicit ``collective`` is an
    error."""
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
