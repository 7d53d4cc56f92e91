"""A lip-sync reward: Wav2Lip's expert SyncNet and the audio-visual offset search of the LSE metrics.

The model is the architecture of Wav2Lip's expert lip-sync discriminator (``SyncNet_color``, trained by
its ``color_syncnet_train.py``), written here with the same module and parameter layout, so its published
checkpoint ``lipsync_expert.pth`` (a dict whose ``state_dict`` holds ``face_encoder.N.conv_block.0.*``
convolutions, ``...conv_block.1.*`` batch norms, ``audio_encoder.N...``) loads with ``strict=True``:

- the face encoder sees 5 consecutive frames' lower halves stacked on the channel axis (``15 x 48 x 96``:
  each frame resized to ``96 x 96``, rows ``48:96`` kept, BGR channel order as OpenCV reads them, values in
  ``[0, 1]``);
- the audio encoder sees a ``1 x 80 x 16`` window of normalised mels (:mod:`rewards.audio`; 16 mel frames
  = 0.2 s = 5 video frames at 25 fps), starting at mel frame ``int(80 * i / 25)`` for the window of video
  frames ``i .. i + 4``;
- both end in ReLU'd, L2-normalised 512-d embeddings; Wav2Lip trains their cosine similarity as the
  probability that the pair is in sync.

The reward (:class:`SyncNetReward`, registered as ``syncnet``) embeds every 5-frame window of a clip and
the audio window at each frame, then searches offsets as the SyncNet evaluation (``calc_pdist`` of
syncnet_python, used for LSE-D / LSE-C) does: for each shift ``k`` in ``[-vshift, vshift]`` the mean over
windows ``i`` of ``|f_i - a_{i+k}|``. LSE-D is the smallest mean distance, LSE-C the median of the means
minus that minimum, and the offset is ``-k`` at the minimum, the convention of syncnet_python: an offset
``o > 0`` says the audio of video frame ``i`` sits at audio frame ``i - o`` (audio ahead of the video;
delaying the audio by ``o`` frames aligns them). One difference from ``calc_pdist``: a shift's mean runs
over the windows where both exist, where ``calc_pdist`` pads the audio with zero vectors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rewards import register
from rewards.audio import WAV2LIP, melspectrogram, resample
from rlflow.types import Conditions, Media, RewardOutput

FACE_FRAMES = 5  # video frames per face window
MEL_STEP = 16  # mel frames per audio window
FACE_SIZE = 96  # frames are resized to FACE_SIZE x FACE_SIZE; the lower half (48 x 96) is seen
MODEL_FPS = 25.0  # the frame rate the published model was trained at
PUBLISHED_WIDTH = 32

# (in, out, kernel, stride, padding, residual) in units of the width (the published model: 32); an input
# given as a negative number is a fixed channel count (15 stacked RGB channels, 1 mel channel).
_FACE_LAYERS: list[tuple[int, int, Any, Any, int, bool]] = [
    (-15, 1, 7, 1, 3, False),
    (1, 2, 5, (1, 2), 1, False), (2, 2, 3, 1, 1, True), (2, 2, 3, 1, 1, True),
    (2, 4, 3, 2, 1, False), (4, 4, 3, 1, 1, True), (4, 4, 3, 1, 1, True), (4, 4, 3, 1, 1, True),
    (4, 8, 3, 2, 1, False), (8, 8, 3, 1, 1, True), (8, 8, 3, 1, 1, True),
    (8, 16, 3, 2, 1, False), (16, 16, 3, 1, 1, True), (16, 16, 3, 1, 1, True),
    (16, 16, 3, 2, 1, False), (16, 16, 3, 1, 0, False), (16, 16, 1, 1, 0, False),
]
_AUDIO_LAYERS: list[tuple[int, int, Any, Any, int, bool]] = [
    (-1, 1, 3, 1, 1, False), (1, 1, 3, 1, 1, True), (1, 1, 3, 1, 1, True),
    (1, 2, 3, (3, 1), 1, False), (2, 2, 3, 1, 1, True), (2, 2, 3, 1, 1, True),
    (2, 4, 3, 3, 1, False), (4, 4, 3, 1, 1, True), (4, 4, 3, 1, 1, True),
    (4, 8, 3, (3, 2), 1, False), (8, 8, 3, 1, 1, True), (8, 8, 3, 1, 1, True),
    (8, 16, 3, 1, 0, False), (16, 16, 1, 1, 0, False),
]


class ConvBN(nn.Module):
    """Conv -> BatchNorm (``conv_block.0``, ``conv_block.1``) -> (+ input when residual) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel: Any, stride: Any, padding: int, residual: bool = False):
        super().__init__()
        if residual and (cin != cout or stride != 1):
            raise ValueError(f"a residual block keeps its shape, got {cin} -> {cout} channels, stride {stride}")
        self.conv_block = nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding), nn.BatchNorm2d(cout))
        self.act = nn.ReLU()
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv_block(x)
        if self.residual:
            out = out + x
        return self.act(out)


def _encoder(layers: list[tuple[int, int, Any, Any, int, bool]], width: int) -> nn.Sequential:
    return nn.Sequential(*[
        ConvBN(-cin if cin < 0 else cin * width, cout * width, k, s, p, res) for cin, cout, k, s, p, res in layers
    ])


class SyncNet(nn.Module):
    """Wav2Lip's expert SyncNet with a configurable width (``width=32``, the default, is the published
    model: 512-d embeddings; the embedding has ``16 * width`` dimensions).

    ``face``: ``[N, 15, 48, 96]`` (5 frames' lower halves, BGR, in ``[0, 1]``); ``mel``: ``[N, 1, 80, 16]``.
    """

    def __init__(self, width: int = PUBLISHED_WIDTH):
        super().__init__()
        if width < 1:
            raise ValueError(f"SyncNet width must be >= 1, got {width}")
        self.width = width
        self.face_encoder = _encoder(_FACE_LAYERS, width)
        self.audio_encoder = _encoder(_AUDIO_LAYERS, width)

    @property
    def embed_dim(self) -> int:
        return 16 * self.width

    def embed_face(self, face: Tensor) -> Tensor:
        """``[N, 15, 48, 96]`` -> ``[N, D]`` unit vectors."""
        if face.shape[1:] != (3 * FACE_FRAMES, FACE_SIZE // 2, FACE_SIZE):
            raise ValueError(f"SyncNet face windows must be [N, 15, 48, 96], got {tuple(face.shape)}")
        return F.normalize(self.face_encoder(face).flatten(1), p=2, dim=1)

    def embed_audio(self, mel: Tensor) -> Tensor:
        """``[N, 1, 80, 16]`` -> ``[N, D]`` unit vectors."""
        if mel.shape[1:] != (1, WAV2LIP.n_mels, MEL_STEP):
            raise ValueError(f"SyncNet mel windows must be [N, 1, 80, 16], got {tuple(mel.shape)}")
        return F.normalize(self.audio_encoder(mel).flatten(1), p=2, dim=1)

    def forward(self, mel: Tensor, face: Tensor) -> tuple[Tensor, Tensor]:
        """``(audio_embedding, face_embedding)``, in the original's argument and return order."""
        return self.embed_audio(mel), self.embed_face(face)


def load_syncnet(checkpoint: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> SyncNet:
    """A :class:`SyncNet` from a checkpoint: Wav2Lip's ``{"state_dict": ...}`` (``lipsync_expert.pth``) or a
    bare state dict, with any ``module.`` prefix of a DataParallel save stripped; the width is read from the
    first convolution. Loaded with ``weights_only=True`` and ``strict=True``; returned in eval mode."""
    path = os.fspath(checkpoint)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"syncnet: checkpoint {path!r} does not exist (Wav2Lip's lipsync_expert.pth)")
    blob = torch.load(path, map_location=map_location, weights_only=True)
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"syncnet: {path!r} holds {type(blob).__name__}, expected a state dict or a dict with "
                         "'state_dict'")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    first = state.get("face_encoder.0.conv_block.0.weight")
    if not isinstance(first, Tensor):
        raise ValueError(f"syncnet: {path!r} is not a SyncNet state dict (no face_encoder.0.conv_block.0.weight)")
    model = SyncNet(width=int(first.shape[0]))
    model.load_state_dict(state, strict=True)
    return model.eval()


# ---- preprocessing ---------------------------------------------------------------------------------------


def face_windows(video: Tensor, bgr: bool = True) -> Tensor:
    """``[B, T, 3, H, W]`` RGB face crops in ``[0, 1]`` -> ``[B, T - 4, 15, 48, 96]``: each frame resized to
    96 x 96 (bilinear, antialiased when shrinking), its lower half, channels flipped to BGR when ``bgr``,
    and frames ``i .. i + 4`` stacked frame-major on the channel axis."""
    b, t = video.shape[:2]
    if t < FACE_FRAMES:
        raise ValueError(f"need at least {FACE_FRAMES} frames, got {t}")
    frames = video.reshape(b * t, *video.shape[2:]).float()
    if frames.shape[-2:] != (FACE_SIZE, FACE_SIZE):
        shrink = frames.shape[-2] > FACE_SIZE or frames.shape[-1] > FACE_SIZE
        frames = F.interpolate(frames, size=(FACE_SIZE, FACE_SIZE), mode="bilinear", align_corners=False,
                               antialias=shrink)
    frames = frames[:, :, FACE_SIZE // 2:].clamp(0.0, 1.0)
    if bgr:
        frames = frames.flip(1)
    frames = frames.reshape(b, t, 3, FACE_SIZE // 2, FACE_SIZE)
    n = t - FACE_FRAMES + 1
    stacked = torch.stack([frames[:, j:j + n] for j in range(FACE_FRAMES)], dim=2)  # [B, n, 5, 3, 48, 96]
    return stacked.reshape(b, n, 3 * FACE_FRAMES, FACE_SIZE // 2, FACE_SIZE)


def mel_start(frame: int, fps: float = MODEL_FPS) -> int:
    """The first mel frame of video frame ``frame``'s audio window (Wav2Lip's ``int(80 * (frame / fps))``)."""
    return int(WAV2LIP.frames_per_second * (frame / float(fps)))


def audio_windows(mel: Tensor, count: int, fps: float = MODEL_FPS) -> Tensor:
    """``[B, 80, M]`` mels -> ``[B, count, 1, 80, 16]``: the window at each of the first ``count`` frames."""
    starts = torch.tensor([mel_start(i, fps) for i in range(count)], device=mel.device)
    idx = starts[:, None] + torch.arange(MEL_STEP, device=mel.device)[None]  # [count, 16]
    return mel[:, :, idx].permute(0, 2, 1, 3).unsqueeze(2)


def window_count(frames: int, mel_frames: int, fps: float = MODEL_FPS) -> int:
    """How many 5-frame windows of a ``frames``-frame clip have a full audio window in ``mel_frames``."""
    n = 0
    while n <= frames - FACE_FRAMES and mel_start(n, fps) + MEL_STEP <= mel_frames:
        n += 1
    return n


def resample_frames(video: Tensor, src_fps: float, dst_fps: float) -> Tensor:
    """``[B, T, ...]`` at ``src_fps`` -> at ``dst_fps``, each output frame the latest input frame shown at its
    time (nearest-previous; no blending)."""
    if abs(src_fps - dst_fps) <= 1e-6 * dst_fps:
        return video
    t = video.shape[1]
    count = int(t * dst_fps / src_fps + 1e-9)
    idx = [min(t - 1, int(j * src_fps / dst_fps + 1e-9)) for j in range(count)]
    return video[:, idx]


class ClipTooShort(ValueError):
    """A clip (or its audio) gives too few sync windows for the offset search."""


# ---- offset search ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyncScores:
    """The offset search of ``B`` clips.

    mean_dist:  ``[B, 2 vshift + 1]`` mean face-audio distance at shift ``k = -vshift .. vshift``.
    lse_d:      ``[B]`` the smallest mean distance (LSE-D).
    lse_c:      ``[B]`` median of the mean distances minus the smallest (LSE-C, the confidence).
    offset:     ``[B]`` int64, ``vshift - argmin``: syncnet_python's AV offset in frames.
    dist0:      ``[B]`` the mean distance at shift 0.
    """

    mean_dist: Tensor
    lse_d: Tensor
    lse_c: Tensor
    offset: Tensor
    dist0: Tensor


def offset_search(face: Tensor, audio: Tensor, vshift: int) -> SyncScores:
    """Face and audio embeddings ``[B, N, D]`` of windows ``0 .. N - 1`` -> :class:`SyncScores`; shift ``k``
    pairs face window ``i`` with audio window ``i + k`` over the ``N - |k|`` windows where both exist."""
    if face.shape != audio.shape or face.ndim != 3:
        raise ValueError(f"face and audio embeddings must both be [B, N, D], got {tuple(face.shape)} and "
                         f"{tuple(audio.shape)}")
    n = face.shape[1]
    if vshift < 0 or n <= vshift:
        raise ValueError(f"an offset search over +-{vshift} frames needs more than {vshift} windows, got {n}")
    means = []
    for k in range(-vshift, vshift + 1):
        f = face[:, max(0, -k):n - max(0, k)]
        a = audio[:, max(0, k):n - max(0, -k)]
        means.append((f - a).norm(dim=-1).mean(dim=1))
    mean_dist = torch.stack(means, dim=1)
    lse_d, argmin = mean_dist.min(dim=1)
    # torch.median of an even count is the lower middle value, as syncnet_python's torch.median is.
    lse_c = mean_dist.median(dim=1).values - lse_d
    return SyncScores(mean_dist, lse_d, lse_c, vshift - argmin, mean_dist[:, vshift])


@torch.no_grad()
def sync_scores(model: SyncNet, video: Tensor, audio: Tensor, sample_rate: int, fps: float = MODEL_FPS,
                vshift: int = 15, bgr: bool = True, chunk: int = 256) -> SyncScores:
    """Score clips ``video [B, T, 3, H, W]`` (face crops, RGB in ``[0, 1]``, at ``fps``) against their
    waveforms ``audio [B, L]`` at ``sample_rate``. The video is re-timed to the model's 25 fps and the audio
    resampled to 16 kHz; the clip is cut to the shorter of the two. ``chunk`` windows are embedded at a
    time. Raises :class:`ClipTooShort` when the clips give no more than ``vshift`` windows."""
    device = next(model.parameters()).device
    video = resample_frames(video, fps, MODEL_FPS)
    wav = resample(audio.to(device=device, dtype=torch.float32), sample_rate, WAV2LIP.sample_rate)
    short = wav.shape[-1] <= WAV2LIP.n_fft // 2  # too short for the STFT's reflect padding
    mel = None if short else melspectrogram(wav)  # [B, 80, M]
    n = 0 if mel is None else window_count(video.shape[1], mel.shape[-1])
    if mel is None or n <= vshift:
        need = vshift + FACE_FRAMES
        raise ClipTooShort(f"the clips give {n} sync windows ({video.shape[1]} frames at 25 fps, "
                         f"{audio.shape[-1] / sample_rate:.2f} s of audio); an offset search over +-{vshift} "
                         f"frames needs at least {need} frames ({need / MODEL_FPS:.2f} s) of both")
    b = video.shape[0]
    faces = face_windows(video[:, :n + FACE_FRAMES - 1].to(device), bgr=bgr).flatten(0, 1)
    mels = audio_windows(mel, n).flatten(0, 1)
    face_emb = torch.cat([model.embed_face(faces[i:i + chunk]) for i in range(0, faces.shape[0], chunk)])
    audio_emb = torch.cat([model.embed_audio(mels[i:i + chunk]) for i in range(0, mels.shape[0], chunk)])
    return offset_search(face_emb.reshape(b, n, -1).float(), audio_emb.reshape(b, n, -1).float(), vshift)


# ---- the reward ------------------------------------------------------------------------------------------


@register("syncnet")
class SyncNetReward:
    """Lip-sync reward from Wav2Lip's expert SyncNet and the LSE offset search.

    Input: ``Media.video [B, T, 3, H, W]``, RGB in ``[0, 1]``, assumed to be **face crops** (a face filling
    the frame as Wav2Lip's face detector crops it: each frame is resized to 96 x 96 and its lower half, the
    mouth region, is what the model sees); ``Media.fps`` (0 means ``fps``). Audio: ``Media.audio [B, L]`` at
    ``Media.sample_rate``, or, when the media carry none, ``Conditions.audio`` at ``Conditions.sample_rate``
    (the driving audio of a lip-sync generator); any sample rate (resampled to 16 kHz).

    ``score="confidence"``: LSE-C at the best offset (higher is better); ``score="distance"``: minus the mean
    distance at offset 0 (in sync is what is rewarded; higher is better). Components: ``lse_c``, ``lse_d``,
    ``offset`` (frames, syncnet_python's sign) and ``dist0``.
    """

    def __init__(self, checkpoint: str, fps: float = MODEL_FPS, vshift: int = 15, score: str = "confidence",
                 device: str = "cpu", bgr: bool = True, chunk: int = 256):
        if score not in ("confidence", "distance"):
            raise ValueError(f"syncnet: score must be 'confidence' or 'distance', got {score!r}")
        if fps <= 0:
            raise ValueError(f"syncnet: fps must be > 0, got {fps}")
        if vshift < 0:
            raise ValueError(f"syncnet: vshift must be >= 0, got {vshift}")
        if chunk < 1:
            raise ValueError(f"syncnet: chunk must be >= 1, got {chunk}")
        self.fps, self.vshift, self.score, self.bgr, self.chunk = float(fps), int(vshift), score, bgr, chunk
        self.device = torch.device(device)
        self.model = load_syncnet(checkpoint, map_location=self.device).to(self.device)
        self.model.requires_grad_(False)

    def _audio(self, media: Media, conditions: Conditions) -> tuple[Tensor, int, str]:
        if media.audio is not None:
            return media.audio, media.sample_rate, "Media"
        if conditions.audio is not None:
            return conditions.audio, conditions.sample_rate, "Conditions"
        raise ValueError("reward 'syncnet' needs audio: Media.audio and Conditions.audio are both None")

    def __call__(self, media: Media, conditions: Conditions) -> RewardOutput:
        if media.video is None:
            raise ValueError("reward 'syncnet' needs Media.video [B, T, 3, H, W] (face crops), got images only")
        audio, rate, where = self._audio(media, conditions)
        if rate <= 0:
            raise ValueError(f"reward 'syncnet': {where}.sample_rate is {rate}; set the audio's sample rate")
        if audio.ndim != 2 or audio.shape[0] != media.num_samples:
            raise ValueError(f"reward 'syncnet': {where}.audio must be [B={media.num_samples}, L], got "
                             f"{tuple(audio.shape)}")
        fps = media.fps if media.fps > 0 else self.fps
        try:
            s = sync_scores(self.model, media.video, audio, rate, fps=fps, vshift=self.vshift, bgr=self.bgr,
                            chunk=self.chunk)
        except ClipTooShort as err:
            raise ValueError(f"reward 'syncnet': Media.video / {where}.audio too short: {err}") from None
        score = s.lse_c if self.score == "confidence" else -s.dist0
        return RewardOutput(score=score.float().cpu(), components={
            "lse_c": s.lse_c.float().cpu(), "lse_d": s.lse_d.float().cpu(), "offset": s.offset.float().cpu(),
            "dist0": s.dist0.float().cpu(),
        })
