"""Helpers shared by the test modules that run whole training loops."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from rlflow.config import Config, validate

# The smallest whole run of the toy world: 2 prompts x 4 samples, 6 sampler steps, DPPO, 3 steps. Test modules
# derive their base config from it with tiny_run(...), so a change of the shared shape is made once.
TINY_RUN: dict[str, Any] = {
    "name": "tiny",
    "sampling": {"prompts_per_step": 2, "group_size": 4, "chunk_size": 4, "num_steps": 6, "sde_range": [0, 4]},
    "data": {"eval_per_kind": 2},
    "algo": {"name": "dppo", "kl_threshold": 1e-4},
    "train": {"steps": 3, "eval_every": 0, "eval_steps": 6, "checkpoint_every": 1, "log_images_every": 0, "threads": 2},
}


ROOT = Path(__file__).resolve().parents[1]


def start_local_ray(num_cpus: int = 4) -> None:
    """A fresh local Ray cluster whose workers import this checkout (shut down any earlier one first)."""
    import ray

    if ray.is_initialized():  # left by an earlier test module's in-process call
        ray.shutdown()
    ray.init(
        address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING",
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}},
    )


def merged(base: dict[str, Any], **sections: Any) -> dict[str, Any]:
    """A copy of ``base`` with each section's keys overridden (a non-dict value replaces the section)."""
    raw = json.loads(json.dumps(base))
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    return raw


def tiny_run(**sections: Any) -> dict[str, Any]:
    """:data:`TINY_RUN` with each section's keys overridden (``algo`` replaces the whole section)."""
    if "algo" in sections:
        sections["algo"] = dict(sections["algo"])  # another algorithm's keys would not validate under dppo's
        return {**merged(TINY_RUN, **{k: v for k, v in sections.items() if k != "algo"}), "algo": sections["algo"]}
    return merged(TINY_RUN, **sections)


def tiny_config(base: dict[str, Any], tmp_path: Path, **sections: Any) -> Config:
    """``base`` with each section's keys overridden (a non-dict value replaces the section), writing to ``tmp_path``."""
    raw = merged(base, **sections)
    raw["output_dir"] = str(tmp_path)
    return validate(raw)


def metric_history(trainer: Any, key: str) -> list[float]:
    """A trainer's logged values of ``key``, in step order, read back from its MLflow run."""
    client = MlflowClient(tracking_uri=trainer.tracker.tracking_uri)
    return [m.value for m in sorted(client.get_metric_history(trainer.tracker.run_id, key), key=lambda m: m.step)]


def replayed_anchors(learner: Any, rollout: Any, micro_batch: int) -> tuple[Any, Any]:
    """``(logp_old [B, S], mean_old [B, S, ...])`` that a DPPO learner replays for ``rollout`` (chunks of
    ``micro_batch``), concatenated in batch order."""
    import torch

    from rlflow.sampler import chunks

    cond = learner.policy.encode(rollout.conditions)
    adv = torch.zeros(rollout.num_samples)
    spans = chunks(rollout.num_samples, micro_batch)
    mbs, _ = learner.prepare([learner.micro_batch(rollout, sl, cond, adv, 0) for sl in spans], 0,
                             learner.micro_batch(rollout, spans[0], cond, adv, 0))
    return (torch.cat([mb.prepared["logp_old"] for mb in mbs]), torch.cat([mb.prepared["mean_old"] for mb in mbs]))


def blank_steps(rollout: Any) -> Any:
    """``rollout`` with its recorded log-probs and means zeroed (so a replay cannot just copy them)."""
    import dataclasses

    import torch

    steps = dataclasses.replace(rollout.steps, log_prob=torch.zeros_like(rollout.steps.log_prob),
                                mean=torch.zeros_like(rollout.steps.mean))
    return dataclasses.replace(rollout, steps=steps)
