"""Model families: one adapter per diffusers transformer class, registered by family name.

Entries are ``"module:Class"`` strings imported on first use, so that importing :mod:`rlflow.models` (and the
config schema, which validates ``model.family`` against this registry) does not import diffusers. A new
family is one adapter file plus one ``MODEL_FAMILIES.add(name, "module:Class")`` line.
"""

from __future__ import annotations

import importlib

import torch

from rlflow.models.base import FlowPolicy
from rlflow.registry import Registry

MODEL_FAMILIES: Registry[str] = Registry("model family", "model.family")
MODEL_FAMILIES.add("sd3", "rlflow.models.sd3:SD3Policy")
MODEL_FAMILIES.add("flux", "rlflow.models.flux:FluxPolicy")


def load_policy(
    family: str, path: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> FlowPolicy:
    """``MODEL_FAMILIES[family].from_pretrained(path, dtype=dtype, device=device)``.

    Raises:
        ConfigError: ``family`` is not registered (the message lists the registered families).
    """
    module_name, cls_name = MODEL_FAMILIES.get(family).split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    policy: FlowPolicy = cls.from_pretrained(path, dtype=dtype, device=device)
    return policy


__all__ = ["MODEL_FAMILIES", "FlowPolicy", "load_policy"]
