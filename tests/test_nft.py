"""DiffusionNFT on the one loop: ODE rollouts of the old adapter, the forward-process loss through the
learner, the soft update of the old policy, checkpoints with both adapters, and exact resume.
(The loss's hand-computed values are in test_losses.py; Ray equals in-process is in test_workers.py.)"""

import pytest
import torch
from safetensors.torch import load_file

from rewards import build_reward
from rlflow.algos.nft import NFT
from rlflow.builders import build_policy, sampler_settings, step_settings
from rlflow.learner import Learner, LearnerSettings
from rlflow.sampler import Sampler, chunks
from rlflow.trainer import Trainer
from rlflow.types import Conditions, Rollout
from tests.helpers import metric_history, tiny_config, tiny_run

TINY = tiny_run(name="tiny-nft", algo={"name": "nft"}, train={"steps": 4, "eval_every": 2, "checkpoint_every": 2})
PROMPTS = ["a red circle"] * 4 + ["two blue squares"] * 4


def _cfg(tmp_path, **over):
    return tiny_config(TINY, tmp_path, **over)


def _setup(tmp_path, algo, lr=3e-4):
    cfg = _cfg(tmp_path)
    policy = build_policy(cfg.model, cfg.seed)
    learner = Learner(policy, algo, LearnerSettings(lr=lr, minibatches=2, micro_batch=4), step_settings(cfg.sampling))
    sampler = Sampler(policy, sampler_settings(cfg.sampling), algo.rollout, adapter=learner.sample_with)
    rollout = sampler.rollout(Conditions.of(PROMPTS), torch.arange(8) // 4, seed=3)
    return policy, learner, sampler, rollout


def test_nft_rollout_keeps_final_samples_of_the_old_adapter(tmp_path):
    policy, learner, sampler, rollout = _setup(tmp_path, NFT())
    assert rollout.steps is None  # an ODE rollout records no steps
    assert rollout.final.shape[0] == 8 and torch.isfinite(rollout.final).all()
    assert torch.equal(rollout.grid, sampler.grid)
    # chunks of a batch (any sampler, any order) join to the whole batch
    parts = [sampler.rollout(rollout.conditions.index(sl), rollout.group_ids[sl], seed=3, offset=sl.start)
             for sl in chunks(8, 4)]
    assert torch.equal(Rollout.cat(parts).final, rollout.final)
    # the old adapter starts as a frozen copy of the trained one; only the trained one is optimised
    assert learner.sample_with == "old"
    default, old = policy.lora_state_dict(), policy.lora_state_dict("old")
    assert default.keys() == old.keys() and all(torch.equal(default[k], old[k]) for k in default)
    trainable = {id(p) for p in learner.params}
    assert trainable == {id(p) for p in policy.adapter_parameters("default").values()}
    # the sampler really samples with the old adapter: change it and the rollout changes
    with torch.no_grad():
        for p in policy.adapter_parameters("old").values():
            p.add_(0.05)
    moved = sampler.rollout(Conditions.of(PROMPTS), torch.arange(8) // 4, seed=3)
    assert not torch.equal(moved.final, rollout.final)


def test_nft_gradient_at_the_old_policy_is_advantage_weighted_flow_matching(tmp_path):
    """At theta = theta_old the policy gradient is clip(A) times a flow-matching gradient (ALGORITHMS.md 4):
    zero for average samples, linear in A inside the clip, odd in A."""
    _, learner, _, rollout = _setup(tmp_path, NFT(kl_coef=0.0))
    adv = torch.tensor([1.5, -0.5, 0.25, -1.25, 2.0, -2.0, 0.75, -0.75])
    zero = learner.gradient(rollout, torch.zeros(8), seed=7)
    assert torch.count_nonzero(zero) == 0
    g1 = learner.gradient(rollout, adv, seed=7)
    assert g1.abs().max() > 0
    tol = {"rtol": 1e-4, "atol": 1e-5 * float(g1.abs().max())}  # float noise of the near-zero entries
    torch.testing.assert_close(learner.gradient(rollout, 2 * adv, seed=7), 2 * g1, **tol)
    torch.testing.assert_close(learner.gradient(rollout, -adv, seed=7), -g1, **tol)
    # the per-sample training times and noise come from the update's seed: another seed, another gradient
    assert not torch.allclose(learner.gradient(rollout, adv, seed=8), g1)


def test_nft_soft_update_of_the_old_adapter(tmp_path):
    """After an update of 2 optimizer steps, d = min(0.25 * 2, 0.4) = 0.4: old = 0.4 old + 0.6 theta."""
    policy, learner, _, rollout = _setup(tmp_path, NFT(decay_rate=0.25, decay_max=0.4), lr=1e-2)
    old_before = policy.lora_state_dict("old")
    stats = learner.update(rollout, torch.linspace(-1, 1, 8), seed=0)
    assert learner.optimizer_steps == 2 and stats["old_decay"] == pytest.approx(0.4)
    theta, old_after = policy.lora_state_dict(), policy.lora_state_dict("old")
    assert any(not torch.equal(theta[k], old_before[k]) for k in theta)  # the trained adapter moved
    for k in theta:
        torch.testing.assert_close(old_after[k], 0.4 * old_before[k] + 0.6 * theta[k])
    for name in ("loss", "policy_loss", "kl_ref", "pos_loss", "neg_loss", "r_mean", "grad_norm"):
        assert name in stats and torch.isfinite(torch.tensor(stats[name])), name
    assert NFT(decay_rate=0.01, decay_max=0.5, decay_start=10).decay(5) == 0.0
    assert NFT(decay_rate=0.01, decay_max=0.5, decay_start=10).decay(30) == pytest.approx(0.2)


def test_nft_resume_repeats_the_uninterrupted_run(tmp_path):
    reward = build_reward("shapes_geneval")
    full = Trainer(_cfg(tmp_path / "a"), reward, tmp_path / "a" / "run")
    full.run()
    short = Trainer(_cfg(tmp_path / "b", train={**TINY["train"], "steps": 2}), reward, tmp_path / "b" / "run")
    short.run()
    assert (tmp_path / "b" / "run" / "checkpoints" / "step_000002" / "lora_old.safetensors").is_file()
    resumed = Trainer(_cfg(tmp_path / "b"), reward, tmp_path / "b" / "run")
    assert resumed.state.step == 2 and resumed.learner.optimizer_steps == 4
    resumed.run()
    for key in ("reward/mean", "train/loss", "train/old_decay", "eval/partial"):
        assert metric_history(full, key) == metric_history(resumed, key), key
    for name in ("lora.safetensors", "lora_old.safetensors"):
        a, b = (load_file(str(d / "run" / "checkpoints" / "step_000004" / name)) for d in (tmp_path / "a", tmp_path / "b"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    logged = {a.path for a in resumed.tracker.client.list_artifacts(resumed.tracker.run_id, "checkpoints/step_000004")}
    assert logged == {"checkpoints/step_000004/lora.safetensors", "checkpoints/step_000004/lora_old.safetensors"}
    old = load_file(str(tmp_path / "a" / "run" / "checkpoints" / "step_000004" / "lora_old.safetensors"))
    new = load_file(str(tmp_path / "a" / "run" / "checkpoints" / "step_000004" / "lora.safetensors"))
    assert any(not torch.equal(old[k], new[k]) for k in old)  # the old policy lags the trained one
