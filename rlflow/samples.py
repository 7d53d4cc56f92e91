"""Deterministic samples of a run's checkpoint (or of its base model), written to a folder: one PNG per
image and a ``manifest.jsonl`` with ``{"image", "prompt", "seed"}`` per line (``rlflow sample``).

Sample ``(prompt, seed)`` starts from the noise of ``torch.Generator().manual_seed(seed)`` and runs the
deterministic ODE sampler of the run's config, so the same call writes the same files, and anyone can
re-score them with a checker of their own.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from rlflow import builders
from rlflow.checkpoint import latest_checkpoint, load_checkpoint
from rlflow.config import Config, load_config
from rlflow.schema import ConfigError
from rlflow.tracking import to_uint8
from rlflow.types import Conditions, Media


@dataclass(frozen=True)
class Source:
    """What to sample: the run's config and the checkpoint folder (``None``: the base model)."""

    config: Config
    checkpoint: Path | None


def resolve_source(path: str | Path, *, base: bool = False, overrides: list[str] | None = None) -> Source:
    """A run folder (its latest checkpoint) or a checkpoint folder (``<run>/checkpoints/step_N``)."""
    p = Path(path)
    ckpt: Path | None
    if (p / "state.json").is_file() and (p.parent.parent / "config.yaml").is_file():
        run_dir, ckpt = p.parent.parent, p
    elif (p / "config.yaml").is_file():
        run_dir, ckpt = p, latest_checkpoint(p)
        if ckpt is None and not base:
            raise ConfigError(f"{p}: the run has no checkpoint yet (use --base to sample the base model)")
    else:
        raise ConfigError(f"{p}: neither a run folder (with config.yaml) nor a checkpoint folder (with state.json)")
    return Source(load_config(run_dir / "config.yaml", overrides), None if base else ckpt)


def to_png(image: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` in ``[0, 1]`` -> an RGB image (the conversion the MLflow image grids use)."""
    return Image.fromarray(to_uint8(image[None])[0], "RGB")


def sample_to_folder(
    source: Source, prompts: list[str], out: str | Path, *, seeds: int = 1, steps: int = 40, adapter: str = "default",
) -> list[dict[str, object]]:
    """Sample every prompt with seeds ``0 .. seeds - 1`` and write the images and the manifest to ``out``;
    returns the manifest rows. ``adapter``: the trained LoRA (``default``) or one of the algorithm's extra
    adapters (e.g. DiffusionNFT's ``old`` policy, which its samplers and its evaluation use)."""
    cfg = source.config
    policy = builders.build_policy(cfg.model, cfg.seed)
    learner = builders.build_learner(policy, cfg)  # adds the algorithm's adapters, so its checkpoint loads
    known = ("default", *learner.algo.policies.extra_adapters)
    if adapter not in known:
        raise ConfigError(f"--adapter {adapter!r}: this run's algorithm ({cfg.algo.name}) has {', '.join(known)}")
    if source.checkpoint is not None:
        learner.load_state(load_checkpoint(source.checkpoint)[1])
    sampler = builders.build_sampler(policy, cfg, adapter=adapter)
    rows = [(p, s) for p in prompts for s in range(seeds)]
    conditions = Conditions.of([p for p, _ in rows])
    with policy.reference() if source.checkpoint is None else contextlib.nullcontext():
        media = sampler.sample(conditions, [s for _, s in rows], num_steps=steps)
    return write_folder(media, rows, Path(out))


def write_folder(media: Media, rows: list[tuple[str, int]], out: Path) -> list[dict[str, object]]:
    out.mkdir(parents=True, exist_ok=True)
    manifest = []
    for i, ((prompt, seed), image) in enumerate(zip(rows, media.stills, strict=True)):
        name = f"{i:05d}.png"
        to_png(image).save(out / name)
        manifest.append({"image": name, "prompt": prompt, "seed": seed})
    (out / "manifest.jsonl").write_text("".join(json.dumps(m) + "\n" for m in manifest))
    return manifest
