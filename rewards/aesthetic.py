"""The LAION "improved aesthetic predictor" (christophschuhmann/improved-aesthetic-predictor) as a reward.

Score = MLP head on the L2-normalised CLIP ViT-L/14 image embedding (the projected ``image_embeds``; OpenAI
CLIP's ``encode_image``). The head is the published ``.pth`` (e.g. ``sac+logos+ava1-l14-linearMSE.pth``): a
state dict of ``layers.N.weight/bias`` for a ``Sequential`` of Linear 768->1024, Dropout, Linear ->128, Dropout,
Linear ->64, Dropout, Linear ->16, Linear ->1 (no activations), so its Linear layers sit at slots 0, 2, 4, 6, 7.
Scores are roughly on AVA's 1-10 scale. Preprocessing is the CLIP checkpoint's image processor, in torch
(:class:`rewards.clip_score.ClipImageTransform`); the original used OpenAI CLIP's PIL transform, the same
resize and crop except that its center-crop offset rounds where the processor's floors (at most one pixel).

Throughput, CPU, one thread, shared 2-core machine: tiny random CLIP (hidden 32, 2 layers, 32 px, patch 8) with
the full-size head, batch 16 of 64 px images, 3000-5200 samples/s (``PYTHONPATH=. .venv/bin/python
tests/test_reward_models_clip.py``), the wrapper's overhead; a random-weight ViT-L/14 (224 px) in fp32, batch 4 of
512 px images, 0.32 samples/s.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rewards import register
from rewards.clip_score import (
    check_batch_size,
    check_image_size,
    load_image_transform,
    load_pretrained,
    resolve_dtype,
)
from rlflow.types import RewardOutput

# The published head's Sequential: Linear at these slots, Dropout (identity at eval) with these p between.
HEAD_LINEAR_SLOTS = (0, 2, 4, 6, 7)
HEAD_DROPOUT = {1: 0.2, 3: 0.2, 5: 0.1}


class AestheticHead(nn.Module):
    """The aesthetic MLP; its ``layers`` Sequential gives the published state-dict keys."""

    def __init__(self, widths: list[int]):
        super().__init__()
        modules: list[nn.Module] = []
        for slot in range(HEAD_LINEAR_SLOTS[-1] + 1):
            if slot in HEAD_DROPOUT:
                modules.append(nn.Dropout(HEAD_DROPOUT[slot]))
            else:
                k = HEAD_LINEAR_SLOTS.index(slot)
                modules.append(nn.Linear(widths[k], widths[k + 1]))
        self.layers = nn.Sequential(*modules)
        self.in_features = int(widths[0])

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def head_from_state_dict(state: dict[str, Tensor], where: str = "aesthetic head") -> AestheticHead:
    """The aesthetic MLP for a state dict in the published key layout (widths read from the weights)."""
    expected = {f"layers.{i}.{p}" for i in HEAD_LINEAR_SLOTS for p in ("weight", "bias")}
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"{where}: not the aesthetic predictor layout (layers.{{0,2,4,6,7}}.weight/bias); "
                         f"missing {missing}, unexpected {unexpected[:8]}")
    widths = [state["layers.0.weight"].shape[1]] + [state[f"layers.{i}.weight"].shape[0] for i in HEAD_LINEAR_SLOTS]
    if widths[-1] != 1:
        raise ValueError(f"{where}: the last layer has {widths[-1]} outputs, expected 1")
    head = AestheticHead(widths)
    try:
        head.load_state_dict({key: v.float() for key, v in state.items()})
    except RuntimeError as err:  # widths that do not chain from one layer to the next
        raise ValueError(f"{where}: {err}") from None
    return head.eval().requires_grad_(False)


def load_head(path: str) -> AestheticHead:
    """The head saved at ``path``: a ``.pth`` state dict (or a checkpoint holding one under ``state_dict``),
    or a ``.safetensors`` file."""
    path = os.path.expanduser(str(path))
    where = f"aesthetic: head '{path}'"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where} does not exist (the MLP .pth, e.g. sac+logos+ava1-l14-linearMSE.pth)")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state: Any = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling and format errors of all kinds
        raise ValueError(f"{where}: cannot read it ({type(err).__name__}: {err})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{where}: expected a state dict of tensors, got {type(state).__name__}")
    return head_from_state_dict(state, where)


@register("aesthetic")
class AestheticReward:
    """LAION aesthetic score of each image (prompts are ignored). ``clip_model``: a CLIP (or CLIP vision with
    projection) checkpoint folder or hub id; ``head``: the MLP ``.pth``; ``processor``: where the image
    processor config lives (default: ``clip_model``). The head runs in fp32 whatever ``dtype`` the CLIP runs in."""

    name = "aesthetic"

    def __init__(self, clip_model: str = "openai/clip-vit-large-patch14", head: str | None = None,
                 processor: str | None = None, device: str = "cpu", dtype: str | torch.dtype = "float32",
                 batch_size: int = 32):
        from transformers import AutoConfig, CLIPVisionModelWithProjection

        if not head:
            raise ValueError("aesthetic: head is required (path to the MLP .pth, e.g. "
                             "sac+logos+ava1-l14-linearMSE.pth)")
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.name)
        self.batch_size = check_batch_size(batch_size, self.name)
        self.head = load_head(head).to(self.device)
        clip_model = str(clip_model)
        config = load_pretrained(AutoConfig, clip_model, self.name, "clip_model")
        if getattr(config, "model_type", "") == "clip":  # a full CLIPModel: the vision tower and its projection
            vision = config.vision_config
            vision.projection_dim = config.projection_dim
            config = vision
        self.vision = load_pretrained(CLIPVisionModelWithProjection, clip_model, self.name, "clip_model",
                                      config=config, dtype=self.dtype)
        self.vision.to(self.device).eval().requires_grad_(False)
        self.transform = load_image_transform(str(processor or clip_model), self.name, "processor")
        check_image_size(self.transform, config.image_size, self.name)
        in_dim = self.head.in_features
        if in_dim != config.projection_dim:
            raise ValueError(f"aesthetic: head '{head}' takes {in_dim}-d embeddings but clip_model '{clip_model}' "
                             f"gives {config.projection_dim}-d ones")

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """``[B, D]`` fp32 L2-normalised CLIP image embeddings."""
        pixels = self.transform(images.to(self.device)).to(self.dtype)
        return F.normalize(self.vision(pixel_values=pixels).image_embeds.float(), dim=-1)

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        parts = [self.head(self.embed(images[i:i + self.batch_size])).squeeze(-1)
                 for i in range(0, images.shape[0], self.batch_size)]
        score = torch.cat(parts).float().cpu() if parts else torch.zeros(0)
        return RewardOutput(score=score, components={self.name: score})
