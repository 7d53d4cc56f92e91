"""Secrets never reach MLflow; a checkpoint folder is data, never code."""

import json
import os
import pickle

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from rewards import build_reward
from rlflow.checkpoint import load_checkpoint
from rlflow.redact import MASK, redact
from rlflow.trainer import Trainer
from tests.helpers import tiny_config

SECRETS = ["S3CRET-KWARG", "S3CRET-URI", "S3CRET-ENV"]


def test_redact_masks_secret_keys_uri_credentials_and_env_values():
    cfg = {
        "reward": {"name": "judge", "kwargs": {"api_key": "S3CRET-KWARG", "endpoint": "https://bob:S3CRET-URI@host/v1",
                                              "max_tokens": 256},
                   "runtime_env": {"env_vars": {"OPENAI_BASE": "S3CRET-ENV"}, "pip": ["x"]}},
        "tracking": {"tracking_uri": "http://u:S3CRET-URI@mlflow:5000"}, "seed": 3,
    }
    out = redact(cfg)
    assert not any(s in json.dumps(out) for s in SECRETS)
    assert out["reward"]["kwargs"] == {"api_key": MASK, "endpoint": f"https://{MASK}@host/v1", "max_tokens": 256}
    assert out["reward"]["runtime_env"] == {"env_vars": {"OPENAI_BASE": MASK}, "pip": ["x"]}
    assert out["tracking"]["tracking_uri"] == f"http://{MASK}@mlflow:5000" and out["seed"] == 3
    assert cfg["reward"]["kwargs"]["api_key"] == "S3CRET-KWARG"  # a copy: the config itself is unchanged


def test_a_run_logs_no_secret_to_mlflow_but_keeps_them_for_resume(tmp_path):
    base = {"name": "tiny", "sampling": {"prompts_per_step": 1, "group_size": 2, "chunk_size": 2, "num_steps": 4,
                                         "sde_range": [0, 3], "sde_steps": 1},
            "data": {"eval_per_kind": 1}, "train": {"steps": 1, "eval_every": 0, "eval_steps": 4,
                                                    "log_images_every": 0, "threads": 2}}
    reward = {"name": "tests.plugins.my_rewards:with_secrets",
              "kwargs": {"api_key": "S3CRET-KWARG", "endpoint": "https://bob:S3CRET-URI@judge/v1"},
              "runtime_env": {"env_vars": {"JUDGE_TOKEN": "S3CRET-ENV"}}}
    cfg = tiny_config(base, tmp_path, reward=reward)
    trainer = Trainer(cfg, build_reward(cfg.reward.name, cfg.reward.kwargs), tmp_path / "run")
    trainer.run()
    client = MlflowClient(tracking_uri=trainer.tracker.tracking_uri)
    run = client.get_run(trainer.tracker.run_id)
    logged = json.dumps({"params": run.data.params, "tags": run.data.tags})
    artifact = client.download_artifacts(trainer.tracker.run_id, "config.yaml", str(tmp_path / "dl"))
    logged += open(artifact).read()
    assert not any(s in logged for s in SECRETS)
    assert run.data.params["reward.kwargs.api_key"] == MASK
    kept = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert kept["reward"]["kwargs"]["api_key"] == "S3CRET-KWARG"  # the run folder's copy resumes the run


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['RLFLOW_TEST_MARKER']}",))


def test_a_checkpoint_with_a_code_payload_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("RLFLOW_TEST_MARKER", str(marker))
    ckpt = tmp_path / "step_000001"
    ckpt.mkdir()
    (ckpt / "state.json").write_text(json.dumps({"step": 1, "policy_version": 1}))
    torch.save({"optimizer": _Evil(), "torch_rng": torch.get_rng_state()}, ckpt / "trainer.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(ckpt)
    assert not marker.exists()
