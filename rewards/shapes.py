"""The shapes-world checker as a reward: GenEval-style partial credit, with strict accuracy logged."""

from __future__ import annotations

import numpy as np
import torch

from rewards import register
from rlflow.types import RewardOutput
from rlflow.worlds.shapes.checker import _PALETTE_NAMES, _color_labels, score_analysed
from rlflow.worlds.shapes.scene import parse_prompt

_COLOR_INDEX = {name: i for i, name in enumerate(_PALETTE_NAMES)}


@register("shapes_geneval")
class ShapesGenEval:
    """GenEval-style reward: ``score = (1 - strict_weight) * partial + strict_weight * strict``.

    ``partial`` is the fraction of the prompt's checks that pass, ``strict`` is 1 when all do. Components:
    ``partial``, ``strict``, ``valid_objects`` (the fraction of an image's detected objects that are valid
    shapes of the world's size; 1 for an empty image) and ``objects`` (how many were detected), so a rise of
    the reward can be told apart from a drift in how the objects are drawn.
    """

    def __init__(self, strict_weight: float = 0.0) -> None:
        if not 0.0 <= strict_weight <= 1.0:
            raise ValueError(f"reward.kwargs.strict_weight must lie in [0, 1], got {strict_weight}")
        self.strict_weight = float(strict_weight)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        partial, strict, found = score_analysed(images.detach().float().cpu().numpy(), prompts)
        p, s = torch.from_numpy(partial), torch.from_numpy(strict)
        valid = torch.tensor([np.mean([d.valid for d in dets]) if dets else 1.0 for dets, _ in found])
        objects = torch.tensor([float(len(dets)) for dets, _ in found])
        score = (1 - self.strict_weight) * p + self.strict_weight * s
        return RewardOutput(score=score, components={"partial": p, "strict": s, "valid_objects": valid.float(),
                                                     "objects": objects})


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
