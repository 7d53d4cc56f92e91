"""The shapes world: 32x32 images of coloured shapes, GenEval-style prompts, a programmatic checker."""

from __future__ import annotations

import numpy as np

from rlflow.worlds.shapes.checker import score_batch
from rlflow.worlds.shapes.model import BASE_DIR
from rlflow.worlds.shapes.prompts import eval_set, split, train_prompts
from rlflow.worlds.shapes.scene import KINDS, parse_prompt

__all__ = ["BASE_DIR", "eval_set", "split", "train_prompts", "score_batch", "accuracy_report"]


def accuracy_report(images: np.ndarray, prompts: list[str]) -> dict[str, float]:
    """Strict accuracy overall and per kind, and mean partial score, of ``[B, 3, 32, 32]`` images."""
    partial, strict = score_batch(images, prompts)
    kinds = np.asarray([parse_prompt(p).kind for p in prompts])
    report = {"accuracy": float(strict.mean()), "partial": float(partial.mean())}
    for k in KINDS:
        if (kinds == k).any():
            report[f"accuracy_{k}"] = float(strict[kinds == k].mean())
    return report
