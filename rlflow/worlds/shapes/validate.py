"""The checker on constructed images: clean renders must pass, each kind of wrong image must fail.

``python -m rlflow.worlds.shapes.validate [--n 1000]`` prints, as JSON, the strict pass rate of clean renders
(sharp, and softened by a small blur as a generator's edges are) and the fail rate of each defect:

    wrong_shape   one asked-for object drawn as another shape
    wrong_color   one asked-for object in another colour (prompts that name a colour)
    oversized     one object drawn 16-20 px (the world draws 10-12)
    merged        a same-colour copy of an object overlapping it (one component, two objects)
    extra_small   an extra 3-6 px object in free space
    noise_blob    one object replaced by speckled noise of its colour
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np

from rlflow.worlds.shapes.checker import score_image
from rlflow.worlds.shapes.scene import (
    COLORS,
    IMAGE_SIZE,
    SHAPES,
    Obj,
    Spec,
    all_contents,
    choose_other,
    render,
    sample_scene,
)

DEFECTS = ("wrong_shape", "wrong_color", "oversized", "merged", "extra_small", "noise_blob")


def blur(img: np.ndarray, sigma: float = 0.5) -> np.ndarray:
    """A separable Gaussian blur of a ``[3, H, W]`` image (soft, generator-like edges)."""
    r = np.arange(-2, 3, dtype=np.float32)
    k = np.exp(-(r**2) / (2 * sigma**2))
    k /= k.sum()
    pad = np.pad(img, ((0, 0), (2, 2), (2, 2)))
    rows = sum(w * pad[:, :, i : i + IMAGE_SIZE] for i, w in enumerate(k))
    return sum(w * rows[:, i : i + IMAGE_SIZE, :] for i, w in enumerate(k))


def _free_spot(objs: list[Obj], size: int, rng: np.random.Generator) -> tuple[float, float] | None:
    for _ in range(200):
        cx, cy = rng.uniform(size / 2 + 0.5, IMAGE_SIZE - size / 2 - 0.5, size=2)
        if all(max(abs(cx - o.cx), abs(cy - o.cy)) >= (size + o.size) / 2 + 2 for o in objs):
            return float(cx), float(cy)
    return None


def defect_image(defect: str, spec: Spec, rng: np.random.Generator) -> np.ndarray | None:
    """A wrong image for ``spec`` (None when the defect does not apply, e.g. a colour for "a circle")."""
    if defect == "wrong_shape":
        return render(sample_scene(replace(spec, shape=choose_other(rng, SHAPES, spec.shape)), rng))
    if defect == "wrong_color":
        if spec.color is None:
            return None
        return render(sample_scene(replace(spec, color=choose_other(rng, list(COLORS), spec.color, spec.color2)), rng))
    objs = sample_scene(spec, rng)
    i = int(rng.integers(len(objs)))
    o = objs[i]
    if defect == "oversized":
        size = int(rng.integers(16, 21))
        lo, hi = size / 2 + 0.5, IMAGE_SIZE - size / 2 - 0.5
        objs[i] = replace(o, size=size, cx=float(np.clip(o.cx, lo, hi)), cy=float(np.clip(o.cy, lo, hi)))
        return render(objs)
    if defect == "merged":
        lo, hi = o.size / 2 + 0.5, IMAGE_SIZE - o.size / 2 - 0.5  # the copy lies wholly on the canvas
        for _ in range(100):
            angle, dist = rng.uniform(0, 2 * np.pi), o.size * rng.uniform(0.5, 0.9)
            cx, cy = o.cx + dist * float(np.cos(angle)), o.cy + dist * float(np.sin(angle))
            if lo <= cx <= hi and lo <= cy <= hi:
                return render(objs + [replace(o, cx=cx, cy=cy)])
        return None
    if defect == "extra_small":
        size = int(rng.integers(3, 7))
        spot = _free_spot(objs, size, rng)
        if spot is None:
            return None
        extra = Obj(choose_other(rng, list(COLORS)), choose_other(rng, SHAPES), spot[0], spot[1], size)
        return render(objs + [extra])
    if defect == "noise_blob":
        img = render(objs[:i] + objs[i + 1 :])
        half = o.size / 2
        y0, x0 = int(max(o.cy - half, 0)), int(max(o.cx - half, 0))
        y1, x1 = int(min(o.cy + half, IMAGE_SIZE)), int(min(o.cx + half, IMAGE_SIZE))
        on = rng.random((y1 - y0, x1 - x0)) < 0.6
        level = rng.uniform(0.4, 1.0, size=on.shape)
        color = np.asarray(COLORS[o.color], dtype=np.float32)[:, None, None]
        img[:, y0:y1, x0:x1] = np.where(on, color * level, img[:, y0:y1, x0:x1])
        return img
    raise ValueError(f"unknown defect {defect!r} (known: {', '.join(DEFECTS)})")


def validate(n: int = 1000, seed: int = 0) -> dict[str, dict[str, float]]:
    """Pass rates of ``n`` clean renders (sharp and blurred) and fail rates of ``n`` images per defect, over
    contents drawn uniformly from the world."""
    rng = np.random.default_rng(seed)
    contents = all_contents()
    out: dict[str, dict[str, float]] = {}
    for case in ("clean", "clean_blurred", *DEFECTS):
        hits = total = 0
        while total < n:
            spec = contents[int(rng.integers(len(contents)))]
            if case.startswith("clean"):
                clean = render(sample_scene(spec, rng))
                img: np.ndarray | None = blur(clean) if case == "clean_blurred" else clean
            else:
                img = defect_image(case, spec, rng)
            if img is None:
                continue
            strict = score_image(img, spec.prompt)[1]
            hits += int(strict == 1.0) if case.startswith("clean") else int(strict == 0.0)
            total += 1
        out[case] = {"pass_rate" if case.startswith("clean") else "fail_rate": hits / total, "images": total}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="images per case")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(json.dumps(validate(args.n, args.seed), indent=2))


if __name__ == "__main__":
    main()
