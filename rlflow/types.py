"""Frozen messages passed between the pieces of rlflow. Shapes and dtypes are in each docstring.

``B`` is a batch of samples, ``S`` the number of trained (stochastic) steps of a rollout, ``K`` the rollout's
grid steps, ``...`` the per-sample latent shape (``C, H, W`` for image latents, ``L, C`` for packed tokens).
Every class here is a frozen dataclass of tensors (and small Python values); ``index`` slices the batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor


def _take(value: Any, idx: slice | list[int]) -> Any:
    """Rows ``idx`` of a batch-first tensor, tuple or list (``None`` stays ``None``)."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        return value[idx] if isinstance(idx, slice) else value[torch.as_tensor(idx, dtype=torch.long)]
    rows = list(value)
    picked = rows[idx] if isinstance(idx, slice) else [rows[i] for i in idx]
    return type(value)(picked) if isinstance(value, tuple) else picked


def _join(values: list[Any]) -> Any:
    missing = sum(v is None for v in values)
    if missing:
        if missing < len(values):
            raise ValueError("cannot join batches where only some carry an optional field")
        return None
    if isinstance(values[0], Tensor):
        return torch.cat(values)
    return type(values[0])(x for v in values for x in v)


@dataclass(frozen=True)
class Conditions:
    """What the samples of a batch are conditioned on (one entry per sample).

    prompts:       ``B`` prompt texts.
    source_images: ``[B, N, 3, H, W]`` fp32 in ``[0, 1]``: the N source images of an edit, or ``None``.
    audio:         ``[B, L]`` fp32 waveforms at ``sample_rate`` (lip-sync), or ``None``.
    metadata:      ``B`` dicts of JSON-able per-sample facts (e.g. a toy world's spec); empty dicts by default.
    """

    prompts: tuple[str, ...]
    source_images: Tensor | None = None
    audio: Tensor | None = None
    sample_rate: int = 0
    metadata: tuple[dict[str, Any], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(self.prompts))
        if not self.metadata:
            object.__setattr__(self, "metadata", tuple({} for _ in self.prompts))
        n = len(self.prompts)
        for name in ("source_images", "audio"):
            v = getattr(self, name)
            if v is not None and v.shape[0] != n:
                raise ValueError(f"Conditions.{name} has {v.shape[0]} rows for {n} prompts")
        if len(self.metadata) != n:
            raise ValueError(f"Conditions.metadata has {len(self.metadata)} entries for {n} prompts")

    @classmethod
    def of(cls, prompts: list[str] | tuple[str, ...]) -> Conditions:
        """Prompts only (text-to-image)."""
        return cls(tuple(prompts))

    def __len__(self) -> int:
        return len(self.prompts)

    def index(self, idx: slice | list[int]) -> Conditions:
        return Conditions(
            _take(self.prompts, idx), _take(self.source_images, idx), _take(self.audio, idx), self.sample_rate,
            _take(self.metadata, idx),
        )

    def repeat(self, group_size: int) -> Conditions:
        """Each sample ``group_size`` times in a row (the G samples of a group)."""
        return self.index([i for i in range(len(self)) for _ in range(group_size)])

    @staticmethod
    def cat(parts: list[Conditions]) -> Conditions:
        return Conditions(
            _join([p.prompts for p in parts]), _join([p.source_images for p in parts]),
            _join([p.audio for p in parts]), parts[0].sample_rate, _join([p.metadata for p in parts]),
        )


@dataclass(frozen=True)
class Media:
    """Decoded outputs of a batch: images or video (exactly one of the two), with optional audio.

    images: ``[B, 3, H, W]`` fp32 in ``[0, 1]``.
    video:  ``[B, T, 3, H, W]`` fp32 in ``[0, 1]``, at ``fps`` frames per second.
    audio:  ``[B, L]`` fp32 waveforms at ``sample_rate``, or ``None``.
    """

    images: Tensor | None = None
    video: Tensor | None = None
    audio: Tensor | None = None
    fps: float = 0.0
    sample_rate: int = 0

    def __post_init__(self) -> None:
        if (self.images is None) == (self.video is None):
            raise ValueError("Media holds exactly one of images [B, 3, H, W] or video [B, T, 3, H, W]")
        if self.images is not None and (self.images.ndim != 4 or self.images.shape[1] != 3):
            raise ValueError(f"Media.images must be [B, 3, H, W], got {tuple(self.images.shape)}")
        if self.video is not None and (self.video.ndim != 5 or self.video.shape[2] != 3):
            raise ValueError(f"Media.video must be [B, T, 3, H, W], got {tuple(self.video.shape)}")

    @property
    def num_samples(self) -> int:
        return int(self.frames.shape[0])

    @property
    def is_video(self) -> bool:
        return self.video is not None

    @property
    def frames(self) -> Tensor:
        """``[B, T, 3, H, W]``: the video, or the images as one-frame videos."""
        return self.video if self.video is not None else self.images.unsqueeze(1)  # type: ignore[union-attr]

    @property
    def stills(self) -> Tensor:
        """``[B, 3, H, W]``: the images, or each video's middle frame (what an image-only reward scores)."""
        return self.images if self.images is not None else self.frames[:, self.frames.shape[1] // 2]

    def index(self, idx: slice | list[int]) -> Media:
        return dataclasses.replace(
            self, images=_take(self.images, idx), video=_take(self.video, idx), audio=_take(self.audio, idx)
        )

    @staticmethod
    def cat(parts: list[Media]) -> Media:
        return dataclasses.replace(
            parts[0], images=_join([p.images for p in parts]), video=_join([p.video for p in parts]),
            audio=_join([p.audio for p in parts]),
        )


@dataclass(frozen=True)
class StepOut:
    """One policy step ``x_t -> x_t'`` (ALGORITHMS.md section 1).

    prev_sample: ``[B, ...]`` fp32, the new state ``x_t'``.
    mean:        ``[B, ...]`` fp32, the Gaussian mean of the step.
    std:         ``[B, 1, ...]`` fp32, broadcastable to ``mean``; zero for a deterministic step.
    log_prob:    ``[B]`` fp32, log-density of ``prev_sample`` reduced with a MEAN over all non-batch
                 elements (zero for a deterministic step).
    """

    prev_sample: Tensor
    mean: Tensor
    std: Tensor
    log_prob: Tensor


@dataclass(frozen=True)
class StepRecord:
    """The stochastic (trained) steps of a batch of rollouts, as the likelihood-ratio learners replay them.

    x:          ``[B, S, ...]`` fp32, states before each trained step.
    x_next:     ``[B, S, ...]`` fp32, the sampled states after each trained step.
    mean:       ``[B, S, ...]`` fp32, rollout step means.
    log_prob:   ``[B, S]`` fp32, rollout log-probs (mean-reduced over D).
    t, t_next:  ``[S]`` fp32, grid times of each trained step (t = 1 is noise).
    step_index: ``[S]`` int64, indices of the trained steps on the rollout grid.
    t_max:      the first grid value below 1 (the step kernels use it in place of ``t = 1``).
    """

    x: Tensor
    x_next: Tensor
    mean: Tensor
    log_prob: Tensor
    t: Tensor
    t_next: Tensor
    step_index: Tensor
    t_max: float

    @property
    def num_steps(self) -> int:
        return int(self.t.shape[0])

    def index(self, idx: slice | list[int]) -> StepRecord:
        return dataclasses.replace(
            self, x=_take(self.x, idx), x_next=_take(self.x_next, idx), mean=_take(self.mean, idx),
            log_prob=_take(self.log_prob, idx),
        )

    @staticmethod
    def cat(parts: list[StepRecord]) -> StepRecord:
        first = parts[0]
        if any(not torch.equal(p.step_index, first.step_index) for p in parts):
            raise ValueError("rollout chunks of one batch disagree on their trained steps")
        return dataclasses.replace(
            first, x=_join([p.x for p in parts]), x_next=_join([p.x_next for p in parts]),
            mean=_join([p.mean for p in parts]), log_prob=_join([p.log_prob for p in parts]),
        )


@dataclass(frozen=True)
class Rollout:
    """A batch of rollouts: what the algorithm asked the sampler to record (its :class:`RolloutSpec`).

    conditions:     the ``B`` samples' conditions.
    group_ids:      ``[B]`` int64; samples of one group share an id (same condition, same rollout batch).
    final:          ``[B, ...]`` fp32, the final clean latents (``t = 0``).
    media:          the decoded final samples.
    grid:           ``[K + 1]`` fp32, the rollout's time grid ``1 = t_0 > ... > t_K = 0``.
    steps:          the recorded stochastic steps, or ``None`` for an ODE rollout (final samples only).
    offset:         index of sample 0 in the whole step's batch (per-sample random streams are keyed by it).
    policy_version: the weight version that produced this batch.
    """

    conditions: Conditions
    group_ids: Tensor
    final: Tensor
    media: Media
    grid: Tensor
    steps: StepRecord | None = None
    offset: int = 0
    policy_version: int = 0

    @property
    def num_samples(self) -> int:
        return len(self.conditions)

    def index(self, sl: slice) -> Rollout:
        """Samples ``sl`` (a contiguous slice, so ``offset`` stays meaningful)."""
        return dataclasses.replace(
            self, conditions=self.conditions.index(sl), group_ids=self.group_ids[sl], final=self.final[sl],
            media=self.media.index(sl), steps=None if self.steps is None else self.steps.index(sl),
            offset=self.offset + (sl.start or 0),
        )

    @staticmethod
    def cat(parts: list[Rollout]) -> Rollout:
        """Join consecutive chunks of one step's batch (same policy version, same trained steps)."""
        first = parts[0]
        if any(p.policy_version != first.policy_version for p in parts):
            raise ValueError("rollout chunks of one batch disagree on their policy version")
        return dataclasses.replace(
            first, conditions=Conditions.cat([p.conditions for p in parts]),
            group_ids=torch.cat([p.group_ids for p in parts]), final=torch.cat([p.final for p in parts]),
            media=Media.cat([p.media for p in parts]),
            steps=None if first.steps is None else StepRecord.cat([p.steps for p in parts]),  # type: ignore[misc]
        )


@dataclass(frozen=True)
class RewardOutput:
    """Rewards of a batch.

    score:      ``[B]`` fp32, the scalar reward used for advantages.
    components: name -> ``[B]`` fp32, every component, logged separately.
    """

    score: Tensor
    components: dict[str, Tensor] = field(default_factory=dict)

    @staticmethod
    def cat(parts: list[RewardOutput]) -> RewardOutput:
        keys = parts[0].components.keys()
        return RewardOutput(
            score=torch.cat([p.score for p in parts]),
            components={k: torch.cat([p.components[k] for p in parts]) for k in keys},
        )


class RewardFn(Protocol):
    """A reward: decoded media and their conditions -> :class:`RewardOutput` (one score per sample)."""

    def __call__(self, media: Media, conditions: Conditions) -> RewardOutput: ...


@dataclass(frozen=True)
class LearnerState:
    """Everything a learner needs to continue exactly (checkpoints, resume, sharded saves).

    lora:            the trained LoRA adapter's tensors (``"default"``).
    optimizer:       the AdamW state dict.
    version:         policy version (updates taken).
    optimizer_steps: optimizer steps taken (several per update).
    adapters:        the algorithm's extra adapters by name (e.g. DiffusionNFT's ``"old"`` policy).
    previous:        the sampling weights of version ``version - 1`` (a one-step-off run samples its next
                     batch with them), or ``None``.
    """

    lora: dict[str, Tensor]
    optimizer: dict[str, Any]
    version: int = 0
    optimizer_steps: int = 0
    adapters: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    previous: dict[str, Tensor] | None = None


def check_finite_reward(out: RewardOutput, name: str) -> None:
    """Raise if any reward is NaN or infinite: a broken reward is an error, never a silent zero."""
    for key, value in {"score": out.score, **out.components}.items():
        if not torch.isfinite(value).all():
            bad = (~torch.isfinite(value)).nonzero().flatten().tolist()
            raise ValueError(f"reward '{name}' returned {len(bad)} non-finite value(s) in '{key}' "
                             f"(samples {bad[:8]})")
