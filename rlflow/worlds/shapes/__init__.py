"""The shapes world: 32x32 images of coloured shapes, GenEval-style prompts, a programmatic checker."""

from __future__ import annotations

import numpy as np

from rlflow.stats import wilson_interval
from rlflow.worlds.shapes.checker import score_batch
from rlflow.worlds.shapes.model import BASE_DIR
from rlflow.worlds.shapes.prompts import eval_set, split, train_prompts
from rlflow.worlds.shapes.scene import KINDS, parse_prompt

__all__ = ["BASE_DIR", "eval_set", "split", "train_prompts", "score_batch", "accuracy_report", "strict_report"]


def accuracy_report(images: np.ndarray, prompts: list[str]) -> dict[str, float]:
    """Strict accuracy overall and per kind, each with its 95% Wilson interval (``*_lo``, ``*_hi``), and the
    mean partial score, of ``[B, 3, 32, 32]`` images."""
    return strict_report(images, prompts)[0]


def strict_report(images: np.ndarray, prompts: list[str]) -> tuple[dict[str, float], np.ndarray]:
    """:func:`accuracy_report` and the per-image strict scores ``[B]`` (0 or 1)."""
    partial, strict = score_batch(images, prompts)
    kinds = np.asarray([parse_prompt(p).kind for p in prompts])
    report = {"partial": float(partial.mean())}
    for key, mask in [("accuracy", np.ones(len(prompts), dtype=bool))] + [(f"accuracy_{k}", kinds == k) for k in KINDS]:
        if mask.any():
            report[key] = float(strict[mask].mean())
            report[f"{key}_lo"], report[f"{key}_hi"] = wilson_interval(float(strict[mask].sum()), int(mask.sum()))
    return report, strict.astype(np.float64)
