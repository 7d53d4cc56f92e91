"""Stand-ins for expensive rewards, for benchmarks: the scores of a real reward, delivered late."""

from __future__ import annotations

import time
from typing import Any

from rewards import build_reward, register
from rlflow.types import Conditions, Media, RewardOutput


@register("slow_judge")
class SlowJudge:
    """Scores with ``inner`` (a reward name) and then sleeps ``seconds_per_batch``: the latency profile of a
    remote VLM judge, without its compute. Used by ``rlflow bench async`` to measure how much scoring
    latency the pipeline hides."""

    def __init__(self, seconds_per_batch: float = 0.5, inner: str = "shapes_geneval", **inner_kwargs: Any):
        if seconds_per_batch < 0:
            raise ValueError(f"slow_judge: seconds_per_batch must be >= 0, got {seconds_per_batch}")
        self.seconds = seconds_per_batch
        self.inner = build_reward(inner, inner_kwargs)

    def __call__(self, media: Media, conditions: Conditions) -> RewardOutput:
        out = self.inner(media, conditions)
        time.sleep(self.seconds)
        return out
