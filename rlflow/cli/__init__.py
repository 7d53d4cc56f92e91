"""``rlflow``: the command line (train, pretrain, sample, ui, bench and the Ray job commands)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from rlflow.checkpoint import CheckpointError
from rlflow.config import ConfigError


def _run_dir(output_dir: str, name: str) -> Path:
    return Path(output_dir) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _resolve_resume(resume: str, output_dir: str) -> Path:
    for cand in (Path(resume), Path(output_dir) / resume):
        if (cand / "config.yaml").is_file():
            return cand
    raise ConfigError(f"--resume {resume}: no run folder with a config.yaml at {resume} or {Path(output_dir) / resume}")


def job_tags() -> dict[str, str]:
    """Tags that tie the MLflow run to the Ray job that runs it (set by ``rlflow submit``)."""
    env = {"RLFLOW_RAY_JOB_ID": "rlflow.ray_job_id", "RLFLOW_RAY_ADDRESS": "rlflow.ray_address"}
    return {tag: os.environ[var] for var, tag in env.items() if os.environ.get(var)}


def cmd_train(args: argparse.Namespace) -> int:
    """Validate, check what the config names (:func:`rlflow.config.check_inputs`; on resume, what it may
    change: :func:`rlflow.config.check_resume`), then train: nothing is made before those pass."""
    from rewards import build_panel
    from rlflow.builders import model_path
    from rlflow.config import check_inputs, check_resume, check_run_name, load_config
    from rlflow.redact import redact_text

    overrides = [*args.set, *([f"output_dir={args.output_dir}"] if args.output_dir else [])]
    if args.resume:
        run_dir = _resolve_resume(args.resume, args.output_dir or "runs")
        cfg = load_config(run_dir / "config.yaml", overrides)
        check_resume(load_config(run_dir / "config.yaml"), cfg, overrides, str(run_dir))
    elif args.config:
        cfg = load_config(args.config, overrides)
        name = os.environ.get("RLFLOW_RUN_NAME")  # set by `rlflow submit`: the MLflow run's name
        run_dir = Path(cfg.output_dir) / check_run_name(name, "RLFLOW_RUN_NAME") if name else _run_dir(
            cfg.output_dir, cfg.name)
    else:
        raise ConfigError("rlflow train needs a CONFIG file, or --resume RUN")
    check_inputs(cfg, on_ray=not args.in_process)
    uri = cfg.tracking.tracking_uri or ""
    if redact_text(uri) != uri:  # MLflow's own "View run at" lines would print its credentials to the logs
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    model_path(cfg.model.path)  # a bad model folder fails here, before the model (or any actor) loads
    tags, run_id = job_tags(), os.environ.get("RLFLOW_MLFLOW_RUN_ID")
    signal.signal(signal.SIGTERM, _terminate)  # `rlflow stop` / `ray job stop`: mark the run KILLED
    if args.in_process:
        from rlflow.trainer import Trainer

        trainer: Any = Trainer(cfg, build_panel(cfg.reward), run_dir, tags=tags, run_id=run_id)
    else:
        from rewards import resolve_all
        from workers.driver import RayTrainer
        from workers.runtime import connect

        if args.working_dir:  # its plug-ins must import here too
            wd = Path(args.working_dir).expanduser().resolve()
            if not wd.is_dir():
                raise ConfigError(f"--working-dir {args.working_dir}: not a directory")
            sys.path.insert(0, str(wd))
        resolve_all(cfg.reward)  # a bad reward name fails here (naming its key), before any actor starts
        print(f"ray: {connect(cfg, args.address, args.working_dir)}", flush=True)
        trainer = RayTrainer(cfg, run_dir, tags=tags, run_id=run_id)
    if trainer.resumed_from:
        print(f"resuming {run_dir} from {trainer.resumed_from.name} (step {trainer.state.step})")
    print(f"run folder: {run_dir}\nmlflow run: {redact_text(trainer.tracker.run_url)}", flush=True)  # logs are shared
    try:
        summary = trainer.run(progress=_progress_bar(cfg.train.steps, trainer.state.step))
    finally:
        if not args.in_process:
            from workers.runtime import disconnect

            disconnect()
    _print_summary(summary)
    return 0


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _progress_bar(total: int, initial: int):  # type: ignore[no-untyped-def]
    from tqdm import tqdm

    bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(step: int, metrics: dict[str, float]) -> None:
        post = {"reward": f"{metrics['reward/mean']:.3f}", "s/step": f"{metrics['time/step']:.1f}"}
        acc = metrics.get("eval/accuracy", metrics.get("eval/reward"))
        if acc is not None:
            post["eval"] = f"{acc:.3f}"
        bar.set_postfix(post)
        bar.update(step - bar.n)
        if step >= total:
            bar.close()

    return update


def _print_summary(s: dict) -> None:  # type: ignore[type-arg]
    before, after = s["eval_before"], s["eval_after"]
    print("\n== rlflow run summary ==")
    for key in sorted(set(before) & set(after)):
        if not key.endswith(("_lo", "_hi")):
            span = f"  [{after[key + '_lo']:.3f}, {after[key + '_hi']:.3f}]" if key + "_lo" in after else ""
            print(f"  eval {key:<22} {before[key]:.3f} -> {after[key]:.3f}{span}")
    if "eval_gain" in s:
        g = s["eval_gain"]
        verdict = "significant" if g["significant"] else "not significant"
        print(f"  eval {g['metric']} gain {g['gain']:+.3f}, 95% [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}] ({verdict})")
    for key in ("train_reward_first10", "train_reward_last10", "rollout_images_per_s", "mean_step_seconds"):
        if key in s:
            print(f"  {key:<27} {s[key]:.3f}")
    print(f"  steps {s['steps']}, wall time this session {s['wall_seconds_this_session']:.0f}s")
    from rlflow.redact import redact_text

    print(f"  run folder  {s['run_dir']}\n  mlflow run  {redact_text(s['mlflow_run_url'])}")


def cmd_pretrain(args: argparse.Namespace) -> int:
    if args.world != "shapes":
        raise ConfigError(f"pretrain: unknown world '{args.world}' (available: shapes)")
    import torch

    from rlflow.worlds.shapes.model import BASE_DIR
    from rlflow.worlds.shapes.pretrain import PretrainSettings, pretrain

    torch.set_num_threads(args.threads or torch.get_num_threads())
    out = args.out or str(BASE_DIR)
    given = {"steps": args.steps, "stop_at": args.stop_at, "seed": args.seed, "eval_every": args.eval_every,
             "mislabel_rate": args.mislabel_rate, "init_from": args.init_from, "lr": args.lr,
             "distill_guidance": args.distill_guidance, "warmup": args.warmup, "layers": args.layers,
             "text_layers": args.text_layers, "order_curriculum": args.order_curriculum,
             "kind_weights": tuple(float(w) for w in args.kind_weights.split(",")) if args.kind_weights else None}
    settings = PretrainSettings(snapshots=args.snapshots, **{k: v for k, v in given.items() if v is not None})
    result = pretrain(out, settings, log=lambda m: print(m, flush=True))
    print(json.dumps(result, indent=2))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from rlflow.tracking import serve_ui

    return serve_ui(args.output_dir, host=args.host, port=args.port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlflow", description="RL fine-tuning of flow-matching generators")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="run a training job (on Ray: embedded local, or a cluster with --address)")
    t.add_argument("config", nargs="?", help="YAML config (see configs/)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    t.add_argument("--resume", metavar="RUN", help="continue a run folder from its last checkpoint")
    t.add_argument("--output-dir", help="where run folders go (default: the config's output_dir)")
    t.add_argument("--address", help="join this Ray cluster (HOST:6379 or auto) instead of an embedded one")
    t.add_argument("--working-dir", help="ship this folder (your reward plug-ins, code) to the Ray workers, as "
                   "`rlflow submit` does; it also goes first on this process's import path")
    t.add_argument("--in-process", action="store_true", help="run the plain loop in this process, without Ray")
    t.set_defaults(func=cmd_train)
    pt = sub.add_parser("pretrain", help="pretrain a toy world's base model")
    pt.add_argument("world", help="shapes")
    pt.add_argument("--out", help="output folder (default: the shipped base model folder)")
    pt.add_argument("--steps", type=int, help="length of the learning-rate schedule (default 6000)")
    pt.add_argument("--stop-at", type=int, help="stop after this many steps (default: the whole schedule)")
    pt.add_argument("--mislabel-rate", type=float,
                    help="fraction of training captions with one attribute wrong, the base's headroom (default 0.3)")
    pt.add_argument("--init-from", metavar="MODEL_DIR", help="continue from a saved model instead of random weights")
    pt.add_argument("--distill-guidance", type=float, metavar="G",
                    help="guidance distillation (with --init-from): learn the init model's CFG-g velocity")
    pt.add_argument("--kind-weights", metavar="S,C,N,P",
                    help="relative frequency of the single, colour, count and position prompts (default 1,1,1,1)")
    pt.add_argument("--order-curriculum", type=int, metavar="N",
                    help="relation curriculum: for the first N steps position prompts name their colours in the "
                    "palette's order only, then both orders (default 0: off)")
    pt.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    pt.add_argument("--warmup", type=int, help="warm-up steps (default 100)")
    pt.add_argument("--layers", type=int, help="transformer blocks of a model trained from scratch (default 4)")
    pt.add_argument("--text-layers", type=int, help="text-encoder layers of a model trained from scratch (default 2)")
    pt.add_argument("--snapshots", action="store_true", help="also save the model at every eval")
    pt.add_argument("--seed", type=int)
    pt.add_argument("--eval-every", type=int)
    pt.add_argument("--threads", type=int, default=0)
    pt.set_defaults(func=cmd_pretrain)
    u = sub.add_parser("ui", help="serve the MLflow UI over a local run store")
    u.add_argument("--output-dir", default="runs")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=5000)
    u.set_defaults(func=cmd_ui)
    from rlflow.cli import bench_cmd, jobs_cmd, sample_cmd, score_cmd, serve_cmd

    jobs_cmd.register(sub)
    bench_cmd.register(sub)
    sample_cmd.register(sub)
    score_cmd.register(sub)
    serve_cmd.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, FileNotFoundError, CheckpointError) as err:
        print(f"rlflow: error: {err}", file=sys.stderr)
        return 2
