"""FLUX.1 family (``FluxTransformer2DModel``: FLUX.1-dev, FLUX.1-schnell, any diffusers FLUX folder).

Components (diffusers layout): ``transformer``, ``scheduler``, ``vae`` (``AutoencoderKL``), ``text_encoder``
(``CLIPTextModel``, pooled output only), ``tokenizer``, ``text_encoder_2`` (``T5EncoderModel``, the token
sequence) and ``tokenizer_2``. Prompts go through diffusers' ``FluxPipeline.encode_prompt``.

Latents. The policy state is the unpacked VAE latent ``x: [B, C, h, w]`` with ``C = in_channels // 4`` and
``h, w = H / f, W / f`` (``f = 2 ** (len(vae.block_out_channels) - 1)``, 8 for the real VAE). ``velocity``
packs it into 2x2 patches ``[B, (h / 2) (w / 2), 4 C]`` for the transformer, exactly as ``FluxPipeline``
does, and unpacks the prediction.

Resolution-dependent schedule. With ``use_dynamic_shifting`` (FLUX.1-dev) the sampling grid depends on the
number of image tokens ``(h / 2) (w / 2)``, but :meth:`FluxPolicy.schedule` only gets ``num_steps``. Call
:meth:`FluxPolicy.set_resolution` (or pass ``resolution=`` to ``from_pretrained``) with the image size before
building a :class:`rlflow.sampler.Sampler`; ``latent_shape`` then refuses any other size so the grid and
the sampled latents cannot silently disagree. Without dynamic shifting (FLUX.1-schnell) no size is needed.

Guidance. When ``transformer.config.guidance_embeds`` (FLUX.1-dev, guidance-distilled) ``guidance_scale`` is
an embedded input of a single forward pass (FluxPipeline's default is 3.5; rlflow's default ``1.0`` is rarely
what you want for FLUX.1-dev). Otherwise ``guidance_scale != 1`` is true classifier-free guidance against the
empty prompt, the unconditional branch computed without grad.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from torch import Tensor

from rlflow.models.base import Conditioning, LoraMixin, PromptCache, freeze
from rlflow.schema import ConfigError


def pack_latents(x: Tensor) -> Tensor:
    """``[B, C, h, w]`` -> ``[B, (h / 2) (w / 2), 4 C]``; each token is one 2x2 patch, channels ordered
    ``(c, dy, dx)`` (the layout of ``FluxPipeline._pack_latents``)."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX latents need even height and width, got {h}x{w}")
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """Inverse of :func:`pack_latents`: ``[B, (h / 2) (w / 2), 4 C]`` -> ``[B, C, h, w]``."""
    b, n, d = tokens.shape
    if n != (h // 2) * (w // 2) or d % 4:
        raise ValueError(f"cannot unpack {tuple(tokens.shape)} into {h}x{w} latents")
    x = tokens.reshape(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def latent_image_ids(
    h: int, w: int, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Tensor:
    """Position ids of the packed image tokens: ``[(h / 2) (w / 2), 3]`` rows ``(0, row, col)``."""
    rows = torch.arange(h // 2, dtype=torch.float32).repeat_interleave(w // 2)
    cols = torch.arange(w // 2, dtype=torch.float32).repeat(h // 2)
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=1)
    return ids.to(device=device, dtype=dtype)


def calculate_mu(image_seq_len: int, scheduler_config: Any) -> float:
    """FLUX's dynamic-shift parameter: linear in the number of image tokens between the two anchor points
    ``(base_image_seq_len, base_shift)`` and ``(max_image_seq_len, max_shift)`` of the scheduler config."""
    cfg = dict(scheduler_config)
    x0, x1 = float(cfg.get("base_image_seq_len", 256)), float(cfg.get("max_image_seq_len", 4096))
    y0, y1 = float(cfg.get("base_shift", 0.5)), float(cfg.get("max_shift", 1.15))
    slope = (y1 - y0) / (x1 - x0)
    return image_seq_len * slope + (y0 - slope * x0)


def _has(path: str, sub: str) -> bool:
    return not os.path.isdir(path) or os.path.isdir(os.path.join(path, sub))


class FluxPolicy(LoraMixin):
    """Adapter for FLUX transformers. ``velocity`` takes ``x: [B, C, h, w]``, ``t: [B]`` in ``[0, 1]``.

    Public surface: :meth:`from_pretrained`, :meth:`to`, :attr:`device`, :meth:`set_resolution`,
    :meth:`image_seq_len`, :meth:`schedule`, :meth:`latent_shape`, :meth:`encode_prompts`, :meth:`velocity`,
    :meth:`decode`, and the LoRA methods of :class:`rlflow.models.base.LoraMixin`.
    """

    family = "flux"

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        *,
        vae: AutoencoderKL,
        text_encoder: Any,
        tokenizer: Any,
        text_encoder_2: Any,
        tokenizer_2: Any,
        max_sequence_length: int = 512,
        resolution: tuple[int, int] | None = None,
    ):
        self.transformer = transformer
        self.scheduler = scheduler
        self.vae = vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.max_sequence_length = max_sequence_length
        freeze(transformer, text_encoder, text_encoder_2, vae)
        self._check_dims()
        self._pipe: Any = None
        self._cache = PromptCache(self._encode_one)
        self.resolution: tuple[int, int] | None = None
        if resolution is not None:
            self.set_resolution(*resolution)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        max_sequence_length: int = 512,
        resolution: tuple[int, int] | None = None,
    ) -> FluxPolicy:
        """Load from a diffusers-format FLUX folder or hub id (the real ``from_pretrained`` path).

        ``max_sequence_length``: T5 tokens per prompt (FluxPipeline's default 512; 256 is usual for schnell).
        ``resolution``: ``(height, width)`` in pixels, see :meth:`set_resolution`.
        """
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        missing = [
            s
            for s in ("transformer", "scheduler", "vae", "text_encoder", "text_encoder_2")
            if not _has(path, s)
        ]
        if missing:
            raise ValueError(f"{path} is not a FLUX folder: no {', '.join(missing)} subfolder")
        transformer = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype)
        policy = cls(
            transformer,
            FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler"),
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype),
            text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype),
            tokenizer=AutoTokenizer.from_pretrained(path, subfolder="tokenizer"),
            text_encoder_2=T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", dtype=dtype),
            tokenizer_2=AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2"),
            max_sequence_length=max_sequence_length,
            resolution=resolution,
        )
        return policy.to(device)

    def to(self, device: str | torch.device) -> FluxPolicy:
        """Move every module; cached prompt encodings are dropped (they live on the old device)."""
        for m in (self.transformer, self.text_encoder, self.text_encoder_2, self.vae):
            m.to(device)
        self._cache = PromptCache(self._encode_one)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def _check_dims(self) -> None:
        cfg = self.transformer.config
        if cfg.in_channels % 4 or self.vae.config.latent_channels != cfg.in_channels // 4:
            raise ValueError(
                f"FLUX transformer in_channels ({cfg.in_channels}) must be 4 x the VAE latent_channels "
                f"({self.vae.config.latent_channels}): tokens are packed 2x2 latent patches"
            )
        if sum(cfg.axes_dims_rope) != cfg.attention_head_dim:
            raise ValueError(
                f"sum(axes_dims_rope) {tuple(cfg.axes_dims_rope)} != "
                f"attention_head_dim {cfg.attention_head_dim}"
            )

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each axis."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def dynamic_shifting(self) -> bool:
        return bool(self.scheduler.config.get("use_dynamic_shifting", False))

    def _latent_hw(self, height: int, width: int) -> tuple[int, int]:
        step = 2 * self.vae_scale_factor
        if height % step or width % step:
            raise ConfigError(
                f"image size {height}x{width} (sampling.height x sampling.width): FLUX needs multiples of {step} "
                f"(2 x VAE factor {self.vae_scale_factor})"
            )
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def set_resolution(self, height: int, width: int) -> FluxPolicy:
        """Fix the image size (pixels) that :meth:`schedule` shifts for and :meth:`latent_shape` accepts."""
        self._latent_hw(height, width)
        self.resolution = (height, width)
        return self

    def image_seq_len(self, height: int, width: int) -> int:
        """Number of packed image tokens of a ``height x width`` image: ``(h / 2) (w / 2)``."""
        h, w = self._latent_hw(height, width)
        return (h // 2) * (w // 2)

    def schedule(self, num_steps: int, *, image_seq_len: int | None = None) -> Tensor:
        """The ``[num_steps + 1]`` fp32 grid ``1 = t_0 > ... > t_K = 0`` that ``FluxPipeline`` uses.

        Base sigmas ``linspace(1, 1 / num_steps, num_steps)`` go through the scheduler's own shifting (dynamic
        with ``mu`` from the image token count when ``use_dynamic_shifting``, else its static ``shift``);
        ``image_seq_len`` defaults to the one of :attr:`resolution`.
        """
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if image_seq_len is None:
            if self.resolution is not None:
                image_seq_len = self.image_seq_len(*self.resolution)
            elif self.dynamic_shifting:
                raise ValueError(
                    "this FLUX scheduler shifts its schedule by image size: call "
                    "policy.set_resolution(height, width) before building a Sampler (or pass image_seq_len)"
                )
            else:
                image_seq_len = 0  # mu is ignored without dynamic shifting
        sched = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        sched.set_timesteps(sigmas=sigmas, mu=calculate_mu(image_seq_len, self.scheduler.config))
        return sched.sigmas.to(device="cpu", dtype=torch.float32)

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """``(C, H / f, W / f)`` with ``C = in_channels // 4``; must match :attr:`resolution` if set and the
        schedule depends on it."""
        if self.dynamic_shifting and self.resolution is not None and (height, width) != self.resolution:
            raise ValueError(
                f"schedule() was set for {self.resolution[0]}x{self.resolution[1]} images but "
                f"{height}x{width} latents were asked for: call set_resolution first"
            )
        h, w = self._latent_hw(height, width)
        return (int(self.transformer.config.in_channels) // 4, h, w)

    def _pipeline(self) -> Any:
        if self._pipe is None:
            from diffusers import FluxPipeline

            self._pipe = FluxPipeline(
                scheduler=self.scheduler,
                vae=self.vae,
                text_encoder=self.text_encoder,
                tokenizer=self.tokenizer,
                text_encoder_2=self.text_encoder_2,
                tokenizer_2=self.tokenizer_2,
                transformer=self.transformer,
            )
        return self._pipe

    def _encode_one(self, prompt: str) -> Conditioning:
        pe, pooled, txt_ids = self._pipeline().encode_prompt(
            prompt=[prompt],
            prompt_2=None,
            device=self.device,
            max_sequence_length=self.max_sequence_length,
        )
        return Conditioning({"prompt_embeds": pe, "pooled": pooled}, {"txt_ids": txt_ids})

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """``prompt_embeds [B, L, joint_attention_dim]`` (T5), ``pooled [B, pooled_projection_dim]`` (CLIP)
        and shared ``txt_ids [L, 3]`` (zeros), ``L = max_sequence_length``."""
        return self._cache(prompts)

    def _forward(self, x: Tensor, t: Tensor, cond: Conditioning, guidance: Tensor | None) -> Tensor:
        dtype, dev = self.transformer.dtype, x.device
        _, _, h, w = x.shape
        out = self.transformer(
            hidden_states=pack_latents(x.to(dtype)),
            encoder_hidden_states=cond.tensors["prompt_embeds"].to(dev, dtype),
            pooled_projections=cond.tensors["pooled"].to(dev, dtype),
            timestep=t.to(dev, dtype),
            img_ids=latent_image_ids(h, w, device=dev, dtype=dtype),
            txt_ids=cond.shared["txt_ids"].to(dev, dtype),
            guidance=guidance,
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w).float()

    def velocity(self, x: Tensor, t: Tensor, cond: Conditioning, *, guidance_scale: float = 1.0) -> Tensor:
        """Predicted velocity ``[B, C, h, w]`` fp32 at ``x: [B, C, h, w]``, ``t: [B]`` in ``[0, 1]``.

        The transformer takes ``t`` itself (it scales by 1000 inside). Guidance-distilled models get
        ``guidance_scale`` as the embedded guidance ``[B]``; others use ``v = v_u + w (v_c - v_u)`` with the
        empty-prompt branch ``v_u`` detached.
        """
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((x.shape[0],), guidance_scale, dtype=torch.float32, device=x.device)
            return self._forward(x, t, cond, guidance)
        v_c = self._forward(x, t, cond, None)
        if guidance_scale == 1.0:
            return v_c
        with torch.no_grad():
            v_u = self._forward(x, t, self.encode_prompts([""] * x.shape[0]), None)
        return v_u + guidance_scale * (v_c - v_u)

    def decode(self, x: Tensor) -> Tensor:
        """Final latents ``[B, C, h, w]`` -> images ``[B, 3, H, W]`` fp32 in ``[0, 1]``."""
        with torch.no_grad():
            cfg = self.vae.config
            z = x / cfg.scaling_factor + (cfg.shift_factor or 0.0)
            img = self.vae.decode(z.to(device=self.vae.device, dtype=self.vae.dtype), return_dict=False)[0]
            return (img.float() / 2 + 0.5).clamp(0, 1)
