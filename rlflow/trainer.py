"""The in-process training loop: named stages over plain objects (the Ray driver wraps the same pieces).

One step: prompts -> rollout -> score -> advantages -> update -> log -> checkpoint; evaluation on the
held-out set before the first step, every ``train.eval_every`` steps and after the last. Every source of
randomness of step k is seeded from ``(seed, k)``, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from rlflow import builders
from rlflow.algos import group_advantages
from rlflow.checkpoint import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from rlflow.config import Config, to_dict
from rlflow.learner import Learner
from rlflow.sampler import Sampler
from rlflow.tracking import Tracker, default_tracking_uri
from rlflow.types import RewardFn, RewardOutput, Trajectories


@dataclass(frozen=True)
class StepBatch:
    prompts: list[str]
    group_ids: torch.Tensor


def step_seed(seed: int, step: int, stream: int) -> int:
    """A 63-bit seed for stream ``stream`` of step ``step``."""
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


class Trainer:
    """Runs (or resumes) one training run in ``run_dir``."""

    def __init__(
        self, cfg: Config, reward: RewardFn, run_dir: Path, *, tags: dict[str, str] | None = None,
        run_id: str | None = None,
    ):
        self.cfg, self.reward, self.run_dir = cfg, reward, Path(run_dir)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.task = builders.build_task(cfg.data)
        self.policy = builders.build_policy(cfg.model, cfg.seed)
        self.sampler = Sampler(self.policy, builders.sampler_settings(cfg.sampling))
        self.learner = Learner(
            self.policy, builders.build_algo(cfg.algo), builders.learner_settings(cfg.train, cfg.sampling),
            builders.step_settings(cfg.sampling),
        )
        self.run_dir.mkdir(parents=True, exist_ok=True)  # only once the model and data have loaded
        self.state = TrainState()
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is not None:
            self.state, lora, optim = load_checkpoint(ckpt)
            self.learner.load_state_dict({"lora": lora, "optimizer": optim})
        uri = cfg.tracking.tracking_uri or default_tracking_uri(cfg.output_dir)
        self.tracker = Tracker(
            uri, cfg.tracking.experiment, run_name=self.run_dir.name, run_id=self.state.mlflow_run_id or run_id,
            tags={"rlflow.run_dir": str(self.run_dir.resolve()), **(tags or {})},
        )
        self.state.mlflow_run_id = self.tracker.run_id
        self.resumed_from = ckpt

    # ---- stages -------------------------------------------------------------------------------
    def stage_prompts(self, step: int) -> StepBatch:
        s = self.cfg.sampling
        rng = np.random.default_rng(step_seed(self.cfg.seed, step, 0))
        unique = self.task.train_prompts(rng, s.prompts_per_step)
        prompts = [p for p in unique for _ in range(s.group_size)]
        group_ids = torch.arange(len(unique)).repeat_interleave(s.group_size) + step * s.prompts_per_step
        return StepBatch(prompts, group_ids)

    def stage_rollout(self, batch: StepBatch, step: int) -> Trajectories:
        return self.sampler.rollout(
            batch.prompts, batch.group_ids, seed=step_seed(self.cfg.seed, step, 1), policy_version=self.state.policy_version
        )

    def stage_score(self, traj: Trajectories) -> RewardOutput:
        return self.reward(traj.images, traj.prompts)

    def stage_advantages(self, rewards: RewardOutput, traj: Trajectories) -> torch.Tensor:
        return group_advantages(rewards.score, traj.group_ids, global_std=self.cfg.algo.global_std)

    def stage_update(self, traj: Trajectories, adv: torch.Tensor, step: int) -> dict[str, float]:
        self.policy.transformer.train()
        stats = self.learner.update(traj, adv, seed=step_seed(self.cfg.seed, step, 2))
        self.policy.transformer.eval()
        self.state.policy_version += 1
        return stats

    def stage_checkpoint(self) -> Path:
        """Save the resumable checkpoint locally and log its LoRA weights to MLflow."""
        learner = self.learner.state_dict()
        path = save_checkpoint(self.run_dir, self.state, learner["lora"], learner["optimizer"])
        self.tracker.log_artifact(path / "lora.safetensors", f"checkpoints/{path.name}")
        return path

    def evaluate(self) -> dict[str, float]:
        prompts, seeds = self.task.eval_set()
        images = self.sampler.sample(prompts, seeds, num_steps=self.cfg.train.eval_steps)
        return self.task.eval_metrics(images, prompts, self.reward)

    # ---- loop ---------------------------------------------------------------------------------
    def run(self, progress: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
        """Train until ``train.steps``; returns the summary (also written to ``summary.json``)."""
        cfg, start = self.cfg, time.time()
        try:
            if self.state.step == 0:
                self._log_start()
            while self.state.step < cfg.train.steps:
                metrics = self.train_step()
                if progress:
                    progress(self.state.step, metrics)
            summary = self._summary(time.time() - start)
            self.tracker.log_dict(summary, "summary.json")
            self.tracker.finish("FINISHED")
            return summary
        except Exception:
            self.tracker.finish("FAILED")
            raise
        except BaseException:  # Ctrl-C, SystemExit: the last checkpoint stays resumable
            self.tracker.finish("KILLED")
            raise

    def _log_start(self) -> None:
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        self.tracker.log_params(to_dict(self.cfg))
        self.tracker.log_artifact(self.run_dir / "config.yaml")
        before = self.evaluate()
        self.state.history.update({f"eval_before/{k}": v for k, v in before.items()})
        self.tracker.log_metrics({f"eval/{k}": v for k, v in before.items()}, step=0)
        self._log_images(0)

    def train_step(self) -> dict[str, float]:
        cfg, step = self.cfg, self.state.step
        t0 = time.perf_counter()
        batch = self.stage_prompts(step)
        traj = self.stage_rollout(batch, step)
        t1 = time.perf_counter()
        rewards = self.stage_score(traj)
        t2 = time.perf_counter()
        adv = self.stage_advantages(rewards, traj)
        stats = self.stage_update(traj, adv, step)
        t3 = time.perf_counter()
        self.state.step = step + 1
        metrics = self._step_metrics(rewards, stats, traj, (t1 - t0, t2 - t1, t3 - t2))
        if self._due(cfg.train.eval_every) or self.state.step == cfg.train.steps:
            te = time.perf_counter()
            metrics.update({f"eval/{k}": v for k, v in self.evaluate().items()})
            metrics["time/eval"] = time.perf_counter() - te
        metrics["time/step"] = time.perf_counter() - t0
        self.state.history.update({k: v for k, v in metrics.items() if k.startswith(("eval/", "reward/"))})
        self.tracker.log_metrics(metrics, step=self.state.step)
        if self._due(cfg.train.log_images_every):
            self._log_images(self.state.step)
        if self._due(cfg.train.checkpoint_every) or self.state.step == cfg.train.steps:
            self.stage_checkpoint()
        return metrics

    def _due(self, every: int) -> bool:
        return every > 0 and self.state.step % every == 0

    def _step_metrics(
        self, rewards: RewardOutput, stats: dict[str, float], traj: Trajectories, times: tuple[float, float, float]
    ) -> dict[str, float]:
        m = {"reward/mean": float(rewards.score.mean()), "reward/std": float(rewards.score.std(unbiased=False))}
        for k, v in rewards.components.items():
            m[f"reward/{k}_mean"] = float(v.mean())
            m[f"reward/{k}_std"] = float(v.std(unbiased=False))
        m.update({f"train/{k}": v for k, v in stats.items()})
        m["train/policy_version"] = float(self.state.policy_version)
        m["train/policy_lag"] = float(self.state.policy_version - 1 - traj.policy_version)
        m.update({"time/rollout": times[0], "time/reward": times[1], "time/update": times[2]})
        m["throughput/rollout_images_per_s"] = traj.num_samples / max(times[0], 1e-9)
        return m

    def _log_images(self, step: int) -> None:
        prompts, seeds = self.task.eval_set()
        n = min(16, len(prompts))
        idx = np.linspace(0, len(prompts) - 1, n).astype(int).tolist()
        sel_p, sel_s = [prompts[i] for i in idx], [seeds[i] for i in idx]
        images = self.sampler.sample(sel_p, sel_s, num_steps=self.cfg.train.eval_steps)
        self.tracker.log_image_grid(images, sel_p, step=step, name="eval_samples")

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
