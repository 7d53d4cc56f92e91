"""The Ray runtime on a real embedded Ray cluster: parity with the in-process loop, the learner group,
weight sync, the one-step-off pipeline, placement, and faults (dead samplers, failing rewards, a dead learner)."""

import time

import numpy as np
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

from rewards import build_reward
from rlflow.builders import build_learner, build_policy, sampler_settings
from rlflow.config import ConfigError
from rlflow.sampler import Sampler
from rlflow.trainer import Trainer
from rlflow.types import Conditions
from tests.helpers import metric_history, tiny_config, tiny_run
from workers.driver import RayTrainer
from workers.learner import LearnerError, LearnerGroup
from workers.messages import to_wire
from workers.placement import Placement, plan
from workers.reward_server import RewardServerError

TINY = tiny_run(reward={"timeout_s": 120}, ray={"sampler": {"num_cpus": 0.5}, "learner": {"num_cpus": 0.5}})


def _cfg(tmp_path, **sections):
    return tiny_config(TINY, tmp_path, **sections)


pytestmark = pytest.mark.usefixtures("ray_cluster")  # tests/conftest.py: one local cluster for the module


def test_ray_pipeline_computes_the_in_process_run(tmp_path):
    """Same config, same seeds: the actors produce the in-process loop's rewards and weights, bit for bit,
    whether each chunk is scored while the next samples (sync) or after the whole rollout (sequential)."""
    from safetensors.torch import load_file

    cfg = _cfg(tmp_path)
    local = Trainer(cfg, build_reward(cfg.reward.name), tmp_path / "local")
    local.run()
    lora_local = local.learner.state().lora
    for pipeline in ("sync", "sequential"):
        remote = RayTrainer(_cfg(tmp_path, ray={**TINY["ray"], "pipeline": pipeline}), tmp_path / pipeline)
        summary = remote.run()
        assert summary["steps"] == 3
        assert metric_history(remote, "reward/mean") == metric_history(local, "reward/mean")
        assert metric_history(remote, "train/kl_mean") == metric_history(local, "train/kl_mean")
        assert metric_history(remote, "train/policy_lag") == [0.0, 0.0, 0.0]
        lora_ray = load_file(str(tmp_path / pipeline / "checkpoints" / "step_000003" / "lora.safetensors"))
        assert set(lora_ray) == set(lora_local)
        assert all(torch.equal(lora_ray[k], lora_local[k]) for k in lora_local)
        assert remote.executor.learners is None and remote.executor.samplers == []  # actors are shut down after the run


def test_nft_on_ray_computes_the_in_process_run(tmp_path):
    """DiffusionNFT with nothing special-cased: the samplers are sent the old adapter's weights (the learner
    keeps both adapters), and the actors reproduce the in-process run bit for bit, both adapters included."""
    from safetensors.torch import load_file

    nft = {**TINY, "algo": {"name": "nft"}}
    local = Trainer(tiny_config(nft, tmp_path), build_reward("shapes_geneval"), tmp_path / "local")
    local.run()
    remote = RayTrainer(tiny_config(nft, tmp_path), tmp_path / "ray")
    for _ in range(3):
        remote.train_step()
    try:
        (version, digest), = remote.executor.learners.digests()
        assert version == 3 and ray.get(remote.executor.samplers[0].digest.remote()) == (3, digest)
        remote.stage_checkpoint()
    finally:
        remote.executor.shutdown()
    for key in ("reward/mean", "train/loss", "train/old_decay"):
        assert metric_history(remote, key) == metric_history(local, key), key
    for name in ("lora.safetensors", "lora_old.safetensors"):
        a, b = (load_file(str(tmp_path / d / "checkpoints" / "step_000003" / name)) for d in ("local", "ray"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def _batch(cfg, seed=3, kinds=4):
    policy = build_policy(cfg.model, cfg.seed)
    sampler = Sampler(policy, sampler_settings(cfg.sampling))
    prompts = [p for p in ["a red circle", "two blue squares", "a green triangle", "a square"][:kinds] for _ in range(4)]
    traj = sampler.rollout(Conditions.of(prompts), torch.arange(len(prompts)) // 4, seed=seed)
    adv = torch.linspace(-1.5, 1.5, len(prompts))
    return policy, traj, adv


@pytest.mark.parametrize(("algo", "strategy"), [("dppo", "ddp"), ("dppo", "fsdp2"), ("nft", "fsdp2")])
def test_two_rank_gloo_group_matches_one_process(tmp_path, algo, strategy):
    """Both strategies sum the ranks' gradients to the one-process gradient. 3 chunks over 2 ranks: one rank
    owns fewer (under FSDP2 it runs a zero-weighted chunk to keep the collectives in step). NFT's old adapter
    is sharded with the trained one, soft-updated shard by shard, and saved whole."""
    ray_cfg = {**TINY["ray"], "num_learners": 2, "placement": "disaggregated", "strategy": strategy}
    base = {**TINY, "algo": {"name": "nft"}} if algo == "nft" else TINY
    cfg = tiny_config(base, tmp_path, ray=ray_cfg, train={**TINY["train"], "minibatches": 1})
    policy, traj, adv = _batch(cfg, kinds=3)
    single = build_learner(policy, cfg)
    expected = single.gradient(traj, adv, seed=0)
    assert expected.abs().sum() > 0
    chunk_refs = [ray.put(to_wire(traj))]
    placement = Placement(cfg.ray, name="grad-test")
    group = LearnerGroup(cfg, placement, name_prefix="grad-test")
    try:
        info = ray.get([a.describe.remote() for a in group.actors])
        total = info[0]["total"]
        if strategy == "fsdp2":  # each rank holds its shard of the LoRA, not a replica
            assert all(i["sharded"] and i["local"] < total for i in info) and sum(i["local"] for i in info) == total
        else:
            assert all(not i["sharded"] and i["local"] == total for i in info)
        grads = group.gradient(chunk_refs, adv.numpy(), seed=0)
        assert np.array_equal(grads[0], grads[1])  # both ranks hold the summed gradient
        torch.testing.assert_close(torch.from_numpy(grads[0].copy()), expected, rtol=1e-5, atol=1e-8)
        refs = group.update(chunk_refs, adv.numpy(), seed=0)
        stats = group.finish_update(refs, step=0)
        if algo == "dppo":
            assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-3)
        else:
            assert stats["old_decay"] == pytest.approx(0.001)  # one optimizer step taken
        (v0, d0), (v1, d1) = group.digests()
        assert v0 == v1 == 1 and d0 == d1  # identical optimizer steps (or one sharded model) on both ranks
        saved = group.state()  # whole tensors, in a one-process learner's layout
        ref = build_learner(build_policy(cfg.model, cfg.seed), cfg)
        ref.load_state(saved)
        assert ref.policy.lora_state_dict().keys() == saved.lora.keys()
        assert len(saved.optimizer["state"]) == len(ref.params)
        assert all(v.shape == p.shape for v, p in zip(saved.lora.values(), ref.policy.lora_state_dict().values(), strict=True))
        if algo == "nft":
            old = saved.adapters["old"]
            assert old.keys() == saved.lora.keys() and any(not torch.equal(old[k], saved.lora[k]) for k in old)
            single.update(traj, adv, seed=0)  # the same update in one process: the same old adapter
            mine = single.policy.lora_state_dict("old")
            assert all(torch.allclose(mine[k], old[k], rtol=1e-5, atol=1e-7) for k in old)
    finally:
        group.shutdown()
        placement.remove()


@pytest.mark.parametrize(("transport", "kind"), [("object_store", "lora"), ("collective", "lora"), ("collective", "full")])
def test_weight_sync_reaches_every_sampler(tmp_path, transport, kind):
    """Through the object store, or broadcast in a gloo group of learner rank 0 and the samplers."""
    ray_cfg = {**TINY["ray"], "num_samplers": 2, "weight_transport": transport, "weight_sync": kind}
    cfg = _cfg(tmp_path, ray=ray_cfg, train={**TINY["train"], "steps": 2})
    trainer = RayTrainer(cfg, tmp_path / "run")
    assert trainer.executor.transport.name == transport
    try:
        initial = ray.get([s.digest.remote() for s in trainer.executor.samplers])
        assert initial[0] == initial[1] and initial[0][0] == 0
        for _ in range(2):
            trainer.train_step()
        version, digest = trainer.executor.learners.digests()[0]
        assert version == 2
        synced = ray.get([s.digest.remote() for s in trainer.executor.samplers])
        assert synced == [(2, digest), (2, digest)]
        assert synced[0][1] != initial[0][1]  # the weights really changed
    finally:
        trainer.executor.shutdown()


def test_sharded_learners_with_collective_sync_and_one_step_off(tmp_path):
    """FSDP2 over 2 learner ranks, weights broadcast to 2 samplers, one-step-off: the run completes, the
    samplers hold the weights the sharded ranks gather, and the checkpoint has the one-process layout."""
    from safetensors.torch import load_file

    ray_cfg = {**TINY["ray"], "num_samplers": 2, "num_learners": 2, "strategy": "fsdp2",
               "weight_transport": "collective", "pipeline": "one_step_off"}
    cfg = _cfg(tmp_path, ray=ray_cfg)
    trainer = RayTrainer(cfg, tmp_path / "run")
    try:
        for _ in range(3):
            trainer.train_step()
        (v0, d0), (v1, d1) = trainer.executor.learners.digests()
        assert v0 == v1 == 3 and d0 == d1
        assert ray.get([s.digest.remote() for s in trainer.executor.samplers]) == [(3, d0), (3, d0)]
    finally:
        trainer.executor.shutdown()
    assert metric_history(trainer, "train/policy_lag") == [0.0, 1.0, 1.0]
    lora = load_file(str(tmp_path / "run" / "checkpoints" / "step_000003" / "lora.safetensors"))
    assert lora.keys() == build_policy(cfg.model, cfg.seed).lora_state_dict().keys()
    assert (tmp_path / "run" / "checkpoints" / "step_000003" / "lora_previous.safetensors").is_file()


def test_one_step_off_pipeline_logs_lag_and_resumes_exactly(tmp_path):
    """Lag 1 from the second step on; a run stopped after 2 steps (rollout of step 3 in flight) and resumed
    repeats the uninterrupted run bit for bit: the checkpoint keeps the previous policy version, which the
    first resumed rollout samples with and the DPPO anchors replay at."""
    from safetensors.torch import load_file

    cfg = _cfg(tmp_path, ray={**TINY["ray"], "pipeline": "one_step_off"}, train={**TINY["train"], "steps": 4})
    trainer = RayTrainer(cfg, tmp_path / "run")
    summary = trainer.run()
    assert summary["steps"] == 4
    assert metric_history(trainer, "train/policy_lag") == [0.0, 1.0, 1.0, 1.0]
    kl = metric_history(trainer, "train/kl_mean")
    local = Trainer(cfg, build_reward(cfg.reward.name), tmp_path / "local")  # the same loop, in-process
    local.run()
    for key in ("train/policy_lag", "reward/mean", "train/kl_mean"):
        assert metric_history(local, key) == metric_history(trainer, key), key
    assert all(np.isfinite(kl)) and kl[0] >= 0
    ckpt = tmp_path / "run" / "checkpoints"
    assert (ckpt / "step_000002" / "lora_previous.safetensors").is_file()

    stopped = RayTrainer(cfg, tmp_path / "run2")
    stopped.train_step()
    stopped.train_step()
    assert 2 in stopped.pipeline.inflight  # the next rollout was in flight when the run stopped
    stopped.executor.shutdown()
    resumed = RayTrainer(cfg, tmp_path / "run2")
    assert resumed.state.step == 2 and resumed.run()["steps"] == 4
    assert metric_history(resumed, "train/policy_lag") == [0.0, 1.0, 1.0, 1.0]
    assert metric_history(resumed, "reward/mean") == metric_history(trainer, "reward/mean")
    assert metric_history(resumed, "train/kl_mean") == kl
    final = [load_file(str(d / "checkpoints" / "step_000004" / "lora.safetensors")) for d in (tmp_path / "run", tmp_path / "run2")]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


@pytest.mark.parametrize("transport", ["object_store", "collective"])
def test_killed_sampler_is_restarted_and_its_chunk_redone(tmp_path, transport):
    """Sampler 0 is killed mid-rollout by the reward; the run finishes with the same numbers as an
    uninterrupted one (nothing lost, nothing counted twice). With the collective transport the dead member
    breaks the broadcast group, which every member then forms anew."""
    reward = {"name": "tests.plugins.faults:kill_sampler_once", "kwargs": {"marker": str(tmp_path / "kill")}}
    plain = RayTrainer(_cfg(tmp_path / "a", reward={"name": "shapes_geneval"}), tmp_path / "a" / "run")
    plain.run()
    ray_cfg = {**TINY["ray"], "weight_transport": transport}
    faulty = RayTrainer(_cfg(tmp_path / "b", reward=reward, ray=ray_cfg), tmp_path / "b" / "run")
    summary = faulty.run()
    assert (tmp_path / "kill").exists()
    assert summary["steps"] == 3
    redone = metric_history(faulty, "faults/chunks_redone")
    assert sum(redone) >= 1 and len(redone) == 3
    assert metric_history(faulty, "reward/mean") == metric_history(plain, "reward/mean")
    assert metric_history(faulty, "train/policy_version") == [1.0, 2.0, 3.0]
    assert faulty.executor.transport.regroups == (1 if transport == "collective" else 0)


def test_dead_reward_server_is_restarted_and_the_batch_rescored(tmp_path):
    reward = {"name": "tests.plugins.faults:exits_once", "kwargs": {"marker": str(tmp_path / "exit")}}
    trainer = RayTrainer(_cfg(tmp_path, reward=reward, train={**TINY["train"], "steps": 2}), tmp_path / "run")
    summary = trainer.run()
    assert (tmp_path / "exit").exists() and summary["steps"] == 2
    assert len(metric_history(trainer, "reward/mean")) == 2


@pytest.mark.parametrize(
    ("reward", "message"),
    [
        ({"name": "tests.plugins.faults:raises"}, "reward server 'tests.plugins.faults:raises'.*the judge exploded"),
        ({"name": "tests.plugins.faults:nan"}, "reward server 'tests.plugins.faults:nan'.*non-finite"),
        (
            {"name": "tests.plugins.faults:hangs", "timeout_s": 2, "retries": 1},
            r"reward server 'tests.plugins.faults:hangs'.*timed out after 2s on 2 tries",
        ),
    ],
)
def test_failing_reward_fails_the_step_naming_the_reward(tmp_path, reward, message):
    trainer = RayTrainer(_cfg(tmp_path, reward=reward), tmp_path / "run")
    with pytest.raises(RewardServerError, match=message):
        trainer.run()
    client = MlflowClient(tracking_uri=trainer.tracker.tracking_uri)
    assert client.get_run(trainer.tracker.run_id).info.status == "FAILED"


def test_reward_runs_in_its_own_runtime_env(tmp_path):
    cfg = _cfg(tmp_path, reward={
        "name": "tests.plugins.faults:env_value", "runtime_env": {"env_vars": {"RLFLOW_TEST_VALUE": "0.25"}},
    })
    trainer = RayTrainer(cfg, tmp_path / "run")
    try:
        metrics = trainer.train_step()
        assert metrics["reward/mean"] == pytest.approx(0.25)
    finally:
        trainer.executor.shutdown()


def test_dead_learner_leaves_a_checkpoint_that_resume_continues(tmp_path):
    reward = {"name": "tests.plugins.faults:kill_learner_once",
              "kwargs": {"marker": str(tmp_path / "kill"), "calls_before": 4}}  # 2 chunks/step: dies in step 3
    cfg = _cfg(tmp_path, reward=reward, train={**TINY["train"], "steps": 4})
    trainer = RayTrainer(cfg, tmp_path / "run")
    with pytest.raises(LearnerError, match=r"step_000002.*rlflow train --resume"):
        trainer.run()
    resumed = RayTrainer(cfg, tmp_path / "run")
    assert resumed.state.step == 2
    summary = resumed.run()
    assert summary["steps"] == 4
    assert metric_history(resumed, "train/policy_version") == [1.0, 2.0, 3.0, 4.0]


def test_config_error_in_an_actor_constructor_reaches_the_driver_as_one(tmp_path):
    """An image size the model cannot embed fails in the sampler and learner constructors; the driver raises it
    as the ConfigError it is (the CLI prints it as one line), and leaves no actor behind."""
    cfg = _cfg(tmp_path, sampling={"height": 64, "width": 64})
    before = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    with pytest.raises(ConfigError, match=r"^image size 64x64 \(sampling.height x sampling.width\).*at most 32 pixels"):
        RayTrainer(cfg, tmp_path / "run")
    deadline = time.monotonic() + 30
    while (left := {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)} - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left


def test_placement_plans_and_infeasible_resources(tmp_path):
    cfg = _cfg(tmp_path, ray={"num_samplers": 2, "num_learners": 1, "sampler": {"num_cpus": 1, "num_gpus": 0.5},
                              "learner": {"num_cpus": 1, "num_gpus": 0.5}})
    co = plan(cfg.ray)
    assert co.bundles == [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 0.5}]
    assert co.sampler == [0, 1] and co.learner == [0]
    dis = plan(cfg.ray.model_copy(update={"placement": "disaggregated"}))
    assert dis.bundles == [{"CPU": 1.0, "GPU": 0.5}] * 3 and dis.learner == [2]
    with pytest.raises(ConfigError, match="GPU: needs 1.5, cluster has 0"):
        Placement(cfg.ray, name="too-big")


def test_weight_transport_resolution_and_the_colocated_nccl_error(tmp_path):
    from workers.driver import weight_transport

    gpus = {"sampler": {"num_cpus": 1, "num_gpus": 0.5}, "learner": {"num_cpus": 1, "num_gpus": 0.5}}
    assert weight_transport(_cfg(tmp_path)) == "object_store"  # CPU actors
    assert weight_transport(_cfg(tmp_path, ray=gpus)) == "object_store"  # colocated: one GPU for both
    assert weight_transport(_cfg(tmp_path, ray={**gpus, "placement": "disaggregated"})) == "collective"
    assert weight_transport(_cfg(tmp_path, ray={"weight_transport": "collective"})) == "collective"  # gloo
    with pytest.raises(ConfigError, match="ray.weight_transport 'collective' with ray.placement 'colocated'"):
        _cfg(tmp_path, ray={**gpus, "weight_transport": "collective"})


def test_actors_given_one_gpu_never_form_an_nccl_group(tmp_path):
    """Fractional GPUs can put two members of an NCCL group on one GPU, which NCCL refuses ("Duplicate GPU
    detected", seen on an H100 node): ``auto`` then uses the object store, an explicit ``collective`` is a clear
    error, and gloo (which does not care) is left alone. The GPU run of this is in tests/test_gpu.py."""
    from workers.driver import weight_transport
    from workers.placement import shared_gpus

    slots = {"learner 0": ("nodeA1234567", ("0",)), "sampler 0": ("nodeA1234567", ("0",)),
             "sampler 1": ("nodeA1234567", ("1",)), "sampler 2": ("nodeB7654321", ("0",))}
    assert shared_gpus(slots) == ["learner 0 and sampler 0 share GPU 0 of node nodeA123"]
    assert shared_gpus({k: v for k, v in slots.items() if k != "sampler 0"}) == []
    assert shared_gpus({"learner 0": ("n", ()), "sampler 0": ("n", ())}) == []  # CPU actors
    shared = shared_gpus(slots)
    gpus = {"sampler": {"num_cpus": 1, "num_gpus": 0.5}, "learner": {"num_cpus": 1, "num_gpus": 0.5},
            "placement": "disaggregated"}
    assert weight_transport(_cfg(tmp_path, ray=gpus), shared) == "object_store"
    assert weight_transport(_cfg(tmp_path, ray=gpus), []) == "collective"
    with pytest.raises(ConfigError, match=r"'collective': learner 0 and sampler 0 share GPU 0 of node nodeA123, "
                                          r"and NCCL refuses"):
        weight_transport(_cfg(tmp_path, ray={**gpus, "weight_transport": "collective"}), shared)
    gloo = _cfg(tmp_path, ray={**gpus, "weight_transport": "collective", "backend": "gloo"})
    assert weight_transport(gloo, shared) == "collective"
