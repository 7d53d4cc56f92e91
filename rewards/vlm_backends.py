"""Backends of the VLM judge (:mod:`rewards.vlm_judge`): one small interface, three engines.

A backend takes a list of :class:`JudgeQuery` (the images of one chat message, then its question text) and
answers one of two things per query:

- :meth:`JudgeBackend.answer_logprobs`: the log-probabilities of given candidate strings (``"Yes"``,
  ``" no"``, ...) as the FIRST generated token of the answer, greedy, no sampling;
- :meth:`JudgeBackend.generate`: the greedy answer text (up to ``max_new_tokens`` tokens).

The three engines:

- ``transformers``: any image-text-to-text model (``AutoModelForImageTextToText`` + ``AutoProcessor``, e.g.
  Qwen2.5-VL, LLaVA), in-process. Candidate log-probs come from the full softmax over the vocabulary;
  a candidate that is not exactly one token is not scored.
- ``vllm``: the offline engine ``vllm.LLM`` (optional, GPU only: ``pip install rlflow[vllm]``). Log-probs
  come from the ``top_logprobs`` most likely first tokens the engine returns (``SamplingParams(logprobs=k)``).
- ``openai``: any OpenAI-compatible ``/chat/completions`` endpoint (``vllm serve``, sglang, ``transformers
  serve``, hosted APIs). Images go as base64 PNG data URLs in ``image_url`` content parts; log-probs come
  from ``logprobs: true, top_logprobs: k`` of the first answer token. The API key is read from the
  environment variable NAMED by ``api_key_env`` at each request; it is never stored on the object.

For the two top-k engines a candidate that is not among the k returned tokens is missing from the answer
(its probability is below the k-th one's). Every failure (HTTP error after the retries, a malformed
answer) raises a :class:`VLMJudgeError` naming the reward and the sample; nothing is ever scored 0 silently.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from rlflow.redact import redact_text

BACKENDS = ("transformers", "vllm", "openai")
VLLM_INSTALL_HINT = "pip install rlflow[vllm]"


class VLMJudgeError(RuntimeError):
    """A VLM judge could not score a sample (the message names the reward and the sample)."""


class VLMBackendError(VLMJudgeError):
    """The engine failed: an HTTP error or a transport failure after the retries."""


class VLMAnswerError(VLMJudgeError):
    """The engine answered, but the answer cannot be scored (malformed, no candidate token, unparseable)."""


@dataclass(frozen=True)
class JudgeQuery:
    """One chat message to the judge: ``images`` (RGB, in order), then the question ``text``.

    ``label`` names the sample in error messages (e.g. ``"sample 3 (prompt 'a red cube')"``)."""

    images: tuple[Image.Image, ...]
    text: str
    label: str = ""


def tensor_to_pil(image: torch.Tensor, max_side: int | None = None) -> Image.Image:
    """``[3, H, W]`` float in ``[0, 1]`` -> an RGB PIL image (rounded to 8 bits), its longer side resized to
    ``max_side`` (bicubic) when it is longer."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a [3, H, W] image, got {tuple(image.shape)}")
    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(np.ascontiguousarray(arr))  # [H, W, 3] uint8 -> RGB
    if max_side is not None and max(pil.size) > max_side:
        w, h = pil.size
        scale = max_side / max(w, h)
        pil = pil.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
    return pil


def png_data_url(image: Image.Image) -> str:
    """``data:image/png;base64,...`` of ``image`` (lossless, so a server sees the same 8-bit pixels)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def chat_messages(query: JudgeQuery, system_prompt: str | None) -> list[dict[str, Any]]:
    """The query as processor-style chat messages: ``{"type": "image"}`` parts, then the text part."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in query.images]
    content.append({"type": "text", "text": query.text})
    messages: list[dict[str, Any]] = []
    if system_prompt:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    messages.append({"role": "user", "content": content})
    return messages


def _logaddexp(a: float | None, b: float) -> float:
    return b if a is None else float(np.logaddexp(a, b))


def merge_alternatives(alternatives: Sequence[tuple[str, float]]) -> dict[str, float]:
    """Top-k ``(token text, log-prob)`` alternatives -> ``{text: log-prob}`` (distinct tokens with the same
    text add up; non-finite entries are dropped)."""
    out: dict[str, float] = {}
    for text, lp in alternatives:
        if math.isfinite(lp):
            out[text] = _logaddexp(out.get(text), lp)
    return out


class JudgeBackend(Protocol):
    """What :class:`rewards.vlm_judge.VLMJudge` needs from an engine."""

    def answer_logprobs(self, queries: Sequence[JudgeQuery], candidates: Sequence[str]) -> list[dict[str, float]]:
        """Per query: ``{token text: log P(the first answer token is it)}``, holding every candidate the engine
        can see: ``transformers`` gives exactly the candidates that are one token; the top-k engines give all
        ``top_logprobs`` alternatives they returned (candidates among them, matched on their exact text).
        An absent candidate has (near-)zero probability."""
        ...

    def generate(self, queries: Sequence[JudgeQuery], max_new_tokens: int) -> list[str]:
        """Per query: the greedy answer text."""
        ...


# ---------------------------------------------------------------------------------------------- transformers


def _torch_dtype(dtype: str | None, owner: str) -> Any:
    if dtype in (None, "auto"):
        return "auto"
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"reward '{owner}': dtype must be 'auto' or a torch dtype name (bfloat16, float16, float32), got {dtype!r}")
    return value


class TransformersBackend:
    """In-process ``AutoModelForImageTextToText`` + ``AutoProcessor`` from ``model`` (a hub id or a local
    folder, via ``from_pretrained``). Queries run in chunks of ``batch_size``, left-padded, through
    ``model.generate`` (greedy), so position ids and multimodal rope are the model's own; the first-token
    log-probs are ``log_softmax`` (fp32) of the raw first-step logits (``output_logits``). A ``device_map``
    in ``model_kwargs`` (e.g. ``"auto"`` for a judge larger than one GPU) replaces ``device``."""

    def __init__(self, model: str, owner: str = "vlm_judge", device: str = "auto", dtype: str | None = "auto",
                 batch_size: int = 8, system_prompt: str | None = None,
                 processor_kwargs: dict[str, Any] | None = None, model_kwargs: dict[str, Any] | None = None,
                 chat_template_kwargs: dict[str, Any] | None = None):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if batch_size < 1:
            raise ValueError(f"reward '{owner}': batch_size must be >= 1, got {batch_size}")
        self.owner, self.model_id, self.batch_size, self.system_prompt = owner, model, batch_size, system_prompt
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   "cpu" if device == "auto" else device)
        self.processor = AutoProcessor.from_pretrained(model, **(processor_kwargs or {}))
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(f"reward '{owner}': the processor of {model!r} has no tokenizer")
        self.tokenizer: Any = tokenizer
        self.tokenizer.padding_side = "left"  # the first generated position is the last one of every row
        model_kwargs = dict(model_kwargs or {})
        self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=_torch_dtype(dtype, owner),
                                                                 **model_kwargs).eval()
        if "device_map" in model_kwargs:  # placed (maybe sharded) by accelerate: inputs go to its first device
            self.device = self.model.device
        else:
            self.model.to(self.device)
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.tokenizer.eos_token_id
        self._candidate_ids: dict[tuple[str, ...], dict[str, int]] = {}

    def __repr__(self) -> str:
        return f"TransformersBackend(model={self.model_id!r}, device={str(self.device)!r})"

    def candidate_ids(self, candidates: Sequence[str]) -> dict[str, int]:
        """``{candidate: token id}`` for the candidates that encode to exactly one token; when two
        candidates are the same token (a SentencePiece "Yes" and " Yes"), only the first is kept."""
        key = tuple(candidates)
        if key not in self._candidate_ids:
            ids: dict[str, int] = {}
            for cand in candidates:
                enc = self.tokenizer.encode(cand, add_special_tokens=False)
                if len(enc) == 1 and enc[0] not in ids.values():
                    ids[cand] = int(enc[0])
            self._candidate_ids[key] = ids
        return self._candidate_ids[key]

    def _inputs(self, queries: Sequence[JudgeQuery]) -> Any:
        texts = [self.processor.apply_chat_template(chat_messages(q, self.system_prompt), tokenize=False,
                                                    add_generation_prompt=True, **self.chat_template_kwargs)
                 for q in queries]
        images = [list(q.images) for q in queries]
        kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
        if any(images):
            kwargs["images"] = images
        # floating tensors (pixel values) to the model's dtype, the rest (ids, masks) only to its device
        return self.processor(**kwargs).to(device=self.device, dtype=self.model.dtype)

    def _generate(self, inputs: Any, max_new_tokens: int, **kwargs: Any) -> Any:
        with torch.inference_mode():
            return self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=self.pad_token_id, **kwargs)

    def answer_logprobs(self, queries: Sequence[JudgeQuery], candidates: Sequence[str]) -> list[dict[str, float]]:
        ids = self.candidate_ids(candidates)
        out: list[dict[str, float]] = []
        for start in range(0, len(queries), self.batch_size):
            inputs = self._inputs(queries[start:start + self.batch_size])
            gen = self._generate(inputs, 1, output_logits=True, return_dict_in_generate=True)
            logprobs = gen.logits[0].float().log_softmax(dim=-1).cpu()
            out.extend({c: float(row[i]) for c, i in ids.items()} for row in logprobs)
        return out

    def generate(self, queries: Sequence[JudgeQuery], max_new_tokens: int) -> list[str]:
        out: list[str] = []
        for start in range(0, len(queries), self.batch_size):
            inputs = self._inputs(queries[start:start + self.batch_size])
            seqs = self._generate(inputs, max_new_tokens)
            new = seqs[:, inputs["input_ids"].shape[1]:]
            out.extend(t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True))
        return out


# ---------------------------------------------------------------------------------------------------- vLLM


class VLLMBackend:
    """The offline ``vllm.LLM`` engine on ``model``. Prompts are built with the model's own chat template
    (``AutoProcessor.apply_chat_template``) and sent with ``multi_modal_data={"image": [...]}``; log-probs
    are the ``top_logprobs`` alternatives of the first token (``SamplingParams(max_tokens=1,
    temperature=0, logprobs=k)``); text is greedy. ``engine_kwargs`` go to ``vllm.LLM`` (e.g.
    ``gpu_memory_utilization``, ``max_model_len``, ``tensor_parallel_size``)."""

    def __init__(self, model: str, owner: str = "vlm_judge", top_logprobs: int = 20, max_images: int = 2,
                 system_prompt: str | None = None, engine_kwargs: dict[str, Any] | None = None,
                 chat_template_kwargs: dict[str, Any] | None = None):
        try:
            import vllm
        except ImportError as err:
            raise ImportError(f"reward '{owner}': backend 'vllm' needs vLLM, which is not installed ({err}); "
                              f"install the GPU-only extra: {VLLM_INSTALL_HINT}") from None
        from transformers import AutoProcessor

        if top_logprobs < 1:
            raise ValueError(f"reward '{owner}': top_logprobs must be >= 1, got {top_logprobs}")
        self.owner, self.model_id, self.top_logprobs = owner, model, top_logprobs
        self.system_prompt = system_prompt
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self._vllm = vllm
        self.processor = AutoProcessor.from_pretrained(model)
        kwargs = {"limit_mm_per_prompt": {"image": max_images}, "max_logprobs": max(20, top_logprobs),
                  **(engine_kwargs or {})}
        self.llm = vllm.LLM(model=model, **kwargs)

    def __repr__(self) -> str:
        return f"VLLMBackend(model={self.model_id!r})"

    def _requests(self, queries: Sequence[JudgeQuery]) -> list[dict[str, Any]]:
        reqs: list[dict[str, Any]] = []
        for q in queries:
            prompt = self.processor.apply_chat_template(chat_messages(q, self.system_prompt), tokenize=False,
                                                        add_generation_prompt=True, **self.chat_template_kwargs)
            req: dict[str, Any] = {"prompt": prompt}
            if q.images:
                req["multi_modal_data"] = {"image": list(q.images) if len(q.images) > 1 else q.images[0]}
            reqs.append(req)
        return reqs

    def answer_logprobs(self, queries: Sequence[JudgeQuery], candidates: Sequence[str]) -> list[dict[str, float]]:
        params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, logprobs=self.top_logprobs)
        outputs = self.llm.generate(self._requests(queries), params, use_tqdm=False)
        tokenizer = None
        result: list[dict[str, float]] = []
        for q, out in zip(queries, outputs, strict=True):
            steps = out.outputs[0].logprobs if out.outputs else None
            if not steps:
                raise VLMAnswerError(f"reward '{self.owner}', {q.label}: vLLM returned no first-token logprobs")
            alternatives: list[tuple[str, float]] = []
            for token_id, lp in steps[0].items():
                text = lp.decoded_token
                if text is None:  # detokenisation off: decode the id ourselves
                    tokenizer = tokenizer or self.llm.get_tokenizer()
                    text = tokenizer.decode([token_id])
                alternatives.append((text, float(lp.logprob)))
            result.append(merge_alternatives(alternatives))
        return result

    def generate(self, queries: Sequence[JudgeQuery], max_new_tokens: int) -> list[str]:
        params = self._vllm.SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
        outputs = self.llm.generate(self._requests(queries), params, use_tqdm=False)
        return [out.outputs[0].text.strip() for out in outputs]


# -------------------------------------------------------------------------------------------------- OpenAI

_RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class OpenAIBackend:
    """An OpenAI-compatible chat-completions endpoint at ``base_url`` (``.../v1``; the request goes to
    ``{base_url}/chat/completions``), one request per query, ``concurrency`` at a time.

    ``api_key_env`` is the NAME of the environment variable that holds the key (sent as ``Authorization:
    Bearer ...``); the key is read at each request and never kept. ``None``: no key (a local server).
    A request gets ``timeout_s``; a transport failure, a timeout or HTTP 408/409/425/429/5xx is retried up to
    ``max_retries`` times after ``retry_backoff_s * 2**attempt`` seconds. ``extra_body`` is merged into every
    request (e.g. ``{"max_completion_tokens": 1}`` or vLLM's ``{"top_k": 1}``)."""

    def __init__(self, model: str, owner: str = "vlm_judge", base_url: str = "http://localhost:8000/v1",
                 api_key_env: str | None = None, top_logprobs: int = 20, timeout_s: float = 60.0,
                 max_retries: int = 3, retry_backoff_s: float = 1.0, concurrency: int = 8,
                 system_prompt: str | None = None, extra_body: dict[str, Any] | None = None):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"reward '{owner}': base_url must start with http:// or https://, got "
                             f"{redact_text(base_url)!r}")
        if api_key_env is not None and not os.environ.get(api_key_env):
            raise ValueError(f"reward '{owner}': api_key_env names the environment variable {api_key_env!r}, "
                             "which is not set (or empty)")
        for field, value, low in (("top_logprobs", top_logprobs, 1), ("concurrency", concurrency, 1),
                                  ("max_retries", max_retries, 0)):
            if value < low:
                raise ValueError(f"reward '{owner}': {field} must be >= {low}, got {value}")
        if timeout_s <= 0 or retry_backoff_s < 0:
            raise ValueError(f"reward '{owner}': timeout_s must be > 0 and retry_backoff_s >= 0")
        self.owner, self.model_id = owner, model
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.api_key_env, self.top_logprobs = api_key_env, top_logprobs
        self.timeout_s, self.max_retries, self.retry_backoff_s = timeout_s, max_retries, retry_backoff_s
        self.concurrency, self.system_prompt = concurrency, system_prompt
        self.extra_body = dict(extra_body or {})

    def __repr__(self) -> str:
        return (f"OpenAIBackend(model={self.model_id!r}, url={redact_text(self.url)!r}, "
                f"api_key_env={self.api_key_env!r})")

    # -- requests
    def _payload(self, query: JudgeQuery, max_tokens: int, logprobs: bool) -> dict[str, Any]:
        content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": png_data_url(im)}}
                                         for im in query.images]
        content.append({"type": "text", "text": query.text})
        messages: list[dict[str, Any]] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": content})
        body: dict[str, Any] = {"model": self.model_id, "messages": messages, "max_tokens": max_tokens,
                                "temperature": 0.0}
        if logprobs:
            body.update(logprobs=True, top_logprobs=self.top_logprobs)
        body.update(self.extra_body)
        return body

    def _scrub(self, text: str) -> str:
        """``text`` (a server's error body) with the key, if it echoes it, masked; at most 300 characters."""
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            text = text.replace(key, "***")
        return redact_text(text[:300])

    def _post(self, query: JudgeQuery, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode("utf-8")
        where = f"reward '{self.owner}', {query.label}"
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.retry_backoff_s * 2 ** (attempt - 1))
            headers = {"Content-Type": "application/json", "Accept": "application/json",
                       "User-Agent": "rlflow-vlm-judge"}
            if self.api_key_env:
                key = os.environ.get(self.api_key_env)
                if not key:
                    raise VLMBackendError(f"{where}: the environment variable {self.api_key_env!r} "
                                          "(api_key_env) is not set")
                headers["Authorization"] = f"Bearer {key}"
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as err:
                detail = self._scrub(err.read().decode("utf-8", "replace")) if err.fp is not None else ""
                last = f"HTTP {err.code} {err.reason}: {detail}"
                if err.code in _RETRY_STATUS:
                    continue
                break
            except OSError as err:  # URLError, timeouts, refused or reset connections
                reason = getattr(err, "reason", err)
                last = f"{type(err).__name__}: {self._scrub(str(reason))}"
                continue
            try:
                answer = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise VLMAnswerError(f"{where}: malformed answer from {redact_text(self.url)} (not JSON: {err}): "
                                     f"{self._scrub(raw.decode('utf-8', 'replace'))!r}") from None
            if not isinstance(answer, dict):
                raise VLMAnswerError(f"{where}: malformed answer from {redact_text(self.url)} (a JSON "
                                     f"{type(answer).__name__}, not an object)")
            return answer
        raise VLMBackendError(f"{where}: request to {redact_text(self.url)} failed after "
                              f"{attempt + 1} attempt(s): {last}")

    def _map(self, fn: Any, queries: Sequence[JudgeQuery]) -> list[Any]:
        if len(queries) <= 1 or self.concurrency == 1:
            return [fn(q) for q in queries]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(queries))) as pool:
            futures = [pool.submit(fn, q) for q in queries]
            return [f.result() for f in futures]  # the first failing sample's error, in sample order

    # -- answers
    def _choice(self, query: JudgeQuery, answer: dict[str, Any]) -> dict[str, Any]:
        choices = answer.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise VLMAnswerError(f"reward '{self.owner}', {query.label}: malformed answer from "
                                 f"{redact_text(self.url)} (no choices): {self._scrub(json.dumps(answer))!r}")
        return choices[0]

    def _first_token_alternatives(self, query: JudgeQuery, answer: dict[str, Any]) -> list[tuple[str, float]]:
        choice = self._choice(query, answer)
        try:
            first = choice["logprobs"]["content"][0]
            chosen = (str(first["token"]), float(first["logprob"]))
            alternatives = [(str(t["token"]), float(t["logprob"])) for t in first.get("top_logprobs") or []]
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise VLMAnswerError(f"reward '{self.owner}', {query.label}: malformed answer from "
                                 f"{redact_text(self.url)} (no first-token logprobs, {type(err).__name__}: "
                                 f"{err}): {self._scrub(json.dumps(choice))!r}") from None
        # the chosen token is normally one of the top_logprobs entries too: add it only when it is not
        if chosen[0] not in {text for text, _ in alternatives}:
            alternatives.append(chosen)
        return alternatives

    def answer_logprobs(self, queries: Sequence[JudgeQuery], candidates: Sequence[str]) -> list[dict[str, float]]:
        def one(q: JudgeQuery) -> dict[str, float]:
            answer = self._post(q, self._payload(q, max_tokens=1, logprobs=True))
            return merge_alternatives(self._first_token_alternatives(q, answer))

        return self._map(one, queries)

    def generate(self, queries: Sequence[JudgeQuery], max_new_tokens: int) -> list[str]:
        def one(q: JudgeQuery) -> str:
            choice = self._choice(q, self._post(q, self._payload(q, max_tokens=max_new_tokens, logprobs=False)))
            message = choice.get("message")
            text = message.get("content") if isinstance(message, dict) else None
            if not isinstance(text, str):
                raise VLMAnswerError(f"reward '{self.owner}', {q.label}: malformed answer from "
                                     f"{redact_text(self.url)} (no message content): "
                                     f"{self._scrub(json.dumps(choice))!r}")
            return text.strip()

        return self._map(one, queries)


def make_backend(backend: str, model: str, owner: str, **kwargs: Any) -> JudgeBackend:
    """The backend named ``backend`` on ``model``; an unknown name or keyword is an error naming ``owner``."""
    classes: dict[str, Any] = {"transformers": TransformersBackend, "vllm": VLLMBackend, "openai": OpenAIBackend}
    if backend not in classes:
        raise ValueError(f"reward '{owner}': unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    cls = classes[backend]
    import inspect

    allowed = set(inspect.signature(cls).parameters) - {"model", "owner"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"reward '{owner}': backend {backend!r} does not take {', '.join(unknown)} "
                         f"(it takes: {', '.join(sorted(allowed))})")
    result: JudgeBackend = cls(model=model, owner=owner, **kwargs)
    return result
