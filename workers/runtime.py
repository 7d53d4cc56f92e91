"""Connecting to Ray: an embedded local cluster by default, an existing one with ``address``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError

from rlflow.config import Config, ConfigError
from workers.placement import plan


def actor_threads(cfg: Config, num_cpus: float) -> int:
    """torch CPU threads of an actor holding ``num_cpus`` CPUs (0 = all cores).

    ``train.threads`` wins when set. Otherwise actors that take turns (sequential / sync pipelines) may each
    use every core, while actors that run at the same time (one_step_off) keep to their own CPUs: two
    OpenMP pools on the same cores slowed a 2-core machine's step from 2.3 s to 7.4 s (measured).
    """
    if cfg.train.threads:
        return cfg.train.threads
    if cfg.ray.pipeline == "one_step_off":
        return max(1, int(num_cpus))
    return 0


def logical_cpus(cfg: Config) -> int:
    """CPUs an embedded cluster advertises: the machine's cores, or more when the actors ask for more
    (actors of a sync pipeline take turns, so on a laptop they may share cores)."""
    need = plan(cfg.ray).total().get("CPU", 0.0) + sum(m.num_cpus * m.replicas for _, m in cfg.reward.members())
    return max(os.cpu_count() or 1, int(need + 0.999))


def disconnect() -> None:
    """Leave Ray: an embedded cluster shuts down with it; a joined cluster keeps running."""
    if ray.is_initialized():
        ray.shutdown()


def connect(cfg: Config, address: str | None = None, working_dir: str | None = None) -> str:
    """Connect this process to Ray; returns a description of the cluster.

    ``address`` (or ``ray.address``, or ``RAY_ADDRESS`` as set inside a Ray job): join that cluster
    (``HOST:6379`` or ``auto``). Otherwise start an embedded local cluster sized by :func:`logical_cpus`.
    ``working_dir``: ship that folder to every worker (as ``rlflow submit`` does), so reward plug-ins and
    code that live only on this machine import on the cluster's nodes.
    """
    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    runtime_env = None
    if working_dir:
        from rlflow.workdir import EXCLUDES

        wd = Path(working_dir).expanduser().resolve()
        if not wd.is_dir():
            raise ConfigError(f"--working-dir {working_dir}: not a directory")
        runtime_env = {"working_dir": str(wd), "excludes": list(EXCLUDES)}
    target = address or cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if target:
        ray.init(address=target, logging_level="WARNING", runtime_env=runtime_env)
        return f"joined {ray.get_runtime_context().gcs_address}"
    ray.init(address="local", num_cpus=logical_cpus(cfg), include_dashboard=False, logging_level="WARNING",
             runtime_env=runtime_env)
    return f"embedded local Ray ({logical_cpus(cfg)} CPUs)"


class ActorGone(RuntimeError):
    """An actor did not come back: dead for good (restarts used up) or restarting for too long."""


def await_alive(actor: Any, label: str, *, not_pid: int | None = None, timeout: float = 300.0) -> int:
    """Wait while Ray restarts ``actor``; returns the pid of the incarnation that answered.

    Calls to a restarting actor fail at once instead of queueing, so a redo must wait for the new
    incarnation; ``not_pid`` (the old one's pid) skips a ping answered by an old incarnation that a
    ``ray.kill`` has not finished off yet. The actor's ``pid`` method must not queue behind work
    (a separate concurrency group).
    """
    end = time.monotonic() + timeout
    while True:
        try:
            pid = int(ray.get(actor.pid.remote(), timeout=max(1.0, end - time.monotonic())))
            if pid != not_pid:
                return pid
        except ActorUnavailableError:
            pass
        except GetTimeoutError:
            raise ActorGone(f"{label} did not answer a health check within {timeout:g}s") from None
        except ActorDiedError as err:
            raise ActorGone(f"{label} died and was not restarted: {str(err).strip().splitlines()[0]}") from None
        if time.monotonic() > end:
            raise ActorGone(f"{label} did not come back within {timeout:g}s")
        time.sleep(0.2)
