"""The in-process loop on the shipped shapes base model: parity, resume, CLI and config errors."""

import dataclasses
import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from rewards import build_reward
from rlflow.algos.dppo import DPPO
from rlflow.algos.grpo import GRPO
from rlflow.builders import build_policy, sampler_settings
from rlflow.cli import main
from rlflow.config import ConfigError, load_config, validate
from rlflow.learner import Learner, LearnerSettings
from rlflow.sampler import Sampler, chunks
from rlflow.trainer import Trainer
from rlflow.types import Conditions, Rollout
from tests.helpers import blank_steps, replayed_anchors, tiny_config, tiny_run

TINY = tiny_run(train={"steps": 4, "eval_every": 2, "checkpoint_every": 2, "log_images_every": 2})


def _cfg(tmp_path, **over):
    return tiny_config(TINY, tmp_path, **over)


@pytest.mark.parametrize("algo", [GRPO(), DPPO()])
def test_first_update_sees_ratio_exactly_one(tmp_path, algo):
    cfg = _cfg(tmp_path)
    policy = build_policy(cfg.model, seed=0)
    sampler = Sampler(policy, sampler_settings(cfg.sampling))
    prompts = ["a red circle"] * 4 + ["two squares"] * 4
    traj = sampler.rollout(Conditions.of(prompts), torch.arange(8) // 4, seed=5)
    learner = Learner(policy, algo, LearnerSettings(minibatches=1, micro_batch=4), sampler.settings.step)
    if algo.policies.anchors:
        logp, mean = replayed_anchors(learner, blank_steps(traj), 4)  # replayed, not copied
        assert torch.equal(logp, traj.steps.log_prob) and torch.equal(mean, traj.steps.mean)
    stats = learner.update(traj, torch.linspace(-1, 1, 8), seed=0)  # one optimizer step after all replays
    assert stats["ratio_min"] == 1.0 and stats["ratio_max"] == 1.0


def test_stale_batch_anchors_replay_at_the_rollout_version(tmp_path):
    """One-step-off: a batch sampled at version 0 reaches a learner at version 1; its anchors must be the
    version-0 values (the LoRA snapshot), not the current weights' values."""
    cfg = _cfg(tmp_path)
    policy = build_policy(cfg.model, seed=0)
    sampler = Sampler(policy, sampler_settings(cfg.sampling))
    prompts = ["a red circle"] * 4 + ["two squares"] * 4
    traj = sampler.rollout(Conditions.of(prompts), torch.arange(8) // 4, seed=5, policy_version=0)
    learner = Learner(policy, DPPO(), LearnerSettings(lr=1e-2, minibatches=1, micro_batch=4), sampler.settings.step)
    learner.update(traj, torch.linspace(-1, 1, 8), seed=0)
    assert learner.version == 1
    logp_v0, _ = replayed_anchors(learner, traj, 4)
    assert torch.equal(logp_v0, traj.steps.log_prob)
    logp_v1, _ = replayed_anchors(learner, dataclasses.replace(traj, policy_version=1), 4)
    assert not torch.allclose(logp_v1, traj.steps.log_prob)  # the update moved the policy
    logp_again, _ = replayed_anchors(learner, traj, 4)
    assert torch.equal(logp_again, logp_v0)  # the current weights were restored after the snapshot replay


def test_chunked_rollout_equals_the_whole_batch(tmp_path):
    """Per-sample noise streams: a batch split at chunk boundaries (across sampler processes) is bit-identical
    to the whole batch. (Splits inside a chunk change the forward's batch shape, and CPU matmuls are not
    batch-invariant, so those agree only to float precision.)"""
    for shared in (False, True):
        cfg = _cfg(tmp_path, sampling={**TINY["sampling"], "shared_noise": shared})
        policy = build_policy(cfg.model, seed=0)
        sampler = Sampler(policy, sampler_settings(cfg.sampling))
        conds = Conditions.of(["a red circle"] * 4 + ["two squares"] * 4)
        groups = torch.arange(8) // 4 + 10
        whole = sampler.rollout(conds, groups, seed=5, trained=[1, 3])
        parts = [sampler.rollout(conds.index(sl), groups[sl], seed=5, trained=[1, 3], offset=sl.start)
                 for sl in chunks(8, 4)]
        joined = Rollout.cat(parts)
        for name in ("x", "x_next", "mean", "log_prob"):
            assert torch.equal(getattr(joined.steps, name), getattr(whole.steps, name)), name
        assert torch.equal(joined.final, whole.final) and torch.equal(joined.media.images, whole.media.images)
        assert torch.equal(whole.steps.step_index, torch.tensor([1, 3]))
        same_start = torch.equal(whole.steps.x[0, 0], whole.steps.x[1, 0])
        assert same_start == shared  # samples 0 and 1 share a group


def _history(run_id, tracking_uri, key):
    client = MlflowClient(tracking_uri=tracking_uri)
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_resume_repeats_the_uninterrupted_run(tmp_path):
    reward = build_reward("shapes_geneval")
    full = Trainer(_cfg(tmp_path / "a"), reward, tmp_path / "a" / "run")
    full_summary = full.run()
    short = Trainer(_cfg(tmp_path / "b", train={**TINY["train"], "steps": 2}), reward, tmp_path / "b" / "run")
    short.run()
    assert (tmp_path / "b" / "run" / "checkpoints" / "step_000002" / "lora.safetensors").is_file()
    resumed = Trainer(_cfg(tmp_path / "b"), reward, tmp_path / "b" / "run")
    assert resumed.state.step == 2 and resumed.tracker.run_id == short.tracker.run_id
    summary = resumed.run()
    assert summary["steps"] == 4
    uri_a, uri_b = full.tracker.tracking_uri, resumed.tracker.tracking_uri
    for key in ("reward/mean", "train/loss", "train/kl_mean", "eval/partial"):
        a, b = _history(full.tracker.run_id, uri_a, key), _history(resumed.tracker.run_id, uri_b, key)
        assert a == b and len(a) >= 2, key
    assert set(_history(resumed.tracker.run_id, uri_b, "reward/mean")) == {1, 2, 3, 4}
    artifacts = {a.path for a in resumed.tracker.client.list_artifacts(resumed.tracker.run_id, "checkpoints")}
    assert artifacts == {"checkpoints/step_000002", "checkpoints/step_000004"}
    logged = {a.path for a in resumed.tracker.client.list_artifacts(resumed.tracker.run_id)}
    assert {"config.yaml", "summary.json", "images", "checkpoints"} <= logged
    assert summary["eval_before"] == full_summary["eval_before"]
    assert summary["eval_after"] == full_summary["eval_after"]
    # the final eval is compared pair by pair with the base's (the first eval), kept in the run folder
    assert (tmp_path / "b" / "run" / "eval_base.npy").is_file()
    gain = full_summary["eval_gain"]
    assert gain == summary["eval_gain"] and gain["metric"] == "accuracy"
    before, after = full_summary["eval_before"], full_summary["eval_after"]
    assert gain["gain"] == pytest.approx(after["accuracy"] - before["accuracy"])
    assert gain["ci95"][0] <= gain["gain"] <= gain["ci95"][1]
    assert gain["significant"] == (gain["ci95"][0] > 0 or gain["ci95"][1] < 0)
    assert before["accuracy_lo"] <= before["accuracy"] <= before["accuracy_hi"]
    # drift sentinels against the base's (eval_base.json), and the train-vs-held-out gap of the last eval
    base_metrics = json.loads((tmp_path / "b" / "run" / "eval_base.json").read_text())
    assert base_metrics["accuracy"] == before["accuracy"]
    for key in ("drift_objects", "drift_object_area", "drift_saturation", "drift_stray_pixels", "drift_top_color_share"):
        assert after[f"{key}_vs_base"] == pytest.approx(after[key] - before[key]), key
    rewards = _history(full.tracker.run_id, uri_a, "reward/mean")
    assert after["train_reward_recent"] == pytest.approx((rewards[3] + rewards[4]) / 2)  # steps since the last eval
    assert after["train_minus_heldout"] == pytest.approx(after["train_reward_recent"] - after["accuracy"])


def test_cli_train_and_resume(tmp_path, capsys):
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(json.dumps({**TINY, "output_dir": str(tmp_path / "runs")}))
    assert main(["train", str(cfg_file), "--set", "train.steps=2"]) == 0
    out = capsys.readouterr().out
    assert "rlflow run summary" in out and "eval accuracy" in out
    (run_dir,) = (tmp_path / "runs").glob("tiny-*")
    assert main(["train", "--resume", str(run_dir), "--set", "train.steps=3"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3
    assert "resuming" in capsys.readouterr().out


def test_bad_config_fails_before_work_naming_the_key(tmp_path, capsys):
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text("sampling:\n  nosie_level: 0.7\n")
    assert main(["train", str(cfg_file)]) == 2
    err = capsys.readouterr().err
    assert "sampling.nosie_level: unknown key" in err and "noise_level" in err
    with pytest.raises(ConfigError, match="algo.kl_threshold: Input should be greater than 0"):
        load_config(_write(tmp_path, "algo: {name: dppo, kl_threshold: -1}"))
    with pytest.raises(ConfigError, match="chunk_size"):
        validate({"sampling": {"prompts_per_step": 3, "group_size": 3, "chunk_size": 4}})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    assert main(["train", str(_write(tmp_path, "reward: {name: nope}"))]) == 2
    assert "reward.name 'nope' is not registered" in capsys.readouterr().err
    bad_model = f"output_dir: {tmp_path}/out\nmodel: {{path: {tmp_path}/missing}}\n"
    assert main(["train", str(_write(tmp_path, bad_model))]) == 2
    assert "model.path" in capsys.readouterr().err and not (tmp_path / "out").exists()


def _write(tmp_path, text):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p
