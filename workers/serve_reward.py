"""A config's reward as a Ray Serve application (``rlflow serve-reward``): several runs score with one pool of
reward replicas over HTTP, protocol ``rlflow-reward/1`` (``rewards/http.py``), with ``reward.name: http``.

Each replica holds a :class:`workers.reward_server.RewardServer` (the reward plug-in, built by
``rewards.build_reward`` with ``reward.kwargs``, scoring in batches of ``reward.max_batch_size``, with the
same length and finiteness checks as inside a run); ``reward.replicas`` replicas, each with
``reward.num_cpus`` / ``reward.num_gpus`` and ``reward.runtime_env``. A replica scores one request at a time
(reward models are rarely thread-safe); Serve spreads concurrent requests over the replicas.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any

from rlflow.config import ConfigError, RewardConfig
from rlflow.types import RewardOutput
from workers.messages import from_wire
from workers.reward_server import RewardServer, RewardServerError

_MAX_ONGOING = 8  # requests queued at one replica before Serve routes elsewhere (or answers 503)


def handle(server: RewardServer, body: bytes) -> tuple[int, dict[str, Any]]:
    """One protocol request -> ``(HTTP status, answer)``: 200 scores, 400 a malformed request, 422 the reward
    failed, 500 anything else. Plain code (no Serve) so it is tested, and reusable, on its own."""
    from rewards.http import ProtocolError, decode_request, encode_response, error_response

    try:
        media, conditions = decode_request(json.loads(body))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return 400, error_response(f"the request is not JSON: {err}")
    except ProtocolError as err:
        return 400, error_response(f"malformed request: {err}")
    try:
        out: RewardOutput = from_wire(server.score(media, conditions))
    except RewardServerError as err:
        return 422, error_response(str(err))
    except Exception as err:  # noqa: BLE001  (answered, and logged by Serve's access log)
        return 500, error_response(f"reward server '{server.name}': {type(err).__name__}: {err}")
    return 200, encode_response(out, server.name)


def _deployment() -> Any:
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response

    @serve.deployment(name="reward", max_ongoing_requests=_MAX_ONGOING)
    class RewardDeployment:
        def __init__(self, name: str, kwargs: dict[str, Any], max_batch_size: int, threads: int = 0):
            self.server = RewardServer(name, kwargs, max_batch_size, threads=threads)
            self.lock = asyncio.Lock()

        async def __call__(self, request: Request) -> Response:
            from rewards.http import PROTOCOL

            if request.method == "GET":  # what is served here (a health check)
                status, answer = 200, {"protocol": PROTOCOL, "reward": self.server.name,
                                       "max_batch_size": self.server.max_batch_size}
            else:
                body = await request.body()
                async with self.lock:  # one scoring call at a time; the event loop stays free
                    status, answer = await asyncio.to_thread(handle, self.server, body)
            return Response(json.dumps(answer), status_code=status, media_type="application/json")

    return RewardDeployment


def reward_app(cfg: RewardConfig, threads: int = 0) -> Any:
    """The Serve application of ``cfg``'s reward (``Deployment.bind``)."""
    if getattr(cfg, "is_panel", False):
        raise ConfigError("reward.panel: serve-reward serves one reward; serve each panel member with a config of "
                          "its own (its reward.name and reward.kwargs)")
    if cfg.name == "http":
        raise ConfigError("reward.name 'http' scores with another server; serve-reward serves a reward itself "
                          "(set reward.name to the reward to serve)")
    actor: dict[str, Any] = {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus}
    if cfg.runtime_env:
        actor["runtime_env"] = cfg.runtime_env
    return _deployment().options(num_replicas=cfg.replicas, ray_actor_options=actor).bind(
        cfg.name, cfg.kwargs, cfg.max_batch_size, threads)


def app_name(cfg: RewardConfig) -> str:
    return "rlflow-reward-" + "".join(c if c.isalnum() or c in "-_" else "-" for c in cfg.name)


def serve_reward(cfg: RewardConfig, *, host: str = "127.0.0.1", port: int = 8000, route: str = "/score",
                 name: str | None = None, threads: int = 0) -> str:
    """Deploy ``cfg``'s reward on the connected Ray cluster (Serve's HTTP proxy on ``host:port``), wait until
    its replicas run; returns the URL to put in ``reward.kwargs.url``."""
    from ray import serve

    if not route.startswith("/"):
        raise ConfigError(f"--route {route!r} must start with '/'")
    serve.start(http_options={"host": host, "port": port})
    running = _http_address()
    if running is not None and running != (host, port):  # Serve keeps the options it started with
        raise ConfigError(f"Ray Serve already runs on this cluster with its HTTP proxy on {running[0]}:{running[1]} "
                          f"(it cannot move): use --host {running[0]} --port {running[1]}")
    serve.run(reward_app(cfg, threads), name=name or app_name(cfg), route_prefix=route)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}{route}"


def _http_address() -> tuple[str, int] | None:
    """``(host, port)`` of the running Serve instance's HTTP proxy (``None`` where Serve does not say)."""
    try:
        from ray.serve.context import _get_global_client

        cfg = _get_global_client().http_config
        return str(cfg.host), int(cfg.port)
    except (ImportError, AttributeError):  # a private API: skip the check where it moved
        return None


# ---- measured overhead (rlflow bench reward-http)
def bench_overhead(cfg: RewardConfig, *, batch: int = 64, repeats: int = 5, port: int = 8000,
                   threads: int = 1) -> dict[str, Any]:
    """Samples/s of scoring one batch of shapes images with ``cfg``'s reward: in this process, through the
    in-cluster reward actor (:class:`RewardPool`, as a run scores) and through HTTP + Ray Serve
    (:class:`rewards.http.HttpReward`), same reward, same batch, one replica each. Needs a connected Ray."""
    import numpy as np
    import ray
    import torch
    from ray import serve

    from rewards import build_reward
    from rewards.http import HttpReward, quantize
    from rlflow.types import Conditions, Media
    from rlflow.worlds.shapes.scene import all_specs, render, sample_scene
    from workers.messages import to_wire
    from workers.reward_server import RewardPool

    rng = np.random.default_rng(0)
    specs = all_specs()
    picked = [specs[int(i)] for i in rng.integers(len(specs), size=batch)]
    images = quantize(torch.from_numpy(np.stack([render(sample_scene(s, rng)) for s in picked])))
    media, conditions = Media(images=images), Conditions.of([s.prompt for s in picked])
    one = cfg.model_copy(update={"replicas": 1})

    def timed(fn: Any) -> tuple[float, Any]:
        fn()  # warm-up
        times, out = [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), out

    torch.set_num_threads(threads)
    local = build_reward(cfg.name, cfg.kwargs)
    t_local, ref_out = timed(lambda: local(media, conditions))

    pool = RewardPool(one, name_prefix="bench", threads=threads)
    pool.ready()
    media_ref = ray.put(to_wire(media))
    counter = iter(range(10**9))
    t_actor, actor_out = timed(lambda: pool.score([(next(counter), media_ref, conditions)])[0])
    pool.shutdown()

    url = serve_reward(one, port=port, route="/bench-score", name="rlflow-bench-reward", threads=threads)
    client = HttpReward(url, batch_size=batch, timeout_s=120)
    try:
        t_http, http_out = timed(lambda: client(media, conditions))
    finally:
        serve.delete("rlflow-bench-reward")
    same = bool(torch.equal(ref_out.score, actor_out.score) and torch.equal(ref_out.score, http_out.score))
    return {
        "reward": cfg.name, "batch": batch, "image_size": list(images.shape[-2:]), "repeats": repeats,
        "threads": threads, "max_batch_size": cfg.max_batch_size, "same_scores": same,
        "in_process": {"seconds": round(t_local, 4), "samples_per_s": round(batch / t_local, 1)},
        "ray_actor": {"seconds": round(t_actor, 4), "samples_per_s": round(batch / t_actor, 1)},
        "http_serve": {"seconds": round(t_http, 4), "samples_per_s": round(batch / t_http, 1)},
        "http_overhead_ms_per_batch": round(1000 * (t_http - t_actor), 1),
        "http_over_actor_ratio": round(t_http / t_actor, 2),
    }
