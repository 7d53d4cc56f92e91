"""The CUDA paths on a real GPU (marked ``gpu``: skipped where CUDA is missing, so never in CI). Run on a GPU
node with ``pytest -m gpu tests/test_gpu.py``. One GPU is enough: sampler and learner actors each take half.

On one GPU the NCCL paths that need two ranks on distinct GPUs (the weight broadcast to samplers, a 2-rank
NCCL learner group) cannot run; these tests check that such a layout is detected and handled (the object
store instead of NCCL, or a clear error) rather than failing inside NCCL."""

import os
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

from rewards import build_reward
from rlflow.algos.dppo import DPPO
from rlflow.builders import build_policy, learner_settings, sampler_settings, step_settings
from rlflow.config import ConfigError
from rlflow.learner import Learner
from rlflow.sampler import Sampler
from rlflow.trainer import Trainer
from rlflow.types import Conditions
from tests.helpers import metric_history, tiny_config, tiny_run
from workers.driver import RayTrainer
from workers.learner import LearnerGroup
from workers.messages import to_wire
from workers.placement import Placement

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]
HALF = {"num_cpus": 1, "num_gpus": 0.5}
TINY = tiny_run(name="tiny-gpu", model={"device": "cuda"}, train={"threads": 0}, ray={"sampler": HALF, "learner": HALF})


def _cfg(tmp_path, **sections):
    return tiny_config(TINY, tmp_path, **sections)


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local", num_cpus=8, num_gpus=1, include_dashboard=False, logging_level="WARNING",
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                                  "TOKENIZERS_PARALLELISM": "false"}},
    )
    yield
    ray.shutdown()



def test_cuda_actors_compute_the_in_process_cuda_run(tmp_path):
    """Sampler and learner actors sharing the GPU reproduce the in-process CUDA loop, and the samplers hold
    the learner's weights after each sync (published from CUDA tensors through the object store)."""
    cfg = _cfg(tmp_path)
    local = Trainer(cfg, build_reward(cfg.reward.name), tmp_path / "local")
    local.run()
    assert next(local.learner.policy.transformer.parameters()).is_cuda
    remote = RayTrainer(cfg, tmp_path / "ray")
    try:
        assert remote.executor.transport.name == "object_store"
        for _ in range(3):
            remote.train_step()
        (version, digest), = remote.executor.learners.digests()
        assert version == 3 and ray.get(remote.executor.samplers[0].digest.remote()) == (3, digest)
    finally:
        remote.executor.shutdown()
    np.testing.assert_allclose(metric_history(remote, "reward/mean"), metric_history(local, "reward/mean"), atol=1e-6)
    np.testing.assert_allclose(metric_history(remote, "train/kl_mean"), metric_history(local, "train/kl_mean"), rtol=1e-3)


def test_disaggregated_on_one_gpu_sends_weights_through_the_object_store(tmp_path):
    """Disaggregated actors with half a GPU each land on the one GPU: ``auto`` would pick an NCCL broadcast,
    which NCCL refuses there ("Duplicate GPU detected"); the driver sees the shared GPU and uses the object
    store. Asking for ``collective`` explicitly is a clear error naming the two actors."""
    quarter = {"num_cpus": 1, "num_gpus": 0.25}
    cfg = _cfg(tmp_path, ray={"placement": "disaggregated", "num_samplers": 2, "sampler": quarter})
    trainer = RayTrainer(cfg, tmp_path / "auto")
    try:
        assert trainer.executor.transport.name == "object_store"
        trainer.train_step()
        (version, digest), = trainer.executor.learners.digests()
        assert ray.get([s.digest.remote() for s in trainer.executor.samplers]) == [(1, digest), (1, digest)]
        tags = MlflowClient(tracking_uri=trainer.tracker.tracking_uri).get_run(trainer.tracker.run_id).data.tags
        assert tags["rlflow.weight_transport"] == "object_store"
    finally:
        trainer.executor.shutdown()
    explicit = _cfg(tmp_path, ray={"placement": "disaggregated", "weight_transport": "collective", "sampler": quarter})
    with pytest.raises(ConfigError, match=r"'collective': learner 0 and sampler 0 share GPU 0 of node .*NCCL refuses"):
        RayTrainer(explicit, tmp_path / "explicit")


def _batch(cfg):
    policy = build_policy(cfg.model, cfg.seed)
    sampler = Sampler(policy, sampler_settings(cfg.sampling))
    prompts = [p for p in ["a red circle", "two blue squares", "a green triangle"] for _ in range(4)]
    traj = sampler.rollout(Conditions.of(prompts), torch.arange(len(prompts)) // 4, seed=3)
    return policy, traj, torch.linspace(-1.5, 1.5, len(prompts))


def test_two_learners_on_one_gpu(tmp_path):
    """NCCL refuses two ranks on one GPU: a clear error before any NCCL call. With ``ray.backend: gloo``
    the two CUDA ranks run DDP and sum to the one-process gradient."""
    ray_cfg = {"num_learners": 2, "placement": "disaggregated", "sampler": {"num_cpus": 1, "num_gpus": 0}}
    cfg = _cfg(tmp_path, ray=ray_cfg, train={**TINY["train"], "minibatches": 1})
    placement = Placement(cfg.ray, name="gpu-nccl")
    try:
        with pytest.raises(ConfigError, match=r"learner 0 and learner 1 share GPU 0 .*ray.backend: gloo"):
            LearnerGroup(cfg, placement, name_prefix="gpu-nccl")
    finally:
        placement.remove()

    cfg = _cfg(tmp_path, ray={**ray_cfg, "backend": "gloo"}, train={**TINY["train"], "minibatches": 1})
    policy, traj, adv = _batch(cfg)
    single = Learner(policy, DPPO(kl_threshold=1e-4), learner_settings(cfg.train, cfg.sampling), step_settings(cfg.sampling))
    expected = single.gradient(traj, adv).cpu()
    placement = Placement(cfg.ray, name="gpu-gloo")
    group = LearnerGroup(cfg, placement, name_prefix="gpu-gloo")
    try:
        grads = group.gradient([ray.put(to_wire(traj))], adv.numpy())
        assert np.array_equal(grads[0], grads[1])
        torch.testing.assert_close(torch.from_numpy(grads[0].copy()), expected, rtol=1e-4, atol=1e-6)
    finally:
        group.shutdown()
        placement.remove()
