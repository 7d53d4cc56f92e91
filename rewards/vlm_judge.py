"""A vision-language model as the reward: ``vlm_judge``.

The judge asks a VLM one question per sample (or several, each a component) and turns the answer into a
score in ``[0, 1]``. Engines: ``transformers`` (in-process), ``vllm`` (offline engine, GPU extra) or
``openai`` (any OpenAI-compatible server); see :mod:`rewards.vlm_backends`.

Modes
-----
``yes_prob`` (VQAScore-style). Let ``lp(t)`` be the log-probability that the FIRST answer token is ``t``
(greedy decoding of the answer has not started yet: it is the model's distribution right after the
generation prompt). With ``YES = {"Yes", " Yes", "yes", " yes", "YES", " YES"}`` and ``NO`` the same for
"no"::

    P_yes = sum_{t in YES} exp(lp(t))      P_no = sum_{t in NO} exp(lp(t))
    score = P_yes / (P_yes + P_no)          (computed as sigmoid(logsumexp_YES lp - logsumexp_NO lp))

Each variant counts once per distinct token: ``transformers`` scores the variants that are exactly one
token of the model's tokenizer, from the full softmax; ``vllm`` / ``openai`` see only the ``top_logprobs``
most likely first tokens, and a variant that is not among them counts as 0 (so a side with no visible
variant gives a score of exactly 0 or 1). A sample where NO variant of either word is visible is an error
(:class:`~rewards.vlm_backends.VLMAnswerError`), never a 0. The component ``<name>_yes_no_mass``
(``P_yes + P_no``) tells how much of the first-token distribution the two answers hold.

``rubric``. The model answers (greedy, ``max_new_tokens``) a number on ``scale = (low, high)``; the first
number in the answer is taken (``"7"``, ``"7/10"``, ``"Score: 7."`` -> 7) and the score is
``(x - low) / (high - low)``. An answer with no number, or a number outside the scale, raises
:class:`RubricParseError` with the answer's text.

Questions
---------
``question`` is a preset name or a template (``str.format`` fields: ``{prompt}``, ``{low}``, ``{high}``
and any key of the sample's ``Conditions.metadata``), or a dict ``{component: preset or template}`` for
several questions at once (each a component, the score their ``weights``-weighted mean). Presets:

- ``t2i``: does the image show the prompt (one image);
- ``edit_instruction``: per-turn instruction following of an edit: the source image, then the edited
  image, and the turn's instruction (the prompt);
- ``edit_consistency``: per-turn content consistency: are the parts the instruction does not mention
  unchanged between the two images.

For an edit the source is ``Conditions.source_images[:, source_index]`` (default ``-1``: the last one, in a
multi-turn edit the image before this turn) and the instruction is the prompt, so one sample is one turn.
A custom template gets the source image first too when ``with_source`` is true (``None``: whenever the
batch has source images).

Example config::

    reward:
      name: vlm_judge
      kwargs: {backend: openai, model: Qwen/Qwen2.5-VL-7B-Instruct, base_url: "http://judge:8000/v1",
               api_key_env: JUDGE_API_KEY, mode: yes_prob,
               question: {instruction: edit_instruction, consistency: edit_consistency}}
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from rewards import register
from rewards.vlm_backends import (
    JudgeBackend,
    JudgeQuery,
    VLMAnswerError,
    VLMJudgeError,
    make_backend,
    tensor_to_pil,
)
from rlflow.types import Conditions, Media, RewardOutput

MODES = ("yes_prob", "rubric")
YES_VARIANTS = ("Yes", " Yes", "yes", " yes", "YES", " YES")
NO_VARIANTS = ("No", " No", "no", " no", "NO", " NO")

_EDIT_INTRO = ('The first image is the original. The second image is the result of editing it with the '
               'instruction "{prompt}". ')
PRESETS: dict[str, dict[str, str]] = {
    "t2i": {
        "yes_prob": 'Does this image show "{prompt}"? Answer Yes or No.',
        "rubric": ('How well does this image match the description "{prompt}"? Rate it on a scale of {low} '
                   'to {high}, where {high} is a perfect match. Answer with a single number.'),
    },
    "edit_instruction": {
        "yes_prob": _EDIT_INTRO + "Does the second image carry out the instruction? Answer Yes or No.",
        "rubric": (_EDIT_INTRO + "How well does the second image carry out the instruction? Rate it on a "
                   "scale of {low} to {high}, where {high} means fully carried out. Answer with a single number."),
    },
    "edit_consistency": {
        "yes_prob": (_EDIT_INTRO + "Apart from what the instruction asks to change, is everything in the second "
                     "image the same as in the first image? Answer Yes or No."),
        "rubric": (_EDIT_INTRO + "Apart from what the instruction asks to change, how well does the second "
                   "image keep the first image unchanged? Rate it on a scale of {low} to {high}, where {high} "
                   "means nothing else changed. Answer with a single number."),
    },
}
EDIT_PRESETS = frozenset({"edit_instruction", "edit_consistency"})

_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?")


class RubricParseError(VLMAnswerError):
    """A rubric answer without a number, or with one outside the scale (the message quotes the answer)."""


def parse_rubric(text: str, low: float, high: float, where: str = "reward 'vlm_judge'") -> float:
    """The first number in ``text``, normalised to ``[0, 1]`` on ``[low, high]``; raises
    :class:`RubricParseError` (naming ``where`` and quoting ``text``) if there is none or it is outside."""
    match = _NUMBER.search(text)
    if match is None:
        raise RubricParseError(f"{where}: cannot parse a score on the scale {low:g}..{high:g} from the "
                               f"answer {text!r}")
    value = float(match.group())
    if not low <= value <= high:
        raise RubricParseError(f"{where}: the answer {text!r} gives {value:g}, outside the scale "
                               f"{low:g}..{high:g}")
    return (value - low) / (high - low)


def yes_probability(logprobs: Mapping[str, float], where: str = "reward 'vlm_judge'") -> tuple[float, float]:
    """``(P_yes / (P_yes + P_no), P_yes + P_no)`` from first-token log-probs (see the module docstring);
    raises :class:`VLMAnswerError` when no variant of either answer is present."""
    yes = [lp for t, lp in logprobs.items() if t in YES_VARIANTS and math.isfinite(lp)]
    no = [lp for t, lp in logprobs.items() if t in NO_VARIANTS and math.isfinite(lp)]
    if not yes and not no:
        top = sorted(logprobs.items(), key=lambda kv: -kv[1])[:5]
        seen = ", ".join(f"{t!r}: {math.exp(lp):.3f}" for t, lp in top) or "nothing"
        raise VLMAnswerError(f"{where}: none of the answer tokens {YES_VARIANTS + NO_VARIANTS} is among the "
                             f"first-token alternatives the engine returned (its most likely: {seen})")
    lse_yes = float(np.logaddexp.reduce(yes)) if yes else -math.inf
    lse_no = float(np.logaddexp.reduce(no)) if no else -math.inf
    if not yes:
        return 0.0, math.exp(lse_no)
    if not no:
        return 1.0, math.exp(lse_yes)
    return 1.0 / (1.0 + math.exp(lse_no - lse_yes)), math.exp(float(np.logaddexp(lse_yes, lse_no)))


class _Fields(dict):  # type: ignore[type-arg]
    def __init__(self, owner: str, values: Mapping[str, Any]):
        super().__init__(values)
        self.owner = owner

    def __missing__(self, key: str) -> Any:
        raise VLMJudgeError(f"reward '{self.owner}': the question template uses {{{key}}}, which is neither "
                            f"prompt, low, high nor a key of the sample's metadata ({', '.join(sorted(self))})")


@register("vlm_judge")
class VLMJudge:
    """A VLM judge reward (see the module docstring). ``backend_kwargs`` go to the engine:

    - ``transformers``: ``device`` ("auto"), ``dtype`` ("auto"), ``batch_size`` (8), ``processor_kwargs``,
      ``model_kwargs``, ``chat_template_kwargs``;
    - ``vllm``: ``top_logprobs`` (20), ``max_images`` (2), ``engine_kwargs``, ``chat_template_kwargs``;
    - ``openai``: ``base_url``, ``api_key_env`` (the NAME of the env variable holding the key),
      ``top_logprobs`` (20), ``timeout_s`` (60), ``max_retries`` (3), ``retry_backoff_s`` (1),
      ``concurrency`` (8), ``extra_body``.

    ``image_size``: resize each image's longer side to this many pixels before it is sent (``None``: as is).
    """

    def __init__(self, model: str, backend: str = "transformers", mode: str = "yes_prob",
                 question: str | Mapping[str, str] = "t2i", weights: Mapping[str, float] | None = None,
                 scale: Sequence[float] = (1, 10), max_new_tokens: int = 8, with_source: bool | None = None,
                 source_index: int = -1, image_size: int | None = None, system_prompt: str | None = None,
                 name: str = "vlm_judge", **backend_kwargs: Any):
        self.name = name
        if mode not in MODES:
            raise ValueError(f"reward '{name}': mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not isinstance(model, str) or not model:
            raise ValueError(f"reward '{name}': model must be a model id or path, got {model!r}")
        self.mode = mode
        low, high = (float(v) for v in scale)
        if not low < high:
            raise ValueError(f"reward '{name}': scale must be (low, high) with low < high, got {tuple(scale)}")
        self.scale = (low, high)
        if max_new_tokens < 1:
            raise ValueError(f"reward '{name}': max_new_tokens must be >= 1, got {max_new_tokens}")
        if image_size is not None and image_size < 1:
            raise ValueError(f"reward '{name}': image_size must be >= 1 or None, got {image_size}")
        self.max_new_tokens, self.with_source = max_new_tokens, with_source
        self.source_index, self.image_size = source_index, image_size
        specs = {name: question} if isinstance(question, str) else dict(question)
        if not specs:
            raise ValueError(f"reward '{name}': question must be a template, a preset or a non-empty dict")
        # component -> (template, uses the source: True / False / None = when the batch has sources)
        self.questions: dict[str, tuple[str, bool | None]] = {}
        for comp, spec in specs.items():
            if not isinstance(spec, str) or not spec.strip():
                raise ValueError(f"reward '{name}': question {comp!r} must be a preset "
                                 f"({', '.join(PRESETS)}) or a template string, got {spec!r}")
            if spec in PRESETS:
                self.questions[comp] = (PRESETS[spec][mode], spec in EDIT_PRESETS)
            else:
                self._check_template(comp, spec)
                self.questions[comp] = (spec, with_source)
        weights = dict(weights or {c: 1.0 for c in self.questions})
        if set(weights) != set(self.questions) or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"reward '{name}': weights must give every question ({', '.join(self.questions)}) a "
                             f"weight >= 0, not all 0; got {weights}")
        self.weights = {c: float(weights[c]) for c in self.questions}
        self.backend_name = backend
        self.backend: JudgeBackend = make_backend(backend, model, name, system_prompt=system_prompt,
                                                  **backend_kwargs)
        if mode == "yes_prob" and hasattr(self.backend, "candidate_ids"):
            ids = self.backend.candidate_ids(YES_VARIANTS + NO_VARIANTS)
            if not any(v in ids for v in YES_VARIANTS) or not any(v in ids for v in NO_VARIANTS):
                raise ValueError(f"reward '{name}': the tokenizer of {model!r} has no single-token 'yes' and 'no' "
                                 f"(single-token variants found: {sorted(ids)}); use mode 'rubric'")

    def _check_template(self, comp: str, template: str) -> None:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        except ValueError as err:
            raise ValueError(f"reward '{self.name}': question {comp!r} is not a valid template ({err}): "
                             f"{template!r}") from None
        if any(not f.isidentifier() for f in fields):
            raise ValueError(f"reward '{self.name}': question {comp!r} may only use plain {{name}} fields, got "
                             f"{fields}")

    def __repr__(self) -> str:
        return (f"VLMJudge(name={self.name!r}, backend={self.backend!r}, mode={self.mode!r}, "
                f"questions={list(self.questions)})")

    @staticmethod
    def _label(i: int, prompt: str) -> str:
        short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        return f"sample {i} (prompt {short!r})"

    def _queries(self, comp: str, template: str, uses_source: bool | None, outputs: list[Any],
                 sources: list[Any] | None, conditions: Conditions) -> list[JudgeQuery]:
        use = (sources is not None) if uses_source is None else uses_source
        if use and sources is None:
            raise VLMJudgeError(f"reward '{self.name}': question {comp!r} shows the source image of an edit, but "
                                "the batch has no Conditions.source_images")
        low, high = self.scale
        queries = []
        for i, (prompt, meta) in enumerate(zip(conditions.prompts, conditions.metadata, strict=True)):
            fields = _Fields(self.name, {**meta, "prompt": prompt, "low": f"{low:g}", "high": f"{high:g}"})
            text = template.format_map(fields)
            images = (sources[i], outputs[i]) if use and sources is not None else (outputs[i],)
            queries.append(JudgeQuery(images=images, text=text, label=self._label(i, prompt)))
        return queries

    def __call__(self, media: Media, conditions: Conditions) -> RewardOutput:
        n = media.num_samples
        if len(conditions) != n:
            raise ValueError(f"reward '{self.name}': {n} samples but {len(conditions)} conditions")
        outputs = [tensor_to_pil(img, self.image_size) for img in media.stills]
        sources = None
        if conditions.source_images is not None:
            src = conditions.source_images
            if not -src.shape[1] <= self.source_index < src.shape[1]:
                raise VLMJudgeError(f"reward '{self.name}': source_index {self.source_index} is out of range for "
                                    f"{src.shape[1]} source image(s) per sample")
            sources = [tensor_to_pil(s[self.source_index], self.image_size) for s in src]
        components: dict[str, torch.Tensor] = {}
        for comp, (template, uses_source) in self.questions.items():
            queries = self._queries(comp, template, uses_source, outputs, sources, conditions)
            if self.mode == "yes_prob":
                answers = self.backend.answer_logprobs(queries, YES_VARIANTS + NO_VARIANTS)
                pairs = [yes_probability(a, f"reward '{self.name}', {q.label}")
                         for q, a in zip(queries, answers, strict=True)]
                components[comp] = torch.tensor([p for p, _ in pairs], dtype=torch.float32)
                components[f"{comp}_yes_no_mass"] = torch.tensor([m for _, m in pairs], dtype=torch.float32)
            else:
                texts = self.backend.generate(queries, self.max_new_tokens)
                components[comp] = torch.tensor(
                    [parse_rubric(t, *self.scale, where=f"reward '{self.name}', {q.label}")
                     for q, t in zip(queries, texts, strict=True)], dtype=torch.float32)
        total = sum(self.weights.values())
        score = sum(components[c] * (w / total) for c, w in self.weights.items())
        assert isinstance(score, torch.Tensor)
        return RewardOutput(score=score.to(torch.float32), components=components)
