"""The in-process executor: the stages of :class:`rlflow.run.Run` on plain objects in this process.

The sampler and the learner share one policy (no second copy of the model): the sampler runs with the
adapter the algorithm samples with, and a rollout of an older kept version runs inside the learner's
``at_version``. A rollout is done (and scored) when ``launch`` returns, so a one-step-off rollout of step
k+1 is sampled with version k's weights before update k, exactly as on Ray.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from rlflow import builders
from rlflow.config import Config, ConfigError
from rlflow.run import Collected, StepBatch, keeps_previous
from rlflow.types import Conditions, LearnerState, Media, RewardFn, RewardOutput, Rollout


@dataclass(frozen=True)
class InProcessJob:
    step: int
    batch: StepBatch
    collected: Collected


class InProcessExecutor:
    """Sampler, learner and reward as objects in this process."""

    def __init__(self, cfg: Config, reward: RewardFn) -> None:
        if cfg.reward.is_panel and getattr(reward, "labels", None) != cfg.reward.labels:
            raise ConfigError(
                f"reward.panel {cfg.reward.labels}: the run was given a reward that is not this panel; build it "
                "with rewards.build_panel(cfg.reward)"
            )
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.cfg, self.reward = cfg, reward
        self.policy = builders.build_policy(cfg.model, cfg.seed)
        self.learner = builders.build_learner(self.policy, cfg)
        self.sampler = builders.build_sampler(self.policy, cfg, adapter=self.learner.sample_with)

    def tags(self) -> dict[str, str]:
        return {"rlflow.runtime": "in-process"}

    def start(self, version: int) -> None:
        """Nothing to send: the sampler reads the learner's policy."""

    def has_version(self, version: int) -> bool:
        return self.learner.has_version(version)

    def launch(self, step: int, batch: StepBatch, seed: int, version: int) -> InProcessJob:
        t0 = time.perf_counter()
        with self.learner.at_version(version):
            rollout = self.sampler.rollout(batch.conditions, batch.group_ids, seed=seed, policy_version=version)
        t1 = time.perf_counter()
        rewards = self.reward(rollout.media, rollout.conditions)
        collected = Collected(rollout, rewards, version, t1 - t0, time.perf_counter() - t1)
        return InProcessJob(step, batch, collected)

    def collect(self, job: InProcessJob) -> Collected:
        return job.collected

    def update(self, got: Collected, adv: torch.Tensor, seed: int, step: int) -> dict[str, float]:
        rollout: Rollout = got.rollout
        return self.learner.update(rollout, adv, seed=seed)

    def sync(self, version: int) -> None:
        """Nothing to send: the sampler reads the learner's policy."""

    def sample(self, conditions: Conditions, seeds: list[int]) -> Media:
        return self.sampler.sample(conditions, seeds, num_steps=self.cfg.train.eval_steps)

    def score(self, media: Media, conditions: Conditions) -> RewardOutput:
        return self.reward(media, conditions)

    def learner_state(self) -> LearnerState:
        return self.learner.state(with_previous=keeps_previous(self.cfg))

    def load_learner_state(self, state: LearnerState) -> None:
        self.learner.load_state(state)

    def shutdown(self) -> None:
        """Nothing to release."""
