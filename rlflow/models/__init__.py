"""Model families: one adapter per diffusers transformer class, loaded by family name.

Adapters are imported lazily (``"module:Class"`` strings) so that importing :mod:`rlflow.models` does not
import diffusers.
"""

from __future__ import annotations

import importlib

import torch

from rlflow.models.base import FlowPolicy

MODEL_FAMILIES: dict[str, str] = {
    "sd3": "rlflow.models.sd3:SD3Policy",
    "flux": "rlflow.models.flux:FluxPolicy",
}


def load_policy(
    family: str, path: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> FlowPolicy:
    """``MODEL_FAMILIES[family].from_pretrained(path, dtype=dtype, device=device)``.

    Raises:
        ValueError: ``family`` is not one of :data:`MODEL_FAMILIES`.
    """
    if family not in MODEL_FAMILIES:
        raise ValueError(
            f"unknown model family {family!r}; allowed families: {', '.join(sorted(MODEL_FAMILIES))}"
        )
    module_name, cls_name = MODEL_FAMILIES[family].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    policy: FlowPolicy = cls.from_pretrained(path, dtype=dtype, device=device)
    return policy


__all__ = ["MODEL_FAMILIES", "FlowPolicy", "load_policy"]
