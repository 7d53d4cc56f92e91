"""Model-family adapters on tiny real-layout models (random weights, CPU).

Each family is built from real diffusers/transformers classes, saved with ``save_pretrained`` in diffusers
layout and loaded back through the adapter's ``from_pretrained``. Images are 16x16 pixels; the tiny VAE
downsamples by 2, so latents are ``[4, 8, 8]`` (SD3: 64 image tokens; FLUX: 16 packed 2x2 tokens).
"""

from __future__ import annotations

import string

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from rlflow.algos.dppo import DPPO
from rlflow.config import ConfigError, validate
from rlflow.learner import Learner, LearnerSettings
from rlflow.models import MODEL_FAMILIES, load_policy
from rlflow.models.flux import FluxPolicy, latent_image_ids, pack_latents, unpack_latents
from rlflow.models.sd3 import SD3Policy
from rlflow.sampler import Sampler, SamplerSettings
from rlflow.types import Conditions
from tests.helpers import blank_steps, replayed_anchors

SIZE = 16  # pixels
CLIP_LEN = 8  # CLIP tokens per prompt
T5_LEN = 16  # T5 tokens per prompt (FLUX max_sequence_length)
PROMPTS = ["a red circle", "a blue square", "a red circle", "two green stars"]
GROUPS = torch.tensor([0, 1, 0, 2])
SETTINGS = SamplerSettings(
    height=SIZE, width=SIZE, num_steps=4, sde_steps=2, sde_lo=0, sde_hi=3, chunk_size=2
)


# ----------------------------------------------------------------------------------------------- builders


def clip_tokenizer() -> CLIPTokenizer:
    """Character-level byte-BPE CLIP tokenizer (no merges): ``<|startoftext|>`` = 0, ``<|endoftext|>`` = 1."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_LEN)


def t5_tokenizer() -> T5Tokenizer:
    """Unigram T5 tokenizer over single characters: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in string.ascii_lowercase] + [
        ("\u2581" + c, -1.5) for c in string.ascii_lowercase
    ]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_LEN)


def clip_config(hidden: int, projection: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=54,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_LEN,
        projection_dim=projection,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def tiny_vae() -> AutoencoderKL:
    """4 latent channels, downsampling by 2."""
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=SIZE,
        scaling_factor=1.5,
        shift_factor=0.1,
    )


def build_sd3() -> StableDiffusion3Pipeline:
    """Two CLIP encoders (widths 16 and 24, projections 8 and 12), no T5 (the pipeline then uses zeros)."""
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=SIZE // 2,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16 + 24,
        caption_projection_dim=16,
        pooled_projection_dim=8 + 12,
        pos_embed_max_size=SIZE // 2,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(),
        text_encoder=CLIPTextModelWithProjection(clip_config(16, 8)),
        tokenizer=clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(clip_config(24, 12)),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )


def flux_transformer(guidance_embeds: bool) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=24,
        pooled_projection_dim=16,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    )


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def build_flux() -> FluxPipeline:
    """A FLUX.1-dev-like model: guidance-distilled transformer, dynamic shifting, CLIP (16) + T5 (24)."""
    torch.manual_seed(0)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=56,
            d_model=24,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    return FluxPipeline(
        scheduler=flux_scheduler(),
        vae=tiny_vae(),
        text_encoder=CLIPTextModel(clip_config(16, 16)),
        tokenizer=clip_tokenizer(),
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer(),
        transformer=flux_transformer(guidance_embeds=True),
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[str, object]]:
    """family -> (folder, the pipeline it was saved from)."""
    out = {}
    for family, build in (("sd3", build_sd3), ("flux", build_flux)):
        pipe = build()
        path = tmp_path_factory.mktemp(family)
        pipe.save_pretrained(path)
        out[family] = (str(path), pipe)
    return out


def load(family: str, path: str) -> SD3Policy | FluxPolicy:
    if family == "flux":
        return FluxPolicy.from_pretrained(path, max_sequence_length=T5_LEN).set_resolution(SIZE, SIZE)
    return SD3Policy.from_pretrained(path)


def state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_from_pretrained_round_trip(saved, family):
    path, pipe = saved[family]
    policy = load(family, path)
    assert policy.family == family and policy.device == torch.device("cpu")
    names = ["transformer", "vae", "text_encoder", "text_encoder_2"]
    for name in names:
        assert type(getattr(policy, name)) is type(getattr(pipe, name)), name
        assert state_equal(getattr(policy, name), getattr(pipe, name)), name
    for name in ("tokenizer", "tokenizer_2"):
        ids = getattr(policy, name)(PROMPTS, padding="max_length", truncation=True).input_ids
        assert ids == getattr(pipe, name)(PROMPTS, padding="max_length", truncation=True).input_ids
    public = [k for k in pipe.scheduler.config if not k.startswith("_")]
    assert all(policy.scheduler.config[k] == pipe.scheduler.config[k] for k in public)
    assert all(not p.requires_grad for p in policy.transformer.parameters())
    if family == "sd3":
        assert isinstance(policy, SD3Policy) and policy.text_encoder_3 is None
    cond = policy.encode_prompts(PROMPTS)
    width = policy.transformer.config.joint_attention_dim
    seq = CLIP_LEN + 256 if family == "sd3" else T5_LEN
    assert cond.tensors["prompt_embeds"].shape == (4, seq, width)
    assert cond.tensors["pooled"].shape == (4, policy.transformer.config.pooled_projection_dim)
    if family == "flux":
        assert torch.equal(cond.shared["txt_ids"], torch.zeros(T5_LEN, 3))
    assert torch.equal(cond.tensors["prompt_embeds"][0], cond.tensors["prompt_embeds"][2])  # same prompt
    assert policy.latent_shape(SIZE, SIZE) == (4, SIZE // 2, SIZE // 2)


def test_load_policy_registry(saved):
    policy = load_policy("flux", saved["flux"][0], dtype=torch.float32, device="cpu")
    assert isinstance(policy, FluxPolicy)
    assert state_equal(policy.transformer, saved["flux"][1].transformer)
    policy = load_policy("sd3", saved["sd3"][0], dtype=torch.float32, device="cpu")
    assert isinstance(policy, SD3Policy)
    assert set(MODEL_FAMILIES) == {"sd3", "flux"}


def test_load_policy_unknown_family():
    with pytest.raises(ConfigError, match=r"model.family 'sdxl': unknown model family; registered: flux, sd3"):
        load_policy("sdxl", "/nowhere", dtype=torch.float32, device="cpu")
    with pytest.raises(ConfigError, match=r"model.family: .*unknown model family 'sdxl'; registered: flux, sd3"):
        validate({"model": {"family": "sdxl"}})


def test_sd3_image_size_is_checked_against_the_positional_embedding(saved):
    """The tiny SD3 (VAE factor 2, patch 1, pos_embed_max_size 8) covers at most 16 pixels a side: larger sizes
    fail at set_resolution with the limit spelled out, not inside the first forward pass."""
    policy = load("sd3", saved["sd3"][0])
    assert policy.set_resolution(SIZE, SIZE) is policy and policy.set_resolution(8, SIZE) is policy
    with pytest.raises(ValueError, match=r"32x16 \(sampling.height x sampling.width\).*at most 16 pixels a side "
                       r"\(pos_embed_max_size 8 x patch_size 1 x VAE factor 2\)"):
        policy.set_resolution(32, SIZE)


def test_sd3_schedule(saved):
    policy = load("sd3", saved["sd3"][0])
    grid = policy.schedule(4)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(4)
    assert grid.shape == (5,) and grid.dtype == torch.float32
    assert grid[0] == 1.0 and grid[-1] == 0.0 and bool((grid[1:] < grid[:-1]).all())
    assert torch.equal(grid, sched.sigmas)


@pytest.mark.parametrize("size,steps", [(SIZE, 4), (SIZE, 28), (64, 10), (1024, 28)])
def test_flux_schedule_equals_pipeline(saved, size, steps):
    policy = load("flux", saved["flux"][0]).set_resolution(size, size)
    grid = policy.schedule(steps)
    assert grid.shape == (steps + 1,) and grid.dtype == torch.float32
    assert grid[0] == 1.0 and grid[-1] == 0.0 and bool((grid[1:] < grid[:-1]).all())
    # what FluxPipeline.__call__ does, with the pipeline module's own helpers
    cfg = flux_scheduler().config
    seq_len = (size // 2 // 2) ** 2  # VAE factor 2, then 2x2 packing
    mu = calculate_shift(
        seq_len, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift
    )
    sched = flux_scheduler()
    retrieve_timesteps(sched, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    assert torch.equal(grid, sched.sigmas)
    assert torch.equal(policy.schedule(steps, image_seq_len=seq_len), grid)


def test_flux_schedule_needs_resolution(saved):
    policy = FluxPolicy.from_pretrained(saved["flux"][0], max_sequence_length=T5_LEN)
    assert policy.resolution is None
    with pytest.raises(ValueError, match="set_resolution"):
        policy.schedule(4)
    with pytest.raises(ValueError, match="multiples of 4"):
        policy.set_resolution(18, 16)
    policy.set_resolution(SIZE, SIZE)
    assert not torch.equal(policy.schedule(4), policy.schedule(4, image_seq_len=4096))  # resolution-dependent
    with pytest.raises(ValueError, match="set_resolution"):
        policy.latent_shape(32, 32)
    # without dynamic shifting (schnell-like) no resolution is needed and the static shift applies
    static = FluxPolicy(
        policy.transformer,
        FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=policy.vae,
        text_encoder=policy.text_encoder,
        tokenizer=policy.tokenizer,
        text_encoder_2=policy.text_encoder_2,
        tokenizer_2=policy.tokenizer_2,
    )
    torch.testing.assert_close(static.schedule(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


def test_flux_packing_matches_pipeline():
    x = torch.randn(3, 4, 6, 8)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 3, 4, 6, 8))
    assert torch.equal(unpack_latents(packed, 6, 8), x)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 6 * 8, 8 * 8, 8), x)
    ids = latent_image_ids(6, 8)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(3, 3, 4, "cpu", torch.float32))


def test_flux_dims_are_checked(saved):
    policy = load("flux", saved["flux"][0])
    bad = FluxTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=24,
        pooled_projection_dim=16,
        axes_dims_rope=(2, 2, 4),
    )
    with pytest.raises(ValueError, match="in_channels"):
        FluxPolicy(
            bad,
            policy.scheduler,
            vae=policy.vae,
            text_encoder=policy.text_encoder,
            tokenizer=policy.tokenizer,
            text_encoder_2=policy.text_encoder_2,
            tokenizer_2=policy.tokenizer_2,
        )


def test_flux_guidance(saved):
    """guidance_embeds: one pass with embedded guidance; otherwise true CFG against the empty prompt."""
    policy = load("flux", saved["flux"][0])
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([0.9, 0.4])
    cond = policy.encode_prompts(PROMPTS[:2])
    with torch.no_grad():
        v1, v35 = policy.velocity(x, t, cond), policy.velocity(x, t, cond, guidance_scale=3.5)
    assert v1.shape == x.shape and v1.dtype == torch.float32 and v1.abs().max() > 0
    assert not torch.allclose(v1, v35)
    torch.manual_seed(2)
    cfg_policy = FluxPolicy(
        flux_transformer(guidance_embeds=False),
        policy.scheduler,
        vae=policy.vae,
        text_encoder=policy.text_encoder,
        tokenizer=policy.tokenizer,
        text_encoder_2=policy.text_encoder_2,
        tokenizer_2=policy.tokenizer_2,
        max_sequence_length=T5_LEN,
    )
    cfg_policy.add_lora(4, 8)
    v = cfg_policy.velocity(x, t, cond, guidance_scale=4.0)
    v.sum().backward()  # the unconditional branch is detached, the conditional one is not
    with torch.no_grad():
        v_c = cfg_policy.velocity(x, t, cond)
        v_u = cfg_policy.velocity(x, t, cfg_policy.encode_prompts(["", ""]))
    torch.testing.assert_close(v.detach(), v_u + 4.0 * (v_c - v_u))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_ode_matches_diffusers_pipeline(saved, family):
    """A deterministic Euler solve through the adapter reproduces the diffusers pipeline's latents."""
    path, _ = saved[family]
    policy = load(family, path)
    x0 = torch.randn((1, *policy.latent_shape(SIZE, SIZE)), generator=torch.Generator().manual_seed(3))
    gs = 3.5 if family == "flux" else 1.0
    grid = policy.schedule(4).tolist()
    cond = policy.encode_prompts(["a red circle"])
    x = x0
    with torch.no_grad():
        for k in range(4):
            x = x + (grid[k + 1] - grid[k]) * policy.velocity(
                x, torch.full((1,), grid[k]), cond, guidance_scale=gs
            )
    if family == "flux":
        assert isinstance(policy, FluxPolicy)
        pipe = policy._pipeline()
        out = pipe(
            "a red circle",
            height=SIZE,
            width=SIZE,
            num_inference_steps=4,
            guidance_scale=gs,
            latents=pack_latents(x0),
            output_type="latent",
            max_sequence_length=T5_LEN,
        ).images
        out = unpack_latents(out, SIZE // 2, SIZE // 2)
    else:
        assert isinstance(policy, SD3Policy)
        pipe = policy._pipeline()
        out = pipe(
            "a red circle",
            height=SIZE,
            width=SIZE,
            num_inference_steps=4,
            guidance_scale=gs,
            latents=x0,
            output_type="latent",
        ).images
    torch.testing.assert_close(x, out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_rollout_rescore_update_reference(saved, family):
    policy = load(family, saved[family][0])
    sampler = Sampler(policy, SETTINGS)
    roll = sampler.rollout(Conditions.of(PROMPTS), GROUPS, seed=0)
    traj = roll.steps
    c, h, w = policy.latent_shape(SIZE, SIZE)
    assert traj.x.shape == traj.x_next.shape == traj.mean.shape == (4, 2, c, h, w)
    assert traj.log_prob.shape == (4, 2) and roll.final.shape == (4, c, h, w)
    images = roll.media.images
    assert images.shape == (4, 3, SIZE, SIZE)
    for name in ("x", "x_next", "mean", "log_prob"):
        assert torch.isfinite(getattr(traj, name)).all(), name
    assert torch.isfinite(roll.final).all() and torch.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1
    assert torch.equal(traj.t, sampler.grid[traj.step_index])

    probe_x = traj.x[:2, 0].clone()
    probe_t = traj.t[0].expand(2).clone()
    probe_c = policy.encode_prompts(PROMPTS[:2])
    with torch.no_grad():
        v_base = policy.velocity(probe_x, probe_t, probe_c)
    assert v_base.abs().max() > 0

    policy.add_lora(4, 8)
    base = {k: v.clone() for k, v in policy.transformer.state_dict().items() if "lora_" not in k}
    lora_before = policy.lora_state_dict()
    assert lora_before and all("lora_" in k for k in lora_before)
    learner = Learner(policy, DPPO(), LearnerSettings(micro_batch=2), SETTINGS.step)

    logp_old, mean_old = replayed_anchors(learner, blank_steps(roll), 2)
    assert torch.equal(logp_old, traj.log_prob)  # bit-identical re-scoring
    assert torch.equal(mean_old, traj.mean)

    stats = learner.update(roll, torch.tensor([1.0, -1.0, 0.5, -0.5]), seed=0)
    assert np.isfinite(stats["loss"]) and stats["grad_norm"] > 0
    lora_after = policy.lora_state_dict()
    assert any(not torch.equal(lora_before[k], lora_after[k]) for k in lora_before)
    after = {k: v for k, v in policy.transformer.state_dict().items() if "lora_" not in k}
    assert after.keys() == base.keys() and all(torch.equal(base[k], after[k]) for k in base)

    with torch.no_grad():
        v_lora = policy.velocity(probe_x, probe_t, probe_c)
        with policy.reference():
            v_ref = policy.velocity(probe_x, probe_t, probe_c)
    assert torch.equal(v_ref, v_base)
    assert not torch.equal(v_lora, v_base)
    assert policy.trainable_parameters()  # LoRA trainable again after the reference block
