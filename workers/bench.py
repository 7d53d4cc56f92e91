"""Benchmarks of the Ray runtime (``rlflow bench ...``). Each returns a JSON-ready dict of measured figures.

Run by hand, never as timed tests. Step times skip the first step (actor warm-up) and the last (it runs the
final evaluation); stage times are medians over the same steps (a shared 2-core machine has outliers).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
from mlflow.tracking import MlflowClient

from rlflow.config import Config, apply_overrides, to_dict, validate
from workers.learner import LearnerGroup
from workers.placement import Placement
from workers.runtime import connect, disconnect
from workers.sampler import SamplerActor

STAGES = (
    "time/step", "time/rollout", "time/sampler_compute", "time/reward", "time/update", "time/sync", "time/wait_rollout",
    "time/reward_exposed",
)


def _with(cfg: Config, overrides: list[str]) -> Config:
    return validate(apply_overrides(to_dict(cfg), overrides))


def _bench_cfg(cfg: Config, steps: int, out: Path, extra: list[str] | None = None) -> Config:
    return _with(cfg, [
        f"train.steps={steps}", "train.eval_every=0", "train.log_images_every=0", f"train.checkpoint_every={steps}",
        "data.eval_per_kind=4", "train.eval_steps=10", f"output_dir={out}", *(extra or []),
    ])


def _stage_means(tracking_uri: str, run_id: str) -> dict[str, float]:
    client = MlflowClient(tracking_uri=tracking_uri)
    out = {}
    for key in STAGES:
        hist = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        values = [m.value for m in hist][1:-1]  # skip warm-up and the step that ran the final eval
        if values:
            out[key.split("/", 1)[1]] = round(statistics.median(values), 4)
    return out


def _run_in_process(cfg: Config, run_dir: Path) -> dict[str, float]:
    from rewards import build_panel
    from rlflow.trainer import Trainer

    trainer = Trainer(cfg, build_panel(cfg.reward), run_dir)
    trainer.run()
    return _stage_means(trainer.tracker.tracking_uri, trainer.tracker.run_id)


def _run_ray(cfg: Config, run_dir: Path) -> dict[str, float]:
    from workers.driver import RayTrainer

    connect(cfg)
    try:
        trainer = RayTrainer(cfg, run_dir)
        trainer.run()
        return _stage_means(trainer.tracker.tracking_uri, trainer.tracker.run_id)
    finally:
        disconnect()


def ray_overhead(cfg: Config, steps: int = 12, repeats: int = 3) -> dict[str, Any]:
    """Step time of the Ray pipeline (1 sampler, 1 learner, colocated, sync) vs the in-process loop.

    The two run in ``repeats`` interleaved pairs (in-process, Ray, in-process, ...): a shared machine's speed
    drifts by 10-30% over minutes, so each pair is compared on its own and the median pair is reported.
    """
    pairs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        base = _bench_cfg(cfg, steps, Path(tmp), ["ray.num_samplers=1", "ray.num_learners=1", "ray.pipeline=sync"])
        for r in range(repeats):
            local = _run_in_process(base, Path(tmp) / f"in_process-{r}")
            remote = _run_ray(base, Path(tmp) / f"ray-{r}")
            pairs.append({"in_process": local, "ray": remote,
                          "overhead_pct": round(100 * (remote["step"] / local["step"] - 1), 1)})
    median = sorted(pairs, key=lambda p: p["overhead_pct"])[len(pairs) // 2]
    return {
        "benchmark": "ray-overhead",
        "steps_measured": steps - 2,
        "batch": base.sampling.prompts_per_step * base.sampling.group_size,
        "overhead_pct_median": median["overhead_pct"],
        "overhead_pct_each": [p["overhead_pct"] for p in pairs],
        "median_pair": median,
    }


def async_overlap(cfg: Config, steps: int = 8, latency: float = 0.5, replicas: int = 1) -> dict[str, Any]:
    """Step times of the three pipelines with and without a reward that sleeps ``latency`` s per batch.

    ``hidden_pct`` of a pipeline: the share of the latency the sequential pipeline pays that this one does
    not, ``100 * (1 - (E(latency) - E(0)) / (E_seq(latency) - E_seq(0)))`` with E the driver's exposed scoring
    wait per step (``time/reward_exposed``: waiting on scores alone, after the samplers have finished and the
    previous update is done). ``hidden_pct_by_step_time`` uses whole step times instead: same idea, but the
    compute noise of a shared 2-core machine (10-30% between runs) is in it.
    """
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for pipeline in ("sequential", "sync", "one_step_off"):
            row = {}
            for lat in (0.0, latency):
                over = [
                    f"ray.pipeline={pipeline}", "reward.name=slow_judge", f"reward.replicas={replicas}",
                    f"reward.kwargs={{seconds_per_batch: {lat}}}",
                ]
                run_cfg = _bench_cfg(cfg, steps, Path(tmp), over)
                row[f"latency_{lat:g}s"] = _run_ray(run_cfg, Path(tmp) / f"{pipeline}-{lat:g}")
            results[pipeline] = row
    lat0, lat1 = "latency_0s", f"latency_{latency:g}s"

    def added(pipeline: str, key: str) -> float:
        return results[pipeline][lat1][key] - results[pipeline][lat0][key]

    summary = {}
    for pipeline, row in results.items():
        summary[pipeline] = {
            "step_s_no_latency": row[lat0]["step"], "step_s_with_latency": row[lat1]["step"],
            "added_step_s": round(added(pipeline, "step"), 3),
            "added_exposed_scoring_s": round(added(pipeline, "reward_exposed"), 3),
            "hidden_pct": _hidden(added(pipeline, "reward_exposed"), added("sequential", "reward_exposed")),
            "hidden_pct_by_step_time": _hidden(added(pipeline, "step"), added("sequential", "step")),
        }
    chunks_per_step = cfg.sampling.prompts_per_step * cfg.sampling.group_size // cfg.sampling.chunk_size
    return {
        "benchmark": "async", "latency_s_per_batch": latency, "reward_replicas": replicas,
        "reward_batches_per_step": chunks_per_step, "steps_measured": steps - 2, "summary": summary, "runs": results,
    }


def _hidden(added: float, injected: float) -> float | None:
    return round(100 * (1 - added / injected), 1) if injected > 0 else None


def weight_sync(cfg: Config, repeats: int = 10, samplers: int = 2) -> dict[str, Any]:
    """Seconds to publish rank 0's weights to ``samplers`` samplers, LoRA-only and full, through the object
    store and as a broadcast in a gloo weight group (the collective transport; NCCL on GPUs), against copying
    the same bytes once per sampler in one process's memory."""
    cfg = _with(cfg, [f"ray.num_samplers={samplers}", "ray.num_learners=1", "ray.placement=colocated"])
    connect(cfg)
    out: dict[str, Any] = {"benchmark": "weight-sync", "samplers": samplers, "repeats": repeats}
    placement = Placement(cfg.ray, name="bench-weight-sync")
    group = LearnerGroup(cfg, placement, name_prefix="bench-ws")
    actors = [
        SamplerActor.options(  # type: ignore[attr-defined]
            num_cpus=cfg.ray.sampler.num_cpus, scheduling_strategy=placement.strategy("sampler", i)
        ).remote(cfg.model_dump(mode="json"), i, cfg.train.threads)
        for i in range(samplers)
    ]
    try:
        ray.get([a.pid.remote() for a in actors])
        for kind in ("lora", "full"):
            out[kind] = _time_sync(group, actors, kind, repeats)
        from workers.transport import form_weight_group, weight_group_backend

        ray.get(form_weight_group(cfg, group, actors))
        backend = weight_group_backend(cfg)
        for kind in ("lora", "full"):
            out[f"{kind}_collective_{backend}"] = _time_broadcast(group, actors, kind, repeats)
    finally:
        for a in actors:
            ray.kill(a)
        group.shutdown()
        placement.remove()
        disconnect()
    return out


def _time_broadcast(group: LearnerGroup, actors: list[Any], kind: str, repeats: int) -> dict[str, Any]:
    """Rank 0 broadcasts to the samplers (both sides called at once); seconds until every side is done."""
    total = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ray.get([group.broadcast(kind)] + [a.receive_weights.remote(kind) for a in actors])
        total.append(time.perf_counter() - t0)
    digests = ray.get([a.digest.remote() for a in actors])
    assert all(d == group.digests()[0] for d in digests), "broadcast did not reach every sampler"
    return {"total_s": round(statistics.median(total), 5)}


def _time_sync(group: LearnerGroup, actors: list[Any], kind: str, repeats: int) -> dict[str, Any]:
    publish, deliver = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ref = group.publish(kind)
        t1 = time.perf_counter()
        ray.get([a.set_weights.remote(ref) for a in actors])
        t2 = time.perf_counter()
        publish.append(t1 - t0)
        deliver.append(t2 - t1)
    arrays = ray.get(ref).arrays
    nbytes = sum(a.nbytes for a in arrays.values())
    copies = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in actors:
            [np.array(a, copy=True) for a in arrays.values()]
        copies.append(time.perf_counter() - t0)
    total = [p + d for p, d in zip(publish, deliver, strict=True)]
    return {
        "tensors": len(arrays), "megabytes": round(nbytes / 1e6, 3),
        "publish_s": round(statistics.median(publish), 5), "load_on_samplers_s": round(statistics.median(deliver), 5),
        "total_s": round(statistics.median(total), 5), "memcpy_s": round(statistics.median(copies), 6),
        "slowdown_vs_memcpy": round(statistics.median(total) / max(statistics.median(copies), 1e-9), 1),
    }
