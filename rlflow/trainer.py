"""The in-process training run: the one loop (:class:`rlflow.run.Run`) over :class:`InProcessExecutor`."""

from __future__ import annotations

from pathlib import Path

from rlflow.config import Config
from rlflow.executor import InProcessExecutor
from rlflow.run import Run, StepBatch, step_seed
from rlflow.types import RewardFn

__all__ = ["StepBatch", "Trainer", "step_seed"]


class Trainer(Run):
    """Runs (or resumes) one training run in ``run_dir`` in this process, without Ray."""

    executor: InProcessExecutor

    def __init__(
        self, cfg: Config, reward: RewardFn, run_dir: Path, *, tags: dict[str, str] | None = None,
        run_id: str | None = None,
    ):
        super().__init__(cfg, InProcessExecutor(cfg, reward), run_dir, tags=tags, run_id=run_id)

    @property
    def learner(self):  # type: ignore[no-untyped-def]
        return self.executor.learner

    @property
    def policy(self):  # type: ignore[no-untyped-def]
        return self.executor.policy
