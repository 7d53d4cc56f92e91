"""A short Flow-DPPO run on the shapes world must raise the training reward well beyond run-to-run noise."""

import numpy as np
from mlflow.tracking import MlflowClient

from rewards import build_reward
from rlflow.config import load_config
from rlflow.trainer import Trainer

STEPS = 24
WINDOW = 6


def test_short_dppo_run_raises_mean_training_reward(tmp_path):
    cfg = load_config(
        "configs/toy_shapes_dppo.yaml",
        [
            f"output_dir={tmp_path}", f"train.steps={STEPS}", "train.eval_every=0", "train.log_images_every=0",
            "train.checkpoint_every=100", "data.eval_per_kind=4", "train.eval_steps=10",
            "sampling.prompts_per_step=4", "sampling.group_size=8",
        ],
    )
    trainer = Trainer(cfg, build_reward("shapes_geneval"), tmp_path / "run")
    trainer.run()
    client = MlflowClient(tracking_uri=trainer.tracker.tracking_uri)
    hist = sorted((m.step, m.value) for m in client.get_metric_history(trainer.tracker.run_id, "reward/mean"))
    rewards = np.array([v for _, v in hist])
    assert len(rewards) == STEPS
    early, late = rewards[:WINDOW], rewards[-WINDOW:]
    # run-to-run noise of a window mean: the spread of per-step batch means over the first steps, where the
    # policy has barely moved, divided by sqrt(window); the gain must exceed it many times over.
    noise = early.std(ddof=1) / np.sqrt(WINDOW)
    gain = late.mean() - early.mean()
    assert gain > 0.05 and gain > 4 * noise, (rewards.round(3).tolist(), gain, noise)
