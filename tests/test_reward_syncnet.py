"""The SyncNet lip-sync reward: the model's layout (the published checkpoint's keys), the mel front end
against numpy/scipy, the offset search, the reward's errors, and a planted AV offset recovered after a
short training of a tiny SyncNet on synthetic talking blobs."""

import math

import numpy as np
import pytest
import scipy.signal
import torch
import torch.nn.functional as F

from rewards.audio import hz_to_mel, mel_filterbank, mel_to_hz, melspectrogram, resample
from rewards.syncnet import (
    SyncNet,
    SyncNetReward,
    audio_windows,
    face_windows,
    load_syncnet,
    mel_start,
    offset_search,
    sync_scores,
    window_count,
)
from rlflow.types import Conditions, Media

SR, FPS, SPF = 16000, 25, 640  # samples per video frame


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- synthetic talking blobs ------------------------------------------------------------------------------


def _render(env, size=64):
    """``[T]`` mouth openings in [0, 1] -> ``[T, 3, size, size]``: a dark lip ellipse on skin, low in the frame,
    whose height follows the opening."""
    r = torch.arange(size).float()[:, None] / size
    c = torch.arange(size).float()[None] / size
    half_h = 0.02 + 0.14 * env[:, None, None]
    inside = ((r - 0.74) / half_h) ** 2 + ((c - 0.5) / 0.24) ** 2
    mask = torch.sigmoid((1 - inside) * 8)[:, None]
    skin = torch.tensor([0.85, 0.65, 0.55])[None, :, None, None]
    lips = torch.tensor([0.35, 0.05, 0.10])[None, :, None, None]
    return skin + (lips - skin) * mask


def _sound(env, seed):
    """``[T]`` loudness per video frame -> a voiced buzz (140 Hz and harmonics) with that envelope, 16 kHz."""
    n = env.shape[0] * SPF
    t = torch.arange(n, dtype=torch.float64) / SR
    buzz = sum(torch.sin(2 * math.pi * 140.0 * h * t + h) / h for h in range(1, 20))
    centres = (np.arange(env.shape[0]) + 0.5) * SPF
    amp = torch.from_numpy(np.interp(np.arange(n), centres, env.double().numpy()))
    noise = 0.01 * torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (0.3 * (0.03 + amp) * buzz + noise).float()


def _clip(frames, delay, seed, margin=10):
    """A clip whose audio lags its video by ``delay`` frames: video frame i's opening is heard at frame
    i + delay (syncnet_python's AV offset of such a clip is ``-delay``)."""
    env = torch.rand(frames + 2 * margin, generator=torch.Generator().manual_seed(seed))
    return _render(env[margin:margin + frames]), _sound(env[margin - delay:margin - delay + frames], seed)


def _tiny(seed=0, width=4):
    torch.manual_seed(seed)
    model = SyncNet(width=width)
    with torch.no_grad():  # non-trivial batch-norm statistics, so eval mode is not an identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _save(model, path):
    torch.save({"state_dict": model.state_dict(), "optimizer": None, "global_step": 0, "global_epoch": 0}, path)
    return str(path)


# ---- the model --------------------------------------------------------------------------------------------


def test_tiny_syncnet_shapes_determinism_and_batching():
    model = _tiny()
    face = torch.rand(6, 15, 48, 96, generator=torch.Generator().manual_seed(1))
    mel = torch.rand(6, 1, 80, 16, generator=torch.Generator().manual_seed(2)) * 8 - 4
    with torch.no_grad():
        a, v = model(mel, face)
        a2, v2 = model(mel, face)
        singles = [model(mel[i:i + 1], face[i:i + 1]) for i in range(6)]
    assert a.shape == v.shape == (6, model.embed_dim) == (6, 64)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(6))
    torch.testing.assert_close(v.norm(dim=1), torch.ones(6))
    assert (a >= 0).all() and (v >= 0).all()  # ReLU'd before the norm: cosines lie in [0, 1]
    assert torch.equal(a, a2) and torch.equal(v, v2)
    torch.testing.assert_close(torch.cat([s[0] for s in singles]), a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([s[1] for s in singles]), v, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"face windows must be \[N, 15, 48, 96\]"):
        model.embed_face(torch.rand(1, 15, 96, 96))


def _published_shapes():
    """The key -> shape layout of Wav2Lip's SyncNet_color (models/syncnet.py with models/conv.py's Conv2d:
    ``conv_block = Sequential(Conv2d, BatchNorm2d)``), written out from that code independently of
    rewards.syncnet: (in, out, kernel) per block, in order."""
    face = [(15, 32, (7, 7)), (32, 64, 5), (64, 64, 3), (64, 64, 3), (64, 128, 3), (128, 128, 3), (128, 128, 3),
            (128, 128, 3), (128, 256, 3), (256, 256, 3), (256, 256, 3), (256, 512, 3), (512, 512, 3),
            (512, 512, 3), (512, 512, 3), (512, 512, 3), (512, 512, 1)]
    audio = [(1, 32, 3), (32, 32, 3), (32, 32, 3), (32, 64, 3), (64, 64, 3), (64, 64, 3), (64, 128, 3),
             (128, 128, 3), (128, 128, 3), (128, 256, 3), (256, 256, 3), (256, 256, 3), (256, 512, 3),
             (512, 512, 1)]
    shapes = {}
    for enc, blocks in (("face_encoder", face), ("audio_encoder", audio)):
        for i, (cin, cout, k) in enumerate(blocks):
            kh, kw = k if isinstance(k, tuple) else (k, k)
            p = f"{enc}.{i}.conv_block"
            shapes[f"{p}.0.weight"] = (cout, cin, kh, kw)
            shapes[f"{p}.0.bias"] = (cout,)
            for name in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"{p}.1.{name}"] = (cout,)
            shapes[f"{p}.1.num_batches_tracked"] = ()
    return shapes


def test_published_checkpoint_layout_loads_strictly(tmp_path):
    shapes = _published_shapes()
    assert len(shapes) == 217
    model = SyncNet()  # the default width is the published model's
    assert model.embed_dim == 512
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.tensor(7) if not s else torch.rand(s, generator=g) + 0.5 if "running_var" in k
                 else torch.randn(s, generator=g) * 0.02) for k, s in shapes.items()}
    SyncNet().load_state_dict(state, strict=True)
    # Wav2Lip's checkpoint dict, and a bare DataParallel-style state dict, both load through the reward's loader
    loaded = load_syncnet(_save_state(state, tmp_path / "lipsync_expert.pth", wrap=True))
    assert loaded.width == 32 and not loaded.training
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    bare = load_syncnet(_save_state({f"module.{k}": v for k, v in state.items()}, tmp_path / "bare.pth"))
    assert torch.equal(bare.face_encoder[0].conv_block[0].weight, state["face_encoder.0.conv_block.0.weight"])
    # a missing or misshapen tensor is an error, never a silently random layer
    broken = dict(state)
    del broken["audio_encoder.13.conv_block.1.running_var"]
    with pytest.raises(RuntimeError, match="running_var"):
        load_syncnet(_save_state(broken, tmp_path / "broken.pth", wrap=True))
    with pytest.raises(FileNotFoundError, match="syncnet: checkpoint .*nope.pth"):
        load_syncnet(tmp_path / "nope.pth")


def _save_state(state, path, wrap=False):
    torch.save({"state_dict": state, "global_step": 1} if wrap else state, path)
    return path


def test_embeddings_reach_one_by_one_at_the_published_size():
    """The published geometry: a 15 x 48 x 96 face window and an 80 x 16 mel window both end at 1 x 1."""
    model = SyncNet().eval()
    with torch.no_grad():
        f = model.face_encoder(torch.rand(1, 15, 48, 96))
        a = model.audio_encoder(torch.rand(1, 1, 80, 16))
    assert f.shape == a.shape == (1, 512, 1, 1)


# ---- the mel front end ------------------------------------------------------------------------------------


def _reference_mel(x):
    """Wav2Lip's melspectrogram in numpy/scipy: scipy's lfilter pre-emphasis, a centred reflect-padded
    periodic-Hann STFT by hand, transformers' numpy Slaney filterbank (the librosa formula), dB, normalise."""
    from transformers.audio_utils import mel_filter_bank

    y = scipy.signal.lfilter([1, -0.97], [1], x)
    padded = np.pad(y, 400, mode="reflect")
    window = scipy.signal.get_window("hann", 800)  # periodic (fftbins=True)
    frames = np.stack([padded[i * 200:i * 200 + 800] * window for i in range(1 + len(y) // 200)])
    mag = np.abs(np.fft.rfft(frames, axis=1)).T  # [401, frames]
    basis = mel_filter_bank(401, 80, 55.0, 7600.0, 16000, norm="slaney", mel_scale="slaney").T
    db = 20 * np.log10(np.maximum(1e-5, basis @ mag)) - 20
    return np.clip(8 * (db + 100) / 100 - 4, -4, 4), basis


def test_mel_front_end_matches_numpy_scipy():
    rng = np.random.default_rng(0)
    t = np.arange(int(0.77 * SR)) / SR
    x = (0.5 * np.sin(2 * np.pi * 440 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
         + 0.2 * scipy.signal.chirp(t, 100, t[-1], 6000) + 0.05 * rng.standard_normal(t.size))
    x[4000:5600] *= 1e-4  # a near-silent stretch reaches the -100 dB floor (the clip)
    ref, basis = _reference_mel(x)
    np.testing.assert_allclose(mel_filterbank(16000, 800, 80, 55.0, 7600.0).numpy(), basis, rtol=0, atol=1e-12)
    out64 = melspectrogram(torch.tensor(x, dtype=torch.float64)).numpy()
    assert out64.shape == ref.shape == (80, 1 + len(x) // 200)
    assert ref.min() == -4.0 and ref.max() > 1.0  # the floor and a loud band are both exercised
    np.testing.assert_allclose(out64, ref, rtol=0, atol=1e-9)
    out32 = melspectrogram(torch.tensor(x, dtype=torch.float32))
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), ref, rtol=0, atol=2e-4)
    batch = melspectrogram(torch.tensor(np.stack([x, x[::-1].copy()]), dtype=torch.float64)).numpy()
    np.testing.assert_allclose(batch[0], ref, rtol=0, atol=1e-9)
    np.testing.assert_allclose(batch[1], _reference_mel(x[::-1].copy())[0], rtol=0, atol=1e-9)


def test_slaney_mel_scale_and_resampling():
    hz = torch.tensor([0.0, 200.0, 1000.0, 6400.0], dtype=torch.float64)
    torch.testing.assert_close(hz_to_mel(hz), torch.tensor([0.0, 3.0, 15.0, 42.0], dtype=torch.float64))
    torch.testing.assert_close(mel_to_hz(hz_to_mel(hz)), hz)
    # a band-limited signal (all below 7 kHz) resamples as scipy.signal.resample does
    rng = np.random.default_rng(1)
    for n, src, dst in ((48000, 48000, 16000), (44100, 44100, 16000), (8000, 8000, 16000)):
        spec = np.fft.rfft(rng.standard_normal(n))
        spec[np.fft.rfftfreq(n, 1 / src) > 3500] = 0
        x = np.fft.irfft(spec, n)
        ours = resample(torch.tensor(x), src, dst).numpy()
        np.testing.assert_allclose(ours, scipy.signal.resample(x, n * dst // src), rtol=0, atol=1e-9)


# ---- windows and the offset search ------------------------------------------------------------------------


def test_windows_follow_wav2lip_indexing():
    assert [mel_start(i) for i in (0, 1, 2, 5, 24, 25)] == [int(80.0 * (i / 25.0)) for i in (0, 1, 2, 5, 24, 25)]
    assert mel_start(25) == 80 and mel_start(1) == 3
    mel = torch.arange(80 * 200).float().reshape(1, 80, 200)
    win = audio_windows(mel, 4)
    assert win.shape == (1, 4, 1, 80, 16)
    assert torch.equal(win[0, 2, 0], mel[0, :, mel_start(2):mel_start(2) + 16])
    video = torch.rand(2, 9, 3, 96, 96)
    faces = face_windows(video, bgr=True)
    assert faces.shape == (2, 5, 15, 48, 96)
    # window 3 = frames 3..7, lower halves, BGR, frame-major on the channel axis
    assert torch.equal(faces[1, 3, 6:9], video[1, 5, :, 48:].flip(0))
    assert torch.equal(face_windows(video, bgr=False)[0, 0, :3], video[0, 0, :, 48:])
    assert face_windows(torch.rand(1, 5, 3, 256, 200)).shape == (1, 1, 15, 48, 96)
    # 2 s at 25 fps and 16 kHz: 46 windows; the audio limits a clip whose audio is shorter
    assert window_count(50, 1 + 32000 // 200) == 46
    assert window_count(50, 1 + 16000 // 200) == 21  # int(3.2 i) + 16 <= 81 for i = 0 .. 20


def test_offset_search_finds_a_planted_shift_exactly():
    g = torch.Generator().manual_seed(0)
    face = F.normalize(torch.rand(3, 40, 16, generator=g), dim=-1)
    audio = F.normalize(torch.rand(3, 40, 16, generator=g), dim=-1)
    for b, k in enumerate((0, 4, -3)):  # audio window i + k carries face window i
        lo, hi = max(0, -k), 40 - max(0, k)
        audio[b, lo + k:hi + k] = face[b, lo:hi]
    s = offset_search(face, audio, vshift=6)
    assert s.mean_dist.shape == (3, 13)
    assert s.offset.tolist() == [0, -4, 3]
    torch.testing.assert_close(s.lse_d, torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(s.lse_c, s.mean_dist.median(dim=1).values)
    assert s.dist0[0] == 0 and (s.dist0[1:] > 0.1).all()
    with pytest.raises(ValueError, match="needs more than 6 windows, got 6"):
        offset_search(face[:, :6], audio[:, :6], vshift=6)


# ---- the reward -------------------------------------------------------------------------------------------


def test_reward_batching_determinism_and_errors(tmp_path):
    reward = SyncNetReward(checkpoint=_save(_tiny(), tmp_path / "tiny.pth"), vshift=4)
    clips = [_clip(24, d, seed) for seed, d in enumerate((0, 1, 2))]
    video = torch.stack([c[0] for c in clips])
    audio = torch.stack([c[1] for c in clips])
    media = Media(video=video, audio=audio, fps=25, sample_rate=SR)
    conds = Conditions.of(["a"] * 3)
    out = reward(media, conds)
    assert out.score.shape == (3,) and out.score.dtype == torch.float32
    assert set(out.components) == {"lse_c", "lse_d", "offset", "dist0"}
    torch.testing.assert_close(out.score, out.components["lse_c"])
    again = reward(media, conds)
    assert all(torch.equal(out.components[k], again.components[k]) for k in out.components)
    for i in range(3):
        one = reward(media.index([i]), conds.index([i]))
        for k in out.components:
            torch.testing.assert_close(one.components[k], out.components[k][i:i + 1], atol=1e-5, rtol=1e-5)
    dist = SyncNetReward(checkpoint=_save(_tiny(), tmp_path / "tiny2.pth"), vshift=4, score="distance")
    torch.testing.assert_close(dist(media, conds).score, -out.components["dist0"])

    with pytest.raises(ValueError, match=r"reward 'syncnet' needs Media.video"):
        reward(Media(images=torch.rand(3, 3, 64, 64)), conds)
    with pytest.raises(ValueError, match=r"reward 'syncnet' needs audio: Media.audio and Conditions.audio"):
        reward(Media(video=video, fps=25), conds)
    with pytest.raises(ValueError, match=r"reward 'syncnet': Media.sample_rate is 0"):
        reward(Media(video=video, audio=audio, fps=25), conds)
    with pytest.raises(ValueError, match=r"reward 'syncnet': Media.video / Media.audio too short: .* 20 sync "
                                         r"windows .* at least 25 frames"):
        SyncNetReward(checkpoint=str(tmp_path / "tiny.pth"), vshift=20)(media, conds)
    short = Media(video=video, audio=audio[:, :300], fps=25, sample_rate=SR)
    with pytest.raises(ValueError, match=r"reward 'syncnet': Media.video / Media.audio too short: the clips give 0"):
        reward(short, conds)
    with pytest.raises(ValueError, match=r"Conditions.audio too short"):
        reward(Media(video=video[:, :7], fps=25), Conditions(("a",) * 3, audio=audio, sample_rate=SR))
    with pytest.raises(ValueError, match=r"score must be 'confidence' or 'distance'"):
        SyncNetReward(checkpoint=str(tmp_path / "tiny.pth"), score="lse")


def test_planted_offset_is_recovered_after_a_short_training(tmp_path):
    """A tiny SyncNet, trained as Wav2Lip trains its expert (BCE on the cosine of in-sync and off-sync
    pairs) for 150 steps on one aligned synthetic clip, finds the delay planted in unseen clips."""
    video, audio = _clip(300, 0, seed=0)
    mel = melspectrogram(audio[None])
    n = window_count(300, mel.shape[-1])
    faces, mels = face_windows(video[None])[0, :n], audio_windows(mel, n)[0]
    torch.manual_seed(0)
    model = SyncNet(width=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(150):
        i = torch.randint(0, n, (16,), generator=g)
        shift = torch.randint(1, 12, (16,), generator=g) * (torch.randint(0, 2, (16,), generator=g) * 2 - 1)
        j = torch.where(torch.rand(16, generator=g) < 0.5, i, (i + shift).clamp(0, n - 1))
        a, v = model(mels[j], faces[i])
        cos = F.cosine_similarity(a, v).clamp(1e-6, 1 - 1e-6)
        loss = F.binary_cross_entropy(cos, (j == i).float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()

    reward = SyncNetReward(checkpoint=_save(model, tmp_path / "trained.pth"), vshift=8)
    delays = (0, 3, -2, 5)
    clips = [_clip(75, d, seed=100 + k) for k, d in enumerate(delays)]
    media = Media(video=torch.stack([c[0] for c in clips]), audio=torch.stack([c[1] for c in clips]), fps=25,
                  sample_rate=SR)
    conds = Conditions.of(["a"] * len(delays))
    out = reward(media, conds)
    assert out.components["offset"].tolist() == [-d for d in delays]
    assert (out.components["lse_c"] > 0.1).all(), out.components["lse_c"]
    dist0 = out.components["dist0"]
    assert (dist0[1:] > dist0[0] + 0.1).all(), dist0  # in sync is closest at offset 0
    # the same clips at 50 fps with 48 kHz audio, carried as the conditions' audio: re-timed and resampled
    hi = Media(video=media.video.repeat_interleave(2, dim=1), fps=50)
    cond48 = Conditions(conds.prompts, audio=resample(media.audio, SR, 48000), sample_rate=48000)
    out48 = reward(hi, cond48)
    assert out48.components["offset"].tolist() == [-d for d in delays]
    torch.testing.assert_close(out48.components["lse_c"], out.components["lse_c"], atol=0.02, rtol=0)
    # the functional API agrees with the reward
    s = sync_scores(model, media.video, media.audio, SR, vshift=8)
    torch.testing.assert_close(s.lse_c, out.components["lse_c"])
