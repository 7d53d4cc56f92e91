"""Secrets never reach MLflow, the Ray Jobs API or the uploaded working dir; a checkpoint folder is data,
never code."""

import json
import os
import pickle
import re
import stat
import urllib.request
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from rewards import build_reward
from rlflow import jobs
from rlflow.checkpoint import load_checkpoint
from rlflow.cli import main
from rlflow.redact import MASK, redact
from rlflow.trainer import Trainer
from rlflow.workdir import EXCLUDES
from tests import test_jobs
from tests.helpers import tiny_config

SECRETS = ["S3CRET-KWARG", "S3CRET-URI", "S3CRET-ENV"]
ray_head, mlflow_url = test_jobs.ray_head, test_jobs.mlflow_url  # a real Ray head and MLflow server (module scope)


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


DOTENV = [".env", ".env.local", "prod.env", "sub/.env", "sub/.env.test", "sub/db.env"]
KEPT = ["keep.py", "environment.yml", ".envrc.example", "sub/keep.txt", "sub/env.py"]


def _working_dir(root: Path) -> Path:
    for name in DOTENV:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("API_KEY=S3CRET-ENV\n")
    for name in KEPT:
        (root / name).write_text("kept\n")
    (root / ".rlflow-job").mkdir()
    (root / ".rlflow-job" / "config.yaml").write_text("name: planted\n")  # replaced by the job's config
    return root


def _ray_init_package(wd: Path, dest: Path) -> Path:
    """What ``rlflow train --working-dir`` uploads: Ray's own working-dir upload with the runtime_env that
    workers/runtime.py gives ray.init, stopped at the upload (the packer gets Ray's merged excludes)."""
    from ray._private.runtime_env.packaging import create_package
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    def pack(working_dir, excludes, is_file=False):
        create_package(working_dir, dest, include_gitignore=True, excludes=excludes)

    upload_working_dir_if_needed({"working_dir": str(wd), "excludes": list(EXCLUDES)}, True, upload_fn=pack)
    return dest


@pytest.mark.parametrize("upload", ["submit", "train --working-dir"])
def test_dotenv_files_are_never_uploaded(tmp_path, upload):
    wd = _working_dir(tmp_path / "wd")
    dest = tmp_path / "pkg.zip"
    if upload == "submit":
        jobs.package_working_dir(wd, "reward: {kwargs: {api_key: S3CRET-KWARG}}\n", dest)
    else:
        _ray_init_package(wd, dest)
    with zipfile.ZipFile(dest) as zf:
        names = sorted(zf.namelist())
        config = zf.read(jobs.JOB_CONFIG).decode() if upload == "submit" else None
        mode = stat.S_IMODE(zf.getinfo(jobs.JOB_CONFIG).external_attr >> 16) if upload == "submit" else None
        dotenv_text = [n for n in names if b"S3CRET-ENV" in zf.read(n)]
    expected = sorted(KEPT + ([jobs.JOB_CONFIG] if upload == "submit" else [".rlflow-job/config.yaml"]))
    assert names == expected and dotenv_text == []
    if upload == "submit":  # the job's config, and only it, carries the secrets; readable by its owner only
        assert config == "reward: {kwargs: {api_key: S3CRET-KWARG}}\n" and mode == 0o600


@pytest.mark.timeout(600)
def test_submit_shows_no_secret_through_the_jobs_api(ray_head, mlflow_url, tmp_path, capsys):
    """A submitted config with secrets in its reward kwargs, the reward's runtime_env and the tracking URI: none
    of them is in what the Jobs API returns (job list, job info with its runtime_env, metadata, logs), and the
    job still gets them all (its run folder keeps the complete config)."""
    host = mlflow_url.split("://", 1)[1]
    secret_uri = f"http://user:S3CRET-MLFLOW@{host}"
    reward = ("reward={name: 'tests.plugins.my_rewards:with_secrets', kwargs: {api_key: S3CRET-KWARG, "
              "endpoint: 'https://bob:S3CRET-URI@judge/v1'}, runtime_env: {env_vars: {JUDGE_TOKEN: S3CRET-ENV}}}")
    sets = [*test_jobs.TINY, "name=jobsec", reward, f"output_dir={tmp_path / 'runs'}",
            f"tracking.tracking_uri={secret_uri}"]
    capsys.readouterr()
    code = main(["submit", test_jobs.CONFIG, "--address", ray_head, "--working-dir", str(test_jobs.REPO),
                 *[a for s in sets for a in ("--set", s)]])
    out, err = capsys.readouterr()
    assert code == 0, err
    job = re.search(r"^job id: (\S+)$", out, re.M).group(1)
    final = jobs.wait(job, ray_head, timeout=300)
    logs = jobs.logs(job, ray_head)
    assert final.status == "SUCCEEDED", logs[-3000:]

    headers = {"Authorization": f"Bearer {os.environ['RAY_AUTH_TOKEN']}"}
    shown = logs + "".join(
        urllib.request.urlopen(urllib.request.Request(f"{ray_head}{path}", headers=headers), timeout=30).read().decode()
        for path in ("/api/jobs/", f"/api/jobs/{job}", f"/api/jobs/{job}/logs")
    )
    assert f'"submission_id": "{job}"' in shown and "runtime_env" in shown  # the job server's view of the job
    leaks = [shown[max(0, m.start() - 300) : m.end()] for m in re.finditer("S3CRET-[A-Z]+", shown)]
    assert leaks == []
    assert final.entrypoint == f"python -m rlflow train {jobs.JOB_CONFIG}"
    assert final.metadata["rlflow.tracking_uri"] == f"http://{MASK}@{host}"
    (run_dir,) = (tmp_path / "runs").glob("jobsec-*")
    kept = yaml.safe_load((run_dir / "config.yaml").read_text())  # what the job ran with
    assert kept["reward"]["kwargs"]["api_key"] == "S3CRET-KWARG"
    assert kept["reward"]["runtime_env"] == {"env_vars": {"JUDGE_TOKEN": "S3CRET-ENV"}}
    assert kept["tracking"]["tracking_uri"] == secret_uri
