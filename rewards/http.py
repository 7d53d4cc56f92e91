"""A reward scored by a server over HTTP (``reward.name: http``), and the wire protocol it speaks.

Protocol ``rlflow-reward/1``: JSON over HTTP POST, images as base64 PNG (8-bit RGB, lossless), no pickle.

Request (``Content-Type: application/json``)::

    {"protocol": "rlflow-reward/1",
     "media": "images" | "video",       # optional; default "video" when a sample has more than one frame
     "fps": 24.0,                        # optional; video only
     "samples": [{"images": [PNG, ...],        # the frames (one for a still image), base64 PNG
                  "prompt": "a red circle",
                  "metadata": {...},            # optional: JSON-able per-sample facts
                  "source_images": [PNG, ...]}  # optional: the source images of an edit
                 , ...]}

Every sample has the same number of frames of the same size; ``source_images`` is given for every sample
(the same number, of one size) or for none. Audio is not carried by this version.

Answer ``200``::

    {"protocol": "rlflow-reward/1", "reward": "shapes_geneval",
     "scores": [0.5, ...],                              # one finite number per sample, in request order
     "components": {"partial": [0.5, ...], ...}}       # each one number per sample

An error is a non-200 status with ``{"protocol": "rlflow-reward/1", "error": "..."}``: ``400`` a malformed
request (wrong protocol version, bad PNG, ...), ``422`` the reward itself failed (deterministic: not
retried), ``5xx`` the server failed (retried).

Pixels: the run's images (``[B, 3, H, W]`` fp32 in ``[0, 1]``) are sent as ``round(255 * clamp(x, 0, 1))``
and decoded as ``uint8 / 255``, so the served reward sees the images quantised to 8 bits
(:func:`quantize` is that round trip), as it would any saved PNG.

:class:`HttpReward` is the client: it cuts a call into requests of ``batch_size`` samples, gives each request
``timeout_s`` and retries a timeout, a refused or reset connection and HTTP 408/429/5xx ``retries`` times.
An HTTP error, a malformed answer, a wrong number of scores or a non-finite score raises
:class:`HttpRewardError` naming the reward, the URL (credentials masked) and the samples: never a zero.
``rlflow serve-reward CONFIG`` (``workers/serve_reward.py``) serves a config's reward with this protocol.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import numpy as np
import torch
from PIL import Image

from rewards import register
from rlflow.redact import redact_text
from rlflow.types import Conditions, Media, RewardOutput

PROTOCOL = "rlflow-reward/1"
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class HttpRewardError(RuntimeError):
    """A served reward failed a call: the message names the reward, the URL and the samples."""


class ProtocolError(ValueError):
    """A request or an answer that does not follow ``rlflow-reward/1`` (the message says where)."""


# ---- pixels
def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[..., 3, H, W]`` fp32 in ``[0, 1]`` -> ``[..., H, W, 3]`` uint8 (``round(255 * clamp(x, 0, 1))``)."""
    x = images.detach().float().cpu().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    return x.movedim(-3, -1).contiguous().numpy()


def from_uint8(pixels: np.ndarray) -> torch.Tensor:
    """``[..., H, W, 3]`` uint8 -> ``[..., 3, H, W]`` fp32 in ``[0, 1]``."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).movedim(-1, -3).float().div(255.0)


def quantize(images: torch.Tensor) -> torch.Tensor:
    """``images`` as the server sees them: the 8-bit round trip of the wire, exactly."""
    return from_uint8(to_uint8(images))


def encode_png(image: torch.Tensor) -> str:
    """One ``[3, H, W]`` fp32 image -> base64 PNG text."""
    buf = io.BytesIO()
    Image.fromarray(to_uint8(image), mode="RGB").save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(text: Any, where: str) -> np.ndarray:
    """Base64 PNG text -> ``[H, W, 3]`` uint8 (raises :class:`ProtocolError` naming ``where``)."""
    if not isinstance(text, str):
        raise ProtocolError(f"{where}: expected a base64 PNG string, got {type(text).__name__}")
    try:
        with Image.open(io.BytesIO(base64.b64decode(text, validate=True))) as im:
            if im.format != "PNG":
                raise ProtocolError(f"{where}: not a PNG ({im.format})")
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (binascii.Error, ValueError, OSError) as err:
        if isinstance(err, ProtocolError):
            raise
        raise ProtocolError(f"{where}: not a base64 PNG ({type(err).__name__}: {err})") from None


# ---- requests
def encode_request(media: Media, conditions: Conditions) -> dict[str, Any]:
    """The ``rlflow-reward/1`` request for a batch."""
    if media.audio is not None or conditions.audio is not None:
        raise ProtocolError(f"the {PROTOCOL} protocol carries no audio")
    if media.num_samples != len(conditions):
        raise ProtocolError(f"{media.num_samples} samples but {len(conditions)} conditions")
    frames, sources = media.frames, conditions.source_images
    samples = []
    for i in range(media.num_samples):
        sample: dict[str, Any] = {"images": [encode_png(f) for f in frames[i]], "prompt": conditions.prompts[i],
                                  "metadata": dict(conditions.metadata[i])}
        if sources is not None:
            sample["source_images"] = [encode_png(s) for s in sources[i]]
        samples.append(sample)
    body: dict[str, Any] = {"protocol": PROTOCOL, "media": "video" if media.is_video else "images",
                            "samples": samples}
    if media.is_video:
        body["fps"] = float(media.fps)
    return body


def _stack(arrays: list[np.ndarray], what: str) -> np.ndarray:
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ProtocolError(f"{what} differ in size ({', '.join(str(s) for s in sorted(shapes))}); one batch "
                            "holds images of one size")
    return np.stack(arrays)


def decode_request(body: Any) -> tuple[Media, Conditions]:
    """A parsed request -> :class:`Media` and :class:`Conditions` (raises :class:`ProtocolError`)."""
    if not isinstance(body, dict):
        raise ProtocolError(f"the request must be a JSON object, got {type(body).__name__}")
    if body.get("protocol") != PROTOCOL:
        raise ProtocolError(f"protocol {body.get('protocol')!r} is not served here (this server speaks {PROTOCOL!r})")
    samples = body.get("samples")
    if not isinstance(samples, list) or not samples:
        raise ProtocolError("'samples' must be a non-empty list")
    frames, prompts, metadata, sources = [], [], [], []
    for i, s in enumerate(samples):
        if not isinstance(s, dict):
            raise ProtocolError(f"samples[{i}] must be an object")
        imgs = s.get("images")
        if not isinstance(imgs, list) or not imgs:
            raise ProtocolError(f"samples[{i}].images must be a non-empty list of base64 PNGs")
        frames.append(_stack([decode_png(x, f"samples[{i}].images[{j}]") for j, x in enumerate(imgs)],
                             f"samples[{i}].images"))
        prompt = s.get("prompt", "")
        if not isinstance(prompt, str):
            raise ProtocolError(f"samples[{i}].prompt must be a string")
        prompts.append(prompt)
        meta = s.get("metadata", {})
        if not isinstance(meta, dict):
            raise ProtocolError(f"samples[{i}].metadata must be an object")
        metadata.append(meta)
        src = s.get("source_images")
        if src is not None:
            if not isinstance(src, list) or not src:
                raise ProtocolError(f"samples[{i}].source_images must be a non-empty list of base64 PNGs")
            sources.append(_stack([decode_png(x, f"samples[{i}].source_images[{j}]") for j, x in enumerate(src)],
                                  f"samples[{i}].source_images"))
    if sources and len(sources) != len(samples):
        raise ProtocolError("source_images must be given for every sample or for none")
    video = _stack(frames, "the samples' frames")  # [B, T, H, W, 3]
    kind = body.get("media", "video" if video.shape[1] > 1 else "images")
    if kind not in ("images", "video"):
        raise ProtocolError(f"'media' must be 'images' or 'video', got {kind!r}")
    if kind == "images" and video.shape[1] != 1:
        raise ProtocolError(f"'media': 'images' takes one frame per sample, got {video.shape[1]}")
    fps = body.get("fps", 0.0)
    if not isinstance(fps, int | float) or isinstance(fps, bool) or not math.isfinite(fps) or fps < 0:
        raise ProtocolError(f"'fps' must be a finite number >= 0, got {fps!r}")
    pixels = from_uint8(video)
    media = Media(images=pixels[:, 0]) if kind == "images" else Media(video=pixels, fps=float(fps))
    source = from_uint8(_stack(sources, "the samples' source images")) if sources else None
    return media, Conditions(tuple(prompts), source_images=source, metadata=tuple(metadata))


# ---- answers
def encode_response(out: RewardOutput, reward: str) -> dict[str, Any]:
    return {"protocol": PROTOCOL, "reward": reward, "scores": out.score.tolist(),
            "components": {k: v.tolist() for k, v in out.components.items()}}


def error_response(message: str) -> dict[str, Any]:
    return {"protocol": PROTOCOL, "error": message}


def _numbers(value: Any, n: int, what: str) -> torch.Tensor:
    if not isinstance(value, list):
        raise ProtocolError(f"{what} must be a list of numbers, got {type(value).__name__}")
    if len(value) != n:
        raise ProtocolError(f"{what} has {len(value)} values for {n} samples")
    if any(not isinstance(v, int | float) or isinstance(v, bool) for v in value):
        raise ProtocolError(f"{what} holds a value that is not a number")
    bad = [i for i, v in enumerate(value) if not math.isfinite(v)]
    if bad:
        raise ProtocolError(f"{what} has {len(bad)} non-finite value(s) (samples {bad[:8]} of the request)")
    return torch.tensor(value, dtype=torch.float32)


def decode_response(body: Any, n: int) -> RewardOutput:
    """A parsed ``200`` answer for ``n`` samples -> :class:`RewardOutput` (raises :class:`ProtocolError`)."""
    if not isinstance(body, dict):
        raise ProtocolError(f"the answer must be a JSON object, got {type(body).__name__}")
    if body.get("protocol", PROTOCOL) != PROTOCOL:
        raise ProtocolError(f"the answer speaks protocol {body.get('protocol')!r}, not {PROTOCOL!r}")
    if "scores" not in body:
        raise ProtocolError("the answer has no 'scores'")
    score = _numbers(body["scores"], n, "'scores'")
    comps = body.get("components", {})
    if not isinstance(comps, dict):
        raise ProtocolError("'components' must be an object of name -> list of numbers")
    components = {str(k): _numbers(v, n, f"component {k!r}") for k, v in comps.items()}
    return RewardOutput(score=score, components=components)


# ---- the client
def _split_credentials(url: str) -> tuple[str, str | None]:
    """``http://user:pw@host/p`` -> (``http://host/p``, a Basic ``Authorization`` value); urllib sends none."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return url, None
    netloc = parts.hostname or ""
    if ":" in netloc:  # an IPv6 literal
        netloc = f"[{netloc}]"
    if parts.port is not None:
        netloc += f":{parts.port}"
    user = urllib.parse.unquote(parts.username)
    pw = urllib.parse.unquote(parts.password or "")
    auth = "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode("ascii")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc)), auth


@register("http")
class HttpReward:
    """Scores with a reward served over HTTP (``rlflow serve-reward``, or any server of the protocol above).

    url:         the scoring endpoint (``http://host:8000/score``); credentials in it go as Basic auth.
    timeout_s:   seconds per request.
    retries:     extra tries of a request after a timeout, a connection failure or HTTP 408/425/429/5xx.
    batch_size:  samples per request.
    api_key_env: the NAME of an environment variable holding a key, sent as ``Authorization: Bearer ...``.
    headers_env: header name -> NAME of the environment variable holding its value.
    Keys are read from the environment at each request and never stored (nor logged).
    """

    def __init__(self, url: str, timeout_s: float = 60.0, retries: int = 2, batch_size: int = 32,
                 api_key_env: str | None = None, headers_env: dict[str, str] | None = None,
                 retry_backoff_s: float = 0.5, name: str = "http"):
        self.name = name
        self.label = redact_text(str(url))
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"reward '{name}': url must start with http:// or https://, got {self.label!r}")
        if timeout_s <= 0 or retries < 0 or batch_size < 1 or retry_backoff_s < 0:
            raise ValueError(f"reward '{name}': needs timeout_s > 0, retries >= 0, batch_size >= 1 and "
                             f"retry_backoff_s >= 0 (got {timeout_s}, {retries}, {batch_size}, {retry_backoff_s})")
        self.url, self._basic = _split_credentials(url)
        self.timeout_s, self.retries, self.batch_size = float(timeout_s), int(retries), int(batch_size)
        self.retry_backoff_s = float(retry_backoff_s)
        self.header_vars = dict(headers_env or {})
        self.api_key_env = api_key_env
        self._headers()  # a variable that is not set fails here, at the run's start

    def __repr__(self) -> str:
        return f"HttpReward(url={self.label!r}, batch_size={self.batch_size}, api_key_env={self.api_key_env!r})"

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "rlflow-http-reward"}
        if self._basic:
            headers["Authorization"] = self._basic
        wanted = [(h, v, "") for h, v in self.header_vars.items()]
        if self.api_key_env:
            wanted.append(("Authorization", self.api_key_env, "Bearer "))
        for header, var, prefix in wanted:
            value = os.environ.get(var)
            if not value:
                raise ValueError(f"reward '{self.name}': the environment variable {var!r} (for the {header} header) "
                                 "is not set")
            headers[header] = prefix + value
        return headers

    def _scrub(self, text: str) -> str:
        """A server's text with any of our secrets it echoes masked; at most 300 characters."""
        for var in [*self.header_vars.values(), *([self.api_key_env] if self.api_key_env else [])]:
            value = os.environ.get(var)
            if value:
                text = text.replace(value, "***")
        return redact_text(text[:300])

    def __call__(self, media: Media, conditions: Conditions) -> RewardOutput:
        n = len(conditions)
        parts = [self._score(media.index(slice(i, i + self.batch_size)), conditions.index(slice(i, i + self.batch_size)),
                             i) for i in range(0, n, self.batch_size)]
        keys = set(parts[0].components)
        for p, i in zip(parts, range(0, n, self.batch_size), strict=True):
            if set(p.components) != keys:
                raise HttpRewardError(f"{self._where(i, len(p.score))}: the answer's components "
                                      f"{sorted(p.components)} differ from the first request's {sorted(keys)}")
        return RewardOutput.cat(parts)

    def _where(self, first: int, count: int) -> str:
        return f"reward '{self.name}' at {self.label}, samples {first}..{first + count - 1}"

    def _score(self, media: Media, conditions: Conditions, first: int) -> RewardOutput:
        n = len(conditions)
        where = self._where(first, n)
        try:
            data = json.dumps(encode_request(media, conditions)).encode("utf-8")
        except (ProtocolError, TypeError, ValueError) as err:
            raise HttpRewardError(f"{where}: cannot encode the request: {err}") from None
        raw = self._post(data, where)
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise HttpRewardError(f"{where}: malformed answer (not JSON: {err}): "
                                  f"{self._scrub(raw.decode('utf-8', 'replace'))!r}") from None
        try:
            return decode_response(body, n)
        except ProtocolError as err:
            raise HttpRewardError(f"{where}: malformed answer: {err}") from None

    def _post(self, data: bytes, where: str) -> bytes:
        last = ""
        attempt = 0
        for attempt in range(self.retries + 1):  # noqa: B007  (reported after the loop)
            if attempt:
                time.sleep(self.retry_backoff_s * 2 ** (attempt - 1))
            req = urllib.request.Request(self.url, data=data, headers=self._headers(), method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return bytes(resp.read())
            except urllib.error.HTTPError as err:
                last = f"HTTP {err.code} {err.reason}: {self._error_text(err)}"
                if err.code in RETRY_STATUS:
                    continue
                break
            except TimeoutError:
                last = f"timed out after {self.timeout_s:g}s (timeout_s)"
            except OSError as err:  # URLError (refused, unreachable), reset connections, socket timeouts
                reason = getattr(err, "reason", err)
                last = (f"timed out after {self.timeout_s:g}s (timeout_s)" if isinstance(reason, TimeoutError)
                        else f"{type(err).__name__}: {self._scrub(str(reason))}")
        raise HttpRewardError(f"{where}: request failed after {attempt + 1} attempt(s) "
                              f"(retries={self.retries}): {last}")

    def _error_text(self, err: urllib.error.HTTPError) -> str:
        try:
            raw = err.read() if err.fp is not None else b""
        except OSError:
            return ""
        try:
            body = json.loads(raw)
            if isinstance(body, dict) and isinstance(body.get("error"), str):
                return self._scrub(body["error"])
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass
        return self._scrub(raw.decode("utf-8", "replace"))
