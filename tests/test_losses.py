import math

import pytest
import torch

from rlflow.algos import dppo_loss, group_advantages, grpo_loss
from rlflow.algos.losses import nft_loss


def test_group_advantages_hand_values():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0])
    gid = torch.tensor([7, 7, 3, 3])
    std = math.sqrt(1.25)
    expected = torch.tensor([-0.5, 0.5, -0.5, 0.5]) / (std + 1e-4)
    torch.testing.assert_close(group_advantages(r, gid), expected)
    torch.testing.assert_close(group_advantages(r, gid, global_std=False), torch.tensor([-0.5, 0.5, -0.5, 0.5]) / 0.5001)
    equal = group_advantages(torch.tensor([2.0, 2.0, 1.0, 3.0]), gid)
    assert equal[0] == 0 and equal[1] == 0


def test_grpo_hand_values():
    logp = torch.log(torch.tensor([1.0, 1.5, 0.5]))
    loss, stats = grpo_loss(logp, torch.zeros(3), torch.tensor([1.0, 1.0, -2.0]), clip_range=0.2)
    # item 0: -1; item 1: max(-1.5, -1.2) = -1.2; item 2: max(2 * 0.5, 2 * 0.8) = 1.6
    assert loss.item() == pytest.approx((-1 - 1.2 + 1.6) / 3, abs=1e-6)
    assert stats["clip_frac"].item() == pytest.approx(2 / 3)
    loss_kl, stats_kl = grpo_loss(
        logp, torch.zeros(3), torch.tensor([1.0, 1.0, -2.0]), clip_range=0.2, kl=torch.tensor([0.1, 0.2, 0.3]), beta=0.5
    )
    assert loss_kl.item() == pytest.approx(-0.2 + 0.1, abs=1e-6)
    assert stats_kl["kl_ref"].item() == pytest.approx(0.2)


def test_grpo_clips_advantage():
    loss, _ = grpo_loss(torch.zeros(1), torch.zeros(1), torch.tensor([10.0]), clip_range=1e-4, adv_clip=5.0)
    assert loss.item() == pytest.approx(-5.0)
    with pytest.raises(ValueError, match="kl"):
        grpo_loss(torch.zeros(1), torch.zeros(1), torch.ones(1), clip_range=0.1, beta=0.1)


def _dppo_case():
    # columns: (log-ratio, advantage, mean shift d); std 1 and D = 1 give kl = d^2 / 2; tau = 0.5
    cases = [
        (math.log(2.0), 1.0, 2.0),  # high kl, rho > 1, A > 0: dropped
        (math.log(0.5), 1.0, 2.0),  # high kl, corrective: kept, -1 * 0.5
        (math.log(0.5), -1.0, 2.0),  # high kl, rho < 1, A < 0: dropped
        (math.log(2.0), -1.0, 2.0),  # high kl, corrective: kept, +1 * 2
        (math.log(2.0), 1.0, 0.0),  # inside the trust region: kept, -2
        (0.0, 1.0, 2.0),  # rho == 1 is never dropped: -1
    ]
    lr = torch.tensor([c[0] for c in cases], requires_grad=True)
    adv = torch.tensor([c[1] for c in cases])
    mean_old = torch.zeros(6, 1)
    mean = torch.tensor([[c[2]] for c in cases])
    return lr, adv, mean, mean_old


def test_dppo_mask_cases_hand_values():
    lr, adv, mean, mean_old = _dppo_case()
    loss, stats = dppo_loss(lr, torch.zeros(6), mean, mean_old, torch.ones(1, 1), adv, kl_threshold=0.5)
    assert loss.item() == pytest.approx((0 - 0.5 + 0 + 2 - 2 - 1) / 6, abs=1e-6)
    assert stats["masked_frac"].item() == pytest.approx(2 / 6)
    assert stats["kl_mask_frac"].item() == pytest.approx(5 / 6)
    assert stats["kl_max"].item() == pytest.approx(2.0)
    loss.backward()
    ratio = torch.tensor([2.0, 0.5, 0.5, 2.0, 2.0, 1.0])
    expected = torch.where(torch.tensor([True, False, True, False, False, False]), 0.0, -adv * ratio / 6)
    torch.testing.assert_close(lr.grad, expected)


def test_dppo_overflowing_ratio_gives_no_nan():
    logp = torch.tensor([1e4, 0.0], requires_grad=True)
    adv = torch.tensor([1.0, 1.0])
    mean = torch.tensor([[3.0], [0.0]])
    loss, _ = dppo_loss(logp, torch.zeros(2), mean, torch.zeros(2, 1), torch.ones(1, 1), adv, kl_threshold=1e-5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert logp.grad[0] == 0


def _nft_hand_case(dtype=torch.float32):
    # B = 2 samples of shape [1, 2] (D = 2); beta = 0.5, adv_clip = 5, kl_coef = 0.1
    v = torch.tensor([[[2.0, 0.0]], [[0.0, 2.0]]], dtype=dtype, requires_grad=True)
    v_old = torch.tensor([[[0.0, 2.0]], [[2.0, 2.0]]], dtype=dtype)
    v_ref = torch.tensor([[[1.0, 1.0]], [[0.0, 0.0]]], dtype=dtype)
    x0 = torch.tensor([[[0.0, 1.0]], [[0.0, 0.0]]], dtype=dtype)
    x_t = torch.tensor([[[1.0, 2.0]], [[1.0, 1.0]]], dtype=dtype)
    t = torch.tensor([0.5, 1.0], dtype=dtype)
    adv = torch.tensor([2.5, -10.0], dtype=dtype)
    return v, v_old, v_ref, x0, x_t, t, adv


def test_nft_hand_values():
    # sample 0: r = 0.5 + 2.5 / 10 = 0.75
    #   v+ = 0.5 [2, 0] + 0.5 [0, 2] = [1, 1];  v- = 1.5 [0, 2] - 0.5 [2, 0] = [-1, 3]
    #   x0+ = [1, 2] - 0.5 [1, 1] = [0.5, 1.5]: err [0.5, 0.5], w+ = 0.5, L+ = (0.25 + 0.25) / 2 / 0.5 = 0.5
    #   x0- = [1, 2] - 0.5 [-1, 3] = [1.5, 0.5]: err [1.5, -0.5], w- = 1, L- = (2.25 + 0.25) / 2 / 1 = 1.25
    #   per-sample policy (0.75 * 0.5 + 0.25 * 1.25) / 0.5 = 1.375; kl = ((2-1)^2 + (0-1)^2) / 2 = 1
    # sample 1: A = -10 clips to -5, r = 0
    #   v+ = [1, 2];  v- = 1.5 [2, 2] - 0.5 [0, 2] = [3, 2]
    #   x0+ = [1, 1] - [1, 2] = [0, -1]: w+ = 0.5, L+ = (0 + 1) / 2 / 0.5 = 1
    #   x0- = [1, 1] - [3, 2] = [-2, -1]: w- = 1.5, L- = (4 + 1) / 2 / 1.5 = 5 / 3
    #   per-sample policy (0 * 1 + 1 * 5 / 3) / 0.5 = 10 / 3; kl = (0 + 4) / 2 = 2
    policy = 5.0 * (1.375 + 10.0 / 3.0) / 2.0
    kl = (1.0 + 2.0) / 2.0
    expected = {
        "policy_loss": policy,
        "kl_ref": kl,
        "loss": policy + 0.1 * kl,
        "pos_loss": (0.5 + 1.0) / 2.0,
        "neg_loss": (1.25 + 5.0 / 3.0) / 2.0,
        "r_mean": (0.75 + 0.0) / 2.0,
        "old_deviation": (4.0 + 4.0 + 4.0 + 0.0) / 4.0,
    }
    # every input is exactly representable in bf16: the result must match fp32 arithmetic, not bf16
    for dtype in (torch.float32, torch.bfloat16):
        loss, stats = nft_loss(*_nft_hand_case(dtype), beta=0.5, adv_clip=5.0, kl_coef=0.1)
        assert loss.dtype == torch.float32 and loss.requires_grad
        torch.testing.assert_close(loss, torch.tensor(expected["loss"]))
        for key, value in expected.items():
            assert stats[key].dtype == torch.float32 and not stats[key].requires_grad and stats[key].ndim == 0
            torch.testing.assert_close(stats[key], torch.tensor(value), msg=key)


def test_nft_gradient_at_old_policy_is_clipped_advantage_times_fm_gradient():
    gen = torch.Generator().manual_seed(0)
    shape = (5, 3, 2, 2)
    v_old = torch.randn(shape, generator=gen, requires_grad=True)
    v = v_old.detach().clone().requires_grad_(True)
    v_ref = torch.randn(shape, generator=gen)
    x0 = torch.randn(shape, generator=gen)
    x_t = torch.randn(shape, generator=gen)
    t = torch.tensor([0.1, 0.4, 0.7, 0.95, 0.5])
    adv = torch.tensor([0.8, -2.3, 7.0, -6.0, 4.9])  # two beyond adv_clip = 5
    for beta in (1.0, 0.3):
        v.grad = None
        loss, stats = nft_loss(v, v_old, v_ref, x0, x_t, t, adv, beta=beta, adv_clip=5.0, kl_coef=0.0)
        loss.backward()
        assert v_old.grad is None
        # at v == v_old: x0+ = x0- = x0_hat, w+ = w- = w, L+ = L- = L, so policy_loss = 5 / beta * mean_B L
        t4 = t.view(-1, 1, 1, 1)
        err = (x_t - t4 * v_old - x0).detach().double()
        w = err.abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-5)
        d, b = 12, 5
        expected_policy = 5.0 / beta * (err**2 / w).mean(dim=(1, 2, 3)).mean()
        torch.testing.assert_close(stats["policy_loss"].double(), expected_policy, rtol=1e-5, atol=0)
        torch.testing.assert_close(stats["pos_loss"], stats["neg_loss"])
        assert stats["old_deviation"] == 0
        # FM-style loss mean_B mean_D (x_t - t v - x0)^2 / w has gradient -2 t err / (w D B) w.r.t. v
        fm_grad = -2.0 * t4.double() * err / (w * d * b)
        a = torch.tensor([0.8, -2.3, 5.0, -5.0, 4.9], dtype=torch.float64).view(-1, 1, 1, 1)
        torch.testing.assert_close(v.grad.double(), a * fm_grad, rtol=1e-4, atol=1e-7)


def test_nft_average_sample_at_old_policy_has_zero_gradient():
    gen = torch.Generator().manual_seed(1)
    shape = (3, 4)
    v_old = torch.randn(shape, generator=gen)
    v_ref = v_old + torch.randn(shape, generator=gen)
    x0 = torch.randn(shape, generator=gen)
    x_t = torch.randn(shape, generator=gen)
    t = torch.tensor([0.2, 0.5, 0.9])
    adv = torch.zeros(3)
    for beta in (1.0, 0.5, 0.37):
        v = v_old.clone().requires_grad_(True)
        loss, stats = nft_loss(v, v_old, v_ref, x0, x_t, t, adv, beta=beta, kl_coef=0.0)
        loss.backward()
        assert stats["r_mean"] == 0.5
        assert torch.equal(v.grad, torch.zeros(shape))
        v = v_old.clone().requires_grad_(True)
        loss, _ = nft_loss(v, v_old, v_ref, x0, x_t, t, adv, beta=beta, kl_coef=0.2)
        loss.backward()
        # only the kl term remains: d/dv 0.2 * mean (v - v_ref)^2 = 0.2 * 2 (v - v_ref) / 12
        assert v.grad.abs().min() > 0
        torch.testing.assert_close(v.grad, 0.2 * 2.0 * (v_old - v_ref) / 12.0)


def test_nft_kl_term_hand_values():
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    v_ref = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    x0 = torch.zeros(2, 2)
    t = torch.tensor([1.0, 0.5])
    err = torch.tensor([[1.0, -1.0], [2.0, 2.0]])
    x_t = x0 + t.view(-1, 1) * v.detach() + err  # so x0_hat - x0 = err at v == v_old
    loss, stats = nft_loss(v, v.detach(), v_ref, x0, x_t, t, torch.tensor([3.0, -1.0]), beta=0.5, kl_coef=0.01)
    # kl: (1 + 4 + 4 + 9) / 4 = 4.5
    # policy: w = [1, 2], L = [(1 + 1) / 2 / 1, (4 + 4) / 2 / 2] = [1, 2]; r L + (1 - r) L = L for any r,
    #   so policy = 5 / 0.5 * (1 + 2) / 2 = 15
    torch.testing.assert_close(stats["kl_ref"], torch.tensor(4.5))
    torch.testing.assert_close(stats["policy_loss"], torch.tensor(15.0))
    torch.testing.assert_close(stats["pos_loss"], torch.tensor(1.5))
    torch.testing.assert_close(stats["neg_loss"], torch.tensor(1.5))
    torch.testing.assert_close(loss, torch.tensor(15.0 + 0.01 * 4.5))
    torch.testing.assert_close(stats["r_mean"], torch.tensor((0.8 + 0.4) / 2))


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("v_old", torch.zeros(2, 3)),
        ("v_ref", torch.zeros(2, 2, 1)),
        ("x0", torch.zeros(3, 2)),
        ("x_t", torch.zeros(2)),
        ("t", torch.zeros(2, 1)),
        ("adv", torch.zeros(3)),
    ],
)
def test_nft_bad_shapes_raise(name, bad):
    args = {
        "v": torch.zeros(2, 2),
        "v_old": torch.zeros(2, 2),
        "v_ref": torch.zeros(2, 2),
        "x0": torch.zeros(2, 2),
        "x_t": torch.zeros(2, 2),
        "t": torch.zeros(2),
        "adv": torch.zeros(2),
    }
    args[name] = bad
    with pytest.raises(ValueError, match=f"argument '{name}'"):
        nft_loss(**args, beta=1.0)


def test_nft_bad_beta_raises():
    x = torch.zeros(2, 2)
    for beta in (0.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="argument 'beta'"):
            nft_loss(x, x, x, x, x, torch.zeros(2), torch.zeros(2), beta=beta)
    with pytest.raises(ValueError, match="argument 'adv_clip'"):
        nft_loss(x, x, x, x, x, torch.zeros(2), torch.zeros(2), beta=1.0, adv_clip=0.0)
