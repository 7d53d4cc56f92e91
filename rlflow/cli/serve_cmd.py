"""``rlflow serve-reward CONFIG``: serve a config's reward over HTTP with Ray Serve, for runs to share."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any


def register(sub: Any) -> None:
    s = sub.add_parser("serve-reward", help="serve a config's reward over HTTP (Ray Serve) for runs to share "
                       "(reward.name: http)")
    s.add_argument("config", help="YAML config; its reward section is served")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    s.add_argument("--address", help="deploy on this Ray cluster (HOST:6379 or auto) instead of an embedded one")
    s.add_argument("--host", default="127.0.0.1",
                   help="where Serve's HTTP proxy listens (default 127.0.0.1; 0.0.0.0 for other machines)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--route", default="/score", help="the route prefix of the scoring endpoint")
    s.add_argument("--name", help="the Serve application's name (default rlflow-reward-<reward.name>)")
    s.add_argument("--threads", type=int, default=0, help="torch CPU threads per replica (0: torch's default)")
    s.add_argument("--detach", action="store_true",
                   help="with --address: leave the application running on the cluster and exit")
    s.set_defaults(func=cmd_serve_reward)


def cmd_serve_reward(args: argparse.Namespace) -> int:
    from rewards import resolve
    from rlflow.config import ConfigError, load_config
    from workers.runtime import connect, disconnect
    from workers.serve_reward import app_name, serve_reward

    cfg = load_config(args.config, args.set)
    if args.detach and not args.address:
        raise ConfigError("--detach needs --address (an embedded Ray stops with this command)")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port}: not a TCP port")
    resolve(cfg.reward.name)  # a bad reward name fails here, before Ray starts
    print(f"ray: {connect(cfg, args.address)}", flush=True)
    name = args.name or app_name(cfg.reward)
    try:
        url = serve_reward(cfg.reward, host=args.host, port=args.port, route=args.route, name=name,
                           threads=args.threads)
        print(json.dumps({"serving": cfg.reward.name, "app": name, "url": url, "replicas": cfg.reward.replicas,
                          "config": {"reward": {"name": "http", "kwargs": {"url": url}}}}), flush=True)
        if args.detach:
            return 0
        print("serving until Ctrl-C", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.delete(name)
        return 0
    finally:
        if not args.detach:
            disconnect()
