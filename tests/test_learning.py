"""Learning tests on the shapes world.

1. A short Flow-DPPO run, and a short DiffusionNFT run, must raise the mean training reward well beyond its
   noise. The reward is the world's dense colour-coverage reward (``shapes_color_coverage``) on its colour
   prompts: it moves within a couple of dozen steps, so the test checks the whole loop (rollout, reward,
   advantages, anchors, trust region, AdamW on the LoRA) in well under a minute.
2. A short DiffusionNFT run rewarded by the strict checker must raise strict accuracy on held-out prompts
   (the single-object prompts' held-out phrasings) by more than the 95% interval of the paired gain.
"""

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from rewards import build_reward
from rlflow.config import load_config
from rlflow.trainer import Trainer

STEPS = 24
HELD_OUT_STEPS = 30
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
            "sampling.prompts_per_step=4", "reward.name=shapes_color_coverage", "reward.kwargs={}", "train.lr=1e-3",
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


def test_short_nft_run_raises_held_out_strict_accuracy(tmp_path):
    """Held-out learning, not just a rising training reward: DiffusionNFT on the shapes world's single-object
    training prompts, rewarded by strict accuracy, must raise strict accuracy on the held-out phrasings (paired
    with the base on the same prompts and seeds) by more than the 95% bootstrap interval of the gain."""
    import json

    from rlflow.worlds.shapes import split

    train, held = split()
    (tmp_path / "train.txt").write_text("\n".join(s.prompt for s in train if s.kind == "single") + "\n")
    (tmp_path / "eval.txt").write_text("\n".join(s.prompt for s in held if s.kind == "single") + "\n")
    cfg = load_config(
        "configs/toy_shapes_nft.yaml",
        [
            f"output_dir={tmp_path}", f"train.steps={HELD_OUT_STEPS}", "train.eval_every=0", "train.log_images_every=0",
            "train.checkpoint_every=100", "train.eval_steps=20", "data.source=file",
            f"data.train_file={tmp_path / 'train.txt'}", f"data.eval_file={tmp_path / 'eval.txt'}", "data.eval_seeds=2",
            "sampling.prompts_per_step=4", "reward.kwargs={strict_weight: 1.0}", "train.lr=1e-3",
        ],
    )
    trainer = Trainer(cfg, build_reward(cfg.reward.name, cfg.reward.kwargs), tmp_path / "run")
    trainer.run()
    gain = json.loads((tmp_path / "run" / "summary.json").read_text())["eval_gain"]
    assert gain["metric"] == "reward" and gain["significant"] and gain["gain"] > 0.1, gain
