"""Helpers shared by the test modules that run whole training loops."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from rlflow.config import Config, validate


def tiny_config(base: dict[str, Any], tmp_path: Path, **sections: Any) -> Config:
    """``base`` with each section's keys overridden (a non-dict value replaces the section), writing to ``tmp_path``."""
    raw = json.loads(json.dumps(base))
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
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
