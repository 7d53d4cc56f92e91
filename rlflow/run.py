"""The one training loop: named stages over an executor, and the bookkeeping of a run.

    prompts      the seeded conditions of step k (``group_size`` copies of each)
    rollout      the pipeline mode launches it on the executor (now, or one step ahead)
    score        the executor collects the rollout and its rewards
    advantages   group-normalised (ALGORITHMS.md section 0; a reward panel's fusion: section 7)
    update       the learner(s) run the algorithm's loss; the policy version advances
    sync         the new sampling weights reach the samplers
    checkpoint   a resumable checkpoint, written first so that a failing eval or tracking store cannot lose it
    eval / log   MLflow metrics, sample grids, the checkpoint's LoRA (a resume finishes what was not logged)

The step is written once (:class:`Run`). Where it runs is an :class:`Executor`: plain objects in this process
(:class:`rlflow.executor.InProcessExecutor`) or Ray actors (``workers/executor.py``); how rollouts overlap
updates is a :class:`Pipeline`. Neither the stages nor the executors branch on an algorithm. Every source of
randomness of step k is seeded from ``(seed, k)``, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import yaml

from rlflow import builders
from rlflow.checkpoint import (
    TrainState,
    adapter_files,
    checkpoint_dir,
    latest_checkpoint,
    load_latest,
    prune_checkpoints,
    save_checkpoint,
)
from rlflow.config import Config, to_dict
from rlflow.learner import NonFiniteError
from rlflow.panel import panel_advantages
from rlflow.redact import redact, redact_text
from rlflow.seeding import step_seed
from rlflow.stats import paired_bootstrap
from rlflow.tasks import EvalReport, Task
from rlflow.tracking import Tracker, default_tracking_uri
from rlflow.types import Conditions, LearnerState, Media, RewardOutput

__all__ = [
    "Run", "RunRecorder", "StepBatch", "Collected", "Executor", "Pipeline", "ResumableError", "NonFiniteError",
    "step_seed",
]

ROW_MARKER = "time/step"  # the last metric of a step's row: a step that has it in the store was logged


@dataclass(frozen=True)
class StepBatch:
    """The conditions of one rollout batch: ``group_size`` copies of each; ``group_ids`` ``[B]`` int64."""

    conditions: Conditions
    group_ids: torch.Tensor

    @property
    def num_samples(self) -> int:
        return len(self.conditions)


def step_batch(cfg: Config, task: Task, step: int) -> StepBatch:
    """The seeded conditions of step ``step``."""
    s = cfg.sampling
    rng = np.random.default_rng(step_seed(cfg.seed, step, 0))
    unique = task.train_conditions(rng, s.prompts_per_step)
    group_ids = torch.arange(len(unique)).repeat_interleave(s.group_size) + step * s.prompts_per_step
    return StepBatch(unique.repeat(s.group_size), group_ids)


@dataclass(frozen=True)
class Collected:
    """A finished rollout and its scores, as an executor hands them to the update.

    rollout: the executor's handle of the batch (an in-process :class:`rlflow.types.Rollout`, or object
             references on Ray); only the executor reads it.
    rewards: ``[B]`` scores (and components) in batch order.
    version: the policy version that sampled the batch.
    rollout_seconds, reward_seconds: wall time of sampling, and of scoring after it.
    metrics: executor-specific figures of this step (e.g. redone chunks), logged as they are.
    """

    rollout: Any
    rewards: RewardOutput
    version: int
    rollout_seconds: float
    reward_seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


class RolloutJob(Protocol):
    """A launched rollout: its step and the batch it samples."""

    @property
    def step(self) -> int: ...

    @property
    def batch(self) -> StepBatch: ...


class Executor(Protocol):
    """Where the stages run. ``launch`` may return before the rollout is done; ``collect`` waits for it."""

    def tags(self) -> dict[str, str]: ...

    def start(self, version: int) -> None:
        """Give the samplers the weights of ``version`` (and of ``version - 1`` when the learner kept them)."""
        ...

    def has_version(self, version: int) -> bool: ...

    def launch(self, step: int, batch: StepBatch, seed: int, version: int) -> RolloutJob: ...

    def collect(self, job: Any) -> Collected: ...

    def update(self, got: Collected, adv: torch.Tensor, seed: int, step: int) -> dict[str, float]: ...

    def sync(self, version: int) -> None: ...

    def sample(self, conditions: Conditions, seeds: list[int]) -> Media: ...

    def score(self, media: Media, conditions: Conditions) -> RewardOutput: ...

    def learner_state(self) -> LearnerState: ...

    def load_learner_state(self, state: LearnerState) -> None: ...

    def shutdown(self) -> None: ...


class ResumableError(RuntimeError):
    """The run cannot continue (e.g. a learner died), but its last checkpoint is intact."""


class RunRecorder:
    """Opens (or re-opens) the run in ``run_dir``: its checkpoint state and its MLflow run.

    ``resume``: the learner state of the newest usable checkpoint (``resumed_from``; a bad one is skipped with a
    warning naming its bad file), or ``None``. ``logged``: the steps the tracking store already has a row of
    (on a resume, those after the checkpoint: they are recomputed, bit for bit, but not logged twice).
    """

    def __init__(
        self, cfg: Config, run_dir: Path, *, tags: dict[str, str] | None = None, run_id: str | None = None
    ) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.state = TrainState()
        self.resumed_from: Path | None = None
        self.resume: LearnerState | None = None
        if (found := load_latest(self.run_dir)) is not None:
            self.resumed_from, self.state, self.resume = found
        uri = cfg.tracking.tracking_uri or default_tracking_uri(cfg.output_dir)
        self.tracker = Tracker(
            uri, cfg.tracking.experiment, run_name=self.run_dir.name, run_id=self.state.mlflow_run_id or run_id,
            tags={"rlflow.run_dir": str(self.run_dir.resolve()), **(tags or {})},
        )
        self.state.mlflow_run_id = self.tracker.run_id
        self.primary: str | None = None
        self.logged: set[int] = set()
        if self.resumed_from is not None:
            self.logged = {m.step for m in self.tracker.client.get_metric_history(self.tracker.run_id, ROW_MARKER)}

    def due(self, every: int) -> bool:
        return every > 0 and self.state.step % every == 0

    def log_start(self, eval_metrics: dict[str, float]) -> None:
        """Config (params and artifact, secrets redacted: :mod:`rlflow.redact`) and the evaluation before the
        first step. The run folder keeps the complete ``config.yaml`` for ``--resume``."""
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        shared = redact(to_dict(self.cfg))
        self.tracker.log_params(shared)
        self.tracker.log_dict(shared, "config.yaml")
        self.state.history.update({f"eval_before/{k}": v for k, v in eval_metrics.items()})
        self.tracker.log_metrics({f"eval/{k}": v for k, v in eval_metrics.items()}, step=0)

    def step_metrics(
        self, got: Collected, stats: dict[str, float], num_samples: int, *, update: float, sync: float
    ) -> dict[str, float]:
        score = got.rewards.score.double()  # fp64 means: independent of how the batch was split and strided
        m = {"reward/mean": float(score.mean()), "reward/std": float(score.std(unbiased=False))}
        for k, v in got.rewards.components.items():
            m[f"reward/{k}_mean"] = float(v.double().mean())
            m[f"reward/{k}_std"] = float(v.double().std(unbiased=False))
        m.update({f"train/{k}": v for k, v in stats.items()})
        m["train/policy_version"] = float(self.state.policy_version)
        m["train/policy_lag"] = float(self.state.policy_version - 1 - got.version)
        m.update({"time/rollout": got.rollout_seconds, "time/reward": got.reward_seconds, "time/update": update,
                  "time/sync": sync})
        m["throughput/rollout_images_per_s"] = num_samples / max(got.rollout_seconds, 1e-9)
        m.update(got.metrics)
        return m

    def compare_with_base(self, report: EvalReport) -> dict[str, float]:
        """The first eval of a run is the base model's: its per-sample scores and metrics are kept in the run
        folder (``eval_base.npy``, ``eval_base.json``) and every later eval reports its paired gain over them,
        and the change of each drift sentinel (metrics named ``drift_*``) as ``<name>_vs_base``."""
        path, metrics_path = self.run_dir / "eval_base.npy", self.run_dir / "eval_base.json"
        self.primary = report.primary
        if not path.is_file():
            np.save(path, report.per_sample)
            metrics_path.write_text(json.dumps(report.metrics, indent=2) + "\n")
            return {}
        out: dict[str, float] = {}
        if metrics_path.is_file():
            base_metrics = json.loads(metrics_path.read_text())
            out.update({f"{k}_vs_base": v - base_metrics[k] for k, v in report.metrics.items()
                        if k.startswith("drift_") and k in base_metrics})
        base = np.load(path, allow_pickle=False)
        if base.shape != report.per_sample.shape:  # the eval set changed (e.g. a --set on resume)
            return out
        diff = report.per_sample - base
        lo, hi = paired_bootstrap(diff)
        key = f"{report.primary}_gain"
        return {**out, key: float(diff.mean()), f"{key}_lo": lo, f"{key}_hi": hi}

    def log_step(self, metrics: dict[str, float]) -> None:
        """Keep the step's eval and reward figures and log its row, unless the store has it already (a step
        recomputed after a resume: one row per step)."""
        self.state.history.update({k: v for k, v in metrics.items() if k.startswith(("eval/", "reward/"))})
        if self.state.step not in self.logged:
            row = {k: v for k, v in metrics.items() if k != ROW_MARKER} | {ROW_MARKER: metrics[ROW_MARKER]}
            self.tracker.log_metrics(row, step=self.state.step)
            self.logged.add(self.state.step)

    def log_samples(self, task: Task, sample: Callable[[Conditions, list[int]], Media], step: int) -> None:
        """Up to 16 held-out samples (a captioned grid; videos also as strips and a GIF)."""
        conditions, seeds = task.eval_set()
        n = min(16, len(conditions))
        idx = np.linspace(0, len(conditions) - 1, n).astype(int).tolist()
        sel = conditions.index(idx)
        self.tracker.log_media(sample(sel, [seeds[i] for i in idx]), list(sel.prompts), step=step, name="eval_samples")

    def checkpoint(self, learner: LearnerState, metrics: dict[str, float]) -> Path:
        """Save the resumable checkpoint of this step locally, with the step's ``metrics`` so far (its report,
        which a resume finishes), and keep the newest ``train.keep_checkpoints``."""
        state = dataclasses.replace(self.state, report={k: float(v) for k, v in metrics.items()})
        path = save_checkpoint(self.run_dir, state, learner)
        if self.cfg.train.keep_checkpoints:
            prune_checkpoints(self.run_dir, self.cfg.train.keep_checkpoints)
        return path

    def upload_checkpoint(self, step: int) -> None:
        """Log the LoRA weights of step ``step``'s checkpoint (the trained adapter and the algorithm's extra
        ones) to MLflow (again, on a resume: the same files under the same names)."""
        path = checkpoint_dir(self.run_dir, step)
        for f in adapter_files(path):
            self.tracker.log_artifact(f, f"checkpoints/{path.name}")

    def finish(self, seconds: float) -> dict[str, Any]:
        """Write and log the summary; mark the MLflow run FINISHED."""
        summary = self._summary(seconds)
        self.tracker.log_dict(summary, "summary.json")
        self.tracker.finish("FINISHED")
        return summary

    def _run_averages(self, window: int = 10) -> dict[str, float]:
        """Means over the whole run (resumed parts included), read back from the tracking store."""

        def history(key: str) -> list[float]:  # one value per step (the last logged, were there more)
            hist = self.tracker.client.get_metric_history(self.tracker.run_id, key)
            by_step = {m.step: m.value for m in sorted(hist, key=lambda m: (m.step, m.timestamp))}
            return [by_step[s] for s in sorted(by_step)]

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
            "mlflow_run_url": redact_text(self.tracker.run_url),  # the summary is logged to MLflow too
            "steps": self.state.step,
            "wall_seconds_this_session": round(seconds, 1),
            "eval_before": {k.split("/", 1)[1]: v for k, v in h.items() if k.startswith("eval_before/")},
            "eval_after": {k.split("/", 1)[1]: v for k, v in h.items() if k.startswith("eval/")},
            **self._run_averages(),
        }
        gain = f"eval/{self.primary}_gain"
        if gain in h:
            lo, hi = h[f"{gain}_lo"], h[f"{gain}_hi"]
            summary["eval_gain"] = {"metric": self.primary, "gain": h[gain], "ci95": [lo, hi],
                                    "significant": bool(lo > 0 or hi < 0)}
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


class Pipeline(Protocol):
    """When rollouts are launched, and with which weights (``ray.pipeline``). ``lag``: updates between the
    weights a batch was sampled with and the update it feeds."""

    lag: int

    def rollout_for(self, run: Run, step: int) -> RolloutJob:
        """The launched rollout of ``step`` (launching more ahead, if the mode does)."""
        ...


class Synchronous:
    """``sync`` / ``sequential``: step k's rollout is launched at step k with the latest weights (lag 0).
    The two differ only in when a Ray executor scores chunks (``scores_each_chunk``)."""

    lag = 0

    def __init__(self, scores_each_chunk: bool) -> None:
        self.scores_each_chunk = scores_each_chunk

    def rollout_for(self, run: Run, step: int) -> RolloutJob:
        return run.launch(step, run.state.policy_version)


class OneStepOff:
    """``one_step_off``: the rollout of step k+1 is launched during step k, with the weights of version k
    (before update k), so it overlaps step k's scoring and update (lag 1). The first step, or the first after
    a resume, samples with version ``v - 1`` when it is kept, as the uninterrupted run did."""

    scores_each_chunk = True
    lag = 1

    def __init__(self) -> None:
        self.inflight: dict[int, RolloutJob] = {}

    def rollout_for(self, run: Run, step: int) -> RolloutJob:
        job = self.inflight.pop(step, None)
        if job is None:
            previous = run.state.policy_version - 1
            job = run.launch(step, previous if previous >= 0 and run.executor.has_version(previous)
                             else run.state.policy_version)
        if step + 1 < run.cfg.train.steps:
            self.inflight[step + 1] = run.launch(step + 1, run.state.policy_version)
        return job


PIPELINES: dict[str, Callable[[], Synchronous | OneStepOff]] = {
    "sync": lambda: Synchronous(scores_each_chunk=True),
    "sequential": lambda: Synchronous(scores_each_chunk=False),
    "one_step_off": OneStepOff,
}


def build_pipeline(cfg: Config) -> Synchronous | OneStepOff:
    return PIPELINES[cfg.ray.pipeline]()


def keeps_previous(cfg: Config) -> bool:
    """Whether checkpoints keep the sampling weights of version ``v - 1`` (a lagging pipeline resumes with
    them)."""
    return build_pipeline(cfg).lag > 0


class Run:
    """One training run in ``run_dir`` over ``executor`` (which has loaded the model). Resumes from the run
    folder's last checkpoint when there is one."""

    def __init__(
        self, cfg: Config, executor: Executor, run_dir: Path, *, pipeline: Synchronous | OneStepOff | None = None,
        tags: dict[str, str] | None = None, run_id: str | None = None,
    ) -> None:
        self.cfg, self.executor = cfg, executor
        self.pipeline = pipeline or build_pipeline(cfg)
        try:
            self.task = builders.build_task(cfg.data)
            self.rec = RunRecorder(cfg, run_dir, tags=tags, run_id=run_id)  # only once the model has loaded
            self.rec.tracker.set_tags(executor.tags())
            if self.rec.resume is not None:
                executor.load_learner_state(self.rec.resume)
            executor.start(self.state.policy_version)
        except BaseException:
            executor.shutdown()
            raise

    @property
    def state(self) -> TrainState:
        return self.rec.state

    @property
    def tracker(self) -> Tracker:
        return self.rec.tracker

    @property
    def run_dir(self) -> Path:
        return self.rec.run_dir

    @property
    def resumed_from(self) -> Path | None:
        return self.rec.resumed_from

    # ---- stages ---------------------------------------------------------------------------------
    def stage_prompts(self, step: int) -> StepBatch:
        return step_batch(self.cfg, self.task, step)

    def launch(self, step: int, version: int) -> RolloutJob:
        """prompts + rollout: launch step ``step``'s rollout with the weights of ``version``."""
        return self.executor.launch(step, self.stage_prompts(step), step_seed(self.cfg.seed, step, 1), version)

    def stage_advantages(self, rewards: RewardOutput, group_ids: torch.Tensor) -> torch.Tensor:
        """Group-normalised advantages; a reward panel's fused at the reward or the advantage level
        (``reward.fusion``, :func:`rlflow.panel.panel_advantages`)."""
        return panel_advantages(self.cfg.reward, rewards, group_ids, global_std=self.cfg.algo.global_std)

    def stage_update(self, got: Collected, adv: torch.Tensor, step: int) -> dict[str, float]:
        """The learner's update; a NaN or inf loss or gradient stops the run here, before its optimizer step,
        so nothing non-finite is synced or checkpointed."""
        try:
            stats = self.executor.update(got, adv, step_seed(self.cfg.seed, step, 2), step)
        except NonFiniteError as err:
            raise NonFiniteError(f"step {step + 1}: {err}") from None
        self.state.policy_version += 1
        return stats

    def stage_sync(self) -> None:
        self.executor.sync(self.state.policy_version)

    def stage_checkpoint(self, metrics: dict[str, float] | None = None) -> Path:
        """The checkpoint of the step just taken, with its ``metrics`` so far (the report a resume finishes)."""
        return self.rec.checkpoint(self.executor.learner_state(), metrics or {})

    def evaluate(self) -> dict[str, float]:
        """The task's eval metrics, and the change of its primary metric since the base model's eval (the
        first one), pair by pair on the same conditions and seeds: ``<primary>_gain`` with its 95% paired
        bootstrap interval (``_gain_lo``, ``_gain_hi``)."""
        conditions, seeds = self.task.eval_set()
        report = self.task.eval_metrics(self.sample(conditions, seeds), conditions, self.executor.score)
        return {**report.metrics, **self.rec.compare_with_base(report)}

    def sample(self, conditions: Conditions, seeds: list[int]) -> Media:
        return self.executor.sample(conditions, seeds)

    # ---- the step -------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        step = self.state.step
        t0 = time.perf_counter()
        job = self.pipeline.rollout_for(self, step)
        got = self.executor.collect(job)
        t1 = time.perf_counter()
        adv = self.stage_advantages(got.rewards, job.batch.group_ids)
        stats = self.stage_update(got, adv, step)
        t2 = time.perf_counter()
        self.stage_sync()
        t3 = time.perf_counter()
        self.state.step = step + 1
        metrics = self.rec.step_metrics(got, stats, job.batch.num_samples, update=t2 - t1, sync=t3 - t2)
        metrics["time/wait_rollout"] = t1 - t0
        self.stage_after(metrics, t0)
        return metrics

    def stage_after(self, metrics: dict[str, float], t0: float) -> None:
        """checkpoint, then eval / log. The checkpoint comes first, so a failing eval or tracking store at this
        step still leaves it; it holds the step's metrics so far, and a resume finishes the report."""
        self.state.recent_rewards.append(metrics["reward/mean"])
        metrics["time/step"] = time.perf_counter() - t0  # the eval's time is added by the report
        cfg = self.cfg
        checkpointed = self.rec.due(cfg.train.checkpoint_every) or self.state.step == cfg.train.steps
        if checkpointed:
            tc = time.perf_counter()
            self.stage_checkpoint(metrics)
            metrics["time/checkpoint"] = time.perf_counter() - tc
        self.stage_report(metrics, checkpointed=checkpointed)

    def stage_report(self, metrics: dict[str, float], *, checkpointed: bool) -> None:
        """eval / log of the step just taken: the eval when due, the metrics row (unless the store has it),
        the sample grid when due, and the LoRA of the step's checkpoint, if it has one. Deterministic, so a
        resume can redo it."""
        cfg = self.cfg
        if self.rec.due(cfg.train.eval_every) or self.state.step == cfg.train.steps:
            te = time.perf_counter()
            report = self.evaluate()
            metrics.update({f"eval/{k}": v for k, v in report.items()})
            # the generalisation gap: training reward since the last eval against the held-out primary metric;
            # a gap that widens while the training reward rises is the first sign of reward hacking
            recent = float(np.mean(self.state.recent_rewards))
            metrics["eval/train_reward_recent"] = recent
            if self.rec.primary in report:
                metrics["eval/train_minus_heldout"] = recent - report[self.rec.primary]
            self.state.recent_rewards.clear()
            metrics["time/eval"] = time.perf_counter() - te
            metrics["time/step"] += metrics["time/eval"]
        self.rec.log_step(metrics)
        if self.rec.due(cfg.train.log_images_every):
            self.rec.log_samples(self.task, self.sample, self.state.step)
        if checkpointed:
            self.rec.upload_checkpoint(self.state.step)

    # ---- the loop -------------------------------------------------------------------------------
    def run(self, progress: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
        """Train until ``train.steps`` (first evaluating, on a fresh run); returns the summary (also written to
        ``summary.json``). The MLflow run is marked FAILED on an error and KILLED on Ctrl-C or SIGTERM; the
        last checkpoint stays resumable. The executor is shut down at the end."""
        rec, start = self.rec, time.time()
        try:
            if rec.state.step == 0:
                rec.log_start(self.evaluate())
                rec.log_samples(self.task, self.sample, 0)
            elif rec.state.report:  # the checkpoint was written before its step's eval and logging: finish them
                self.stage_report(dict(rec.state.report), checkpointed=True)
            while rec.state.step < self.cfg.train.steps:
                metrics = self.train_step()
                if progress:
                    progress(rec.state.step, metrics)
            return rec.finish(time.time() - start)
        except ResumableError as err:
            self._mark("FAILED")
            raise type(err)(f"{err}; {self._resume_hint()}") from None
        except Exception:
            self._mark("FAILED")
            raise
        except BaseException:
            self._mark("KILLED")
            raise
        finally:
            self.executor.shutdown()

    def _mark(self, status: str) -> None:
        """End the MLflow run with ``status``; a tracking store that is down (often why the run failed) gets a
        warning, so the error that stopped the run is the one raised."""
        try:
            self.rec.tracker.finish(status)
        except Exception as err:
            warnings.warn(f"could not mark MLflow run {self.rec.tracker.run_id} {status}: {err}", stacklevel=2)

    def _resume_hint(self) -> str:
        ckpt = latest_checkpoint(self.run_dir)
        where = f"the last checkpoint is {ckpt.name}" if ckpt else "no checkpoint was written yet"
        return f"{where}; continue with: rlflow train --resume {self.run_dir}"
