"""CLIP rewards: PickScore (Kirstain et al. 2023) and CLIPScore (Hessel et al. 2021), and the CLIP loading and
tensor preprocessing they share with :mod:`rewards.aesthetic`.

Images arrive as ``[B, 3, H, W]`` fp32 in ``[0, 1]`` and are resized, center-cropped and normalised in torch with
the numbers of the checkpoint's ``CLIPImageProcessor`` (:class:`ClipImageTransform`), so there is no PIL round
trip; the result matches the processor fed the same images as uint8 to within its own rounding (about one uint8
step: PIL resizes in two clipped uint8 passes, width then height, which the transform mirrors in float).
Models load once, in ``__init__``, through ``from_pretrained(path_or_hub_id)``; transformers is imported there.

Throughput, tiny random CLIP (hidden 32, 2 layers, 32 px, patch 8), CPU, one thread, batch 16 of 64 px images:
PickScore and CLIPScore 2100-3100 samples/s each on a shared 2-core machine (``PYTHONPATH=. .venv/bin/python
tests/test_reward_models_clip.py``): the wrapper's overhead, not a real model's speed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rewards import register
from rlflow.types import RewardOutput

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# PIL resampling codes -> torch modes. torch's antialiased kernels are PIL's (its cubic uses a = -0.5).
_RESAMPLE = {2: "bilinear", 3: "bicubic"}
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype, reward: str) -> torch.dtype:
    """``dtype`` as a torch floating dtype (``"float32"``, ``"bf16"``, ... or a ``torch.dtype``)."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"{reward}: dtype must be one of {', '.join(sorted(_DTYPES))}, got {dtype!r}")
    return _DTYPES[key]


def check_batch_size(batch_size: int, reward: str) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{reward}: batch_size must be an integer >= 1, got {batch_size!r}")
    return batch_size


def _check_local(path: str, reward: str, field: str) -> None:
    """A path-like ``path`` (absolute, ``./``, ``~`` or existing) must exist; anything else is a hub id."""
    if (os.path.isabs(path) or path.startswith((".", "~"))) and not os.path.exists(os.path.expanduser(path)):
        raise FileNotFoundError(f"{reward}: {field} '{path}' does not exist")


def _dtype_kwarg() -> str:
    """``from_pretrained``'s dtype keyword: ``dtype`` from transformers 4.56, ``torch_dtype`` before."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def load_pretrained(cls: Any, path: str, reward: str, field: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(path, **kwargs)``; a failure names the reward and the config field."""
    path = str(path)
    _check_local(path, reward, field)
    if "dtype" in kwargs:
        kwargs[_dtype_kwarg()] = kwargs.pop("dtype")
    try:
        return cls.from_pretrained(os.path.expanduser(path), **kwargs)
    except (OSError, ValueError) as err:
        raise OSError(f"{reward}: cannot load {field} '{path}' with {cls.__name__}.from_pretrained ({err})") from err


def load_image_transform(path: str, reward: str, field: str) -> ClipImageTransform:
    """The :class:`ClipImageTransform` of the image processor saved at ``path`` (a folder or hub id)."""
    from transformers import AutoImageProcessor

    proc = load_pretrained(AutoImageProcessor, path, reward, field)  # only its numbers are used
    return ClipImageTransform.from_processor(proc, f"{reward}: {field} '{path}'")


def _size_field(size: Any, key: str) -> Any:
    """``size[key]`` of a processor's size: a dict (transformers 4) or a ``SizeDict`` (transformers 5)."""
    if size is None:
        return None
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


@dataclass(frozen=True)
class ClipImageTransform:
    """A ``CLIPImageProcessor``'s resize, center crop and normalisation, on ``[B, 3, H, W]`` tensors in ``[0, 1]``.

    shortest_edge: resize so the short side is this (the long side truncated to int, as the processor does);
    resize_to:     or resize to exactly ``(height, width)``; neither: no resize.
    crop:          center crop ``(height, width)`` (a too-small image is padded with black first), or ``None``.
    """

    shortest_edge: int | None = 224
    resize_to: tuple[int, int] | None = None
    crop: tuple[int, int] | None = (224, 224)
    mode: str = "bicubic"
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD

    @classmethod
    def from_processor(cls, proc: Any, where: str) -> ClipImageTransform:
        shortest_edge = resize_to = crop = None
        if getattr(proc, "do_resize", True):
            size = proc.size
            if _size_field(size, "longest_edge") or _size_field(size, "max_height"):
                raise ValueError(f"{where}: unsupported image processor size {size} (shortest_edge or height/width)")
            shortest_edge = _size_field(size, "shortest_edge")
            if shortest_edge is None:
                h, w = _size_field(size, "height"), _size_field(size, "width")
                if h is None or w is None:
                    raise ValueError(f"{where}: image processor size {size} has no shortest_edge or height/width")
                resize_to = (int(h), int(w))
        if getattr(proc, "do_center_crop", False):
            cs = proc.crop_size
            crop = (int(_size_field(cs, "height")), int(_size_field(cs, "width")))
        resample = getattr(proc, "resample", 3)
        resample = getattr(resample, "value", resample)  # a PIL enum, or torchvision's InterpolationMode
        mode = _RESAMPLE.get(resample) if isinstance(resample, int) else str(resample)
        if mode not in ("bilinear", "bicubic"):
            raise ValueError(f"{where}: unsupported resample {resample!r} (bilinear or bicubic)")
        if getattr(proc, "do_rescale", False) and abs(proc.rescale_factor * 255 - 1) > 1e-6:
            raise ValueError(f"{where}: rescale_factor {proc.rescale_factor} is not 1/255")
        normalize = getattr(proc, "do_normalize", True)
        mean = tuple(float(m) for m in proc.image_mean) if normalize else (0.0, 0.0, 0.0)
        std = tuple(float(s) for s in proc.image_std) if normalize else (1.0, 1.0, 1.0)
        return cls(None if shortest_edge is None else int(shortest_edge), resize_to, crop, mode, mean, std)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        if self.resize_to is not None:
            return self.resize_to
        if self.shortest_edge is None:
            return height, width
        short, long = min(height, width), max(height, width)
        new_long = int(self.shortest_edge * long / short)
        return (new_long, self.shortest_edge) if width <= height else (self.shortest_edge, new_long)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return self.crop if self.crop is not None else self.resized_size(height, width)

    def __call__(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in ``[0, 1]`` -> the model's ``pixel_values``, fp32."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"CLIP preprocessing expects [B, 3, H, W] images, got {tuple(images.shape)}")
        x = images.float().clamp(0.0, 1.0)
        size = self.resized_size(x.shape[-2], x.shape[-1])
        if size != tuple(x.shape[-2:]):  # PIL's two passes, width then height, each clipped to the pixel range
            for step in ((x.shape[-2], size[1]), size):
                if step != tuple(x.shape[-2:]):
                    x = F.interpolate(x, size=step, mode=self.mode, align_corners=False, antialias=True).clamp(0, 1)
        if self.crop is not None:
            x = _center_crop(x, self.crop)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


def _center_crop(x: Tensor, size: tuple[int, int]) -> Tensor:
    """The processor's center crop: offsets floor((H - h) / 2); a too-small side is zero-padded, centred."""
    (ch, cw), (h, w) = size, x.shape[-2:]
    ph, pw = max(ch - h, 0), max(cw - w, 0)
    if ph or pw:
        x = F.pad(x, (math.ceil(pw / 2), pw // 2, math.ceil(ph / 2), ph // 2))
        h, w = x.shape[-2:]
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[..., top:top + ch, left:left + cw]


def check_image_size(transform: ClipImageTransform, image_size: int, reward: str) -> None:
    """The processor's output must be the vision tower's input size (CLIP's position embeddings are fixed)."""
    if transform.crop is not None and transform.crop != (image_size, image_size):
        raise ValueError(f"{reward}: the image processor crops to {transform.crop} but the model takes "
                         f"{image_size}x{image_size} images")


def projected(out: Any) -> Tensor:
    """The projected embedding from ``get_image_features``/``get_text_features``: a tensor in transformers 4,
    an output whose ``pooler_output`` holds it in transformers 5."""
    return out if isinstance(out, Tensor) else out.pooler_output


class _ClipSimilarity:
    """Shared body of the text-image CLIP rewards: per-sample cosine of image and prompt embeddings."""

    name = ""

    def __init__(self, model: str, processor: str | None, device: str, dtype: str | torch.dtype, batch_size: int):
        from transformers import AutoTokenizer, CLIPModel

        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.name)
        self.batch_size = check_batch_size(batch_size, self.name)
        processor = str(processor or model)
        self.model = load_pretrained(CLIPModel, model, self.name, "model", dtype=self.dtype)
        self.model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = load_pretrained(AutoTokenizer, processor, self.name, "processor")
        self.transform = load_image_transform(processor, self.name, "processor")
        check_image_size(self.transform, self.model.config.vision_config.image_size, self.name)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def embed_images(self, images: Tensor) -> Tensor:
        """``[B, D]`` fp32 L2-normalised image embeddings."""
        pixels = self.transform(images.to(self.device)).to(self.dtype)
        return F.normalize(projected(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, prompts: list[str]) -> Tensor:
        """``[B, D]`` fp32 L2-normalised text embeddings (prompts truncated to the model's context)."""
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        out = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                           attention_mask=tok["attention_mask"].to(self.device))
        return F.normalize(projected(out).float(), dim=-1)

    def cosine(self, images: Tensor, prompts: list[str]) -> Tensor:
        """``[B]`` fp32 cosine of each image with its own prompt, ``batch_size`` samples at a time."""
        if images.shape[0] != len(prompts):
            raise ValueError(f"{self.name}: {images.shape[0]} images but {len(prompts)} prompts")
        parts = []
        for i in range(0, len(prompts), self.batch_size):
            img = self.embed_images(images[i:i + self.batch_size])
            txt = self.embed_texts(prompts[i:i + self.batch_size])
            parts.append((img * txt).sum(-1))
        return torch.cat(parts).cpu() if parts else torch.zeros(0)

    def score(self, cosine: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        score = self.score(self.cosine(images, list(prompts))).float()
        return RewardOutput(score=score, components={self.name: score})


@register("pickscore")
class PickScoreReward(_ClipSimilarity):
    """PickScore: ``exp(logit_scale) * cos(image, prompt)`` with the PickScore CLIP-H model, as its authors
    compute it (about 20 for typical images; the model's ``logit_scale`` is a log)."""

    name = "pickscore"

    def __init__(self, model: str = "yuvalkirstain/PickScore_v1",
                 processor: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", device: str = "cpu",
                 dtype: str | torch.dtype = "float32", batch_size: int = 16):
        super().__init__(model, processor, device, dtype, batch_size)
        self.logit_scale = float(self.model.logit_scale.float().exp().item())

    def score(self, cosine: Tensor) -> Tensor:
        return self.logit_scale * cosine


@register("clipscore")
class CLIPScoreReward(_ClipSimilarity):
    """CLIPScore (Hessel et al. 2021): ``w * max(cos(image, prefix + prompt), 0)``, ``w = 2.5``. The paper
    prefixes captions with ``"A photo depicts "``; the default here scores the bare prompt."""

    name = "clipscore"

    def __init__(self, model: str = "openai/clip-vit-large-patch14", processor: str | None = None,
                 device: str = "cpu", dtype: str | torch.dtype = "float32", batch_size: int = 16,
                 w: float = 2.5, prefix: str = ""):
        super().__init__(model, processor, device, dtype, batch_size)
        self.w, self.prefix = float(w), str(prefix)

    def cosine(self, images: Tensor, prompts: list[str]) -> Tensor:
        return super().cosine(images, [self.prefix + p for p in prompts])

    def score(self, cosine: Tensor) -> Tensor:
        return self.w * cosine.clamp(min=0.0)
