"""``rlflow score``: score a folder of images (or a manifest.jsonl) with a reward or a config's reward panel."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    s = sub.add_parser("score", help="score images with a reward (or a config's reward panel) and print JSON")
    s.add_argument("--reward", required=True, metavar="NAME_OR_PATH",
                   help="a registered reward name, 'package.module:callable', or a config YAML (its reward section)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. reward.kwargs.model=/models/judge")
    s.add_argument("--batch-size", type=int, default=32, help="images per reward call")
    s.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    s.add_argument("--summary", action="store_true", help="print only the counts and means (no per-image rows)")
    s.add_argument("target", metavar="IMAGES_DIR_OR_MANIFEST")
    s.set_defaults(func=cmd_score)


def reward_config(spec: str, overrides: list[str]) -> Any:
    """The validated config whose ``reward`` section ``spec`` names: a YAML file's, or a default config with
    ``reward.name = spec``; ``overrides`` are applied as ``rlflow train --set`` applies them."""
    from rlflow.config import apply_overrides, load_config, validate

    if spec.endswith((".yaml", ".yml")) or Path(spec).is_file():
        return load_config(spec, overrides)
    return validate(apply_overrides({"reward": {"name": spec}}, overrides), f"--reward {spec}")


def cmd_score(args: argparse.Namespace) -> int:
    import torch

    from rewards import build_panel
    from rlflow.scoring import read_items, score_items

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = reward_config(args.reward, args.set)
    items = read_items(args.target)  # a bad folder or manifest fails before the reward's models load
    reward = build_panel(cfg.reward)
    result = {"reward": args.reward, **score_items(reward, items, args.batch_size)}
    if args.summary:
        result.pop("per_image")
    print(json.dumps(result, indent=None if args.summary else 1))
    return 0
