"""A torch-only mel front end with Wav2Lip's settings (no torchaudio, no librosa at runtime).

``melspectrogram(wav)`` reproduces what Wav2Lip's ``audio.melspectrogram`` computes with its ``hparams``
(and librosa 0.7, the version it pins): pre-emphasis ``y[n] = x[n] - 0.97 x[n-1]``; a centred STFT
(reflect padding of ``n_fft // 2`` each side, periodic Hann window of ``win`` samples, ``n_fft`` bins);
its magnitude (not power) through a Slaney mel filterbank (Slaney's mel scale, linear below 1 kHz and
logarithmic above, each triangle area-normalised by ``2 / (f_hi - f_lo)``); then
``20 log10(max(1e-5, m)) - ref_level_db`` and the symmetric normalisation
``clip(2 A (S - min_db) / -min_db - A, -A, A)`` with ``A = max_abs_value = 4``.

The output is ``[..., n_mels, frames]`` with ``frames = 1 + L // hop`` (80 mel frames per second at 16 kHz
and hop 200). ``resample`` changes a waveform's sample rate (FFT-based, band-limited).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class MelConfig:
    """The front end's settings; :data:`WAV2LIP` holds Wav2Lip's ``hparams``."""

    sample_rate: int = 16000
    n_fft: int = 800
    hop: int = 200
    win: int = 800
    n_mels: int = 80
    fmin: float = 55.0
    fmax: float = 7600.0
    preemphasis: float = 0.97  # 0 disables it
    ref_level_db: float = 20.0
    min_level_db: float = -100.0
    max_abs_value: float = 4.0

    @property
    def frames_per_second(self) -> float:
        return self.sample_rate / self.hop


WAV2LIP = MelConfig()

# Slaney's mel scale (the Auditory Toolbox; librosa's default, htk=False).
_F_SP = 200.0 / 3.0  # Hz per mel below the break
_BREAK_HZ = 1000.0
_BREAK_MEL = _BREAK_HZ / _F_SP  # 15 mels
_LOG_STEP = math.log(6.4) / 27.0  # log-Hz per mel above the break


def hz_to_mel(freq: Tensor) -> Tensor:
    """Slaney mels of frequencies in Hz."""
    lin = freq / _F_SP
    log = _BREAK_MEL + torch.log(torch.clamp(freq, min=_BREAK_HZ) / _BREAK_HZ) / _LOG_STEP
    return torch.where(freq >= _BREAK_HZ, log, lin)


def mel_to_hz(mel: Tensor) -> Tensor:
    """Frequencies in Hz of Slaney mels (the inverse of :func:`hz_to_mel`)."""
    lin = mel * _F_SP
    log = _BREAK_HZ * torch.exp(_LOG_STEP * (torch.clamp(mel, min=_BREAK_MEL) - _BREAK_MEL))
    return torch.where(mel >= _BREAK_MEL, log, lin)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float,
                   dtype: torch.dtype = torch.float64) -> Tensor:
    """``[n_mels, n_fft // 2 + 1]``: triangles in Hz between mel-spaced edges, Slaney area-normalised."""
    if not 0 <= fmin < fmax <= sample_rate / 2:
        raise ValueError(f"mel filterbank needs 0 <= fmin < fmax <= sample_rate / 2, got fmin={fmin}, "
                         f"fmax={fmax}, sample_rate={sample_rate}")
    bins = torch.linspace(0.0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    lo, hi = hz_to_mel(torch.tensor(float(fmin), dtype=torch.float64)), hz_to_mel(torch.tensor(float(fmax),
                                                                                               dtype=torch.float64))
    edges = mel_to_hz(torch.linspace(float(lo), float(hi), n_mels + 2, dtype=torch.float64))  # [n_mels + 2]
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None] - left) / (centre - left)
    falling = (right - bins[None]) / (right - centre)
    weights = torch.clamp(torch.minimum(rising, falling), min=0.0)
    weights = weights * (2.0 / (right - left))
    return weights.to(dtype)


_FILTERBANKS: dict[tuple[MelConfig, torch.dtype, str], Tensor] = {}


def _filterbank(cfg: MelConfig, dtype: torch.dtype, device: torch.device) -> Tensor:
    key = (cfg, dtype, str(device))
    if key not in _FILTERBANKS:
        _FILTERBANKS[key] = mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax,
                                           dtype).to(device)
    return _FILTERBANKS[key]


def preemphasis(wav: Tensor, k: float) -> Tensor:
    """``y[n] = x[n] - k x[n - 1]`` along the last axis, with ``x[-1] = 0``."""
    if k == 0:
        return wav
    return torch.cat([wav[..., :1], wav[..., 1:] - k * wav[..., :-1]], dim=-1)


def stft_magnitude(wav: Tensor, cfg: MelConfig = WAV2LIP) -> Tensor:
    """``[..., n_fft // 2 + 1, 1 + L // hop]``: the centred (reflect-padded) STFT's magnitude."""
    if wav.shape[-1] <= cfg.n_fft // 2:
        raise ValueError(f"audio of {wav.shape[-1]} samples is too short for the STFT (reflect padding needs "
                         f"more than n_fft // 2 = {cfg.n_fft // 2})")
    lead = wav.shape[:-1]
    flat = wav.reshape(-1, wav.shape[-1])
    window = torch.hann_window(cfg.win, periodic=True, dtype=wav.dtype, device=wav.device)
    spec = torch.stft(flat, n_fft=cfg.n_fft, hop_length=cfg.hop, win_length=cfg.win, window=window,
                      center=True, pad_mode="reflect", normalized=False, onesided=True, return_complex=True)
    return spec.abs().reshape(*lead, spec.shape[-2], spec.shape[-1])


def melspectrogram(wav: Tensor, cfg: MelConfig = WAV2LIP) -> Tensor:
    """``[..., n_mels, 1 + L // hop]`` normalised mels in ``[-max_abs_value, max_abs_value]`` of waveforms
    ``[..., L]`` at ``cfg.sample_rate`` (computed in ``wav``'s floating dtype; integers become fp32)."""
    if not wav.is_floating_point():
        wav = wav.float()
    mag = stft_magnitude(preemphasis(wav, cfg.preemphasis), cfg)
    mel = torch.matmul(_filterbank(cfg, wav.dtype, wav.device), mag)
    floor = 10.0 ** (cfg.min_level_db / 20.0)
    db = 20.0 * torch.log10(torch.clamp(mel, min=floor)) - cfg.ref_level_db
    a = cfg.max_abs_value
    return torch.clamp(2 * a * (db - cfg.min_level_db) / (-cfg.min_level_db) - a, -a, a)


def resample(wav: Tensor, orig_sr: int, new_sr: int) -> Tensor:
    """``wav [..., L]`` at ``orig_sr`` -> ``[..., round(L * new_sr / orig_sr)]`` at ``new_sr``: the
    spectrum cut (or zero-padded) at the lower Nyquist frequency, as ``scipy.signal.resample`` does (the
    clip is treated as periodic, so its first and last few milliseconds may ring)."""
    if orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {new_sr}")
    if orig_sr == new_sr:
        return wav
    n = wav.shape[-1]
    m = max(1, round(n * new_sr / orig_sr))
    spec = torch.fft.rfft(wav, dim=-1)
    keep = min(n, m) // 2 + 1
    out = torch.zeros(*spec.shape[:-1], m // 2 + 1, dtype=spec.dtype, device=spec.device)
    out[..., :keep] = spec[..., :keep]
    if min(n, m) % 2 == 0:
        # The shorter signal's Nyquist bin: an upsampled one stands for +f and -f at once (halve it so the
        # longer signal's separate +f and -f bins carry it once); a downsampled one would alias (drop it).
        out[..., keep - 1] = spec[..., keep - 1] * 0.5 if m > n else 0.0
    return torch.fft.irfft(out, n=m, dim=-1) * (m / n)
