"""A programmatic GenEval-style checker for the shapes world, strict enough that RL cannot game it.

Detection: a pixel is foreground when its brightest channel exceeds ``FG_THRESHOLD``; it takes the palette
colour of nearest chromaticity (colour / brightest channel; ``"other"`` when none is close). 4-connected
components of one colour are candidate objects, measured on their core (the pixels at least half as bright as
the component's peak). A core of at least ``MIN_AREA`` pixels is a detection; smaller specks are stray pixels.

Shape: the core is fitted by each ideal shape (the renderer's own masks, over a few sizes and sub-pixel
offsets); the shape is the best fit when its IoU is at least ``SHAPE_IOU`` and beats every other shape by
``SHAPE_MARGIN``, else ``"blob"`` (noise, merged objects, a square-ish circle). An object counts only when
its shape is known and its fitted size lies in ``SIZE_RANGE`` (the world draws 10-12 px objects), so an
oversized blob, a merged pair and a tiny extra object all fail; they still count towards the number of objects
in the image, and the "right number of objects" check needs every object to be valid.

Scoring: a prompt becomes a list of boolean checks, one of which is that the image is clean (at most
``STRAY_MAX`` stray foreground pixels); the training reward is the fraction that pass (partial credit) and
strict accuracy is 1 only when all pass.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from rlflow.worlds.shapes.scene import COLORS, SHAPES, Spec, parse_prompt, shape_mask

FG_THRESHOLD = 0.25
CORE_LEVEL = 0.5
COLOR_TOLERANCE = 0.45
MIN_AREA = 4
SHAPE_IOU = 0.75
SHAPE_MARGIN = 0.04
SIZE_RANGE = (7.5, 13.5)
STRAY_MAX = 2
_PALETTE_NAMES = list(COLORS)
_PALETTE = np.asarray([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float32)
_PALETTE /= _PALETTE.max(axis=1, keepdims=True)  # chromaticity: brightness-free, so soft edges keep their hue


@dataclass(frozen=True)
class Detection:
    """A detected object: colour name (or ``"other"``), shape name (or ``"blob"``), centroid, core area, the
    fitted bounding-box side and the fit's IoU."""

    color: str
    shape: str
    cx: float
    cy: float
    area: int
    size: float = 0.0
    iou: float = 0.0

    @property
    def valid(self) -> bool:
        """A recognised shape of the world's size: the only kind of detection a prompt's object can match."""
        return self.shape != "blob" and SIZE_RANGE[0] <= self.size <= SIZE_RANGE[1]


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


_OFFSETS = np.asarray([-0.5, 0.0, 0.5], dtype=np.float32)
_SIZE_STEPS = np.arange(-1.5, 2.01, 0.5, dtype=np.float32)


def fit_shape(ys: np.ndarray, xs: np.ndarray) -> tuple[str, float, float]:
    """``(shape or "blob", fitted size, IoU)`` of a pixel set, by the best fit of each ideal shape."""
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    side = float(max(x1 - x0, y1 - y0))
    pad = 3
    gy, gx = np.mgrid[y0 - pad : y1 + pad, x0 - pad : x1 + pad].astype(np.float32) + 0.5
    mask = np.zeros(gy.shape, dtype=bool)
    mask[ys - y0 + pad, xs - x0 + pad] = True
    sizes, dx, dy = np.meshgrid(side + _SIZE_STEPS, _OFFSETS, _OFFSETS, indexing="ij")
    sizes, cx, cy = sizes.ravel(), (x0 + x1) / 2 + dx.ravel(), (y0 + y1) / 2 + dy.ravel()
    best: dict[str, tuple[float, float]] = {}
    for shape in SHAPES:
        ideal = shape_mask(shape, cx[:, None, None], cy[:, None, None], sizes[:, None, None], gy, gx)
        inter = (ideal & mask).sum((1, 2))
        iou = inter / np.maximum((ideal | mask).sum((1, 2)), 1)
        i = int(iou.argmax())
        best[shape] = (float(iou[i]), float(sizes[i]))
    ranked = sorted(best, key=lambda k: best[k][0], reverse=True)
    top, runner_up = best[ranked[0]][0], best[ranked[1]][0]
    if top < SHAPE_IOU or top - runner_up < SHAPE_MARGIN:
        return "blob", float(max(side, best[ranked[0]][1])), top
    return ranked[0], best[ranked[0]][1], top


def analyse(img: np.ndarray) -> tuple[list[Detection], int]:
    """``(detections, stray pixel count)`` of a ``[3, 32, 32]`` image with values in ``[0, 1]``."""
    arr = np.asarray(img, dtype=np.float32)
    bright = arr.max(0)
    found, stray = [], 0
    for lab, ys, xs in _components(_color_labels(arr)):
        level = bright[ys, xs]
        core = level >= CORE_LEVEL * np.percentile(level, 90)
        ys, xs = ys[core], xs[core]
        if len(xs) < MIN_AREA:
            stray += len(xs)
            continue
        color = _PALETTE_NAMES[lab] if lab < len(_PALETTE_NAMES) else "other"
        shape, size, iou = fit_shape(ys, xs)
        found.append(Detection(color, shape, float(xs.mean()) + 0.5, float(ys.mean()) + 0.5, len(xs), size, iou))
    return found, stray


def detect(img: np.ndarray) -> list[Detection]:
    """Objects (valid or not) in a ``[3, 32, 32]`` image with values in ``[0, 1]``."""
    return analyse(img)[0]


def _matches(dets: list[Detection], shape: str, color: str | None) -> list[Detection]:
    return [d for d in dets if d.valid and d.shape == shape and (color is None or d.color == color)]


def relation_holds(a: Detection, b: Detection, relation: str, margin: float = 2.0) -> bool:
    dx, dy = b.cx - a.cx, b.cy - a.cy
    return {"left of": dx > margin, "right of": -dx > margin, "above": dy > margin, "below": -dy > margin}[relation]


def checks(spec: Spec, dets: list[Detection], stray: int = 0) -> list[bool]:
    """The boolean checks of one prompt on one image's detections and stray pixel count."""
    clean = stray <= STRAY_MAX
    if spec.kind == "position":
        a, b = _matches(dets, spec.shape, spec.color), _matches(dets, spec.shape2 or "", spec.color2)
        related = bool(a and b) and relation_holds(a[0], b[0], spec.relation or "")
        return [bool(a), bool(b), related, _n_valid_objects(dets, 2), clean]
    shape_only = _matches(dets, spec.shape, None)
    wanted = _matches(dets, spec.shape, spec.color)
    result = [bool(shape_only)]
    if spec.kind == "color":
        result.append(bool(wanted))
    result += [len(wanted) == spec.count, _n_valid_objects(dets, spec.count), clean]
    return result


def _n_valid_objects(dets: list[Detection], n: int) -> bool:
    """Exactly ``n`` objects, each a valid shape: a blob, a merged pair or an oversized object never makes up
    the number (so partial credit cannot be earned by drawing the right number of shapeless blobs)."""
    return len(dets) == n and all(d.valid for d in dets)


def score_image(img: np.ndarray, prompt: str) -> tuple[float, float]:
    """``(partial, strict)`` for one image and its prompt."""
    c = checks(parse_prompt(prompt), *analyse(img))
    return float(np.mean(c)), float(all(c))


def score_analysed(
    images: np.ndarray, prompts: list[str]
) -> tuple[np.ndarray, np.ndarray, list[tuple[list[Detection], int]]]:
    """``(partial [B], strict [B], analyses)`` of ``[B, 3, 32, 32]`` images in ``[0, 1]``: float32 scores, and
    each image's :func:`analyse` result (for statistics over the detections)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    found = [analyse(img) for img in images]
    results = [checks(parse_prompt(p), dets, stray) for p, (dets, stray) in zip(prompts, found, strict=True)]
    partial = np.asarray([np.mean(c) for c in results], dtype=np.float32).reshape(-1)
    strict = np.asarray([all(c) for c in results], dtype=np.float32).reshape(-1)
    return partial, strict, found


def score_batch(images: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``images``: ``[B, 3, 32, 32]`` in ``[0, 1]`` -> ``(partial [B], strict [B])`` float32."""
    partial, strict, _ = score_analysed(images, prompts)
    return partial, strict
