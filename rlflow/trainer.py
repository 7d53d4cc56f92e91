"""The in-process training loop: named stages over plain objects (the Ray driver wraps the same pieces).

One step: prompts -> rollout -> score -> advantages -> update -> log -> checkpoint; evaluation on the
held-out set before the first step, every ``train.eval_every`` steps and after the last. Every source of
randomness of step k is seeded from ``(seed, k)``, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rlflow import builders
from rlflow.algos import group_advantages
from rlflow.config import Config
from rlflow.learner import Learner
from rlflow.run import RunRecorder, StepBatch, StepTimes, run_loop, step_batch, step_seed
from rlflow.sampler import Sampler
from rlflow.types import RewardFn, RewardOutput, Trajectories

__all__ = ["StepBatch", "Trainer", "step_seed"]


class Trainer:
    """Runs (or resumes) one training run in ``run_dir``."""

    def __init__(
        self, cfg: Config, reward: RewardFn, run_dir: Path, *, tags: dict[str, str] | None = None,
        run_id: str | None = None,
    ):
        self.cfg, self.reward = cfg, reward
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.task = builders.build_task(cfg.data)
        self.policy = builders.build_policy(cfg.model, cfg.seed)
        self.sampler = Sampler(self.policy, builders.sampler_settings(cfg.sampling))
        self.learner = Learner(
            self.policy, builders.build_algo(cfg.algo), builders.learner_settings(cfg.train, cfg.sampling),
            builders.step_settings(cfg.sampling),
        )
        self.rec = RunRecorder(cfg, run_dir, tags=tags, run_id=run_id)  # only once the model and data have loaded
        if self.rec.resume is not None:
            self.learner.load_state_dict(self.rec.resume)

    @property
    def state(self):  # type: ignore[no-untyped-def]
        return self.rec.state

    @property
    def tracker(self):  # type: ignore[no-untyped-def]
        return self.rec.tracker

    @property
    def run_dir(self) -> Path:
        return self.rec.run_dir

    @property
    def resumed_from(self) -> Path | None:
        return self.rec.resumed_from

    # ---- stages -------------------------------------------------------------------------------
    def stage_prompts(self, step: int) -> StepBatch:
        return step_batch(self.cfg, self.task, step)

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
        return self.rec.checkpoint(self.learner.state_dict())

    def evaluate(self) -> dict[str, float]:
        prompts, seeds = self.task.eval_set()
        return self.task.eval_metrics(self.sample(prompts, seeds), prompts, self.reward)

    def sample(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        return self.sampler.sample(prompts, seeds, num_steps=self.cfg.train.eval_steps)

    # ---- loop ---------------------------------------------------------------------------------
    def run(self, progress: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
        """Train until ``train.steps``; returns the summary (also written to ``summary.json``)."""
        return run_loop(self, progress)

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
        times = StepTimes(rollout=t1 - t0, reward=t2 - t1, update=t3 - t2)
        metrics = self.rec.step_metrics(rewards, stats, traj.policy_version, traj.num_samples, times)
        if self.rec.due(cfg.train.eval_every) or self.state.step == cfg.train.steps:
            te = time.perf_counter()
            metrics.update({f"eval/{k}": v for k, v in self.evaluate().items()})
            metrics["time/eval"] = time.perf_counter() - te
        metrics["time/step"] = time.perf_counter() - t0
        self.rec.log_step(metrics)
        if self.rec.due(cfg.train.log_images_every):
            self.rec.log_images(self.task, self.sample, self.state.step)
        if self.rec.due(cfg.train.checkpoint_every) or self.state.step == cfg.train.steps:
            self.stage_checkpoint()
        return metrics
