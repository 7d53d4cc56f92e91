"""The shapes-world checker as a reward: GenEval-style partial credit, with strict accuracy logged."""

from __future__ import annotations

import numpy as np
import torch

from rewards import register
from rlflow.types import RewardOutput
from rlflow.worlds.shapes.checker import _PALETTE_NAMES, _color_labels, score_batch
from rlflow.worlds.shapes.scene import parse_prompt

_COLOR_INDEX = {name: i for i, name in enumerate(_PALETTE_NAMES)}


@register("shapes_geneval")
class ShapesGenEval:
    """score = fraction of the prompt's checks that pass; components: ``partial`` and ``strict``."""

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        partial, strict = score_batch(images.detach().float().cpu().numpy(), prompts)
        p, s = torch.from_numpy(partial), torch.from_numpy(strict)
        return RewardOutput(score=p, components={"partial": p, "strict": s})


@register("shapes_color_coverage")
class ShapesColorCoverage:
    """A dense shaping reward: the fraction of pixels showing the prompt's (first) colour, in ``[0, 1]``.

    Prompts without a colour score 0. Smooth in the pixels, so it is learnt in a few dozen RL steps; the
    learning test uses it to check the whole loop quickly.
    """

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        labels = torch.from_numpy(np.stack([_color_labels(im) for im in images.detach().float().cpu().numpy()]))
        wanted = torch.tensor([_COLOR_INDEX.get(parse_prompt(p).color or "", -2) for p in prompts])
        cover = (labels == wanted[:, None, None]).float().mean(dim=(1, 2))
        return RewardOutput(score=cover, components={"color_coverage": cover})
