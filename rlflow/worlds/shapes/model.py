"""The tiny text-to-image flow model of the shapes world, built from real diffusers/transformers classes.

A word-level tokenizer (``tokenizers`` WordLevel in a ``PreTrainedTokenizerFast``), a tiny
``CLIPTextModelWithProjection`` and a tiny ``SD3Transformer2DModel`` that works directly on 32x32 RGB pixels
(no VAE). Saved in diffusers layout, it loads with :meth:`rlflow.models.sd3.SD3Policy.from_pretrained`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast

from rlflow.worlds.shapes.scene import COLORS, IMAGE_SIZE, NUMBER_WORDS, PHRASINGS, RELATIONS, SHAPES

SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]  # EOS must not be id 2 (CLIP's legacy pooling rule)
MAX_TOKENS = 16
BASE_DIR = Path(__file__).parent / "base"


def vocabulary() -> list[str]:
    words = ["a", *NUMBER_WORDS.values(), *COLORS, *SHAPES, *(s + "s" for s in SHAPES)]
    words += sorted({w for r in RELATIONS for w in r.split()})
    words += sorted({w for p in PHRASINGS for w in p.format("").split()} - set(words))
    return SPECIAL + words


def build_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]",
        model_max_length=MAX_TOKENS,
    )


def build_text_encoder(width: int = 64, layers: int = 2) -> CLIPTextModelWithProjection:
    vocab = vocabulary()
    cfg = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=width,
        pad_token_id=vocab.index("[PAD]"), bos_token_id=vocab.index("[BOS]"), eos_token_id=vocab.index("[EOS]"),
    )
    return CLIPTextModelWithProjection(cfg)


def build_transformer(
    text_width: int = 64, heads: int = 4, head_dim: int = 24, layers: int = 4, patch_size: int = 4
) -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=IMAGE_SIZE, patch_size=patch_size, in_channels=3, out_channels=3, num_layers=layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=text_width,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=text_width,
        pos_embed_max_size=IMAGE_SIZE // patch_size,
    )


def init_for_scratch(transformer: SD3Transformer2DModel, patch_scale: float = 0.1) -> SD3Transformer2DModel:
    """Initialisation for training from scratch (diffusers keeps default inits, expecting pretrained weights).

    - DiT's adaLN-Zero: zero gates and a zero output layer, so every block starts as the identity.
    - A small patch embedding next to the position embedding: the final LayerNorm then stays nearly linear
      in each patch's pixels, so the network can pass the noise through to the velocity (at ``t ~ 1`` the
      target is ``v ~ x_t - E[x0]``). With the default scale the LayerNorm erases each noise patch's norm,
      ``x0_hat = x_t - t v`` keeps that norm, and the ODE grows one spurious object per bright noise patch.
    """
    for name, module in transformer.named_modules():
        if name.endswith(("norm1.linear", "norm1_context.linear", "norm_out.linear")) or name == "proj_out":
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
    with torch.no_grad():
        transformer.pos_embed.proj.weight.mul_(patch_scale)
        transformer.pos_embed.proj.bias.zero_()
    return transformer


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(shift=1.0)


def save_model(
    out_dir: str | os.PathLike,
    transformer: SD3Transformer2DModel,
    text_encoder: CLIPTextModelWithProjection,
    tokenizer: PreTrainedTokenizerFast,
    scheduler: FlowMatchEulerDiscreteScheduler,
) -> None:
    """Write the model in diffusers layout (one folder per component and a ``model_index.json``)."""
    out = Path(out_dir)
    transformer.save_pretrained(out / "transformer")
    text_encoder.save_pretrained(out / "text_encoder")
    tokenizer.save_pretrained(out / "tokenizer")
    scheduler.save_pretrained(out / "scheduler")
    index = {
        "_class_name": "StableDiffusion3Pipeline",
        "_rlflow_family": "sd3",
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "vae": [None, None],
        "text_encoder_2": [None, None],
        "tokenizer_2": [None, None],
        "text_encoder_3": [None, None],
        "tokenizer_3": [None, None],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
