"""The bookkeeping of one training run, shared by the in-process :class:`rlflow.trainer.Trainer` and the Ray
driver (``workers/driver.py``): run folder, resumable state, MLflow run, step metrics, image grids,
checkpoints and the closing summary. It never touches a model: callers pass images, stats and weights in.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import yaml

from rlflow.checkpoint import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from rlflow.config import Config, to_dict
from rlflow.tracking import Tracker, default_tracking_uri
from rlflow.types import RewardOutput


@dataclass(frozen=True)
class StepBatch:
    """The prompts of one rollout batch: ``group_size`` copies of each prompt; ``group_ids`` ``[B]`` int64."""

    prompts: list[str]
    group_ids: torch.Tensor


@dataclass(frozen=True)
class StepTimes:
    """Wall seconds of a step's stages (``rollout`` includes scoring that overlapped it)."""

    rollout: float
    reward: float
    update: float
    sync: float = 0.0


def step_seed(seed: int, step: int, stream: int) -> int:
    """A 63-bit seed for stream ``stream`` of step ``step``."""
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def step_batch(cfg: Config, task: Any, step: int) -> StepBatch:
    """The seeded prompts of step ``step`` (``task``: a :class:`rlflow.tasks.Task`)."""
    s = cfg.sampling
    rng = np.random.default_rng(step_seed(cfg.seed, step, 0))
    unique = task.train_prompts(rng, s.prompts_per_step)
    prompts = [p for p in unique for _ in range(s.group_size)]
    group_ids = torch.arange(len(unique)).repeat_interleave(s.group_size) + step * s.prompts_per_step
    return StepBatch(prompts, group_ids)


class RunRecorder:
    """Opens (or re-opens) the run in ``run_dir``: its checkpoint state and its MLflow run.

    ``resume``: the latest checkpoint's learner state dict (for ``Learner.load_state_dict``), or ``None``.
    """

    def __init__(
        self, cfg: Config, run_dir: Path, *, tags: dict[str, str] | None = None, run_id: str | None = None
    ) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.state = TrainState()
        self.resumed_from = latest_checkpoint(self.run_dir)
        self.resume: dict[str, Any] | None = None
        if self.resumed_from is not None:
            self.state, self.resume = load_checkpoint(self.resumed_from)
        uri = cfg.tracking.tracking_uri or default_tracking_uri(cfg.output_dir)
        self.tracker = Tracker(
            uri, cfg.tracking.experiment, run_name=self.run_dir.name, run_id=self.state.mlflow_run_id or run_id,
            tags={"rlflow.run_dir": str(self.run_dir.resolve()), **(tags or {})},
        )
        self.state.mlflow_run_id = self.tracker.run_id

    def due(self, every: int) -> bool:
        return every > 0 and self.state.step % every == 0

    def log_start(self, eval_metrics: dict[str, float]) -> None:
        """Config (params and artifact) and the evaluation before the first step."""
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        self.tracker.log_params(to_dict(self.cfg))
        self.tracker.log_artifact(self.run_dir / "config.yaml")
        self.state.history.update({f"eval_before/{k}": v for k, v in eval_metrics.items()})
        self.tracker.log_metrics({f"eval/{k}": v for k, v in eval_metrics.items()}, step=0)

    def step_metrics(
        self, rewards: RewardOutput, stats: dict[str, float], rollout_version: int, num_samples: int, times: StepTimes
    ) -> dict[str, float]:
        score = rewards.score.double()  # fp64 means: independent of how the batch was split and strided
        m = {"reward/mean": float(score.mean()), "reward/std": float(score.std(unbiased=False))}
        for k, v in rewards.components.items():
            m[f"reward/{k}_mean"] = float(v.double().mean())
            m[f"reward/{k}_std"] = float(v.double().std(unbiased=False))
        m.update({f"train/{k}": v for k, v in stats.items()})
        m["train/policy_version"] = float(self.state.policy_version)
        m["train/policy_lag"] = float(self.state.policy_version - 1 - rollout_version)
        m.update({"time/rollout": times.rollout, "time/reward": times.reward, "time/update": times.update})
        if times.sync:
            m["time/sync"] = times.sync
        m["throughput/rollout_images_per_s"] = num_samples / max(times.rollout, 1e-9)
        return m

    def log_step(self, metrics: dict[str, float]) -> None:
        self.state.history.update({k: v for k, v in metrics.items() if k.startswith(("eval/", "reward/"))})
        self.tracker.log_metrics(metrics, step=self.state.step)

    def log_images(self, task: Any, sample: Callable[[list[str], list[int]], torch.Tensor], step: int) -> None:
        """A grid of up to 16 held-out prompts sampled with the eval sampler."""
        prompts, seeds = task.eval_set()
        n = min(16, len(prompts))
        idx = np.linspace(0, len(prompts) - 1, n).astype(int).tolist()
        sel_p, sel_s = [prompts[i] for i in idx], [seeds[i] for i in idx]
        self.tracker.log_image_grid(sample(sel_p, sel_s), sel_p, step=step, name="eval_samples")

    def checkpoint(self, learner: dict[str, Any]) -> Path:
        """Save the resumable checkpoint (``learner``: the learner's state dict) locally and log its LoRA
        weights to MLflow."""
        path = save_checkpoint(self.run_dir, self.state, learner)
        self.tracker.log_artifact(path / "lora.safetensors", f"checkpoints/{path.name}")
        return path

    def finish(self, seconds: float) -> dict[str, Any]:
        """Write and log the summary; mark the MLflow run FINISHED."""
        summary = self._summary(seconds)
        self.tracker.log_dict(summary, "summary.json")
        self.tracker.finish("FINISHED")
        return summary

    def _run_averages(self, window: int = 10) -> dict[str, float]:
        """Means over the whole run (resumed parts included), read back from the tracking store."""

        def history(key: str) -> list[float]:
            hist = self.tracker.client.get_metric_history(self.tracker.run_id, key)
            return [m.value for m in sorted(hist, key=lambda m: m.step)]

        out: dict[str, float] = {}
        images_per_s, step_s, reward = (history(k) for k in ("throughput/rollout_images_per_s", "time/step", "reward/mean"))
        if images_per_s:
            out["rollout_images_per_s"] = float(np.mean(images_per_s))
            out["mean_step_seconds"] = float(np.mean(step_s))
            out["total_step_seconds"] = float(np.sum(step_s))
            out[f"train_reward_first{window}"] = float(np.mean(reward[:window]))
            out[f"train_reward_last{window}"] = float(np.mean(reward[-window:]))
        return out

    def _summary(self, seconds: float) -> dict[str, Any]:
        h = self.state.history
        summary: dict[str, Any] = {
            "run_dir": str(self.run_dir.resolve()),
            "mlflow_run_id": self.tracker.run_id,
            "mlflow_run_url": self.tracker.run_url,
            "steps": self.state.step,
            "wall_seconds_this_session": round(seconds, 1),
            "eval_before": {k.split("/", 1)[1]: v for k, v in h.items() if k.startswith("eval_before/")},
            "eval_after": {k.split("/", 1)[1]: v for k, v in h.items() if k.startswith("eval/")},
            **self._run_averages(),
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


class TrainingLoop(Protocol):
    """What :func:`run_loop` drives: the in-process Trainer and the Ray driver."""

    cfg: Config
    rec: RunRecorder
    task: Any

    def evaluate(self) -> dict[str, float]: ...

    def sample(self, prompts: list[str], seeds: list[int]) -> torch.Tensor: ...

    def train_step(self) -> dict[str, float]: ...


def run_loop(loop: TrainingLoop, progress: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Train until ``train.steps`` (first evaluating, on a fresh run); returns the summary. The MLflow run is
    marked FAILED on an error and KILLED on Ctrl-C or SIGTERM; the last checkpoint stays resumable."""
    rec, start = loop.rec, time.time()
    try:
        if rec.state.step == 0:
            rec.log_start(loop.evaluate())
            rec.log_images(loop.task, loop.sample, 0)
        while rec.state.step < loop.cfg.train.steps:
            metrics = loop.train_step()
            if progress:
                progress(rec.state.step, metrics)
        return rec.finish(time.time() - start)
    except Exception:
        rec.tracker.finish("FAILED")
        raise
    except BaseException:
        rec.tracker.finish("KILLED")
        raise
