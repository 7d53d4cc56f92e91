import math

import pytest
import torch

from rlflow.algos import dppo_loss, group_advantages, grpo_loss


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
