"""The shapes world: scenes of coloured shapes, their prompts, and a renderer to 32x32 RGB.

A :class:`Spec` is what a prompt asks for; a scene is a list of :class:`Obj` placed on a black canvas, each
object in its own cell of a 2x2 layout grid (with a little jitter), which keeps layouts learnable by a tiny
model trained on a CPU.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

IMAGE_SIZE = 32
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.75, 0.25),
    "blue": (0.20, 0.35, 0.95),
    "yellow": (0.95, 0.85, 0.15),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")
KINDS = ("single", "color", "count", "position")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
# Ways of saying the same thing: every content is written in each of these, so each kind has enough distinct
# prompts for a held-out eval of dozens of prompts per kind (the content itself is unchanged).
PHRASINGS = (
    "{}", "a photo of {}", "an image of {}", "a picture of {}", "a drawing of {}", "a sketch of {}",
    "a painting of {}", "a rendering of {}", "an illustration of {}", "a photograph of {}", "a snapshot of {}",
    "a render of {}", "a depiction of {}", "a view of {}", "{} on black", "{} on a black background",
)


@dataclass(frozen=True)
class Obj:
    """A placed object: colour, shape, centre ``(cx, cy)`` in pixels and bounding-box side ``size``."""

    color: str
    shape: str
    cx: float
    cy: float
    size: int


@dataclass(frozen=True)
class Spec:
    """What a prompt asks for.

    kind: one of :data:`KINDS`. shape/color: the (first) object; color is None when unconstrained.
    count: how many of it (1 to 3). relation/shape2/color2: the second object of a position prompt.
    """

    kind: str
    shape: str
    color: str | None = None
    count: int = 1
    relation: str | None = None
    shape2: str | None = None
    color2: str | None = None
    phrasing: int = 0

    @property
    def prompt(self) -> str:
        return PHRASINGS[self.phrasing].format(self.content)

    @property
    def content(self) -> str:
        """What is asked for, in the plain phrasing (``"a red circle"``)."""
        if self.kind == "single":
            return f"a {self.shape}"
        if self.kind == "color":
            return f"a {self.color} {self.shape}"
        if self.kind == "count":
            return f"{NUMBER_WORDS[self.count]} {self.shape}{'s' if self.count > 1 else ''}"
        return f"a {self.color} {self.shape} {self.relation} a {self.color2} {self.shape2}"


def all_specs() -> list[Spec]:
    """Every prompt of the world (every content in every phrasing), in a fixed order."""
    return [replace(c, phrasing=i) for c in all_contents() for i in range(len(PHRASINGS))]


def all_contents() -> list[Spec]:
    """Every content of the world in the plain phrasing, in a fixed order."""
    specs = [Spec("single", s) for s in SHAPES]
    specs += [Spec("color", s, c) for c in COLORS for s in SHAPES]
    specs += [Spec("count", s, count=n) for n in NUMBER_WORDS for s in SHAPES]
    objects = list(itertools.product(COLORS, SHAPES))
    for (c1, s1), (c2, s2) in itertools.permutations(objects, 2):
        if c1 == c2:  # two distinct colours keep the checker's pairing unambiguous
            continue
        specs += [Spec("position", s1, c1, relation=r, shape2=s2, color2=c2) for r in RELATIONS]
    return specs


def parse_prompt(prompt: str) -> Spec:
    """The :class:`Spec` of a world prompt; raises ``ValueError`` for text outside the world."""
    spec = _PROMPT_INDEX.get(prompt.strip().lower())
    if spec is None:
        raise ValueError(f"not a shapes-world prompt: {prompt!r}")
    return spec


_PROMPT_INDEX = {s.prompt: s for s in all_specs()}


def shape_mask(shape: str, cx: Any, cy: Any, size: Any, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Which pixel centres ``(yy, xx)`` fall inside the shape of bounding-box side ``size`` centred at
    ``(cx, cy)``; every argument broadcasts (the checker fits many candidates at once)."""
    half = np.asarray(size, dtype=np.float32) / 2
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= half**2
    if shape == "square":
        return (np.abs(xx - cx) <= half) & (np.abs(yy - cy) <= half)
    top, bottom = cy - half, cy + half
    frac = (yy - top) / (2 * half)
    return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half * frac)


def pixel_grid() -> tuple[np.ndarray, np.ndarray]:
    """``(yy, xx)``: pixel-centre coordinates of the canvas (pixel ``i`` spans ``[i, i + 1]``)."""
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5
    return yy, xx


def _mask(shape: str, cx: float, cy: float, size: float) -> np.ndarray:
    return shape_mask(shape, cx, cy, size, *pixel_grid())


def render(objects: list[Obj]) -> np.ndarray:
    """Scene -> ``[3, 32, 32]`` float32 image in ``[0, 1]`` on a black background."""
    img = np.zeros((3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for o in objects:
        m = _mask(o.shape, o.cx, o.cy, o.size)
        img[:, m] = np.asarray(COLORS[o.color], dtype=np.float32)[:, None]
    return img


GRID = (8.5, 23.5)  # cell centres of the 2x2 layout grid
JITTER = 1.5


def _free(box: tuple[float, float, int], placed: list[tuple[float, float, int]], gap: float = 1.0) -> bool:
    cx, cy, s = box
    return all(abs(cx - px) >= (s + ps) / 2 + gap or abs(cy - py) >= (s + ps) / 2 + gap for px, py, ps in placed)


def _place(rng: np.random.Generator, n: int) -> list[tuple[float, float, int]]:
    """``n`` non-overlapping boxes in distinct cells of the 2x2 grid, with a little jitter."""
    while True:
        cells = rng.choice(len(GRID) ** 2, size=n, replace=False)
        placed: list[tuple[float, float, int]] = []
        for c in cells:
            size = int(rng.integers(10, 13))
            col, row = int(c) % len(GRID), int(c) // len(GRID)
            cx, cy = GRID[col] + rng.uniform(-JITTER, JITTER), GRID[row] + rng.uniform(-JITTER, JITTER)
            box = (float(cx), float(cy), size)
            if not _free(box, placed):
                break
            placed.append(box)
        if len(placed) == n:
            return placed


def _relation_boxes(rng: np.random.Generator, relation: str) -> list[tuple[float, float, int]]:
    """Two boxes whose centres satisfy ``first <relation> second`` with a clear margin."""
    while True:
        a, b = _place(rng, 2)
        dx, dy = b[0] - a[0], b[1] - a[1]  # offsets of the second object from the first
        ok = {"left of": dx > 6, "right of": dx < -6, "above": dy > 6, "below": dy < -6}[relation]
        if ok:
            return [a, b]


def sample_scene(spec: Spec, rng: np.random.Generator) -> list[Obj]:
    """A random scene that satisfies ``spec`` exactly (the pretraining data)."""
    colors = list(COLORS)
    if spec.kind == "position":
        assert spec.relation and spec.shape2 and spec.color and spec.color2
        (ax, ay, asz), (bx, by, bsz) = _relation_boxes(rng, spec.relation)
        return [Obj(spec.color, spec.shape, ax, ay, asz), Obj(spec.color2, spec.shape2, bx, by, bsz)]
    objs = []
    for box in _place(rng, spec.count):
        color = spec.color or colors[int(rng.integers(len(colors)))]
        objs.append(Obj(color, spec.shape, *box))
    return objs


def choose_other(rng: np.random.Generator, options: tuple[str, ...] | list[str], *avoid: str | None) -> str:
    """A uniformly drawn option that is none of ``avoid``."""
    pool = [o for o in options if o not in avoid]
    return pool[int(rng.integers(len(pool)))]


def mislabel(spec: Spec, rng: np.random.Generator) -> Spec:
    """``spec`` with exactly one of the attributes its prompt asks for changed (the pretraining's caption noise).

    single: the shape, or one object more; color: the shape or the colour; count: the shape or the number;
    position: either object's shape or colour (the two colours stay distinct), or the relation reversed.
    An image of the result fails ``spec``'s strict check, so a model trained on such captions follows each
    prompt only part of the time: the headroom RL is meant to close.
    """
    other = functools.partial(choose_other, rng)
    colors = list(COLORS)
    attrs = {"single": ("shape", "count"), "color": ("shape", "color"), "count": ("shape", "count")}.get(
        spec.kind, ("shape", "color", "shape2", "color2", "relation")
    )
    attr = attrs[int(rng.integers(len(attrs)))]
    if attr == "shape":
        return replace(spec, shape=other(SHAPES, spec.shape))
    if attr == "shape2":
        return replace(spec, shape2=other(SHAPES, spec.shape2))
    if attr == "color":
        return replace(spec, color=other(colors, spec.color, spec.color2))
    if attr == "color2":
        return replace(spec, color2=other(colors, spec.color, spec.color2))
    if attr == "count":
        return replace(spec, count=int(other([str(n) for n in NUMBER_WORDS], str(spec.count))))
    return replace(spec, relation=_OPPOSITE[spec.relation or ""])


_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
