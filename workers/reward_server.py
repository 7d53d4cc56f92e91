"""Reward servers: a plain :class:`RewardServer` (batching and checks around a reward plug-in), its Ray actor,
the driver-side :class:`RewardPool` (replicas, per-call timeouts, retries, restarts), and the
:class:`RewardPanel` of one pool per reward of the config (``reward.panel``), whose outputs it fuses.

Failure policy: a replica that dies is restarted by Ray and the call is redone; a call that outlives its
deadline is retried (the hung replica is killed and restarted) and after ``retries`` retries fails the step
with a :class:`RewardServerError` naming the reward; an exception raised by the reward, or a non-finite
score, fails the step at once with the reward's name (retrying a deterministic bug only wastes time).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from rlflow.config import ConfigError, RewardConfig, RewardServerConfig
from rlflow.panel import fuse_outputs
from rlflow.types import Conditions, Media, RewardOutput
from workers.messages import from_wire, to_wire
from workers.runtime import ActorGone, await_alive


class RewardServerError(RuntimeError):
    """A reward failed a step: the message names the reward server and what went wrong."""


class RewardServer:
    """Scores images with one reward plug-in in batches of at most ``max_batch_size``."""

    def __init__(self, name: str, kwargs: dict[str, Any], max_batch_size: int, replica: int = 0, threads: int = 0,
                 key: str = "reward", label: str | None = None):
        from rewards import build_reward

        if threads:
            torch.set_num_threads(threads)
        self.name, self.replica, self.max_batch_size = name, replica, max_batch_size
        self.who = _who(key, label or name)
        self.fn = build_reward(name, kwargs, key=f"{key}.name")

    def score(self, media: Media, conditions: Conditions) -> RewardOutput:
        """Wire :class:`Media` and :class:`Conditions` -> a wire :class:`RewardOutput`, in batches."""
        return to_wire(RewardOutput.cat(self._batched(lambda m, c: self.fn(m, c), media, conditions)))

    def score_and_grad(self, media: Media, conditions: Conditions) -> tuple[RewardOutput, torch.Tensor]:
        """A differentiable reward's wire rewards and ``d score / d pixels`` (see ``NamedReward.score_and_grad``)."""
        parts = self._batched(lambda m, c: self.fn.score_and_grad(m, c), media, conditions)  # type: ignore[attr-defined]
        return to_wire(RewardOutput.cat([p[0] for p in parts])), torch.cat([p[1] for p in parts])

    def _batched(self, call: Any, media: Media, conditions: Conditions) -> list[Any]:
        media, conditions = from_wire(media), from_wire(conditions)
        parts = []
        for i in range(0, len(conditions), self.max_batch_size):
            sl = slice(i, i + self.max_batch_size)
            try:
                parts.append(call(media.index(sl), conditions.index(sl)))
            except Exception as err:
                raise RewardServerError(
                    f"{self.who} (replica {self.replica}) failed on samples "
                    f"{i}..{min(i + self.max_batch_size, len(conditions)) - 1}: {type(err).__name__}: {err}"
                ) from err
        return parts

    def env(self, name: str) -> str | None:
        """An environment variable as the server sees it (checks a reward's runtime_env)."""
        return os.environ.get(name)

    def pid(self) -> int:
        return os.getpid()


@ray.remote(concurrency_groups={"control": 1})
class RewardActor(RewardServer):
    """The actor: ``pid`` answers from its own concurrency group even while a call hangs."""

    @ray.method(concurrency_group="control")
    def pid(self) -> int:
        return os.getpid()


@dataclass
class _Call:
    key: Any
    media: Any  # ObjectRef of the wire Media
    conditions: Conditions
    replica: int = 0
    ref: Any = None
    deadline: float = 0.0
    attempts: int = 0
    result: RewardOutput | None = None
    pid: int | None = None  # the replica incarnation the call went to


def _safe(label: str) -> str:
    """A reward's label as part of an actor name."""
    return "".join(c if c.isalnum() else "-" for c in label)


def _who(key: str, label: str) -> str:
    """How messages name a reward: ``reward server 'name'``, or a panel member's ``reward.panel[1] 'label'``."""
    return f"reward server '{label}'" if key == "reward" else f"{key} '{label}'"


class _Waiting:
    """The blocking half of the pool interface, shared by :class:`RewardPool` and :class:`RewardPanel`: both
    only need ``submit``, ``pending_refs``, ``next_deadline``, ``poll`` and ``pop``."""

    def submit(self, key: Any, media: Any, conditions: Conditions) -> None:
        raise NotImplementedError

    def pending_refs(self) -> list[Any]:
        raise NotImplementedError

    def next_deadline(self) -> float | None:
        raise NotImplementedError

    def poll(self) -> None:
        raise NotImplementedError

    def pop(self, key: Any) -> RewardOutput:
        raise NotImplementedError

    def score(self, keyed: list[tuple[Any, Any, Conditions]]) -> list[RewardOutput]:
        """Blocking convenience: submit ``(key, media_ref, conditions)`` items and wait for all of them."""
        for key, media, conditions in keyed:
            self.submit(key, media, conditions)
        while self.pending_refs():
            self.wait_some()
        return [self.pop(key) for key, _, _ in keyed]

    def wait_some(self, max_wait: float = 1.0) -> None:
        refs = self.pending_refs()
        if refs:
            deadline = self.next_deadline() or time.monotonic()
            timeout = max(0.0, min(max_wait, deadline - time.monotonic()))
            try:
                ray.wait(refs, num_returns=1, timeout=timeout)
            except GetTimeoutError:
                pass
        self.poll()


class RewardPool(_Waiting):
    """``cfg.replicas`` reward actors; calls are spread round-robin and collected with :meth:`poll`.

    ``key``: the config keys of this reward in messages (``reward``, or a panel member's ``reward.panel[1]``);
    ``label``: its name in messages and in its actors' names (default: the reward's name)."""

    def __init__(self, cfg: RewardServerConfig, *, name_prefix: str, threads: int = 0, key: str = "reward",
                 label: str | None = None):
        self.cfg, self.key = cfg, key
        self.label = label or cfg.name
        self.who = _who(key, self.label)
        safe = _safe(self.label)
        options: dict[str, Any] = {
            "num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus, "max_restarts": -1, "max_task_retries": 0,
        }
        if cfg.runtime_env:
            options["runtime_env"] = cfg.runtime_env
        self.actors = [
            RewardActor.options(name=f"{name_prefix}-reward-{safe}-{i}", **options).remote(  # type: ignore[attr-defined]
                cfg.name, cfg.kwargs, cfg.max_batch_size, i, threads, key, self.label
            )
            for i in range(cfg.replicas)
        ]
        self._calls: dict[Any, _Call] = {}
        self._next = 0
        self._pids: list[int | None] = [None] * len(self.actors)

    def ready(self, timeout: float = 600.0) -> None:
        """Wait until every replica has built its reward (a bad reward name or import fails here)."""
        try:
            self._pids = list(ray.get([a.pid.remote() for a in self.actors], timeout=timeout))
        except RayActorError as err:
            raise RewardServerError(f"{self.who} could not start: {_cause(err)}") from None
        except GetTimeoutError:
            raise RewardServerError(
                f"{self.who} did not start within {timeout:g}s (no free resources for "
                f"{self.key}.num_cpus={self.cfg.num_cpus:g} / num_gpus={self.cfg.num_gpus:g}?)"
            ) from None

    # ---- calls
    def submit(self, key: Any, media: Any, conditions: Conditions) -> None:
        """Score ``media`` (an ObjectRef of wire :class:`Media`) under ``key``; read it with :meth:`pop`."""
        call = _Call(key=key, media=media, conditions=conditions, replica=self._next % len(self.actors))
        self._next += 1
        self._calls[key] = call
        self._dispatch(call)

    def _dispatch(self, call: _Call) -> None:
        actor = self.actors[call.replica]
        ahead = [c for c in self._calls.values() if c.replica == call.replica and c.result is None and c.ref is not None]
        call.ref = actor.score.remote(call.media, to_wire(call.conditions))
        call.pid = self._pids[call.replica]
        call.deadline = time.monotonic() + self.cfg.timeout_s * (1 + len(ahead))

    def pending_refs(self) -> list[Any]:
        return [c.ref for c in self._calls.values() if c.result is None]

    def next_deadline(self) -> float | None:
        open_calls = [c.deadline for c in self._calls.values() if c.result is None]
        return min(open_calls) if open_calls else None

    def poll(self) -> None:
        """Collect finished calls; retry lost or late ones; raise :class:`RewardServerError` on failure."""
        open_calls = [c for c in self._calls.values() if c.result is None]
        if not open_calls:
            return
        done, _ = ray.wait([c.ref for c in open_calls], num_returns=len(open_calls), timeout=0)
        done_set = set(done)
        now = time.monotonic()
        for call in open_calls:
            if call.ref in done_set:
                self._finish(call)
            elif now > call.deadline:
                self._timeout(call)

    def _finish(self, call: _Call) -> None:
        try:
            call.result = from_wire(ray.get(call.ref))
        except RayTaskError as err:
            raise RewardServerError(_cause(err)) from None
        except RayActorError:
            self._await(call.replica, call.pid)
            self._retry(call, f"replica {call.replica} died")

    def _timeout(self, call: _Call) -> None:
        """Kill the hung replica (Ray restarts it) and redo every call that was waiting on it."""
        replica = call.replica
        ray.kill(self.actors[replica], no_restart=False)
        waiting = [c for c in self._calls.values() if c.replica == replica and c.result is None and c is not call]
        self._await(replica, self._pids[replica])
        self._retry(call, f"timed out after {self.cfg.timeout_s:g}s")
        for other in waiting:
            self._dispatch(other)

    def _await(self, replica: int, dead_pid: int | None) -> None:
        """Wait for an incarnation of ``replica`` other than the dead one (pid ``dead_pid``); returns at once
        when a newer one is already known (several calls lost with one incarnation)."""
        if self._pids[replica] != dead_pid:
            return
        try:
            self._pids[replica] = await_alive(
                self.actors[replica], f"{self.who} replica {replica}", not_pid=dead_pid
            )
        except ActorGone as err:
            raise RewardServerError(str(err)) from None

    def _retry(self, call: _Call, why: str) -> None:
        call.attempts += 1
        if call.attempts > self.cfg.retries:
            raise RewardServerError(
                f"{self.who}: a batch of {len(call.conditions)} samples {why} on {call.attempts} tries "
                f"({self.key}.timeout_s={self.cfg.timeout_s:g}, {self.key}.retries={self.cfg.retries})"
            )
        call.replica = (call.replica + 1) % len(self.actors)
        self._dispatch(call)

    def result(self, key: Any) -> RewardOutput | None:
        call = self._calls.get(key)
        return call.result if call else None

    def pop(self, key: Any) -> RewardOutput:
        call = self._calls.pop(key)
        assert call.result is not None
        return call.result

    def discard(self, key: Any) -> None:
        self._calls.pop(key, None)

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)


class RewardPanel(_Waiting):
    """One :class:`RewardPool` per reward of ``cfg`` (a config without ``reward.panel``: one pool, as ever),
    with the pool's interface: a call is sent to every member and :meth:`pop` returns the members' outputs
    fused (:func:`rlflow.panel.fuse_outputs`). ``threads``: torch threads of an actor of ``num_cpus`` CPUs."""

    def __init__(self, cfg: RewardConfig, *, name_prefix: str, threads: Callable[[float], int] = lambda _: 0,
                 reserved: dict[str, float] | None = None):
        self.cfg = cfg
        _check_fits(cfg, reserved or {})
        self.pools: list[RewardPool] = []
        taken: set[str] = set()
        try:
            for i, (key, m) in enumerate(cfg.members()):
                # actors are named <prefix>-reward-<label>-<replica>; labels that read alike get the member's index
                safe = _safe(m.component)
                prefix = name_prefix if safe not in taken else f"{name_prefix}-{i}"
                taken.add(safe)
                self.pools.append(RewardPool(m, name_prefix=prefix, threads=threads(m.num_cpus), key=key,
                                             label=m.component))
        except BaseException:
            self.shutdown()
            raise

    def ready(self, timeout: float = 600.0) -> None:
        """Wait until every member's replicas have built their rewards."""
        for pool in self.pools:
            pool.ready(timeout)

    def submit(self, key: Any, media: Any, conditions: Conditions) -> None:
        for pool in self.pools:
            pool.submit(key, media, conditions)

    def pending_refs(self) -> list[Any]:
        return [r for pool in self.pools for r in pool.pending_refs()]

    def next_deadline(self) -> float | None:
        deadlines = [d for pool in self.pools if (d := pool.next_deadline()) is not None]
        return min(deadlines) if deadlines else None

    def poll(self) -> None:
        for pool in self.pools:
            pool.poll()

    def result(self, key: Any) -> RewardOutput | None:
        outs = [pool.result(key) for pool in self.pools]
        if any(o is None for o in outs):
            return None
        return fuse_outputs(self.cfg, [o for o in outs if o is not None])

    def pop(self, key: Any) -> RewardOutput:
        return fuse_outputs(self.cfg, [pool.pop(key) for pool in self.pools])

    def discard(self, key: Any) -> None:
        for pool in self.pools:
            pool.discard(key)

    def shutdown(self) -> None:
        for pool in self.pools:
            pool.shutdown()


def reward_resources(cfg: RewardConfig) -> dict[str, float]:
    """The CPUs and GPUs all of the config's reward actors take (every member's replicas)."""
    members = [m for _, m in cfg.members()]
    return {"CPU": sum(m.num_cpus * m.replicas for m in members), "GPU": sum(m.num_gpus * m.replicas for m in members)}


def _check_fits(cfg: RewardConfig, reserved: dict[str, float]) -> None:
    """Fail with the config keys to change, instead of waiting forever for resources the cluster does not
    have (``reserved``: what the samplers' and learners' placement group takes). A panel's members count
    together."""
    total = ray.cluster_resources()
    members = cfg.members()
    for key, need in reward_resources(cfg).items():
        free = total.get(key, 0.0) - reserved.get(key, 0.0)
        if need > free + 1e-9:
            res = f"num_{key.lower()}s"
            asks = " + ".join(f"{k}.replicas={m.replicas} x {k}.{res}={getattr(m, res):g}" for k, m in members)
            raise ConfigError(
                f"{asks} does not fit: the cluster has {free:g} {key} left after the samplers and learners"
            )


def _cause(err: Exception) -> str:
    """The message of the original exception behind a Ray error (without Ray's traceback banner)."""
    cause = getattr(err, "cause", None)
    if isinstance(err, RayTaskError) and cause is not None:
        return str(cause)
    return str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
