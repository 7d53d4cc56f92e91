"""A programmatic GenEval-style checker for the shapes world.

Detection: a pixel is foreground when its brightest channel exceeds ``FG_THRESHOLD``; it takes the palette colour
of nearest chromaticity (colour / brightest channel; ``"other"`` when none is close). 4-connected components of one colour larger than
``MIN_AREA`` pixels are objects; the bounding box names the shape: a triangle (apex up) has about a third of its mass above the
middle of its box, and a square fills the 2x2 corners of its box where a circle leaves them empty. Scoring: a prompt becomes a list of boolean checks; the training reward is the
fraction that pass (partial credit) and strict accuracy is 1 only when all pass.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from rlflow.worlds.shapes.scene import COLORS, Spec, parse_prompt

FG_THRESHOLD = 0.25
CORE_LEVEL = 0.5
COLOR_TOLERANCE = 0.45
MIN_AREA = 10
_PALETTE_NAMES = list(COLORS)
_PALETTE = np.asarray([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float32)
_PALETTE /= _PALETTE.max(axis=1, keepdims=True)  # chromaticity: brightness-free, so soft edges keep their hue


@dataclass(frozen=True)
class Detection:
    """A detected object: colour name (or ``"other"``), shape name (or ``"blob"``), centroid, area."""

    color: str
    shape: str
    cx: float
    cy: float
    area: int


def _color_labels(img: np.ndarray) -> np.ndarray:
    """``[H, W]`` int map: -1 background, 0..P-1 palette index, P for an unknown colour."""
    pix = img.transpose(1, 2, 0)
    bright = pix.max(-1)
    chroma = pix / np.maximum(bright, 1e-6)[..., None]
    dist = np.linalg.norm(chroma[:, :, None, :] - _PALETTE[None, None], axis=-1)
    labels = np.where(dist.min(-1) < COLOR_TOLERANCE, dist.argmin(-1), len(_PALETTE))
    return np.where(bright > FG_THRESHOLD, labels, -1)


def _components(labels: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """4-connected components of equal label: ``(label, ys, xs)`` each."""
    h, w = labels.shape
    seen = labels < 0
    out = []
    for y0, x0 in zip(*np.nonzero(~seen), strict=True):
        if seen[y0, x0]:
            continue
        lab, queue, ys, xs = labels[y0, x0], deque([(y0, x0)]), [], []
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            ys.append(y)
            xs.append(x)
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and not seen[ny, nx] and labels[ny, nx] == lab:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        out.append((int(lab), np.asarray(ys), np.asarray(xs)))
    return out


def _shape_of(ys: np.ndarray, xs: np.ndarray) -> str:
    """Triangle (apex up): about a third of the mass above the box's middle; square vs circle: corners."""
    bw, bh = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    if not 0.6 <= bw / bh <= 1.67:
        return "blob"
    fill = len(xs) / (bw * bh)
    if fill < 0.35:
        return "blob"
    mid = (ys.min() + ys.max()) / 2
    top, bottom = float((ys < mid).sum()), float((ys > mid).sum())
    if top < 0.6 * bottom:
        return "triangle"
    box = np.zeros((bh, bw), dtype=bool)
    box[ys - ys.min(), xs - xs.min()] = True
    corners = np.concatenate([box[:2, :2], box[:2, -2:], box[-2:, :2], box[-2:, -2:]]).mean()
    return "square" if corners >= 0.6 else "circle"


def detect(img: np.ndarray) -> list[Detection]:
    """Objects in a ``[3, 32, 32]`` image with values in ``[0, 1]``.

    A component's shape and centre are measured on its core: the pixels at least half as bright as the
    component's peak (the half-maximum contour of a blurred edge sits where the sharp edge was).
    """
    arr = np.asarray(img, dtype=np.float32)
    bright = arr.max(0)
    found = []
    for lab, ys, xs in _components(_color_labels(arr)):
        level = bright[ys, xs]
        core = level >= CORE_LEVEL * np.percentile(level, 90)
        ys, xs = ys[core], xs[core]
        if len(xs) < MIN_AREA:
            continue
        color = _PALETTE_NAMES[lab] if lab < len(_PALETTE_NAMES) else "other"
        found.append(Detection(color, _shape_of(ys, xs), float(xs.mean()), float(ys.mean()), len(xs)))
    return found


def _matches(dets: list[Detection], shape: str, color: str | None) -> list[Detection]:
    return [d for d in dets if d.shape == shape and (color is None or d.color == color)]


def _relation_holds(a: Detection, b: Detection, relation: str, margin: float = 2.0) -> bool:
    dx, dy = b.cx - a.cx, b.cy - a.cy
    return {"left of": dx > margin, "right of": -dx > margin, "above": dy > margin, "below": -dy > margin}[relation]


def checks(spec: Spec, dets: list[Detection]) -> list[bool]:
    """The boolean checks of one prompt on one image's detections."""
    if spec.kind == "position":
        a, b = _matches(dets, spec.shape, spec.color), _matches(dets, spec.shape2 or "", spec.color2)
        related = bool(a and b) and _relation_holds(a[0], b[0], spec.relation or "")
        return [bool(a), bool(b), related, len(dets) == 2]
    shape_only = _matches(dets, spec.shape, None)
    wanted = _matches(dets, spec.shape, spec.color)
    result = [bool(shape_only)]
    if spec.kind == "color":
        result.append(bool(wanted))
    result += [len(wanted) == spec.count, len(dets) == spec.count]
    return result


def score_image(img: np.ndarray, prompt: str) -> tuple[float, float]:
    """``(partial, strict)`` for one image and its prompt."""
    c = checks(parse_prompt(prompt), detect(img))
    return float(np.mean(c)), float(all(c))


def score_batch(images: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``images``: ``[B, 3, 32, 32]`` in ``[0, 1]`` -> ``(partial [B], strict [B])`` float32."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    pairs = [score_image(img, p) for img, p in zip(images, prompts, strict=True)]
    arr = np.asarray(pairs, dtype=np.float32).reshape(-1, 2)
    return np.ascontiguousarray(arr[:, 0]), np.ascontiguousarray(arr[:, 1])
