"""Durable checkpoints and faults of the one loop: the checkpoint comes before eval and logging, is written
atomically, is checked on resume (falling back past a bad one), is pruned to ``train.keep_checkpoints``; a NaN
loss stops the run before anything non-finite is saved; a resumed run logs one row per step."""

import errno
import socket
from pathlib import Path

import pytest
import ray
import safetensors.torch
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

import rlflow.checkpoint as checkpoint
from rewards import build_reward
from rlflow.checkpoint import CheckpointWarning, check_checkpoint, load_checkpoint, prune_checkpoints
from rlflow.config import ConfigError
from rlflow.learner import NonFiniteError
from rlflow.tracking import start_server, stop_server, wait_for_server
from rlflow.trainer import Trainer
from tests.helpers import tiny_config, tiny_run

ROOT = Path(__file__).resolve().parents[1]
TINY = tiny_run(train={"threads": 1})
REWARD = build_reward("shapes_geneval")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One output folder (one sqlite MLflow store) for the module's runs: a new store costs seconds."""
    return tmp_path_factory.mktemp("store")


def _cfg(out, **train):
    return tiny_config(TINY, out, train={**TINY["train"], **train})


def _folders(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def _steps(trainer, key):
    """The steps of every row of ``key`` in the run's MLflow store (duplicates kept)."""
    client = MlflowClient(tracking_uri=trainer.tracker.tracking_uri)
    return sorted(m.step for m in client.get_metric_history(trainer.tracker.run_id, key))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_tracking_outage_at_a_checkpoint_step_leaves_its_checkpoint(tmp_path, monkeypatch):
    """A real outage: the MLflow server is stopped after step 2, so logging step 3 fails (connection refused).
    Step 3's checkpoint was written before it; with the server back, the resume finishes step 3's report
    (its row and its LoRA artifact) from the checkpoint and the run, one row per step."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    port, db, artifacts = _free_port(), tmp_path / "server" / "mlflow.db", tmp_path / "server" / "artifacts"
    db.parent.mkdir()
    uri = f"http://127.0.0.1:{port}"

    def serve():
        proc = start_server(f"sqlite:///{db}", artifacts, port, log_file=tmp_path / "server.log")
        wait_for_server(uri, timeout=90, proc=proc)
        return proc

    cfg = tiny_config(TINY, tmp_path / "out", train={**TINY["train"], "steps": 4, "checkpoint_every": 3},
                      tracking={"tracking_uri": uri})
    proc = serve()
    try:
        trainer = Trainer(cfg, REWARD, tmp_path / "run")

        def outage(step, metrics):
            if step == 2:
                stop_server(proc)

        with pytest.raises(Exception, match=r"127\.0\.0\.1.*log-batch"):  # logging step 3's metrics
            trainer.run(progress=outage)
        ckpt = tmp_path / "run" / "checkpoints" / "step_000003"
        assert check_checkpoint(ckpt) is None
        state, learner = load_checkpoint(ckpt)
        assert state.step == 3 and learner.version == 3 and state.report["reward/mean"] > 0

        proc = serve()
        resumed = Trainer(cfg, REWARD, tmp_path / "run")
        assert resumed.resumed_from == ckpt and resumed.tracker.run_id == trainer.tracker.run_id
        assert resumed.run()["steps"] == 4
        for key in ("reward/mean", "time/step", "train/loss"):
            assert _steps(resumed, key) == [1, 2, 3, 4], key
        client = MlflowClient(tracking_uri=uri)
        logged = {a.path for a in client.list_artifacts(resumed.tracker.run_id, "checkpoints/step_000003")}
        assert logged == {"checkpoints/step_000003/lora.safetensors"}
        assert client.get_run(resumed.tracker.run_id).info.status == "FINISHED"
    finally:
        stop_server(proc)


def test_a_full_disk_mid_checkpoint_leaves_no_step_folder(store, tmp_path, monkeypatch):
    """Writing step 2's ``trainer.pt`` fails half-way with the kernel's ENOSPC (the test sends the rest of that
    one file to /dev/full, which answers every write with it): no ``step_000002`` and no temporary folder
    are left, step 1 stays sound, and the resume continues from it. A temporary folder left by a killed process
    is not a checkpoint, and the next save removes it."""
    real = checkpoint._write

    def disk_fills_up(path, data):
        if path.name == "trainer.pt" and path.parent.name.startswith(".step_000002."):
            real(path, data[: len(data) // 2])
            return real(Path("/dev/full"), data)
        return real(path, data)

    monkeypatch.setattr(checkpoint, "_write", disk_fills_up)
    run_dir = tmp_path / "run"
    with pytest.raises(OSError) as full:
        Trainer(_cfg(store), REWARD, run_dir).run()
    assert full.value.errno == errno.ENOSPC
    assert _folders(run_dir) == ["step_000001"]
    assert check_checkpoint(run_dir / "checkpoints" / "step_000001") is None

    monkeypatch.setattr(checkpoint, "_write", real)
    for stale in (".step_000002.x1y2.tmp", "step_000002.tmp"):  # this version's and an older version's
        (run_dir / "checkpoints" / stale).mkdir()
        (run_dir / "checkpoints" / stale / "lora.safetensors").write_bytes(b"half")
    resumed = Trainer(_cfg(store), REWARD, run_dir)
    assert resumed.resumed_from.name == "step_000001"
    assert resumed.run()["steps"] == 3
    assert _folders(run_dir) == ["step_000001", "step_000002", "step_000003"]
    assert _steps(resumed, "reward/mean") == [1, 2, 3]


def test_resume_falls_back_past_a_truncated_lora_naming_the_file(store, tmp_path):
    """The newest checkpoint's LoRA is cut in half: resume warns naming that file, continues from the one
    before, and recomputes the lost step bit for bit (its LoRA equals the original)."""
    run_dir = tmp_path / "run"
    first = Trainer(_cfg(store, steps=2), REWARD, run_dir)
    first.run()
    lora = run_dir / "checkpoints" / "step_000002" / "lora.safetensors"
    original = lora.read_bytes()
    lora.write_bytes(original[: len(original) // 2])
    with pytest.warns(CheckpointWarning, match=r"step_000002 is not usable.*step_000002/lora\.safetensors: \d+ bytes"):
        resumed = Trainer(_cfg(store, steps=3), REWARD, run_dir)
    assert resumed.resumed_from.name == "step_000001" and resumed.state.step == 1
    assert resumed.tracker.run_id == first.tracker.run_id
    assert resumed.run()["steps"] == 3
    assert check_checkpoint(run_dir / "checkpoints" / "step_000002") is None
    redone, before = load_file(str(lora)), safetensors.torch.load(original)
    assert redone.keys() == before.keys() and all(torch.equal(redone[k], before[k]) for k in before)
    assert _steps(resumed, "reward/mean") == [1, 2, 3]


def test_keep_checkpoints_keeps_the_newest_sound_ones(store, tmp_path):
    run_dir = tmp_path / "run"
    Trainer(_cfg(store, steps=3, keep_checkpoints=2), REWARD, run_dir).run()
    assert _folders(run_dir) == ["step_000002", "step_000003"]
    # a bad checkpoint does not count as one of the kept: with step 3 truncated, step 2 is the only sound one
    opt = run_dir / "checkpoints" / "step_000003" / "trainer.pt"
    opt.write_bytes(opt.read_bytes()[:100])
    assert prune_checkpoints(run_dir, 1) == [] and _folders(run_dir) == ["step_000002", "step_000003"]
    with pytest.warns(CheckpointWarning, match=r"step_000003/trainer\.pt"):
        resumed = Trainer(_cfg(store, steps=4, keep_checkpoints=2), REWARD, run_dir)
    assert resumed.state.step == 2
    resumed.run()
    assert _folders(run_dir) == ["step_000003", "step_000004"]
    assert all(check_checkpoint(run_dir / "checkpoints" / n) is None for n in _folders(run_dir))
    with pytest.raises(ConfigError, match=r"train\.keep_checkpoints: Input should be greater than or equal to 0"):
        _cfg(store, keep_checkpoints=-1)


def _assert_nan_stopped_at_step_2(trainer, run_dir):
    # here the first non-finite value is a gradient (the loss of that micro-batch is still finite)
    with pytest.raises(NonFiniteError, match=r"^step 2: (the dppo loss is (nan|inf|-inf) \(term|the gradient of "
                                             r"transformer_blocks\.\S+ has \d+ non-finite).*; no optimizer step was taken$"):
        trainer.run()
    assert _folders(run_dir) == ["step_000001"]  # nothing of step 2 was saved
    weights = load_file(str(run_dir / "checkpoints" / "step_000001" / "lora.safetensors"))
    assert weights and all(torch.isfinite(v).all() for v in weights.values())
    assert _steps(trainer, "train/loss") == [1]
    client = MlflowClient(tracking_uri=trainer.tracker.tracking_uri)
    assert client.get_run(trainer.tracker.run_id).info.status == "FAILED"


def test_a_nan_loss_stops_the_run_naming_the_step(store, tmp_path):
    """Real divergence, nothing injected: at lr 10 step 1's update leaves finite but huge weights, and step 2's
    loss is NaN. The run stops before step 2's optimizer step: no step 2 checkpoint, and the weights the
    sampler holds are step 1's finite ones."""
    run_dir = tmp_path / "run"
    trainer = Trainer(_cfg(store, lr=10.0), REWARD, run_dir)
    _assert_nan_stopped_at_step_2(trainer, run_dir)
    live = trainer.policy.lora_state_dict()
    assert all(torch.isfinite(v).all() for v in live.values())


def test_a_nan_loss_names_its_term_and_leaves_the_weights_alone(store):
    """A NaN advantage (what a broken reward normalisation would hand the learner) makes the first micro-batch's
    loss NaN: the update stops naming the loss, its term, the samples and the non-finite stats, before any
    optimizer step."""
    from rlflow.algos.dppo import DPPO
    from rlflow.builders import build_policy, sampler_settings
    from rlflow.learner import Learner, LearnerSettings
    from rlflow.sampler import Sampler
    from rlflow.types import Conditions

    cfg = _cfg(store)
    policy = build_policy(cfg.model, seed=0)
    sampler = Sampler(policy, sampler_settings(cfg.sampling))
    traj = sampler.rollout(Conditions.of(["a red circle"] * 4 + ["two squares"] * 4), torch.arange(8) // 4, seed=5)
    learner = Learner(policy, DPPO(), LearnerSettings(minibatches=1, micro_batch=4), sampler.settings.step)
    before = {k: v.clone() for k, v in policy.lora_state_dict().items()}
    adv = torch.linspace(-1, 1, 8)
    adv[1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"^the dppo loss is nan \(term 0 of the micro-batch of samples 0\.\.3; "
                                             r"non-finite stats: .*loss.*\); no optimizer step was taken$"):
        learner.update(traj, adv, seed=0)
    assert learner.optimizer_steps == 0 and learner.version == 0
    assert all(torch.equal(v, before[k]) for k, v in policy.lora_state_dict().items())


def test_a_nan_loss_on_ray_stops_the_run_naming_the_step(store, tmp_path):
    """The same divergence on the learner actors: the NaN error reaches the driver as itself (not as a dead
    learner to resume), and no weights of step 2 are checkpointed."""
    from workers.driver import RayTrainer

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}})
    try:
        cfg = tiny_config(TINY, store, train={**TINY["train"], "lr": 10.0},
                          ray={"sampler": {"num_cpus": 0.5}, "learner": {"num_cpus": 0.5}})
        _assert_nan_stopped_at_step_2(RayTrainer(cfg, tmp_path / "run"), tmp_path / "run")
    finally:
        ray.shutdown()


def test_a_resumed_run_logs_one_row_per_step_and_the_uninterrupted_summary(store, tmp_path):
    """Checkpoints at steps 2 and 4; the driver fails right after step 3 was logged; the resume recomputes
    step 3 from step 2's checkpoint but does not log it again, and its summary is the uninterrupted run's."""
    cfg = _cfg(store, steps=4, checkpoint_every=2, eval_every=2)
    full = Trainer(cfg, REWARD, tmp_path / "full")
    expected = full.run()

    def driver_dies(step, metrics):
        if step == 3:
            raise RuntimeError("the driver died")

    stopped = Trainer(cfg, REWARD, tmp_path / "run")
    with pytest.raises(RuntimeError, match="the driver died"):
        stopped.run(progress=driver_dies)
    assert _steps(stopped, "reward/mean") == [1, 2, 3]
    resumed = Trainer(cfg, REWARD, tmp_path / "run")
    assert resumed.state.step == 2
    summary = resumed.run()
    for key in ("reward/mean", "train/loss", "train/policy_version", "time/step"):
        assert _steps(resumed, key) == [1, 2, 3, 4], key
    assert _steps(resumed, "eval/accuracy") == [0, 2, 4]
    client = MlflowClient(tracking_uri=full.tracker.tracking_uri)
    for key in ("reward/mean", "train/loss"):
        a, b = (sorted((m.step, m.value) for m in client.get_metric_history(t.tracker.run_id, key))
                for t in (full, resumed))
        assert a == b, key
    ignored = {"run_dir", "mlflow_run_id", "mlflow_run_url", "wall_seconds_this_session", "rollout_images_per_s",
               "mean_step_seconds", "total_step_seconds"}  # where and how fast, not what
    assert {k: v for k, v in summary.items() if k not in ignored} == {
        k: v for k, v in expected.items() if k not in ignored}
    assert summary["train_reward_first10"] == expected["train_reward_first10"]
