"""SD3 / SD3.5 family (``SD3Transformer2DModel``).

Two text front-ends, chosen from what the folder holds:
- the real SD3 layout (``text_encoder``, ``text_encoder_2`` and optional ``text_encoder_3``): prompts are
  encoded by diffusers' ``StableDiffusion3Pipeline.encode_prompt``;
- a single CLIP text encoder (the toy worlds): its last hidden state is the sequence and its projected
  output the pooled vector; their widths must equal the transformer's ``joint_attention_dim`` and
  ``pooled_projection_dim``.
Without a ``vae`` folder the model works in pixel space and ``decode`` is the identity map to ``[0, 1]``.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from torch import Tensor

from rlflow.models.base import Conditioning, LoraMixin, PromptCache, freeze
from rlflow.schema import ConfigError
from rlflow.sde import flow_schedule

_OPTIONAL = ("text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3", "vae")


def _load_part(path: str, sub: str, loader: Any, **kw: Any) -> Any:
    """A component from ``path/sub``; ``None`` when an optional one is absent (local folder or hub id)."""
    if os.path.isdir(path) and not os.path.isdir(os.path.join(path, sub)):
        if sub in _OPTIONAL:
            return None
        raise FileNotFoundError(f"model.path {path}: no '{sub}' folder (diffusers layout expected)")
    try:
        return loader.from_pretrained(path, subfolder=sub, **kw)
    except OSError:
        if sub in _OPTIONAL and not os.path.isdir(path):
            return None
        raise


class SD3Policy(LoraMixin):
    """Adapter for SD3-family transformers. ``velocity`` takes ``x: [B, C, H, W]``, ``t: [B]`` in ``[0, 1]``."""

    family = "sd3"

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        *,
        text_encoder: Any,
        tokenizer: Any,
        text_encoder_2: Any = None,
        tokenizer_2: Any = None,
        text_encoder_3: Any = None,
        tokenizer_3: Any = None,
        vae: AutoencoderKL | None = None,
        max_sequence_length: int = 256,
    ):
        self.transformer = transformer
        self.scheduler = scheduler
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.text_encoder_3, self.tokenizer_3 = text_encoder_3, tokenizer_3
        self.vae = vae
        self.max_sequence_length = max_sequence_length
        freeze(transformer, text_encoder, text_encoder_2, text_encoder_3, vae)
        self._pipe: Any = None
        self._cache = PromptCache(self._encode_one)
        if text_encoder_2 is None:
            self._check_single_encoder_dims()

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> SD3Policy:
        """Load from a diffusers-format folder or hub id (the real ``from_pretrained`` path)."""
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        load = functools.partial(_load_part, path)
        parts: dict[str, Any] = {
            "text_encoder": load("text_encoder", CLIPTextModelWithProjection, dtype=dtype),
            "tokenizer": load("tokenizer", AutoTokenizer),
            "text_encoder_2": load("text_encoder_2", CLIPTextModelWithProjection, dtype=dtype),
            "tokenizer_2": load("tokenizer_2", AutoTokenizer),
            "text_encoder_3": load("text_encoder_3", T5EncoderModel, dtype=dtype),
            "tokenizer_3": load("tokenizer_3", AutoTokenizer),
            "vae": load("vae", AutoencoderKL, torch_dtype=dtype),
        }
        transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
        policy = cls(transformer, scheduler, **parts)
        return policy.to(device)

    def to(self, device: str | torch.device) -> SD3Policy:
        for m in (self.transformer, self.text_encoder, self.text_encoder_2, self.text_encoder_3, self.vae):
            if m is not None:
                m.to(device)
        self._cache = PromptCache(self._encode_one)  # cached rows live on the old device
        return self

    def set_resolution(self, height: int, width: int) -> SD3Policy:
        """Check that ``height x width`` images fit the transformer (SD3's grid itself has a static shift).

        Its patch embedding crops a ``pos_embed_max_size``-patch square of positional embeddings, so larger
        images would only fail deep inside the first forward pass.
        """
        cfg = self.transformer.config
        _, h, w = self.latent_shape(height, width)
        patch, most = int(cfg.patch_size), cfg.get("pos_embed_max_size")
        if h % patch or w % patch:
            raise ConfigError(
                f"image size {height}x{width} (sampling.height x sampling.width) gives {h}x{w} latents, "
                f"not a multiple of the transformer's patch_size {patch}"
            )
        if most is not None and max(h, w) > patch * int(most):
            f = height // h
            raise ConfigError(
                f"image size {height}x{width} (sampling.height x sampling.width) is larger than this SD3 "
                f"transformer's positional embedding covers: at most {patch * int(most) * f} pixels a side "
                f"(pos_embed_max_size {most} x patch_size {patch} x VAE factor {f})"
            )
        return self

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def _check_single_encoder_dims(self) -> None:
        cfg, tcfg = self.transformer.config, self.text_encoder.config
        if tcfg.hidden_size != cfg.joint_attention_dim or tcfg.projection_dim != cfg.pooled_projection_dim:
            raise ValueError(
                "single-encoder SD3 model: text_encoder hidden_size/projection_dim "
                f"({tcfg.hidden_size}/{tcfg.projection_dim}) must equal transformer joint_attention_dim/"
                f"pooled_projection_dim ({cfg.joint_attention_dim}/{cfg.pooled_projection_dim})"
            )

    def schedule(self, num_steps: int) -> Tensor:
        """The ``[num_steps + 1]`` sampling grid from the scheduler's static shift."""
        return flow_schedule(num_steps, float(self.scheduler.config.shift))

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        c = int(self.transformer.config.in_channels)
        if self.vae is None:
            return (c, height, width)
        f = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (c, height // f, width // f)

    def _encode_one(self, prompt: str) -> Conditioning:
        if self.text_encoder_2 is not None:
            pe, _, pooled, _ = self._pipeline().encode_prompt(
                prompt=[prompt], prompt_2=None, prompt_3=None, device=self.device,
                do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
            )
            return Conditioning({"prompt_embeds": pe, "pooled": pooled}, {})
        tok = self.tokenizer([prompt], padding="max_length", truncation=True, return_tensors="pt")
        out = self.text_encoder(tok.input_ids.to(self.device))
        return Conditioning({"prompt_embeds": out.last_hidden_state, "pooled": out.text_embeds}, {})

    def _pipeline(self) -> Any:
        if self._pipe is None:
            from diffusers import StableDiffusion3Pipeline

            self._pipe = StableDiffusion3Pipeline(
                transformer=self.transformer, scheduler=self.scheduler, vae=self.vae,
                text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
                text_encoder_3=self.text_encoder_3, tokenizer_3=self.tokenizer_3,
            )
        return self._pipe

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """``prompt_embeds [B, L, joint_attention_dim]`` and ``pooled [B, pooled_projection_dim]``."""
        return self._cache(prompts)

    def _forward(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        dtype = self.transformer.dtype
        out = self.transformer(
            hidden_states=x.to(dtype),
            encoder_hidden_states=cond.tensors["prompt_embeds"].to(dtype),
            pooled_projections=cond.tensors["pooled"].to(dtype),
            timestep=(t * 1000).to(dtype),
            return_dict=False,
        )[0]
        return out.float()

    def velocity(self, x: Tensor, t: Tensor, cond: Conditioning, *, guidance_scale: float = 1.0) -> Tensor:
        """``v = v_u + w (v_c - v_u)``; the unconditional branch runs without grad (detached)."""
        v_c = self._forward(x, t, cond)
        if guidance_scale == 1.0:
            return v_c
        with torch.no_grad():
            v_u = self._forward(x, t, self.encode_prompts([""] * x.shape[0]))
        return v_u + guidance_scale * (v_c - v_u)

    def decode(self, x: Tensor) -> Tensor:
        """Final latents -> images ``[B, 3, H, W]`` fp32 in ``[0, 1]``."""
        with torch.no_grad():
            if self.vae is not None:
                cfg = self.vae.config
                z = x / cfg.scaling_factor + (cfg.shift_factor or 0.0)
                x = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
            return (x.float() / 2 + 0.5).clamp(0, 1)
