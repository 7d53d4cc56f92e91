"""``rlflow pretrain shapes``: train the tiny shapes-world base model by flow matching on generated scenes.

The shipped base (``rlflow/worlds/shapes/base``) is made in four stages; its ``pretrain.json`` records each
stage's command, settings, held-out figures and wall time:

1. ``rlflow pretrain shapes --out STAGE1`` (the defaults below): flow matching from scratch. Its headroom comes
   from caption noise: a ``mislabel_rate`` fraction of the training scenes show their prompt with one asked-for
   attribute changed, so the base follows each prompt only part of the time (as web-trained models do) and RL
   has something to sharpen. Prompts are dropped (replaced by ``""``) 10% of the time so classifier-free
   guidance is usable. The saved weights are an exponential moving average (``ema_decay``).
2. Two stages of a relation curriculum on position prompts only (``kind_weights`` ``0,0,0,1``, clean captions):
   first with the colours named in the palette's order only (``order_curriculum``), then in both orders.
   Stage 1 alone learns to ignore the relation word (both colour orders mixed from the start pull the layout
   in opposite directions); with one order first it learns the relation, then binds it to either order.
3. ``rlflow pretrain shapes --init-from STAGE2B --distill-guidance 3 ...``: guidance distillation. The model
   learns its own CFG-3 velocity, so one forward pass per step samples like guidance 3 (as FLUX.1-dev does):
   without it the tiny model hedges between a circle and a square (a rounded blob the checker rejects), and
   rollouts with real CFG would cost two forward passes.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlflow.models.sd3 import SD3Policy
from rlflow.sampler import Sampler, SamplerSettings
from rlflow.types import Conditions
from rlflow.worlds.shapes import accuracy_report, eval_set
from rlflow.worlds.shapes.model import (
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_transformer,
    init_for_scratch,
    save_model,
)
from rlflow.worlds.shapes.prompts import sample_specs
from rlflow.worlds.shapes.scene import COLORS, IMAGE_SIZE, Spec, all_specs, mislabel, render, sample_scene


@dataclass(frozen=True)
class PretrainSettings:
    steps: int = 6000  # length of the learning-rate schedule
    stop_at: int | None = None  # stop early (at this step) instead of finishing the schedule
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    prompt_dropout: float = 0.1
    mislabel_rate: float = 0.3  # caption noise: the base follows prompts only part of the time (RL's headroom)
    seed: int = 0
    eval_every: int = 2000
    eval_per_kind: int = 32
    snapshots: bool = False  # also save the model at every eval, under <out>/snapshots/step_N
    init_from: str | None = None  # continue from a saved model folder instead of random weights
    patch_size: int = 4
    heads: int = 4
    head_dim: int = 24
    layers: int = 4
    text_layers: int = 2
    ema_decay: float = 0.999
    high_t_weight: float = 0.2  # fraction of each batch with t ~ U(0.6, 1): the layout-deciding noisy times
    # guidance distillation (needs init_from): the student learns the teacher's (the init model's) CFG velocity
    # v_u + g (v_c - v_u), so one forward pass samples like guidance g (as FLUX.1-dev is guidance-distilled)
    distill_guidance: float | None = None
    kind_weights: tuple[float, ...] | None = None  # how often each prompt kind is drawn (default: equally)
    # relation curriculum: for the first N steps position prompts name their two colours in the palette's order
    # only (red before green before blue before yellow), so the relation word alone decides the layout; then
    # both orders. Mixed from the start, the binding (which object the relation word is about) never starts to
    # be learnt: the two orders cancel each other's gradient.
    order_curriculum: int = 0


def palette_ordered(spec: Spec) -> bool:
    """Whether a spec names its colours in the palette's order (always true but for position prompts)."""
    if spec.kind != "position":
        return True
    colors = list(COLORS)
    return colors.index(spec.color or "") < colors.index(spec.color2 or "")


@lru_cache(maxsize=1)
def _ordered_specs() -> tuple[Spec, ...]:
    return tuple(s for s in all_specs() if palette_ordered(s))


def make_batch(
    rng: np.random.Generator, n: int, dropout: float, mislabel_rate: float = 0.0,
    kind_weights: tuple[float, ...] | None = None, palette_order_only: bool = False,
) -> tuple[torch.Tensor, list[str]]:
    """``n`` rendered scenes in ``[-1, 1]`` (``[n, 3, 32, 32]``) and their prompts (some dropped to "").

    A ``mislabel_rate`` fraction of the scenes show their prompt with one asked-for attribute changed
    (:func:`rlflow.worlds.shapes.scene.mislabel`): noisy captions, as in web-scale image-text data.
    ``palette_order_only`` draws only position prompts whose colours come in the palette's order (the first
    stage of the relation curriculum, :attr:`PretrainSettings.order_curriculum`).
    """
    specs = sample_specs(rng, n, specs=_ordered_specs() if palette_order_only else None, kind_weights=kind_weights)
    drawn = [mislabel(s, rng) if rng.random() < mislabel_rate else s for s in specs]
    images = np.stack([render(sample_scene(s, rng)) for s in drawn])
    prompts = ["" if rng.random() < dropout else s.prompt for s in specs]
    return torch.from_numpy(images) * 2 - 1, prompts


def evaluate(policy: SD3Policy, per_kind: int, num_steps: int = 40) -> dict[str, float]:
    """Strict held-out accuracy of the deterministic ODE sampler."""
    prompts, seeds = eval_set(per_kind)
    sampler = Sampler(policy, SamplerSettings(height=IMAGE_SIZE, width=IMAGE_SIZE, chunk_size=64))
    media = sampler.sample(Conditions.of(prompts), seeds, num_steps=num_steps)
    return accuracy_report(media.stills.numpy(), prompts)


def _init_model(s: PretrainSettings) -> tuple[Any, Any, Any]:
    init_from = s.init_from
    if init_from is None:
        transformer = build_transformer(heads=s.heads, head_dim=s.head_dim, layers=s.layers, patch_size=s.patch_size)
        return build_tokenizer(), build_text_encoder(layers=s.text_layers), init_for_scratch(transformer)
    from diffusers import SD3Transformer2DModel
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    return (
        AutoTokenizer.from_pretrained(init_from, subfolder="tokenizer"),
        CLIPTextModelWithProjection.from_pretrained(init_from, subfolder="text_encoder"),
        SD3Transformer2DModel.from_pretrained(init_from, subfolder="transformer"),
    )


def _velocity(transformer: Any, text_encoder: Any, tokenizer: Any, xt: torch.Tensor, t: torch.Tensor,
              prompts: list[str]) -> torch.Tensor:
    """The model's velocity at ``(x_t, t)`` for ``prompts`` (``t`` in ``[0, 1]``, one per sample)."""
    tok = tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt")
    enc = text_encoder(tok.input_ids)
    return transformer(
        hidden_states=xt, encoder_hidden_states=enc.last_hidden_state, pooled_projections=enc.text_embeds,
        timestep=t * 1000, return_dict=False,
    )[0]


def _guided_target(teacher: tuple[Any, Any], tokenizer: Any, xt: torch.Tensor, t: torch.Tensor, prompts: list[str],
                   guidance: float) -> torch.Tensor:
    """The teacher's classifier-free-guided velocity ``v_u + g (v_c - v_u)`` (just ``v_u`` for dropped prompts)."""
    with torch.no_grad():
        v = _velocity(*teacher, tokenizer, torch.cat([xt, xt]), torch.cat([t, t]), prompts + [""] * len(prompts))
        v_c, v_u = v.chunk(2)
        g = torch.tensor([guidance if p else 1.0 for p in prompts])[:, None, None, None]
        return v_u + g * (v_c - v_u)


def pretrain(out_dir: str | Path, s: PretrainSettings, log: Callable[[str], None] = print) -> dict[str, float]:
    if s.distill_guidance is not None and s.init_from is None:
        raise ValueError("pretrain: distill_guidance needs init_from (the teacher model folder)")
    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    tokenizer, text_encoder, transformer = _init_model(s)
    teacher = None
    if s.distill_guidance is not None:
        teacher = (copy.deepcopy(transformer).requires_grad_(False).eval(),
                   copy.deepcopy(text_encoder).requires_grad_(False).eval())
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    # an exponential moving average of the weights is what is evaluated and saved (sharper samples)
    ema_tr, ema_te = copy.deepcopy(transformer).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    ema_params = list(ema_tr.parameters()) + list(ema_te.parameters())
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / s.warmup) * 0.5 * (1 + math.cos(math.pi * min(i / s.steps, 1.0)))
    )
    report: dict[str, float] = {}
    start = time.time()
    last = min(s.stop_at or s.steps, s.steps)
    for step in range(1, last + 1):
        transformer.train()
        text_encoder.train()
        x0, prompts = make_batch(rng, s.batch_size, s.prompt_dropout, s.mislabel_rate, s.kind_weights,
                                 palette_order_only=step <= s.order_curriculum)
        t = torch.rand(s.batch_size)
        n_high = int(s.high_t_weight * s.batch_size)
        t[:n_high] = 0.6 + 0.4 * t[:n_high]
        eps = torch.randn_like(x0)
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
        v = _velocity(transformer, text_encoder, tokenizer, xt, t, prompts)
        if teacher is None:
            target = eps - x0
        else:
            assert s.distill_guidance is not None  # a teacher exists only for guidance distillation
            target = _guided_target(teacher, tokenizer, xt, t, prompts, s.distill_guidance)
        loss = torch.nn.functional.mse_loss(v, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - min(s.ema_decay, (1 + step) / (10 + step)))
        if step % 100 == 0:
            log(f"step {step} loss {loss.item():.4f} ({time.time() - start:.0f}s)")
        if step % s.eval_every == 0 or step == last:
            policy = SD3Policy(ema_tr, build_scheduler(), text_encoder=ema_te, tokenizer=tokenizer)
            report = evaluate(policy, s.eval_per_kind)
            log(f"step {step} eval {json.dumps({k: round(v, 3) for k, v in report.items() if not k.endswith(('_lo', '_hi'))})}")
            if s.snapshots:
                save_model(Path(out_dir) / "snapshots" / f"step_{step}", ema_tr, ema_te, tokenizer, build_scheduler())
    save_model(out_dir, ema_tr, ema_te, tokenizer, build_scheduler())
    summary = {**report, "steps": float(last), "seconds": time.time() - start, "torch_threads": torch.get_num_threads()}
    (Path(out_dir) / "pretrain.json").write_text(json.dumps({"settings": asdict(s), "result": summary}, indent=2) + "\n")
    return summary
