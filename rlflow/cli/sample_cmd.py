"""``rlflow sample``: deterministic samples of a run's checkpoint (or its base) as PNGs plus a manifest."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(sub: Any) -> None:
    s = sub.add_parser("sample", help="write deterministic samples of a run's checkpoint (PNGs + manifest.jsonl)")
    s.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="a run folder (its last checkpoint) or a checkpoint folder")
    s.add_argument("--prompts", required=True, metavar="FILE", help="one prompt per line")
    s.add_argument("--seeds", type=int, default=1, help="images per prompt (noise seeds 0..N-1)")
    s.add_argument("--steps", type=int, default=40, help="ODE steps")
    s.add_argument("--base", action="store_true", help="sample the run's base model (LoRA off)")
    s.add_argument("--adapter", default="default",
                   help="the trained LoRA (default) or an extra adapter of the algorithm (nft: old)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of the run's config")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    s.set_defaults(func=cmd_sample)


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from rlflow.samples import resolve_source, sample_to_folder
    from rlflow.schema import ConfigError
    from rlflow.tasks import read_prompts

    if args.seeds < 1 or args.steps < 1:
        raise ConfigError(f"--seeds {args.seeds} and --steps {args.steps} must both be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = read_prompts(args.prompts, "--prompts")
    source = resolve_source(args.run, base=args.base, overrides=args.set)
    rows = sample_to_folder(source, prompts, args.out, seeds=args.seeds, steps=args.steps, adapter=args.adapter)
    what = "base model" if source.checkpoint is None else str(source.checkpoint)
    print(json.dumps({"images": len(rows), "out": args.out, "from": what, "steps": args.steps}))
    return 0
