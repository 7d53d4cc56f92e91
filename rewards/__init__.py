"""Reward plug-ins: the registry and the built-in rewards.

A reward is anything callable as ``fn(images, prompts)`` with ``images`` a ``[B, 3, H, W]`` float tensor in
``[0, 1]``; it returns a :class:`rlflow.types.RewardOutput`, or ``[B]`` scores (tensor, array or list).
Register one with ``@register("name")`` or reference it from a config as ``"package.module:callable"``.
A class is instantiated with the config's ``reward.kwargs``; a function gets them as keyword arguments.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from rlflow.config import ConfigError
from rlflow.types import RewardFn, RewardOutput, check_finite_reward

_REGISTRY: dict[str, Any] = {}
_BUILTIN_MODULES = ("rewards.shapes", "rewards.synthetic")


def register(name: str) -> Callable[[Any], Any]:
    """Decorator: make a reward class or function available by ``name``; duplicate names raise."""

    def deco(obj: Any) -> Any:
        if name in _REGISTRY and _REGISTRY[name] is not obj:
            raise ValueError(f"reward name '{name}' is already registered (by {_REGISTRY[name]!r})")
        _REGISTRY[name] = obj
        return obj

    return deco


def registered() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def _load_builtins() -> None:
    for mod in _BUILTIN_MODULES:
        importlib.import_module(mod)


def resolve(spec: str) -> Any:
    """The reward class or function ``spec`` names (raises :class:`ConfigError` naming ``reward.name``)."""
    return _resolve(spec)


def _resolve(spec: str) -> Any:
    if ":" in spec:
        module, _, attr = spec.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"reward.name '{spec}': cannot import it ({err})") from None
    _load_builtins()
    if spec not in _REGISTRY:
        raise ConfigError(f"reward.name '{spec}' is not registered; known: {', '.join(sorted(_REGISTRY))} "
                         "(or use 'package.module:callable')")
    return _REGISTRY[spec]


class NamedReward:
    """Wraps a user reward: coerces its output to :class:`RewardOutput` and rejects non-finite values."""

    def __init__(self, name: str, fn: Callable[..., Any]):
        self.name, self.fn = name, fn

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        out = self.fn(images, prompts)
        if not isinstance(out, RewardOutput):
            score = torch.as_tensor(np.asarray(out, dtype=np.float32))
            out = RewardOutput(score=score, components={self.name: score})
        if out.score.shape != (len(prompts),):
            raise ValueError(f"reward '{self.name}' returned shape {tuple(out.score.shape)}, expected ({len(prompts)},)")
        check_finite_reward(out, self.name)
        return out


def build_reward(name: str, kwargs: dict[str, Any] | None = None) -> RewardFn:
    """The reward named by a config: a registered name or ``"package.module:callable"``."""
    obj = _resolve(name)
    kwargs = kwargs or {}
    if inspect.isclass(obj):
        fn = obj(**kwargs)
    elif kwargs:
        fn = functools.partial(obj, **kwargs)
    else:
        fn = obj
    return NamedReward(name, fn)
