"""The CLIP model rewards (aesthetic, PickScore, CLIPScore) on tiny random-weight CLIPs of the real architecture,
saved with ``save_pretrained`` and loaded through the same ``from_pretrained`` path users take.

Run as a script for the throughput numbers quoted in the modules' docstrings:
``PYTHONPATH=. .venv/bin/python tests/test_reward_models_clip.py``.
"""

import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from rewards import build_reward, resolve
from rewards.aesthetic import AestheticReward, load_head
from rewards.clip_score import CLIPScoreReward, PickScoreReward, load_image_transform
from rlflow.types import Conditions, Media

EMBED = 768  # the published head takes ViT-L/14's 768-d embeddings
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
PROMPTS = ["a red square", "two blue circles", "a cat on a mat", "green", "an old photo of a tree"]
AESTHETIC = "rewards.aesthetic:AestheticReward"
PICKSCORE = "rewards.clip_score:PickScoreReward"
CLIPSCORE = "rewards.clip_score:CLIPScoreReward"


def save_tiny_clip(path, image_size=32, seed=0, projection_dim=EMBED):
    """A tiny random CLIPModel with its tokenizer and image processor, saved to ``path`` (no hub access)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                projection_dim=projection_dim)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=8, projection_dim=projection_dim)
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)).save_pretrained(path)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(path)
    return str(path)


def published_head_state(in_dim=EMBED, seed=1):
    """A random head state dict in the published key layout: Linear at Sequential slots 0, 2, 4, 6, 7."""
    g = torch.Generator().manual_seed(seed)
    widths = [in_dim, 1024, 128, 64, 16, 1]
    state = OrderedDict()
    for k, slot in enumerate((0, 2, 4, 6, 7)):
        fan_in = widths[k]
        state[f"layers.{slot}.weight"] = torch.randn(widths[k + 1], fan_in, generator=g) / math.sqrt(fan_in)
        state[f"layers.{slot}.bias"] = torch.randn(widths[k + 1], generator=g) * 0.1
    return state


def head_by_hand(state, emb):
    x = emb
    for slot in (0, 2, 4, 6, 7):  # no activations; Dropout is the identity at eval
        x = x @ state[f"layers.{slot}.weight"].T + state[f"layers.{slot}.bias"]
    return x.squeeze(-1)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def head_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("head") / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(published_head_state(), path)
    return str(path)


def _images(n=5, h=32, w=32, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _score(fn, images, prompts=PROMPTS):
    return fn(Media(images=images), Conditions.of(prompts[: images.shape[0]]))


def _kwargs(spec, clip_dir, head_file, **extra):
    if spec == AESTHETIC:
        return {"clip_model": clip_dir, "head": head_file, **extra}
    return {"model": clip_dir, "processor": clip_dir, **extra}


def _hand_features(clip_dir, images, prompts):
    """Unit image and text embeddings straight from CLIPModel (32 px images: the processor only normalises)."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(clip_dir).eval()
    tok = AutoTokenizer.from_pretrained(clip_dir)(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=(images - MEAN) / STD)
        txt = model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
    img, txt = (x if isinstance(x, torch.Tensor) else x.pooler_output for x in (img, txt))
    return model, img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("size,crop", [(32, 32), (224, 224), (24, 20)])
def test_preprocessing_matches_clip_image_processor(tmp_path, size, crop):
    """Our tensor resize/crop/normalise vs the real CLIPImageProcessor fed the same pixels as uint8: within
    about one uint8 step (the processor rounds to uint8 after each PIL pass), on down-, up- and no-resizes."""
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": crop, "width": crop})
    proc.save_pretrained(tmp_path)
    transform = load_image_transform(str(tmp_path), "test", "processor")
    g = torch.Generator().manual_seed(0)
    for h, w in [(40, 50), (32, 32), (17, 90), (300, 256)]:
        u8 = (torch.rand(3, h, w, generator=g) * 255).round().to(torch.uint8)
        ref = torch.as_tensor(proc(images=[u8.permute(1, 2, 0).numpy()], return_tensors="pt")["pixel_values"])
        ours = transform(u8[None].float() / 255)
        assert ours.shape == ref.shape == (1, 3, crop, crop)
        err = (ours - ref).abs()
        one_step = 1 / 255 / STD.min().item()
        assert err.max() <= 1.6 * one_step, (h, w, err.max())
        assert err.mean() <= 0.45 * one_step, (h, w, err.mean())


def test_published_head_layout_loads_and_reproduces_the_forward(tmp_path, head_file):
    state = published_head_state()
    head = load_head(head_file)
    emb = F.normalize(torch.linspace(-1, 1, EMBED).unsqueeze(0) ** 3 + 0.1, dim=-1)
    torch.testing.assert_close(head(emb), head_by_hand(state, emb).unsqueeze(-1), rtol=0, atol=1e-5)
    # a Lightning-style checkpoint ({"state_dict": ...}) and a safetensors file load the same head
    from safetensors.torch import save_file

    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "ckpt.pth")
    save_file(state, str(tmp_path / "head.safetensors"))
    for other in ("ckpt.pth", "head.safetensors"):
        torch.testing.assert_close(load_head(str(tmp_path / other))(emb), head(emb), rtol=0, atol=0)


def test_head_file_errors(tmp_path, clip_dir, head_file):
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match=r"aesthetic: head '.*nope\.pth' does not exist"):
        AestheticReward(clip_model=clip_dir, head=missing)
    with pytest.raises(ValueError, match="aesthetic: head is required"):
        AestheticReward(clip_model=clip_dir)
    state = published_head_state()
    relu_layout = {k.replace("layers.7.", "layers.9."): v for k, v in state.items()}  # a head with activations
    torch.save(relu_layout, tmp_path / "relu.pth")
    with pytest.raises(ValueError, match=r"relu\.pth': not the aesthetic predictor layout.*missing \['layers\.7\.bias', "
                                         r"'layers\.7\.weight'\], unexpected \['layers\.9\.bias'"):
        load_head(str(tmp_path / "relu.pth"))
    torch.save(published_head_state(in_dim=512), tmp_path / "b32.pth")
    with pytest.raises(ValueError, match=r"head '.*b32\.pth' takes 512-d embeddings but clip_model .* gives 768-d"):
        AestheticReward(clip_model=clip_dir, head=str(tmp_path / "b32.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"junk\.pth': cannot read it"):
        load_head(str(tmp_path / "junk.pth"))


def test_aesthetic_equals_hand_computation(clip_dir, head_file):
    images = _images(3)
    out = _score(build_reward(AESTHETIC, {"clip_model": clip_dir, "head": head_file}), images)
    _, img, _ = _hand_features(clip_dir, images, PROMPTS[:3])
    want = head_by_hand(published_head_state(), img)
    assert out.score.shape == (3,) and out.score.dtype == torch.float32
    assert set(out.components) == {"aesthetic"}
    torch.testing.assert_close(out.score, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.components["aesthetic"], want, rtol=0, atol=1e-5)
    assert want.std() > 1e-3  # the images really score differently


def test_pickscore_equals_hand_computation(clip_dir):
    images = _images(5, seed=1)
    out = _score(build_reward(PICKSCORE, {"model": clip_dir, "processor": clip_dir}), images)
    model, img, txt = _hand_features(clip_dir, images, PROMPTS)
    want = model.logit_scale.exp().item() * (img * txt).sum(-1)
    assert set(out.components) == {"pickscore"} and out.score.shape == (5,)
    torch.testing.assert_close(out.score, want, rtol=0, atol=1e-5)


def test_clipscore_equals_hand_computation_and_clips_at_zero(tmp_path, clip_dir):
    images = _images(5, seed=2)
    reward = build_reward(CLIPSCORE, {"model": clip_dir, "processor": clip_dir})
    out = _score(reward, images)
    _, img, txt = _hand_features(clip_dir, images, PROMPTS)
    cos = (img * txt).sum(-1)
    assert (cos > 0).all(), cos  # the tiny random CLIP's cosines are small and positive
    torch.testing.assert_close(out.score, 2.5 * cos, rtol=0, atol=1e-5)
    assert set(out.components) == {"clipscore"}
    # the same CLIP with its text projection negated: every cosine flips sign and clips to 0
    from transformers import CLIPModel

    flipped = CLIPModel.from_pretrained(clip_dir)
    with torch.no_grad():
        flipped.text_projection.weight.neg_()
    flipped.save_pretrained(tmp_path)
    neg = _score(build_reward(CLIPSCORE, {"model": str(tmp_path), "processor": clip_dir}), images)
    assert torch.equal(neg.score, torch.zeros(5))
    # w and the paper's caption prefix
    prefixed = _score(build_reward(CLIPSCORE, {"model": clip_dir, "processor": clip_dir, "w": 1.0,
                                               "prefix": "A photo depicts "}), images)
    _, img, txt = _hand_features(clip_dir, images, ["A photo depicts " + p for p in PROMPTS])
    torch.testing.assert_close(prefixed.score, (img * txt).sum(-1).clamp(min=0), rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", [AESTHETIC, PICKSCORE, CLIPSCORE])
def test_batching_invariance_and_determinism(clip_dir, head_file, spec):
    images = _images(5, 40, 48, seed=3)  # 40x48: resized and cropped on the way in
    small = build_reward(spec, _kwargs(spec, clip_dir, head_file, batch_size=2))
    whole = build_reward(spec, _kwargs(spec, clip_dir, head_file, batch_size=5))
    a, b = _score(small, images), _score(whole, images)
    assert a.score.shape == (5,) and a.score.dtype == torch.float32
    torch.testing.assert_close(a.score, b.score, rtol=0, atol=1e-5)
    assert torch.equal(_score(small, images).score, a.score)
    assert a.score.std() > 1e-4  # not a constant
    # a video's middle frame is what gets scored
    video = torch.stack([torch.zeros_like(images), images, torch.ones_like(images)], dim=1)
    v = small(Media(video=video, fps=8), Conditions.of(PROMPTS))
    torch.testing.assert_close(v.score, a.score, rtol=0, atol=1e-5)


def test_names_dtype_and_config_errors(tmp_path, clip_dir):
    import rewards.aesthetic  # noqa: F401  (registers on import; the built-in list is not updated here)
    import rewards.clip_score  # noqa: F401

    assert resolve("aesthetic") is AestheticReward
    assert resolve("pickscore") is PickScoreReward and resolve("clipscore") is CLIPScoreReward
    images = _images(4, seed=4)
    fp32 = PickScoreReward(model=clip_dir, processor=clip_dir)(images, PROMPTS[:4])
    bf16 = PickScoreReward(model=clip_dir, processor=clip_dir, dtype="bf16")
    assert bf16.model.dtype == torch.bfloat16
    out = _score(build_reward("pickscore", {"model": clip_dir, "processor": clip_dir, "dtype": "bf16"}), images)
    assert out.score.dtype == torch.float32
    torch.testing.assert_close(out.score, fp32.score, rtol=0, atol=0.5)  # ~14 * cos; bf16 rounding only
    with pytest.raises(ValueError, match="pickscore: dtype must be one of .*, got 'int8'"):
        PickScoreReward(model=clip_dir, processor=clip_dir, dtype="int8")
    with pytest.raises(ValueError, match="clipscore: batch_size must be an integer >= 1, got 0"):
        CLIPScoreReward(model=clip_dir, batch_size=0)
    with pytest.raises(FileNotFoundError, match=r"pickscore: model '.*missing' does not exist"):
        PickScoreReward(model=str(tmp_path / "missing"), processor=clip_dir)
    with pytest.raises(OSError, match=r"clipscore: cannot load processor '.*empty' with AutoTokenizer"):
        (tmp_path / "empty").mkdir()
        CLIPScoreReward(model=clip_dir, processor=str(tmp_path / "empty"))
    big = save_tiny_clip(tmp_path / "clip64", image_size=64)
    with pytest.raises(ValueError, match=r"clipscore: the image processor crops to \(32, 32\) but the model takes 64x64"):
        CLIPScoreReward(model=big, processor=clip_dir)


def _benchmark(n=256, batch=16, size=64):
    """Samples/s of each reward on the tiny CLIP, one CPU thread."""
    import tempfile
    import time

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        clip = save_tiny_clip(f"{tmp}/clip")
        head = f"{tmp}/head.pth"
        torch.save(published_head_state(), head)
        images = _images(n, size, size)
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
        for spec in (AESTHETIC, PICKSCORE, CLIPSCORE):
            fn = build_reward(spec, _kwargs(spec, clip, head, batch_size=batch))
            _score(fn, images[:batch], prompts)  # warm-up
            t0 = time.perf_counter()
            fn(Media(images=images), Conditions.of(prompts))
            print(f"{spec}: {n / (time.perf_counter() - t0):.0f} samples/s (batch {batch}, {size} px, 1 thread)")


if __name__ == "__main__":
    _benchmark()
