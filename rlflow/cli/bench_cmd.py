"""``rlflow bench ray-overhead|async|weight-sync|reward-http``: measured figures of the Ray runtime, printed as JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    b = sub.add_parser("bench", help="benchmark the Ray runtime (JSON out)")
    b.add_argument("what", choices=["ray-overhead", "async", "weight-sync", "reward-http"])
    b.add_argument("--config", default="configs/toy_shapes_dppo.yaml", help="the run config to measure")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    b.add_argument("--steps", type=int, default=0, help="training steps per run (default: 12 / 8)")
    b.add_argument("--latency", type=float, default=0.5, help="async: seconds the reward sleeps per batch")
    b.add_argument("--replicas", type=int, default=1, help="async: reward server replicas")
    b.add_argument("--repeats", type=int, default=0,
                   help="ray-overhead: interleaved in-process/Ray pairs (default 3); weight-sync: timed repetitions "
                        "(default 10)")
    b.add_argument("--batch", type=int, default=64, help="reward-http: samples per scored batch")
    b.add_argument("--port", type=int, default=8000, help="reward-http: Ray Serve's HTTP port")
    b.add_argument("--out", help="also write the JSON here")
    b.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from rlflow.config import load_config
    from workers import bench

    cfg = load_config(args.config, args.set)
    if args.what == "ray-overhead":
        result = bench.ray_overhead(cfg, steps=args.steps or 12, repeats=args.repeats or 3)
    elif args.what == "reward-http":
        from workers.runtime import connect, disconnect
        from workers.serve_reward import bench_overhead

        connect(cfg)
        try:
            result = bench_overhead(cfg.reward, batch=args.batch, repeats=args.repeats or 5, port=args.port)
        finally:
            disconnect()
    elif args.what == "async":
        result = bench.async_overlap(cfg, steps=args.steps or 8, latency=args.latency, replicas=args.replicas)
    else:
        result = bench.weight_sync(cfg, repeats=args.repeats or 10)
    result["config"] = args.config
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0
