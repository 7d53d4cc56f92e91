"""Reward plug-ins: the registry and the built-in rewards.

A reward is a callable in one of two forms, told apart by the name of its first parameter:
- ``fn(media, conditions)``: :class:`rlflow.types.Media` (images ``[B, 3, H, W]`` or video ``[B, T, 3, H, W]``,
  optional audio) and :class:`rlflow.types.Conditions` (prompts, source images, audio, metadata);
- ``fn(images, prompts)``: the plain form, a ``[B, 3, H, W]`` float tensor in ``[0, 1]`` (a video's middle
  frame) and the prompt strings.
Either returns a :class:`rlflow.types.RewardOutput`, or ``[B]`` scores (tensor, array or list).
Register one with ``@register("name")`` or reference it from a config as ``"package.module:callable"``.
A class is instantiated with the config's ``reward.kwargs``; a function gets them as keyword arguments.
A config's ``reward.panel`` names several, fused into one reward (:func:`build_panel`, :mod:`rlflow.panel`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import importlib
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rlflow.config import RewardConfig
from rlflow.panel import fuse_outputs
from rlflow.schema import ConfigError
from rlflow.types import Conditions, Media, RewardFn, RewardOutput, check_finite_reward

_REGISTRY: dict[str, Any] = {}
_BUILTIN_MODULES = (
    "rewards.shapes", "rewards.synthetic", "rewards.aesthetic", "rewards.clip_score", "rewards.vlm_judge", "rewards.syncnet",
    "rewards.http", "rewards.shapes_soft",
)


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


def resolve(spec: str, key: str = "reward.name") -> Any:
    """The reward class or function ``spec`` names (raises :class:`ConfigError` naming ``key``)."""
    return _resolve(spec, key)


def resolve_all(cfg: RewardConfig) -> None:
    """Resolve every reward of the config (each panel member's), raising a :class:`ConfigError` naming the
    first bad one's key (``reward.panel[1].name``)."""
    for key, m in cfg.members():
        _resolve(m.name, f"{key}.name")


def _resolve(spec: str, key: str = "reward.name") -> Any:
    if ":" in spec:
        module, _, attr = spec.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"{key} '{spec}': cannot import it ({err})") from None
    _load_builtins()
    if spec not in _REGISTRY:
        raise ConfigError(f"{key} '{spec}' is not registered; known: {', '.join(sorted(_REGISTRY))} "
                         "(or use 'package.module:callable')")
    return _REGISTRY[spec]


def takes_media(fn: Callable[..., Any]) -> bool:
    """Whether ``fn``'s first parameter is named ``media`` (the ``fn(media, conditions)`` form)."""
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return False
    return bool(params) and params[0] == "media"


class NamedReward:
    """Wraps a user reward: calls it in its form (awaiting it when it is ``async``), coerces its output to
    :class:`RewardOutput`, and rejects a wrong signature, a wrong length or dtype, or a non-finite value,
    naming the reward."""

    def __init__(self, name: str, fn: Callable[..., Any]):
        self.name, self.fn = name, fn
        self.media_form = takes_media(fn)
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return  # a builtin or C callable: its calls will tell
        try:
            sig.bind(None, None)
        except TypeError:
            raise ConfigError(f"reward '{name}': a reward takes two arguments, (media, conditions) or (images, "
                              f"prompts); {getattr(fn, '__name__', type(fn).__name__)}{sig} does not") from None

    def __call__(self, media: Media, conditions: Conditions) -> RewardOutput:
        if len(conditions) != media.num_samples:
            raise ValueError(f"reward '{self.name}': {media.num_samples} samples but {len(conditions)} conditions")
        out = self.fn(media, conditions) if self.media_form else self.fn(media.stills, list(conditions.prompts))
        if inspect.isawaitable(out):
            out = _await(out)
        if isinstance(out, torch.Tensor):  # kept a tensor: a differentiable reward's graph survives
            out = RewardOutput(score=out.to(torch.float32), components={self.name: out.to(torch.float32)})
        if not isinstance(out, RewardOutput):
            try:
                score = torch.as_tensor(np.asarray(out, dtype=np.float32))
            except (TypeError, ValueError) as err:
                raise ValueError(f"reward '{self.name}' returned {type(out).__name__}, expected a RewardOutput or "
                                 f"[B] float scores ({err})") from None
            out = RewardOutput(score=score, components={self.name: score})
        n = len(conditions)
        for what, t in [("score", out.score), *((f"component '{k}'", v) for k, v in out.components.items())]:
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                kind = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"reward '{self.name}' returned a {what} of {kind}, expected a float tensor")
            if t.shape != (n,):
                raise ValueError(f"reward '{self.name}' returned a {what} of shape {tuple(t.shape)}, expected ({n},)")
        check_finite_reward(out, self.name)
        return out

    @property
    def differentiable(self) -> bool:
        """Whether the reward declares itself differentiable (``differentiable = True`` on it)."""
        return bool(getattr(self.fn, "differentiable", False))

    def score_and_grad(self, media: Media, conditions: Conditions) -> tuple[RewardOutput, Tensor]:
        """The (detached) rewards and ``d score / d pixels``, shaped like the media's images or video.

        A differentiable reward either is a torch-differentiable function of the pixels (the gradient is taken
        by autograd through its call) or has a ``gradient(media, conditions) -> (scores, grad)`` method of its
        own (e.g. a reward served elsewhere that returns its gradient).
        """
        if not self.differentiable:
            raise TypeError(f"reward '{self.name}' is not differentiable: a reward declares it with "
                            "`differentiable = True` (and is a torch function of the pixels, or has a gradient method)")
        pixels = media.images if media.images is not None else media.video
        assert pixels is not None
        own = getattr(self.fn, "gradient", None)
        if own is not None:
            scores, grad = own(media, conditions)
            out = self._checked(scores, len(conditions))
        else:
            x = pixels.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                traced = dataclasses.replace(media, images=x) if media.images is not None else dataclasses.replace(
                    media, video=x)
                out = self(traced, conditions)
                if not out.score.requires_grad:
                    raise ValueError(f"reward '{self.name}' declares itself differentiable, but its score has no "
                                     "gradient with respect to the pixels (computed outside torch, or detached)")
                (grad,) = torch.autograd.grad(out.score.sum(), x)
        grad = torch.as_tensor(grad, dtype=torch.float32)
        if grad.shape != pixels.shape:
            raise ValueError(f"reward '{self.name}' returned a gradient of shape {tuple(grad.shape)}, expected "
                             f"{tuple(pixels.shape)}")
        if not torch.isfinite(grad).all():
            bad = sorted({int(i) for i in (~torch.isfinite(grad)).nonzero()[:, 0]})
            raise ValueError(f"reward '{self.name}' returned a non-finite gradient (samples {bad[:8]})")
        detached = RewardOutput(out.score.detach(), {k: v.detach() for k, v in out.components.items()})
        return detached, grad

    def _checked(self, scores: Any, n: int) -> RewardOutput:
        out = scores if isinstance(scores, RewardOutput) else RewardOutput(
            score=torch.as_tensor(np.asarray(scores, dtype=np.float32)))
        if out.score.shape != (n,):
            raise ValueError(f"reward '{self.name}' returned a score of shape {tuple(out.score.shape)}, expected ({n},)")
        check_finite_reward(out, self.name)
        return out


def _await(coro: Any) -> Any:
    """The result of an ``async`` reward's call: run on a fresh event loop, or on a helper thread when this
    thread already runs one (an async Ray actor, a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def build_reward(name: str, kwargs: dict[str, Any] | None = None, *, key: str = "reward.name") -> RewardFn:
    """The reward named by a config: a registered name or ``"package.module:callable"`` (``key``: the config
    key that names it, for errors)."""
    obj = _resolve(name, key)
    kwargs = kwargs or {}
    fn: Callable[..., Any]
    if inspect.isclass(obj):
        fn = obj(**kwargs)  # type: ignore[assignment]  # a reward class's instances are callable
    elif kwargs:
        fn = functools.partial(obj, **kwargs)
    else:
        fn = obj
    return NamedReward(name, fn)


class RewardError(RuntimeError):
    """A member of a reward panel failed: the message names the member (``reward.panel[1] 'aesthetic'``)."""


class PanelReward:
    """A reward panel in this process: every member scores the batch, :func:`rlflow.panel.fuse_outputs`
    fuses their outputs (``labels``: the members' component names, in order)."""

    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg
        self.labels = cfg.labels
        self.members = [(f"{key} '{m.component}'", build_reward(m.name, m.kwargs, key=f"{key}.name"))
                        for key, m in cfg.members()]

    def __call__(self, media: Media, conditions: Conditions) -> RewardOutput:
        outputs = []
        for who, fn in self.members:
            try:
                outputs.append(fn(media, conditions))
            except Exception as err:
                raise RewardError(f"{who}: {type(err).__name__}: {err}") from err
        return fuse_outputs(self.cfg, outputs)


def build_panel(cfg: RewardConfig) -> RewardFn:
    """The reward of a config's ``reward`` section: the one reward (:func:`build_reward`, exactly), or its
    panel (:class:`PanelReward`)."""
    if not cfg.is_panel:
        return build_reward(cfg.name, cfg.kwargs)
    return PanelReward(cfg)
