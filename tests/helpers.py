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
