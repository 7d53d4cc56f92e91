"""The shapes-world checker as a reward: GenEval-style partial credit, with strict accuracy logged."""

from __future__ import annotations

import torch

from rewards import register
from rlflow.types import RewardOutput
from rlflow.worlds.shapes.checker import score_batch


@register("shapes_geneval")
class ShapesGenEval:
    """score = fraction of the prompt's checks that pass; components: ``partial`` and ``strict``."""

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        partial, strict = score_batch(images.detach().float().cpu().numpy(), prompts)
        p, s = torch.from_numpy(partial), torch.from_numpy(strict)
        return RewardOutput(score=p, components={"partial": p, "strict": s})
