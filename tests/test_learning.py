"""A short Flow-DPPO run, and a short DiffusionNFT run, on the shapes world must raise the mean training
reward well beyond its noise.

The reward is the world's dense colour-coverage reward (``shapes_color_coverage``) on its colour prompts:
it moves within a couple of dozen steps, so the test checks the whole loop (rollout, reward, advantages,
anchors, trust region, AdamW on the LoRA) in well under a minute. The sparse GenEval-style checker needs
far more samples than a CPU test can afford (see the README's toy-run figures).
"""

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from rewards import build_reward
from rlflow.config import load_config
from rlflow.trainer import Trainer

STEPS = 24
WINDOW = 6
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle", "a red square", "a blue triangle"]


@pytest.mark.parametrize("config", ["configs/toy_shapes_dppo.yaml", "configs/toy_shapes_nft.yaml"])
def test_short_run_raises_mean_training_reward(tmp_path, config):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")
    cfg = load_config(
        config,
        [
            f"output_dir={tmp_path}", f"train.steps={STEPS}", "train.eval_every=0", "train.log_images_every=0",
            "train.checkpoint_every=100", "train.eval_steps=10", "data.source=file", f"data.train_file={prompt_file}",
            "sampling.prompts_per_step=4", "reward.name=shapes_color_coverage", "train.lr=1e-3",
        ],
    )
    trainer = Trainer(cfg, build_reward(cfg.reward.name), tmp_path / "run")
    trainer.run()
    client = MlflowClient(tracking_uri=trainer.tracker.tracking_uri)
    hist = sorted((m.step, m.value) for m in client.get_metric_history(trainer.tracker.run_id, "reward/mean"))
    rewards = np.array([v for _, v in hist])
    assert len(rewards) == STEPS
    early, late = rewards[:WINDOW], rewards[-WINDOW:]
    # noise of a window mean: the spread of the per-step batch means over the first steps (where the policy
    # has barely moved) over sqrt(window); the gain must exceed it many times over
    noise = early.std(ddof=1) / np.sqrt(WINDOW)
    gain = late.mean() - early.mean()
    assert gain > 0.03 and gain > 4 * noise, (rewards.round(3).tolist(), gain, noise)
