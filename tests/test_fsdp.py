"""FSDP2 on CPU (gloo, 2 processes) against one unsharded process, on the toy shapes policy.

Each rank backpropagates its half of a 4-sample batch as two micro-batches of one sample, each loss weighted
``n / count`` as the learner does; the summed (reduce-scattered) LoRA gradient must be the whole batch's
gradient of one process, and one clipped AdamW step must give the same LoRA.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from rlflow.builders import build_policy
from rlflow.config import load_config
from rlflow.fsdp import (
    block_modules,
    clip_grad_norm_,
    full_lora_state,
    full_optimizer_state,
    full_tensor,
    is_sharded,
    load_full_lora_state,
    load_full_optimizer_state,
    set_gradient_sync,
    shard_policy,
)
from rlflow.models.base import Conditioning, FlowPolicy

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
BATCH = 4
LR, WEIGHT_DECAY = 1e-2, 0.01
PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a square"]


def _policy() -> FlowPolicy:
    """The toy policy with a seeded non-zero LoRA (PEFT's ``lora_B`` starts at zero, which would leave the
    ``lora_A`` gradients zero)."""
    cfg = load_config(ROOT / "configs" / "toy_shapes_dppo.yaml")
    policy = build_policy(cfg.model, cfg.seed)
    gen = torch.Generator().manual_seed(1)
    policy.load_lora_state_dict(
        {k: 0.05 * torch.randn(v.shape, generator=gen) for k, v in policy.lora_state_dict().items()}
    )
    return policy


def _batch(policy: FlowPolicy) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(BATCH, *policy.latent_shape(32, 32), generator=gen)
    t = torch.tensor([0.9, 0.7, 0.5, 0.3])
    return x, t, policy.encode_prompts(PROMPTS)


def _loss(policy: FlowPolicy, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """Mean over the samples of a per-sample loss on the velocity (what the learner's losses reduce to)."""
    v = policy.velocity(x, t, cond)
    target = torch.linspace(-1.0, 1.0, v[0].numel()).view_as(v[0])
    return (v - target).pow(2).mean()


def _modified(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: 2 * v + 0.01 * i for i, (k, v) in enumerate(state.items())}


def _worker(rank: int, store: str, out: str) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group(  # a hung collective fails instead of waiting for the default 30 min
            "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120)
        )
        _rank_run(rank, Path(out))
    except BaseException:
        (Path(out) / f"error{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _rank_run(rank: int, out: Path) -> None:
    policy = _policy()
    shard_policy(policy)
    assert is_sharded(policy)
    params = policy.trainable_parameters()
    names = [n for n, p in policy.transformer.named_parameters() if p.requires_grad]
    initial = full_lora_state(policy)
    snapshot = policy.lora_state_dict()  # sharded (DTensor) clones: a learner's version snapshot
    res: dict[str, object] = {"initial": initial}
    x, t, cond = _batch(policy)
    with torch.no_grad(), policy.reference():  # the first forward runs with the LoRA disabled (frozen)
        res["reference_v"] = policy.velocity(x[:1], t[:1], cond.index(slice(0, 1)))

    mine = [2 * rank, 2 * rank + 1]  # this rank's half of the batch, one sample per micro-batch
    grads = {}
    for mode in ("sync_each", "no_sync"):
        for p in params:
            p.grad = None
        for pos, i in enumerate(mine):
            if mode == "no_sync":
                set_gradient_sync(policy, pos == len(mine) - 1)
            sl = slice(i, i + 1)
            (_loss(policy, x[sl], t[sl], cond.index(sl)) * (1 / BATCH)).backward()
        grads[mode] = {n: full_tensor(p.grad).clone() for n, p in zip(names, params, strict=True)}
    res["grads"], res["grads_no_sync"] = grads["sync_each"], grads["no_sync"]

    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    res["grad_norm"] = clip_grad_norm_(params, 0.5)
    optimizer.step()
    res["stepped"] = full_lora_state(policy)
    res["optim"] = opt_state = full_optimizer_state(optimizer)
    load_full_optimizer_state(optimizer, opt_state)
    res["optim_reloaded"] = full_optimizer_state(optimizer)

    load_full_lora_state(policy, snapshot)
    res["restored"] = full_lora_state(policy)
    load_full_lora_state(policy, _modified(initial))
    res["modified"] = full_lora_state(policy)
    with torch.no_grad():
        res["modified_v"] = policy.velocity(x[:1], t[:1], cond.index(slice(0, 1)))
    torch.save(res, out / f"rank{rank}.pt")
    dist.barrier()  # tear down together (a rank leaving while the other is mid-teardown can abort gloo)


def _start_ranks(tmp_path: Path) -> list:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, str(tmp_path / "store"), str(tmp_path))) for r in range(WORLD)]
    for p in procs:
        p.start()
    return procs


def test_fsdp_two_ranks_match_one_process(tmp_path):
    procs = _start_ranks(tmp_path)  # the ranks run while this process computes the reference
    try:
        policy = _policy()
        initial = policy.lora_state_dict()
        x, t, cond = _batch(policy)
        first = (x[:1], t[:1], cond.index(slice(0, 1)))
        with torch.no_grad():
            with policy.reference():
                reference_v = policy.velocity(*first)
            policy.load_lora_state_dict(_modified(initial))
            modified_v = policy.velocity(*first)
            policy.load_lora_state_dict(initial)
        params = policy.trainable_parameters()
        names = [n for n, p in policy.transformer.named_parameters() if p.requires_grad]
        _loss(policy, x, t, cond).backward()  # the whole batch as one micro-batch (weight n / count = 1)
        expected_grads = {n: p.grad.clone() for n, p in zip(names, params, strict=True)}
    finally:
        for p in procs:
            p.join(timeout=180)
            if p.is_alive():
                p.kill()
    errors = [(tmp_path / f"error{r}.txt").read_text() for r in range(WORLD) if (tmp_path / f"error{r}.txt").exists()]
    assert not errors, "\n".join(errors)
    assert [p.exitcode for p in procs] == [0] * WORLD
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    expected_norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in expected_grads.values()]))
    assert expected_norm > 0.5  # the clip below really scales the gradient
    assert any(g.abs().max() > 0 for k, g in expected_grads.items() if "lora_A" in k)  # lora_B is not zero
    for res in ranks:
        # (b) the gathered LoRA is the unsharded policy's, key for key and bit for bit
        assert list(res["initial"]) == list(initial)
        assert all(torch.equal(res["initial"][k], initial[k]) for k in initial)
        torch.testing.assert_close(res["reference_v"], reference_v, rtol=1e-5, atol=1e-6)
        # (a) the gradient summed over the ranks is the whole batch's gradient, with or without no-sync
        for key in ("grads", "grads_no_sync"):
            assert list(res[key]) == list(expected_grads)
            for n, g in expected_grads.items():
                torch.testing.assert_close(res[key][n], g, rtol=1e-5, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")
        torch.testing.assert_close(res["grad_norm"], expected_norm, rtol=1e-5, atol=0)
        # (b) loading whole tensors into the shards: gathered back exactly, and what the forward uses; a
        # sharded snapshot (DTensors) loads back too
        assert all(torch.equal(res["restored"][k], v) for k, v in initial.items())
        assert all(torch.equal(res["modified"][k], v) for k, v in _modified(initial).items())
        torch.testing.assert_close(res["modified_v"], modified_v, rtol=1e-5, atol=1e-5)

    # (c) the sharded clip + AdamW step is the single-process step on the same (summed) gradient. (From
    # the whole-batch gradient instead, Adam's first step, about lr * g / (|g| + eps), would amplify the
    # rounding of splitting the batch wherever |g| is tiny.)
    for n, p in zip(names, params, strict=True):
        p.grad = ranks[0]["grads_no_sync"][n].clone()  # the gradient the ranks stepped on
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    torch.testing.assert_close(torch.nn.utils.clip_grad_norm_(params, 0.5), ranks[0]["grad_norm"], rtol=1e-6, atol=0)
    optimizer.step()
    stepped, expected_optim = policy.lora_state_dict(), optimizer.state_dict()
    for res in ranks:
        assert list(res["stepped"]) == list(stepped)
        for k, v in stepped.items():
            assert not torch.equal(v, initial[k])
            torch.testing.assert_close(res["stepped"][k], v, rtol=1e-6, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")
        assert res["optim"]["param_groups"] == expected_optim["param_groups"]
        assert list(res["optim"]["state"]) == list(expected_optim["state"])
        for idx, entry in expected_optim["state"].items():
            assert list(res["optim"]["state"][idx]) == sorted(entry)
            for name, value in entry.items():
                torch.testing.assert_close(res["optim"]["state"][idx][name], value, rtol=1e-6, atol=1e-12)
                assert torch.equal(res["optim_reloaded"]["state"][idx][name], res["optim"]["state"][idx][name])
    assert all(torch.equal(ranks[0]["stepped"][k], ranks[1]["stepped"][k]) for k in stepped)


def test_block_modules_are_the_outermost_module_lists_children():
    """FLUX-like layout: two block lists; the ModuleList inside a block and parameter-free entries stay out."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.to_out = nn.ModuleList([nn.Linear(2, 2), nn.Dropout()])

    class Transformer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.x_embedder = nn.Linear(2, 2)
            self.transformer_blocks = nn.ModuleList([Block(), Block()])
            self.single_transformer_blocks = nn.ModuleList([Block(), nn.Identity()])

    tr = Transformer()
    assert block_modules(tr) == [*tr.transformer_blocks, tr.single_transformer_blocks[0]]
