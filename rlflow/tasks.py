"""Where prompts come from and how a run is evaluated.

``ShapesTask``: the shapes world's fixed train prompts (kinds balanced) and held-out eval set, scored by
strict accuracy. ``PromptFileTask``: prompts from text files (one per line), scored by the mean reward.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from rlflow.schema import ConfigError
from rlflow.types import Conditions, Media, RewardFn


@dataclass(frozen=True)
class EvalReport:
    """metrics: name -> value (logged as ``eval/<name>``). primary: the metric whose per-sample values are
    ``per_sample`` (``[B]`` float64, the eval set's order), which the run compares pair by pair with the
    base model's on the same conditions and seeds."""

    metrics: dict[str, float]
    primary: str
    per_sample: np.ndarray


class Task(Protocol):
    """train_conditions: ``n`` distinct training conditions (one group each). eval_set: the held-out
    conditions and the noise seed of each eval sample. eval_metrics: scores of the eval samples."""

    def train_conditions(self, rng: np.random.Generator, n: int) -> Conditions: ...

    def eval_set(self) -> tuple[Conditions, list[int]]: ...

    def eval_metrics(self, media: Media, conditions: Conditions, reward: RewardFn) -> EvalReport: ...


class ShapesTask:
    def __init__(self, eval_per_kind: int = 128):
        from rlflow.worlds.shapes import split

        self._train = split()[0]
        self.eval_per_kind = eval_per_kind

    def train_conditions(self, rng: np.random.Generator, n: int) -> Conditions:
        from rlflow.worlds.shapes.prompts import sample_specs

        return Conditions.of([s.prompt for s in sample_specs(rng, n, self._train)])

    def eval_set(self) -> tuple[Conditions, list[int]]:
        from rlflow.worlds.shapes import eval_set

        prompts, seeds = eval_set(self.eval_per_kind)
        return Conditions.of(prompts), seeds

    def eval_metrics(self, media: Media, conditions: Conditions, reward: RewardFn) -> EvalReport:
        from rlflow.worlds.shapes import strict_report

        metrics, strict = strict_report(media.stills.numpy(), list(conditions.prompts))
        return EvalReport(metrics, "accuracy", strict)


def read_prompts(path: str | Path, field: str) -> list[str]:
    """The non-empty lines of a prompt file; a missing or empty file is a :class:`ConfigError` naming
    ``field`` (the config key or command-line flag that gave the path)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{field}: prompt file not found: {p}")
    prompts = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"{field}: {p} holds no prompts (one per line)")
    return prompts


class PromptFileTask:
    def __init__(self, train_file: str, eval_file: str | None, eval_seeds: int = 1):
        self._train = read_prompts(train_file, "data.train_file")
        self._eval = read_prompts(eval_file, "data.eval_file") if eval_file else self._train[:16]
        self.eval_seeds = eval_seeds

    def train_conditions(self, rng: np.random.Generator, n: int) -> Conditions:
        return Conditions.of([self._train[int(i)] for i in rng.integers(len(self._train), size=n)])

    def eval_set(self) -> tuple[Conditions, list[int]]:
        prompts = [p for p in self._eval for _ in range(self.eval_seeds)]
        return Conditions.of(prompts), [1_000_000 + i for i in range(len(prompts))]

    def eval_metrics(self, media: Media, conditions: Conditions, reward: RewardFn) -> EvalReport:
        out = reward(media, conditions)
        metrics = {"reward": float(out.score.mean())}
        metrics.update({f"reward_{k}": float(v.mean()) for k, v in out.components.items()})
        return EvalReport(metrics, "reward", out.score.double().numpy())
