"""A smooth, differentiable surrogate of the shapes-world checker (``shapes_soft``), for reward-gradient methods.

The exact checker (:mod:`rlflow.worlds.shapes.checker`, the ``shapes_geneval`` reward) stays the eval metric:
this surrogate only gives a pixel gradient that points the way the checker's checks are passed. It is a torch
function of the pixels end to end, in ``[0, 1]``:

- soft colour masks: each pixel is softly assigned to the four palette colours and the black background by a
  softmax over the negative squared RGB distances to them (``temperature``); the foreground is one minus the
  background mask. (The checker's ``"other"`` colour has no class here: a white pixel counts as its nearest
  palette colour.)
- soft shape term (a differentiable stand-in for the checker's IoU fit): each ideal shape's template (the
  renderer's masks, anti-aliased by supersampling, at sizes 10/11/12 and two sub-pixel phases) is correlated
  with a mask at every position, giving a soft IoU map ``inter / (|template| + mass in a box 2 px wider than
  the template on each side - inter)`` (the box ring charges a blob for spilling past the template). The
  asked shape's probability at a position is ``sigmoid((IoU - SHAPE_IOU) / t) * sigmoid((IoU - best other
  shape's IoU - shape_margin) / margin_temperature)`` (``shape_margin`` defaults to 0, not the checker's 0.04:
  the pixelated 12 px circle is fitted by a square almost as well, and a zero margin keeps it scoring), and the term is its softmax-weighted maximum over positions: "is there
  an object of this shape (and colour)". It looks at the best match only, so with several objects (count
  prompts) it does not check that every one of them has the asked shape.
- soft count: foreground (or colour) mass divided by the asked shape's template area at size 11, scored by
  ``exp(-log(count / n)^2 / (2 count_sigma^2))`` (log-ratio, so sizes 10-12 stay near the target).
- soft colour term (colour and position prompts): ``exp(color_weight * mean log p(asked colour))`` over the
  foreground pixels (for position prompts, the probability of either asked colour). It does not saturate on a
  wrongly coloured object (the shape term on the asked colour's mask does: a mask of ~0 has no gradient), so
  it is what lets ascent recolour a near miss.
- soft position: ``sigmoid((margin - 2) / relation_temperature)`` of the offset between the two colours' soft
  centroids (the checker's 2 px margin).

Terms per prompt kind (:func:`rlflow.worlds.shapes.scene.parse_prompt`): single: shape, count; color: shape,
coloured shape, colour, count; count: shape, count; position: first object, second object, relation,
colour, count. The score
is their geometric mean (one failing term pulls it down, as one failing check fails the strict metric).

Known limits (measured by gradient ascent on the pixels, 40 max-normalised steps, clamped to [0, 1]; see
tests/test_reward_shapes_soft.py): from a near miss with one colour wrong, ascent raises the surrogate (0.04 ->
0.91 on a colour prompt) and the checker's partial score (0.6 -> 0.8 there, 0.6 -> 1.0 on a position prompt).
From a blank canvas the surrogate barely rises (to < 0.1) and the checker's strict score stays 0: blobs painted
by ascent are not accepted as objects, so the surrogate is not exploited into a high exact score in that
budget, but it was not stress-tested with long runs or other optimisers. A reversed relation is not fixed:
moving whole objects is beyond a pixel-space ascent (the score stays ~0.25, the relation term saturated).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from rewards import register
from rlflow.types import RewardOutput
from rlflow.worlds.shapes.checker import SHAPE_IOU
from rlflow.worlds.shapes.scene import COLORS, IMAGE_SIZE, SHAPES, Spec, parse_prompt, shape_mask

_NAMES = list(COLORS)
_SIZES = (10.0, 11.0, 12.0)
_PHASES = ((0.0, 0.0), (0.5, 0.0), (0.0, 0.5), (0.5, 0.5))
_K = 21  # kernel side: holds the largest template's box (12 + 2 * 2 ring) with room for the phase
_RING = 2.0
_SUPER = 4  # supersampling per pixel side for anti-aliased templates


def _pool(inside: np.ndarray) -> np.ndarray:
    """Fraction of each kernel pixel covered by a ``_SUPER``-fold supersampled boolean mask."""
    return inside.astype(np.float32).reshape(_K, _SUPER, _K, _SUPER).mean(axis=(1, 3))


def _templates() -> tuple[Tensor, Tensor, Tensor]:
    """``(templates [S*Z*P, 1, K, K], boxes [same], areas [S])``: soft (supersampled) shape masks and their ring
    boxes, centred on the kernel's centre pixel (plus a phase), and each shape's area at size 11."""
    sub = (np.arange(_K * _SUPER, dtype=np.float32) + 0.5) / _SUPER
    yy, xx = np.meshgrid(sub, sub, indexing="ij")
    c = _K // 2 + 0.5
    tmpl, boxes = [], []
    for shape in SHAPES:
        for size in _SIZES:
            for dx, dy in _PHASES:
                cx, cy = c + dx, c + dy
                tmpl.append(_pool(shape_mask(shape, cx, cy, size, yy, xx)))
                half = size / 2 + _RING
                boxes.append(_pool((np.abs(xx - cx) <= half) & (np.abs(yy - cy) <= half)))
    areas = [_pool(shape_mask(shape, c, c, 11.0, yy, xx)).sum() for shape in SHAPES]
    return (torch.from_numpy(np.stack(tmpl))[:, None], torch.from_numpy(np.stack(boxes))[:, None],
            torch.tensor(areas, dtype=torch.float32))


@register("shapes_soft")
class ShapesSoft:
    """Differentiable surrogate of the shapes checker (see the module docstring); the exact checker
    (``shapes_geneval``) stays the eval metric.

    Components (``[B]`` each, 1 where a term does not apply to the prompt's kind): ``shape_term`` (the first
    object: shape, and colour where the prompt names one), ``second_term`` (position prompts' second object;
    for color prompts, the coloured-shape term), ``count_term``, ``relation_term``, ``color_term`` and ``soft_count`` (the
    raw soft number of objects).
    """

    differentiable = True

    def __init__(self, temperature: float = 0.1, shape_temperature: float = 0.04, position_temperature: float = 0.05,
                 count_sigma: float = 0.25, relation_temperature: float = 1.5, shape_margin: float = 0.0,
                 margin_temperature: float = 0.02, color_weight: float = 0.5) -> None:
        for k, v in [("temperature", temperature), ("shape_temperature", shape_temperature),
                     ("position_temperature", position_temperature), ("count_sigma", count_sigma),
                     ("relation_temperature", relation_temperature), ("margin_temperature", margin_temperature),
                     ("color_weight", color_weight)]:
            if not v > 0:
                raise ValueError(f"reward.kwargs.{k} must be > 0, got {v}")
        self.temperature, self.shape_temperature = float(temperature), float(shape_temperature)
        self.position_temperature, self.count_sigma = float(position_temperature), float(count_sigma)
        self.relation_temperature = float(relation_temperature)
        self.shape_margin, self.margin_temperature = float(shape_margin), float(margin_temperature)
        self.color_weight = float(color_weight)
        self.palette = torch.tensor([COLORS[c] for c in _NAMES] + [(0.0, 0.0, 0.0)], dtype=torch.float32)
        self.templates, self.boxes, self.areas = _templates()
        self.template_mass = self.templates.sum(dim=(1, 2, 3))

    # --- soft measurements -------------------------------------------------------------------------------

    def masks(self, images: Tensor) -> Tensor:
        """``[B, 5, H, W]``: soft assignment of each pixel to red, green, blue, yellow and background."""
        pal = self.palette.to(images)
        d2 = ((images[:, None] - pal[None, :, :, None, None]) ** 2).sum(2)
        return torch.softmax(-d2 / self.temperature, dim=1)

    def shape_term(self, mask: Tensor, shape: str) -> Tensor:
        """``[B]``: soft "there is an object of ``shape`` in ``mask``" (``mask``: ``[B, H, W]``)."""
        m = mask[:, None]
        pad = _K // 2
        inter = F.conv2d(m, self.templates.to(m), padding=pad)
        box = F.conv2d(m, self.boxes.to(m), padding=pad)
        iou = inter / (self.template_mass.to(m)[None, :, None, None] + box - inter + 1e-6)
        b, _, h, w = iou.shape
        iou = iou.reshape(b, len(SHAPES), -1, h, w).amax(2)  # best size and phase of each shape: [B, S, H, W]
        s = SHAPES.index(shape)
        others = torch.cat([iou[:, :s], iou[:, s + 1:]], 1).amax(1)
        q = torch.sigmoid((iou[:, s] - SHAPE_IOU) / self.shape_temperature) * torch.sigmoid(
            (iou[:, s] - others - self.shape_margin) / self.margin_temperature)
        q = q.reshape(b, -1)
        return (torch.softmax(q / self.position_temperature, dim=1) * q).sum(1)

    def color_term(self, masks: Tensor, colors: list[str]) -> Tensor:
        """``[B]``: ``exp(color_weight * mean log p(pixel in colors))`` over the foreground (the weights
        detached, so the term recolours pixels rather than rewarding their dimming to black)."""
        pal = masks[:, [_NAMES.index(c) for c in colors]].sum(1)
        w = (1 - masks[:, -1]).detach()
        mean_log = (w * torch.log(pal + 1e-12)).sum((1, 2)) / (w.sum((1, 2)) + 1e-6)
        return torch.exp(self.color_weight * mean_log)

    def count_term(self, mass: Tensor, area: Tensor | float, n: float) -> tuple[Tensor, Tensor]:
        count = mass / area
        ratio = torch.log((count + 1e-3) / n)
        return torch.exp(-ratio**2 / (2 * self.count_sigma**2)), count

    @staticmethod
    def centroid(mask: Tensor) -> tuple[Tensor, Tensor]:
        grid = torch.arange(IMAGE_SIZE, dtype=mask.dtype, device=mask.device) + 0.5
        mass = mask.sum((1, 2)) + 1e-6
        return (mask.sum(1) * grid).sum(1) / mass, (mask.sum(2) * grid).sum(1) / mass

    def relation_term(self, first: Tensor, second: Tensor, relation: str) -> Tensor:
        (ax, ay), (bx, by) = self.centroid(first), self.centroid(second)
        dx, dy = bx - ax, by - ay
        margin = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[relation]
        return torch.sigmoid((margin - 2.0) / self.relation_temperature)

    # --- the reward --------------------------------------------------------------------------------------

    def terms(self, masks: Tensor, spec: Spec) -> dict[str, Tensor]:
        """The soft terms of one image (``masks``: ``[1, 5, H, W]``) for ``spec``; every value ``[1]``."""
        fg = 1 - masks[:, -1]
        fg_mass = fg.sum((1, 2))
        area = self.areas.to(masks)
        one = torch.ones_like(fg_mass)
        out = {"shape_term": one, "second_term": one, "count_term": one, "relation_term": one, "color_term": one}
        if spec.kind == "position":
            assert spec.color and spec.color2 and spec.shape2 and spec.relation
            a, b = masks[:, _NAMES.index(spec.color)], masks[:, _NAMES.index(spec.color2)]
            out["shape_term"] = self.shape_term(a, spec.shape)
            out["second_term"] = self.shape_term(b, spec.shape2)
            out["relation_term"] = self.relation_term(a, b, spec.relation)
            out["color_term"] = self.color_term(masks, [spec.color, spec.color2])
            total = area[SHAPES.index(spec.shape)] + area[SHAPES.index(spec.shape2)]
            out["count_term"], count = self.count_term(fg_mass, total, 1.0)
            out["soft_count"] = 2 * count
            return out
        out["shape_term"] = self.shape_term(fg, spec.shape)
        if spec.kind == "color":
            assert spec.color
            out["second_term"] = self.shape_term(masks[:, _NAMES.index(spec.color)], spec.shape)
            out["color_term"] = self.color_term(masks, [spec.color])
        out["count_term"], out["soft_count"] = self.count_term(fg_mass, area[SHAPES.index(spec.shape)],
                                                               float(spec.count))
        return out

    def __call__(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        x = images.float().clamp(0, 1)
        masks = self.masks(x)
        rows = [self.terms(masks[i:i + 1], parse_prompt(p)) for i, p in enumerate(prompts)]
        names = ("shape_term", "second_term", "count_term", "relation_term", "color_term")
        comps = {k: torch.cat([r[k] for r in rows]) for k in (*names, "soft_count")}
        eps = 1e-3
        logs = torch.stack([torch.log(eps + (1 - eps) * comps[k]) for k in names])
        n_terms = torch.tensor([_n_terms(parse_prompt(p)) for p in prompts], dtype=x.dtype, device=x.device)
        score = torch.exp(logs.sum(0) / n_terms)  # geometric mean of the applicable terms (the others are 1)
        score = ((score - eps) / (1 - eps)).clamp(0, 1)
        return RewardOutput(score=score, components=comps)


def _n_terms(spec: Spec) -> int:
    return {"single": 2, "color": 4, "count": 2, "position": 5}[spec.kind]

