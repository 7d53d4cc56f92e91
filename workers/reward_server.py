"""Reward servers: a plain :class:`RewardServer` (batching and checks around a reward plug-in), its Ray actor,
and the driver-side :class:`RewardPool` (replicas, per-call timeouts, retries, restarts).

Failure policy: a replica that dies is restarted by Ray and the call is redone; a call that outlives its
deadline is retried (the hung replica is killed and restarted) and after ``retries`` retries fails the step
with a :class:`RewardServerError` naming the reward; an exception raised by the reward, or a non-finite
score, fails the step at once with the reward's name (retrying a deterministic bug only wastes time).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from rlflow.config import ConfigError, RewardConfig
from rlflow.types import Conditions, Media, RewardOutput
from workers.messages import from_wire, to_wire
from workers.runtime import ActorGone, await_alive


class RewardServerError(RuntimeError):
    """A reward failed a step: the message names the reward server and what went wrong."""


class RewardServer:
    """Scores images with one reward plug-in in batches of at most ``max_batch_size``."""

    def __init__(self, name: str, kwargs: dict[str, Any], max_batch_size: int, replica: int = 0, threads: int = 0):
        from rewards import build_reward

        if threads:
            torch.set_num_threads(threads)
        self.name, self.replica, self.max_batch_size = name, replica, max_batch_size
        self.fn = build_reward(name, kwargs)

    def score(self, media: Media, conditions: Conditions) -> RewardOutput:
        """Wire :class:`Media` and :class:`Conditions` -> a wire :class:`RewardOutput`, in batches."""
        media, conditions = from_wire(media), from_wire(conditions)
        parts = []
        for i in range(0, len(conditions), self.max_batch_size):
            sl = slice(i, i + self.max_batch_size)
            try:
                parts.append(self.fn(media.index(sl), conditions.index(sl)))
            except Exception as err:
                raise RewardServerError(
                    f"reward server '{self.name}' (replica {self.replica}) failed on samples "
                    f"{i}..{min(i + self.max_batch_size, len(conditions)) - 1}: {type(err).__name__}: {err}"
                ) from err
        return to_wire(RewardOutput.cat(parts))

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


class RewardPool:
    """``cfg.replicas`` reward actors; calls are spread round-robin and collected with :meth:`poll`."""

    def __init__(self, cfg: RewardConfig, *, name_prefix: str, threads: int = 0, reserved: dict[str, float] | None = None):
        self.cfg = cfg
        self.label = cfg.name
        _check_fits(cfg, reserved or {})
        safe = "".join(c if c.isalnum() else "-" for c in cfg.name)
        options: dict[str, Any] = {
            "num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus, "max_restarts": -1, "max_task_retries": 0,
        }
        if cfg.runtime_env:
            options["runtime_env"] = cfg.runtime_env
        self.actors = [
            RewardActor.options(name=f"{name_prefix}-reward-{safe}-{i}", **options).remote(  # type: ignore[attr-defined]
                cfg.name, cfg.kwargs, cfg.max_batch_size, i, threads
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
            raise RewardServerError(f"reward server '{self.label}' could not start: {_cause(err)}") from None
        except GetTimeoutError:
            raise RewardServerError(
                f"reward server '{self.label}' did not start within {timeout:g}s (no free resources for "
                f"reward.num_cpus={self.cfg.num_cpus:g} / num_gpus={self.cfg.num_gpus:g}?)"
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
                self.actors[replica], f"reward server '{self.label}' replica {replica}", not_pid=dead_pid
            )
        except ActorGone as err:
            raise RewardServerError(str(err)) from None

    def _retry(self, call: _Call, why: str) -> None:
        call.attempts += 1
        if call.attempts > self.cfg.retries:
            raise RewardServerError(
                f"reward server '{self.label}': a batch of {len(call.conditions)} samples {why} "
                f"on {call.attempts} tries (reward.timeout_s={self.cfg.timeout_s:g}, reward.retries={self.cfg.retries})"
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

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)


def _check_fits(cfg: RewardConfig, reserved: dict[str, float]) -> None:
    """Fail with the config keys to change, instead of waiting forever for resources the cluster does not
    have (``reserved``: what the samplers' and learners' placement group takes)."""
    total = ray.cluster_resources()
    for key, need in (("CPU", cfg.num_cpus), ("GPU", cfg.num_gpus)):
        free = total.get(key, 0.0) - reserved.get(key, 0.0)
        if need * cfg.replicas > free + 1e-9:
            raise ConfigError(
                f"reward.replicas={cfg.replicas} x reward.num_{key.lower()}s={need:g} does not fit: the cluster "
                f"has {free:g} {key} left after the samplers and learners"
            )


def _cause(err: Exception) -> str:
    """The message of the original exception behind a Ray error (without Ray's traceback banner)."""
    cause = getattr(err, "cause", None)
    if isinstance(err, RayTaskError) and cause is not None:
        return str(cause)
    return str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
