"""Score a folder of images with a configured reward (``rlflow score``): how a user checks a reward before
spending GPU hours on it.

The input is a folder of images, or a ``manifest.jsonl`` (as ``rlflow sample`` writes: one JSON object per
line with ``"image"`` (a path relative to the manifest) and ``"prompt"``, optionally ``"metadata"`` (a
dict) and ``"source_image"`` (the image an edit started from)). A folder without a manifest is scored with
empty prompts. Images of different sizes are scored in separate batches (one size per batch).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from rlflow.schema import ConfigError
from rlflow.types import Conditions, Media, RewardFn

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_items(path: str | Path) -> list[dict[str, Any]]:
    """The items to score: ``{"image": Path, "prompt": str, "metadata": dict, "source_image": Path | None}``."""
    p = Path(path)
    manifest = p / "manifest.jsonl" if p.is_dir() else p
    if manifest.is_file():
        return _read_manifest(manifest)
    if not p.is_dir():
        raise ConfigError(f"{p}: neither a folder of images nor a manifest.jsonl")
    images = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ConfigError(f"{p}: no images ({', '.join(IMAGE_SUFFIXES)}) and no manifest.jsonl")
    return [{"image": f, "prompt": "", "metadata": {}, "source_image": None} for f in images]


def _read_manifest(manifest: Path) -> list[dict[str, Any]]:
    items = []
    for n, line in enumerate(manifest.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{manifest} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{where}: not JSON ({err})") from None
        if not isinstance(row, dict) or not isinstance(row.get("image"), str):
            raise ConfigError(f'{where}: expected an object with "image" (a path) and "prompt", got {line.strip()!r}')
        prompt, meta = row.get("prompt", ""), row.get("metadata", {})
        if not isinstance(prompt, str) or not isinstance(meta, dict):
            raise ConfigError(f'{where}: "prompt" must be a string and "metadata" an object')
        image = manifest.parent / row["image"]
        source = manifest.parent / row["source_image"] if row.get("source_image") else None
        for f in (image, source):
            if f is not None and not f.is_file():
                raise ConfigError(f"{where}: image file not found: {f}")
        items.append({"image": image, "prompt": prompt, "metadata": meta, "source_image": source})
    if not items:
        raise ConfigError(f"{manifest}: holds no images")
    return items


def load_image(path: Path) -> torch.Tensor:
    """An image file -> ``[3, H, W]`` fp32 in ``[0, 1]`` (RGB)."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the image ({err})") from None
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _num(x: torch.Tensor) -> float:
    return float(f"{float(x):.7g}")  # the rewards score in fp32: more digits would be noise


def score_items(reward: RewardFn, items: list[dict[str, Any]], batch_size: int = 32) -> dict[str, Any]:
    """Score every item; returns ``{"images", "mean": {"score", <component>...}, "per_image": [...]}``
    (per-image rows in input order)."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    images = [load_image(it["image"]) for it in items]
    sources = [load_image(it["source_image"]) if it["source_image"] else None for it in items]
    if any(s is None for s in sources) and any(s is not None for s in sources):
        raise ConfigError("the manifest gives a source_image for some images but not all")
    by_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, img in enumerate(images):
        key = tuple(img.shape) + (tuple(sources[i].shape) if sources[i] is not None else ())  # type: ignore[union-attr]
        by_size[key].append(i)
    scores = torch.zeros(len(items), dtype=torch.float64)
    components: dict[str, torch.Tensor] = {}
    for idx in by_size.values():
        for start in range(0, len(idx), batch_size):
            part = idx[start:start + batch_size]
            src = [sources[i] for i in part]
            conditions = Conditions(
                tuple(items[i]["prompt"] for i in part),
                torch.stack([s for s in src if s is not None])[:, None] if src[0] is not None else None,
                metadata=tuple(items[i]["metadata"] for i in part),
            )
            out = reward(Media(images=torch.stack([images[i] for i in part])), conditions)
            scores[part] = out.score.double()
            for k, v in out.components.items():
                components.setdefault(k, torch.full((len(items),), float("nan"), dtype=torch.float64))[part] = v.double()
    rows = [
        {"image": str(it["image"]), "prompt": it["prompt"], "score": _num(scores[i]),
         "components": {k: _num(v[i]) for k, v in components.items()}}
        for i, it in enumerate(items)
    ]
    mean = {"score": _num(scores.mean())} | {k: _num(v.mean()) for k, v in components.items()}
    return {"images": len(items), "mean": mean, "per_image": rows}
