"""Run ``rlflow train`` as a Ray job: thin functions over ``ray.job_submission.JobSubmissionClient``.

``submit`` validates the config locally (a bad config never reaches the cluster), creates the MLflow run
client-side (status SCHEDULED, tagged with the Ray job id and address) and submits
``python -m rlflow train .rlflow-job/config.yaml`` with the validated config as that file of the job's
working-dir package (:func:`package_working_dir`; why there: :func:`submit`); the job re-opens that MLflow
run (``RLFLOW_MLFLOW_RUN_ID``). The other functions look jobs up, stream their logs and stop them. Every
failure to reach the cluster or find a job is a ``JobsError`` naming the address.

Address resolution: the explicit argument, else ``$RAY_ADDRESS``, else ``http://127.0.0.1:8265`` (the Ray
dashboard / job server of the head node); ``HOST:PORT`` without a scheme gets ``http://``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import socket
import stat
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import yaml

from rlflow.config import ConfigError, check_device, load_config, to_dict
from rlflow.redact import MASK, redact_text
from rlflow.workdir import EXCLUDES

__all__ = [
    "DEFAULT_ADDRESS",
    "EXCLUDES",
    "TERMINAL",
    "JobState",
    "JobsError",
    "SubmittedJob",
    "close_mlflow_run",
    "follow",
    "list_jobs",
    "logs",
    "package_working_dir",
    "resolve_address",
    "status",
    "stop",
    "submit",
    "wait",
]

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
JOB_CONFIG = ".rlflow-job/config.yaml"  # in the job's working dir: the validated config, secrets included
CONNECT_TIMEOUT_S = 5.0

# Ray's INFO notes per ignored file and per closed log stream, and its warning that .git/.venv are now
# left out of working dirs by default (EXCLUDES leaves them out anyway)
_QUIET_LOGGERS = {
    "ray._private.runtime_env.packaging": logging.WARNING,
    "ray.dashboard.modules.job.sdk": logging.WARNING,
    "ray._private.runtime_env.working_dir": logging.ERROR,
}
_META = "rlflow."  # prefix of the job metadata keys rlflow sets


class JobsError(ConfigError):
    """The cluster cannot be reached, the job does not exist, or the job server refused a request."""


@dataclass(frozen=True)
class SubmittedJob:
    job_id: str
    address: str
    mlflow_run_id: str
    mlflow_run_url: str
    tracking_uri: str


@dataclass(frozen=True)
class JobState:
    """What the job server knows about one job (times are Unix seconds)."""

    job_id: str
    status: str
    message: str
    entrypoint: str
    start_time: float | None
    end_time: float | None
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    @property
    def rlflow(self) -> dict[str, str]:
        """The rlflow metadata, keys without the ``rlflow.`` prefix."""
        return {k[len(_META) :]: v for k, v in self.metadata.items() if k.startswith(_META)}


# --------------------------------------------------------------------------- address and client


def resolve_address(address: str | None = None) -> str:
    """``address``, else ``$RAY_ADDRESS``, else the local default; ``http://`` added when there is no scheme."""
    addr = (address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS).strip().rstrip("/")
    if "://" not in addr:
        addr = f"http://{addr}"
    return addr


def _probe(address: str, what: str = "the Ray cluster") -> None:
    """Fail fast (seconds, not the OS connect timeout or a client's retries) when nothing answers."""
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise JobsError(f"the address of {what}, {address!r}, must be http(s)://HOST:PORT")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as err:
        raise JobsError(f"the address of {what}, {address!r}: {err}") from None
    try:
        with socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        raise JobsError(f"cannot reach {what} at {address}: {err}") from None


@contextmanager
def _without_ray_address_env() -> Iterator[None]:
    # JobSubmissionClient lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override its argument; the address we
    # resolved (which already honours RAY_ADDRESS when no address was given) must win.
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _local_token() -> str | None:
    """The Ray auth token this machine has, where Ray keeps it: ``$RAY_AUTH_TOKEN``, the file
    ``$RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _client(address: str) -> Any:
    _probe(address)
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    for name, level in _QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    try:
        with _without_ray_address_env():
            try:
                return JobSubmissionClient(address)
            except AuthenticationError:
                # A cluster with token auth (the default of local clusters since Ray 2.59) while this
                # process has RAY_AUTH_MODE unset, so Ray sent no token: send the local one, as ray.init does.
                token = _local_token()
                if token is None:
                    raise
                return JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
    except AuthenticationError as err:
        raise JobsError(
            f"the Ray cluster at {address} requires its auth token: set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) "
            f"to the cluster's token ({str(err).splitlines()[0]})"
        ) from None
    except (ConnectionError, RuntimeError, OSError) as err:
        raise JobsError(f"cannot reach the Ray cluster at {address}: {err}") from None


def _request_error(err: Exception, job_id: str, address: str) -> JobsError:
    text = str(err)
    if "404" in text or "does not exist" in text:
        return JobsError(f"no job {job_id!r} on the Ray cluster at {address}")
    return JobsError(f"Ray job server at {address}, job {job_id}: {text}")


def _state(details: Any) -> JobState:
    def secs(ms: int | None) -> float | None:
        return None if ms is None else ms / 1000.0

    raw_status = details.status
    return JobState(
        job_id=details.submission_id or details.job_id or "",
        status=str(getattr(raw_status, "value", raw_status)),
        message=details.message or "",
        entrypoint=details.entrypoint or "",
        start_time=secs(details.start_time),
        end_time=secs(details.end_time),
        metadata=dict(details.metadata or {}),
    )


# --------------------------------------------------------------------------- submit


def _submission_id(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "run"
    return f"rlflow-{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def package_working_dir(working_dir: Path, config_yaml: str, dest: Path) -> Path:
    """Write ``dest``, the zip of the job's working dir that Ray uploads as is: ``working_dir`` packed by Ray's
    own packer as Ray packs a working-dir folder (its .gitignore and Ray's default excludes honoured) less
    :data:`~rlflow.workdir.EXCLUDES` (dotenv files among them), plus ``config_yaml`` at :data:`JOB_CONFIG`
    (mode 0600; a file of that name in ``working_dir`` is left out)."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import create_package

    excludes = [*ray_constants.get_runtime_env_default_excludes(), *EXCLUDES, JOB_CONFIG.split("/")[0]]
    include_gitignore = os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    create_package(str(working_dir), dest, include_gitignore=include_gitignore, include_parent_dir=False,
                   excludes=excludes)
    entry = zipfile.ZipInfo(JOB_CONFIG, date_time=time.localtime()[:6])
    entry.external_attr = (stat.S_IFREG | 0o600) << 16
    with zipfile.ZipFile(dest, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(entry, config_yaml)
    return dest


def submit(
    config: str,
    address: str | None,
    overrides: list[str] | None = None,
    *,
    working_dir: str = ".",
    python: str = "python",
    entrypoint_num_cpus: float = 0,
    job_id: str | None = None,
) -> SubmittedJob:
    """Validate ``config`` (+ ``overrides``) here, create its MLflow run, submit it as a Ray job.

    ``entrypoint_num_cpus`` is the CPU reservation of the driver (``rlflow train``) itself; 0 (Ray's
    default) leaves every CPU of the cluster to the actors the trainer starts.

    Secrets: the Jobs API hands every job's entrypoint, ``runtime_env`` (its env vars too) and metadata to
    anyone who can reach the job server, so none of them carries the config or a credential: the env vars
    and metadata hold ids and URIs with their credentials masked (:func:`rlflow.redact.redact_text`). The
    job needs the whole config (reward kwargs, the reward's ``runtime_env`` env vars, credentials of
    ``tracking.tracking_uri``), so it travels as a file of the working-dir package
    (:func:`package_working_dir`), which the job server keeps in the cluster's GCS and unpacks only on the
    cluster's nodes; its HTTP API answers whether a package exists, never what it holds. (Whoever may submit
    jobs runs code on the cluster and can read anything there: that is Ray's trust boundary.) The prompt
    files and model folder are not checked here: they are read on the cluster, where ``rlflow train``
    checks them before any work.
    """
    from rlflow.tracking import Tracker, default_tracking_uri

    cfg = load_config(config, list(overrides or []))
    check_device(cfg, on_ray=True)
    out_dir = Path(cfg.output_dir).expanduser()
    abs_out = str(out_dir.resolve())
    if not out_dir.is_absolute():
        print(
            f"rlflow: warning: output_dir {cfg.output_dir!r} is relative; inside the job it would be a folder "
            f"of the job's temporary working dir, so the job gets {abs_out} (a path on this machine: for a "
            "remote cluster set output_dir to a folder the cluster nodes share)",
            file=sys.stderr,
        )
    wd = Path(working_dir).expanduser().resolve()
    if not wd.is_dir():
        raise ConfigError(f"--working-dir {working_dir}: not a directory")

    address = resolve_address(address)
    client = _client(address)  # before any MLflow store is touched: an unreachable cluster leaves nothing
    uri = cfg.tracking.tracking_uri or default_tracking_uri(abs_out)
    if uri.startswith(("http://", "https://")):
        _probe(uri, "the MLflow tracking server")

    raw = to_dict(cfg)
    raw["output_dir"] = abs_out
    raw.setdefault("tracking", {})["tracking_uri"] = uri
    sub_id = job_id or _submission_id(cfg.name)
    run_name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        tracker = Tracker(
            uri,
            cfg.tracking.experiment,
            run_name=run_name,
            tags={"rlflow.ray_job_id": sub_id, "rlflow.ray_address": redact_text(address),
                  "rlflow.config": str(config)},
        )
        tracker.client.update_run(tracker.run_id, "SCHEDULED")
    except Exception as err:  # MlflowException, OSError, ...: nothing was submitted
        raise JobsError(f"cannot create the MLflow run in {uri}: {str(err).splitlines()[0]}") from None
    env_vars = {
        "RLFLOW_MLFLOW_RUN_ID": tracker.run_id,
        "RLFLOW_RUN_NAME": run_name,  # the job's run folder takes the MLflow run's name
        "RLFLOW_RAY_JOB_ID": sub_id,
        "RLFLOW_RAY_ADDRESS": redact_text(address),
        "PYTHONUNBUFFERED": "1",  # logs stream while the job runs
    }
    metadata = {
        "rlflow.name": cfg.name,
        "rlflow.config": str(config),
        "rlflow.mlflow_run_id": tracker.run_id,
        "rlflow.tracking_uri": redact_text(uri),
    }
    try:
        with tempfile.TemporaryDirectory(prefix="rlflow-job-") as tmp:  # 0700; gone once uploaded
            package = package_working_dir(wd, yaml.safe_dump(raw, sort_keys=False), Path(tmp) / "working_dir.zip")
            got = client.submit_job(
                entrypoint=f"{python} -m rlflow train {JOB_CONFIG}",
                submission_id=sub_id,
                runtime_env={"working_dir": str(package), "env_vars": env_vars},
                metadata=metadata,
                entrypoint_num_cpus=entrypoint_num_cpus,
            )
    except Exception as err:
        tracker.set_tags({"rlflow.submit_error": str(err)[:5000]})
        tracker.finish("FAILED")
        if isinstance(err, ConnectionError | OSError):
            raise JobsError(f"cannot reach the Ray cluster at {address}: {err}") from None
        raise JobsError(f"the Ray job server at {address} refused the job: {err}") from None
    return SubmittedJob(
        job_id=str(got), address=address, mlflow_run_id=tracker.run_id, mlflow_run_url=tracker.run_url,
        tracking_uri=uri,
    )


# --------------------------------------------------------------------------- look up, follow, stop


def status(job_id: str, address: str | None = None) -> JobState:
    address = resolve_address(address)
    client = _client(address)
    try:
        return _state(client.get_job_info(job_id))
    except (RuntimeError, OSError) as err:
        raise _request_error(err, job_id, address) from None


def logs(job_id: str, address: str | None = None) -> str:
    address = resolve_address(address)
    client = _client(address)
    try:
        return str(client.get_job_logs(job_id))
    except (RuntimeError, OSError) as err:
        raise _request_error(err, job_id, address) from None


def wait(job_id: str, address: str | None = None, timeout: float = 600.0, poll: float = 1.0) -> JobState:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED; TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        state = status(job_id, address)
        if state.done:
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {state.status} after {timeout:.0f} s")
        time.sleep(poll)


def follow(job_id: str, address: str | None = None, out: TextIO | None = None) -> str:
    """Stream the job's logs to ``out`` (stdout) until it ends; returns its final status."""
    address = resolve_address(address)
    client = _client(address)
    stream = sys.stdout if out is None else out
    try:
        client.get_job_info(job_id)  # a clear error for an unknown job, before opening the websocket
    except (RuntimeError, OSError) as err:
        raise _request_error(err, job_id, address) from None

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            stream.write(chunk)
            stream.flush()

    try:
        asyncio.run(_tail())
    except (RuntimeError, OSError) as err:  # the connection dropped before the job ended: poll below
        print(f"rlflow: log stream of {job_id} ended early ({err}); waiting for the job", file=sys.stderr)
    return wait(job_id, address).status


def stop(job_id: str, address: str | None = None) -> bool:
    """Ask the job server to stop the job; True if it was running (False: it had already ended).

    The status is checked first: Ray's ``stop_job`` also answers True for a job that has just ended while its
    supervisor actor lingers, which made a second ``rlflow stop`` report a stop request for a STOPPED job."""
    address = resolve_address(address)
    client = _client(address)
    try:
        if _state(client.get_job_info(job_id)).done:
            return False
        return bool(client.stop_job(job_id))
    except (RuntimeError, OSError) as err:
        raise _request_error(err, job_id, address) from None


def list_jobs(address: str | None = None) -> list[JobState]:
    """Every job the cluster knows (oldest first)."""
    address = resolve_address(address)
    client = _client(address)
    try:
        jobs = [_state(d) for d in client.list_jobs()]
    except (RuntimeError, OSError) as err:
        raise JobsError(f"Ray job server at {address}: {err}") from None
    return sorted(jobs, key=lambda j: (j.start_time or 0.0, j.job_id))


def close_mlflow_run(state: JobState) -> str | None:
    """After a job ended, end its MLflow run if the job could not (killed, or died before training started).

    STOPPED -> KILLED, FAILED -> FAILED, SUCCEEDED -> left alone. Returns the status set, or None. The job's
    metadata has the tracking URI without its credentials: MLflow then takes them from this machine's
    ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (or ``MLFLOW_TRACKING_TOKEN``).
    """
    info = state.rlflow
    run_id, uri = info.get("mlflow_run_id"), info.get("tracking_uri", "").replace(f"{MASK}@", "")
    if not state.done or state.status == "SUCCEEDED" or not run_id or not uri:
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
    except Exception:  # the store is gone or unreachable: nothing to reconcile
        return None
    if run.info.status not in ("SCHEDULED", "RUNNING"):
        return None
    new = "KILLED" if state.status == "STOPPED" else "FAILED"
    client.set_terminated(run_id, status=new)
    return new
