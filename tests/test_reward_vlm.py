"""The VLM judge reward (``vlm_judge``): its three backends on a tiny random VLM, offline, on the CPU.

The model is a real ``LlavaForConditionalGeneration`` (CLIP vision tower + Llama text model, ~80k weights)
with a byte-level BPE tokenizer trained here, saved with ``save_pretrained`` and loaded back through the
user path (``AutoProcessor`` / ``AutoModelForImageTextToText.from_pretrained(folder)``). A tiny Qwen2-VL /
Qwen2.5-VL is not used because their processors need torchvision (their video processor) in transformers
5.x, and the CPU environment does not install it.

The ``openai`` backend is tested against ``transformers serve`` (transformers' own OpenAI-compatible server,
the ``transformers[serving]`` extra) over the same tiny model: the rubric answers match the in-process ones.
That server ignores ``logprobs``, so ``yes_prob`` over HTTP, the key handling, the retries and the malformed
answers are tested against :class:`ChatServer`, a STAND-IN that follows the OpenAI chat-completions schema
(with ``logprobs`` / ``top_logprobs``, as vLLM and OpenAI answer) and is backed by the same tiny model.
"""

from __future__ import annotations

import base64
import io
import json
import math
import pickle
import socket
import sys
import threading
import time
import types
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import torch
from PIL import Image

import rewards.vlm_judge  # noqa: F401  (registers "vlm_judge")
from rewards import build_reward
from rewards.vlm_backends import (
    VLMAnswerError,
    VLMBackendError,
    VLMJudgeError,
    chat_messages,
    tensor_to_pil,
)
from rewards.vlm_judge import (
    NO_VARIANTS,
    PRESETS,
    YES_VARIANTS,
    RubricParseError,
    VLMJudge,
    parse_rubric,
    yes_probability,
)
from rlflow.types import Conditions, Media

torch.set_num_threads(1)

_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
_WORDS = ("Yes yes YES No no NO Does this image show a red blue square circle cube Answer or On scale of to "
          "how well the match The first second original result editing it with instruction carry out Apart from "
          "what asks change is everything same as in user assistant system 0 1 2 3 4 5 6 7 8 9 10").split()
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_vlm(folder: str, seed: int = 0) -> str:
    """A tiny random LLaVA (image-text-to-text) with its processor, saved to ``folder``; returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    answers = " ".join(f"a {w}" for w in ("Yes", "yes", "YES", "No", "no", "NO"))
    corpus = [" ".join(_WORDS)] * 40 + [" ".join(reversed(_WORDS))] * 40 + list(_WORDS) * 40 + [answers] * 80
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=480, special_tokens=_SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
        tokenizer=hf_tok, chat_template=_CHAT_TEMPLATE, patch_size=14, vision_feature_select_strategy="default",
        image_token="<image>", num_additional_image_tokens=1)
    vocab = hf_tok.get_vocab()
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32,
                                       initializer_range=0.5),
        text_config=LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                initializer_range=0.3, eos_token_id=vocab["<|im_end|>"],
                                pad_token_id=vocab["<|endoftext|>"], bos_token_id=None),
        image_token_id=vocab["<image>"], vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    return build_tiny_vlm(str(tmp_path_factory.mktemp("tiny_vlm")))


@pytest.fixture(scope="module")
def loaded(tiny_vlm):
    """The saved model and processor as a user loads them (for the hand computations)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(tiny_vlm).eval(), AutoProcessor.from_pretrained(tiny_vlm)


def _judge(tiny_vlm, **kwargs):
    if kwargs.get("backend", "transformers") == "transformers":
        kwargs.setdefault("device", "cpu")
    return build_reward("vlm_judge", {"model": tiny_vlm, **kwargs})


def _batch(n=5, seed=1, size=32):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=g)
    prompts = [("a red square", "a blue circle on the left of a cube", "cube", "a red cube and a blue circle",
                "the square")[i % 5] for i in range(n)]
    return Media(images=images), Conditions.of(prompts)


def _hand_yes_prob(loaded, images: list[Image.Image], text: str) -> float:
    """P(yes) / (P(yes) + P(no)) from one unpadded forward pass: the last position's logits, softmaxed."""
    model, processor = loaded
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                           add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[images], return_tensors="pt")
    with torch.no_grad():
        logprobs = model(**inputs).logits[0, -1].double().log_softmax(-1)

    def mass(variants):
        ids = {processor.tokenizer.encode(v, add_special_tokens=False)[0] for v in variants
               if len(processor.tokenizer.encode(v, add_special_tokens=False)) == 1}
        return sum(math.exp(logprobs[i].item()) for i in ids)

    p_yes, p_no = mass(YES_VARIANTS), mass(NO_VARIANTS)
    return p_yes / (p_yes + p_no)


# ---------------------------------------------------------------------------------------------- transformers


def test_tiny_tokenizer_has_single_token_answers(loaded):
    _, processor = loaded
    single = [v for v in YES_VARIANTS + NO_VARIANTS if len(processor.tokenizer.encode(v, add_special_tokens=False)) == 1]
    assert len(single) == 12  # the hand computation below sums over several variants of each word


def test_yes_prob_matches_hand_computation_shape_determinism_and_batching(tiny_vlm, loaded):
    media, conds = _batch(5)
    judge = _judge(tiny_vlm, batch_size=3)  # chunks of 3 + 2, left-padded prompts of different lengths
    out = judge(media, conds)
    assert out.score.shape == (5,) and out.score.dtype == torch.float32
    assert set(out.components) == {"vlm_judge", "vlm_judge_yes_no_mass"}
    assert ((out.score > 0) & (out.score < 1)).all()
    assert out.score.max() - out.score.min() > 1e-3  # the random model does tell the samples apart
    again = judge(media, conds)
    assert torch.equal(out.score, again.score)  # deterministic (greedy, no sampling)
    one_by_one = _judge(tiny_vlm, batch_size=1)(media, conds)
    torch.testing.assert_close(out.score, one_by_one.score, atol=1e-5, rtol=0)
    for i in range(5):
        text = PRESETS["t2i"]["yes_prob"].format(prompt=conds.prompts[i])
        hand = _hand_yes_prob(loaded, [tensor_to_pil(media.images[i])], text)
        assert out.score[i].item() == pytest.approx(hand, abs=1e-5)


def test_edit_questions_show_source_then_edit(tiny_vlm, loaded):
    media, _ = _batch(3, seed=2)
    g = torch.Generator().manual_seed(3)
    sources = torch.rand(3, 2, 3, 40, 40, generator=g)  # two earlier turns; the judge compares with the last
    conds = Conditions(("make it red", "add a blue circle", "remove the cube"), source_images=sources)
    judge = _judge(tiny_vlm, question={"instruction": "edit_instruction", "consistency": "edit_consistency"},
                   weights={"instruction": 3.0, "consistency": 1.0})
    out = judge(media, conds)
    assert set(out.components) == {"instruction", "consistency", "instruction_yes_no_mass",
                                   "consistency_yes_no_mass"}
    torch.testing.assert_close(out.score, 0.75 * out.components["instruction"] + 0.25 * out.components["consistency"])
    for i in (0, 2):
        imgs = [tensor_to_pil(sources[i, -1]), tensor_to_pil(media.images[i])]
        for comp, preset in (("instruction", "edit_instruction"), ("consistency", "edit_consistency")):
            hand = _hand_yes_prob(loaded, imgs, PRESETS[preset]["yes_prob"].format(prompt=conds.prompts[i]))
            assert out.components[comp][i].item() == pytest.approx(hand, abs=1e-5)
    with pytest.raises(VLMJudgeError, match="reward 'vlm_judge': question 'instruction' shows the source image"):
        judge(media, Conditions.of(["a", "b", "c"]))


def test_custom_template_uses_metadata_and_names_missing_fields(tiny_vlm, loaded):
    media, _ = _batch(2)
    conds = Conditions(("a cube", "a square"), metadata=({"color": "red"}, {"color": "blue"}))
    judge = _judge(tiny_vlm, question='Is the {prompt} {color}? Answer Yes or No.')
    out = judge(media, conds)
    hand = _hand_yes_prob(loaded, [tensor_to_pil(media.images[1])], "Is the a square blue? Answer Yes or No.")
    assert out.score[1].item() == pytest.approx(hand, abs=1e-5)
    with pytest.raises(VLMJudgeError, match=r"uses \{color\}, which is neither prompt"):
        judge(media, Conditions.of(["a", "b"]))


def test_rubric_parsing():
    assert parse_rubric("7", 1, 10) == pytest.approx(6 / 9)
    assert parse_rubric("Score: 7/10.", 1, 10) == pytest.approx(6 / 9)
    assert parse_rubric(" 10 ", 1, 10) == 1.0 and parse_rubric("1", 1, 10) == 0.0
    assert parse_rubric("3.5 out of 5", 0, 5) == pytest.approx(0.7)
    with pytest.raises(RubricParseError, match=r"reward 'r', sample 4: cannot parse .* from the answer 'seven'"):
        parse_rubric("seven", 1, 10, where="reward 'r', sample 4")
    with pytest.raises(RubricParseError, match=r"the answer '11/10' gives 11, outside the scale 1..10"):
        parse_rubric("11/10", 1, 10)
    with pytest.raises(RubricParseError, match="outside"):
        parse_rubric("-2", 1, 10)
    with pytest.raises(RubricParseError, match="cannot parse"):
        parse_rubric("Qwen2 says", 1, 10)  # a digit inside a word is not a score


def test_rubric_on_the_transformers_backend(tiny_vlm):
    """The random model writes gibberish: the first sample whose answer has no number in range is named, with
    its text; (were every answer a number in range, the scores would be the parsed ones)."""
    media, conds = _batch(3)
    judge = _judge(tiny_vlm, mode="rubric", max_new_tokens=4)
    inner = judge.fn
    queries = inner._queries("vlm_judge", *inner.questions["vlm_judge"], [tensor_to_pil(x) for x in media.images],
                             None, conds)
    texts = inner.backend.generate(queries, 4)
    assert texts == inner.backend.generate(queries, 4)  # greedy: the same text every time

    def parses(text):
        try:
            return parse_rubric(text, 1, 10)
        except RubricParseError:
            return None

    bad = [i for i, t in enumerate(texts) if parses(t) is None]
    if not bad:
        torch.testing.assert_close(judge(media, conds).score, torch.tensor([parses(t) for t in texts]))
        return
    with pytest.raises(RubricParseError) as err:
        judge(media, conds)
    assert f"reward 'vlm_judge', sample {bad[0]} (prompt {conds.prompts[bad[0]]!r})" in str(err.value)
    assert repr(texts[bad[0]]) in str(err.value)  # the offending text, as the model wrote it


def test_yes_probability_from_top_k():
    assert yes_probability({"Yes": math.log(0.3), " yes": math.log(0.1), "No": math.log(0.2)}) == pytest.approx(
        (0.4 / 0.6, 0.6))
    assert yes_probability({"Yes": -1.0, "Maybe": -0.1}) == pytest.approx((1.0, math.exp(-1.0)))
    assert yes_probability({"no": -2.0})[0] == 0.0
    with pytest.raises(VLMAnswerError, match="reward 'vlm_judge': none of the answer tokens"):
        yes_probability({"Maybe": -0.1, "yes!": -0.5})


def test_bad_configs_are_named_errors(tiny_vlm):
    with pytest.raises(ValueError, match="unknown backend 'tgi'; choose one of transformers, vllm, openai"):
        VLMJudge(model=tiny_vlm, backend="tgi")
    with pytest.raises(ValueError, match="backend 'openai' does not take batch_size"):
        VLMJudge(model="m", backend="openai", batch_size=4)
    with pytest.raises(ValueError, match="mode must be one of yes_prob, rubric"):
        VLMJudge(model=tiny_vlm, mode="score")
    with pytest.raises(ValueError, match="scale must be"):
        VLMJudge(model=tiny_vlm, scale=(5, 1))
    with pytest.raises(ValueError, match="weights must give every question"):
        VLMJudge(model=tiny_vlm, question={"a": "t2i", "b": "edit_instruction"}, weights={"a": 1.0})
    with pytest.raises(ValueError, match="plain"):
        VLMJudge(model=tiny_vlm, question="Is it {prompt[0]}?")


# -------------------------------------------------------------------------------------------------- OpenAI


@dataclass
class Scripted:
    """What the stand-in server answers instead of running the model (``None``: run it)."""

    status: int | None = None  # an HTTP error status
    raw: bytes | None = None  # a raw 200 body (malformed JSON)
    content: str | None = None  # a chat answer text (no logprobs)
    delay_s: float = 0.0  # wait this long before answering


class ChatServer:
    """A STAND-IN OpenAI-compatible server (see the module docstring): ``POST /v1/chat/completions`` on a
    loopback port, backed by the tiny model, answering the chat-completions schema (``choices[0].message``,
    ``choices[0].logprobs.content[i].{token, logprob, top_logprobs}``) with greedy decoding. Token texts are
    ``tokenizer.decode([id])`` (as vLLM and OpenAI report them). It records every request's headers and body.
    """

    def __init__(self, folder: str):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.model = AutoModelForImageTextToText.from_pretrained(folder).eval()
        self.processor = AutoProcessor.from_pretrained(folder)
        self.lock = threading.Lock()
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.script = Scripted()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((dict(self.headers), body))
                time.sleep(server.script.delay_s)
                if self.path != "/v1/chat/completions":
                    return self._send(404, b'{"error": {"message": "not found"}}')
                if server.script.status is not None:
                    return self._send(server.script.status, b'{"error": {"message": "scripted failure"}}')
                if server.script.raw is not None:
                    return self._send(200, server.script.raw)
                answer = server.complete(body)
                return self._send(200, json.dumps(answer).encode())

            def _send(self, status, data):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # a client that timed out and hung up: expected
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.script.content is not None:
            text, entries = self.script.content, None
        else:
            text, entries = self._run(body)
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": "length"}
        if body.get("logprobs"):
            choice["logprobs"] = {"content": entries}
        return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [choice], "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}

    def _run(self, body: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
        messages, images = [], []
        for m in body["messages"]:
            if isinstance(m["content"], str):
                messages.append({"role": m["role"], "content": [{"type": "text", "text": m["content"]}]})
                continue
            parts = []
            for part in m["content"]:
                if part["type"] == "image_url":
                    header, _, data = part["image_url"]["url"].partition(",")
                    assert header == "data:image/png;base64"
                    images.append(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
                    parts.append({"type": "image"})
                else:
                    parts.append({"type": "text", "text": part["text"]})
            messages.append({"role": m["role"], "content": parts})
        prompt = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = self.processor(text=[prompt], images=[images] if images else None, return_tensors="pt")
        with self.lock, torch.no_grad():
            gen = self.model.generate(**inputs, max_new_tokens=body.get("max_tokens", 16), do_sample=False,
                                      output_logits=True, return_dict_in_generate=True,
                                      pad_token_id=self.processor.tokenizer.pad_token_id)
        tok = self.processor.tokenizer
        new_ids = gen.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        k = int(body.get("top_logprobs") or 0)
        entries = []
        for step, token_id in enumerate(new_ids):
            lp = gen.logits[step][0].float().log_softmax(-1)
            top = lp.topk(min(k, lp.numel())) if k else None
            entries.append({
                "token": tok.decode([token_id]), "logprob": lp[token_id].item(), "bytes": None,
                "top_logprobs": [] if top is None else [
                    {"token": tok.decode([i]), "logprob": v, "bytes": None}
                    for v, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)]})
        return tok.decode(new_ids, skip_special_tokens=True), entries

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture(scope="module")
def server(tiny_vlm):
    srv = ChatServer(tiny_vlm)
    yield srv
    srv.close()


@pytest.fixture
def fresh(server):
    server.script = Scripted()
    server.requests.clear()
    return server


SECRET = "sk-test-9f8e7d6c5b4a"


def _openai(server, **kwargs):
    base = {"model": "tiny-vlm", "backend": "openai", "base_url": server.base_url, "retry_backoff_s": 0.0}
    return build_reward("vlm_judge", {**base, **kwargs})


def test_openai_matches_transformers_and_keeps_the_key_out(tiny_vlm, fresh, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", SECRET)
    media, conds = _batch(4)
    kwargs = {"api_key_env": "JUDGE_TEST_KEY", "top_logprobs": 1000, "concurrency": 2}
    judge = _openai(fresh, **kwargs)
    out = judge(media, conds)
    local = _judge(tiny_vlm, batch_size=4)(media, conds)
    torch.testing.assert_close(out.score, local.score, atol=1e-5, rtol=0)  # same maths over HTTP
    assert len(fresh.requests) == 4
    assert all(h["Authorization"] == f"Bearer {SECRET}" for h, _ in fresh.requests)
    texts = sorted(b["messages"][-1]["content"][-1]["text"] for _, b in fresh.requests)  # concurrent: any order
    assert texts == sorted(PRESETS["t2i"]["yes_prob"].format(prompt=p) for p in conds.prompts)
    body = fresh.requests[0][1]
    assert body["logprobs"] is True and body["top_logprobs"] == 1000 and body["max_tokens"] == 1
    parts = body["messages"][-1]["content"]
    assert [p["type"] for p in parts] == ["image_url", "text"]
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    # the key lives only in the environment: not in the kwargs, the repr, the attributes or a pickle
    inner = judge.fn
    assert SECRET not in repr(judge.fn) and SECRET not in json.dumps(kwargs)
    assert SECRET not in repr(vars(inner)) and SECRET not in repr(vars(inner.backend))
    assert SECRET.encode() not in pickle.dumps(inner)
    assert "JUDGE_TEST_KEY" in repr(inner)


def test_openai_missing_key_variable_is_named(fresh, monkeypatch):
    monkeypatch.delenv("JUDGE_TEST_KEY", raising=False)
    with pytest.raises(ValueError, match="api_key_env names the environment variable 'JUDGE_TEST_KEY', which is not set"):
        _openai(fresh, api_key_env="JUDGE_TEST_KEY")


def test_openai_http_500_is_retried_then_raises_naming_reward_and_sample(fresh):
    fresh.script = Scripted(status=500)
    media, conds = _batch(1)
    with pytest.raises(VLMBackendError, match=r"reward 'vlm_judge', sample 0 \(prompt 'a red square'\): request "
                       r"to http://127\.0\.0\.1:\d+/v1/chat/completions failed after 2 attempt\(s\): HTTP 500"):
        _openai(fresh, max_retries=1)(media, conds)
    assert len(fresh.requests) == 2  # one retry
    fresh.requests.clear()
    fresh.script = Scripted(status=401)
    with pytest.raises(VLMBackendError, match="after 1 attempt.*HTTP 401"):
        _openai(fresh, max_retries=3)(media, conds)
    assert len(fresh.requests) == 1  # a client error is not retried
    fresh.script = Scripted(delay_s=1.0)
    with pytest.raises(VLMBackendError, match="after 1 attempt.*timed out"):
        _openai(fresh, max_retries=0, timeout_s=0.2)(media, conds)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(VLMBackendError, match="after 2 attempt.*(refused|URLError)"):
        build_reward("vlm_judge", {"model": "m", "backend": "openai", "base_url": f"http://127.0.0.1:{port}/v1",
                                   "max_retries": 1, "retry_backoff_s": 0.0})(media, conds)


def test_openai_malformed_answers_raise_naming_the_sample(fresh):
    media, conds = _batch(2)
    fresh.script = Scripted(raw=b"<html>gateway says hi</html>")
    with pytest.raises(VLMAnswerError, match=r"reward 'vlm_judge', sample 0 .*malformed answer .*not JSON.*gateway"):
        _openai(fresh)(media, conds)
    fresh.script = Scripted(raw=b'{"object": "chat.completion", "choices": []}')
    with pytest.raises(VLMAnswerError, match="malformed answer .*no choices"):
        _openai(fresh)(media, conds)
    fresh.script = Scripted(content="Yes")  # a server that ignores logprobs=true
    with pytest.raises(VLMAnswerError, match="malformed answer .*no first-token logprobs"):
        _openai(fresh)(media, conds)


def _first_token_answer(chosen, top):
    entry = {"token": chosen[0], "logprob": chosen[1], "bytes": None,
             "top_logprobs": [{"token": t, "logprob": lp, "bytes": None} for t, lp in top]}
    return json.dumps({"object": "chat.completion", "choices": [{"index": 0, "finish_reason": "length",
                       "message": {"role": "assistant", "content": chosen[0]}, "logprobs": {"content": [entry]}}]})


def test_openai_top_k_answers(fresh):
    """Only the top-k first tokens are visible: the variants among them count, missing ones count 0, and an
    answer with neither word is an error (never a 0)."""
    media, conds = _batch(1)
    top = [("Yes", math.log(0.5)), (" yes", math.log(0.1)), ("No", math.log(0.2)), ("Maybe", math.log(0.1))]
    fresh.script = Scripted(raw=_first_token_answer(top[0], top).encode())
    out = _openai(fresh, top_logprobs=4)(media, conds)
    assert out.score.item() == pytest.approx(0.6 / 0.8)
    assert out.components["vlm_judge_yes_no_mass"].item() == pytest.approx(0.8)
    assert fresh.requests[-1][1]["top_logprobs"] == 4
    fresh.script = Scripted(raw=_first_token_answer((" Yes", -0.1), [("Sure", -2.5)]).encode())
    assert _openai(fresh)(media, conds).score.item() == 1.0  # the chosen token counts though not in the top list
    fresh.script = Scripted(raw=_first_token_answer(("Maybe", -0.1), [("Maybe", -0.1), ("Perhaps", -2.5)]).encode())
    with pytest.raises(VLMAnswerError, match=r"reward 'vlm_judge', sample 0 .*none of the answer tokens.*'Maybe'"):
        _openai(fresh)(media, conds)


def test_openai_rubric(fresh):
    media, conds = _batch(2)
    fresh.script = Scripted(content="Score: 8/10")
    out = _openai(fresh, mode="rubric", scale=[1, 10])(media, conds)
    torch.testing.assert_close(out.score, torch.full((2,), 7 / 9))
    assert "logprobs" not in fresh.requests[0][1] and fresh.requests[0][1]["max_tokens"] == 8
    fresh.script = Scripted(content="I cannot tell from this picture")
    with pytest.raises(RubricParseError, match="sample 0 .*from the answer 'I cannot tell from this picture'"):
        _openai(fresh, mode="rubric")(media, conds)


# ---------------------------------------------------------------------------------------------------- vLLM


def test_vllm_missing_names_the_extra(tiny_vlm, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, installed or not
    with pytest.raises(ImportError, match=r"backend 'vllm' needs vLLM.*pip install rlflow\[vllm\]"):
        _judge(tiny_vlm, backend="vllm")


def test_vllm_backend_against_a_fake_engine(tiny_vlm, loaded, monkeypatch):
    """vLLM cannot run here: a fake ``vllm`` module with the documented offline API (``LLM(model=...,
    limit_mm_per_prompt=...)``, ``LLM.generate([{"prompt", "multi_modal_data": {"image": ...}}],
    SamplingParams(max_tokens, temperature, logprobs))`` -> ``outputs[0].logprobs[0] = {id: Logprob}``),
    backed by the tiny model, checks OUR side of that API: the requests we build and how we read them."""
    model, processor = loaded
    calls: dict[str, Any] = {}

    @dataclass
    class Logprob:
        logprob: float
        rank: int | None = None
        decoded_token: str | None = None

    class SamplingParams:
        def __init__(self, max_tokens=16, temperature=1.0, logprobs=None):
            self.max_tokens, self.temperature, self.logprobs = max_tokens, temperature, logprobs

    class LLM:
        def __init__(self, model, **kwargs):
            calls["init"] = (model, kwargs)

        def generate(self, prompts, params, use_tqdm=True):
            calls.setdefault("prompts", []).extend(prompts)
            outs = []
            for p in prompts:
                images = p.get("multi_modal_data", {}).get("image")
                images = images if isinstance(images, list) else [images]
                inputs = processor(text=[p["prompt"]], images=[images], return_tensors="pt")
                with torch.no_grad():
                    lp = model(**inputs).logits[0, -1].float().log_softmax(-1)
                top = lp.topk(min(params.logprobs, lp.numel()))
                step = {i: Logprob(v, r + 1, processor.tokenizer.decode([i]))
                        for r, (v, i) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True))}
                outs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(text="Yes", logprobs=[step])]))
            return outs

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams))
    media, conds = _batch(3)
    judge = _judge(tiny_vlm, backend="vllm", top_logprobs=1000, engine_kwargs={"gpu_memory_utilization": 0.5})
    out = judge(media, conds)
    local = _judge(tiny_vlm)(media, conds)
    torch.testing.assert_close(out.score, local.score, atol=1e-5, rtol=0)
    assert calls["init"] == (tiny_vlm, {"limit_mm_per_prompt": {"image": 2}, "max_logprobs": 1000,
                                        "gpu_memory_utilization": 0.5})
    first = calls["prompts"][0]
    expected = processor.apply_chat_template(chat_messages(judge.fn._queries(
        "vlm_judge", *judge.fn.questions["vlm_judge"], [tensor_to_pil(x) for x in media.images], None, conds)[0],
        None), tokenize=False, add_generation_prompt=True)
    assert first["prompt"] == expected and isinstance(first["multi_modal_data"]["image"], Image.Image)


# ---- a real OpenAI-compatible server: `transformers serve` over the tiny model saved locally


@pytest.fixture(scope="module")
def transformers_serve(tiny_vlm, tmp_path_factory):
    """``transformers serve`` (FastAPI + uvicorn, transformers' own OpenAI-compatible server) on loopback,
    serving the tiny random VLM from its folder; its chat endpoint answers text but refuses ``logprobs``."""
    import os
    import subprocess
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = os.path.join(os.path.dirname(sys.executable), "transformers")
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w")  # noqa: SIM115  (closed below)
    proc = subprocess.Popen([exe, "serve", tiny_vlm, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"transformers serve did not start (exit {proc.poll()}); see {log.name}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_openai_backend_against_transformers_serve(tiny_vlm, transformers_serve, monkeypatch):
    """Through a real server the rubric answers are the in-process model's (both greedy, the images sent as
    PNG data URLs). transformers serve ignores ``logprobs`` (its answer has none): for ``yes_prob`` that is
    an error naming the reward, the sample and the server, never a score."""
    monkeypatch.setenv("JUDGE_TEST_KEY", SECRET)
    media, conds = _batch(3)
    remote = build_reward("vlm_judge", {"model": tiny_vlm, "backend": "openai", "base_url": transformers_serve,
                                        "api_key_env": "JUDGE_TEST_KEY", "mode": "rubric", "max_new_tokens": 4,
                                        "retry_backoff_s": 0.0})
    local = _judge(tiny_vlm, mode="rubric", max_new_tokens=4)
    texts = []
    for judge in (remote, local):
        inner = judge.fn
        queries = inner._queries("vlm_judge", *inner.questions["vlm_judge"],
                                 [tensor_to_pil(x) for x in media.images], None, conds)
        texts.append(inner.backend.generate(queries, 4))
    assert texts[0] == texts[1] and all(texts[0])
    try:
        expected = local(media, conds).score
    except RubricParseError as err:  # the random model's text has no number: the same named error both ways
        with pytest.raises(RubricParseError) as remote_err:
            remote(media, conds)
        assert str(remote_err.value) == str(err)
    else:
        torch.testing.assert_close(remote(media, conds).score, expected)
    yes_no = build_reward("vlm_judge", {"model": tiny_vlm, "backend": "openai", "base_url": transformers_serve,
                                        "api_key_env": "JUDGE_TEST_KEY", "max_retries": 0})
    with pytest.raises(VLMAnswerError, match=r"reward 'vlm_judge', sample 0 .*malformed answer from "
                       r"http://127.0.0.1:\d+/v1/chat/completions \(no first-token logprobs") as err:
        yes_no(media, conds)
    assert SECRET not in str(err.value)
