import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from rlflow.sde import flow_schedule, sde_step, step_kl


@pytest.mark.parametrize("steps,shift", [(10, 3.0), (40, 3.0), (10, 1.0), (28, 3.0), (1, 1.0)])
def test_schedule_equals_diffusers(steps, shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    assert torch.equal(flow_schedule(steps, shift), sched.sigmas)


def test_schedule_known_values():
    grid = flow_schedule(10, 3.0)
    assert grid[0] == 1.0 and grid[-1] == 0.0
    assert grid[1].item() == pytest.approx(0.9601, abs=1e-4)
    assert grid[9].item() == pytest.approx(0.0089, abs=1e-4)


def test_ode_kind_is_euler_and_sde_tends_to_it():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    ode = sde_step(x, v, 0.6, 0.5, noise_level=0.7, t_max=0.96, kind="ode")
    torch.testing.assert_close(ode.prev_sample, x + v * (0.5 - 0.6))
    assert torch.equal(ode.log_prob, torch.zeros(4))
    errs = []
    for a in (1e-1, 1e-2, 1e-3):
        out = sde_step(x, v, 0.6, 0.5, noise_level=a, t_max=0.96, noise=torch.randn(x.shape, generator=g))
        errs.append((out.prev_sample - ode.prev_sample).abs().max().item())
    assert errs[0] > errs[1] > errs[2] and errs[2] < 5e-3
    assert errs[0] / errs[2] > 50  # the gap shrinks linearly with the noise level


def test_sde_step_matches_hand_formula_and_logprob():
    x = torch.tensor([[0.5, -1.0]])
    v = torch.tensor([[2.0, 0.25]])
    noise = torch.tensor([[0.3, -1.2]])
    t, tn, a = 0.8, 0.7, 0.7
    out = sde_step(x, v, t, tn, noise_level=a, t_max=0.96, noise=noise)
    dt = tn - t
    g = a * math.sqrt(t / (1 - t))
    mean = x * (1 + g**2 * dt / (2 * t)) + v * (1 + g**2 * (1 - t) / (2 * t)) * dt
    std = g * math.sqrt(-dt)
    torch.testing.assert_close(out.mean, mean)
    torch.testing.assert_close(out.prev_sample, mean + std * noise)
    lp = (-(noise**2) / 2 - math.log(std) - 0.5 * math.log(2 * math.pi)).mean()
    assert out.log_prob.shape == (1,)
    assert out.log_prob.item() == pytest.approx(lp.item(), rel=1e-5)


def test_t_equal_one_uses_t_max():
    x, v = torch.ones(2, 4), torch.ones(2, 4)
    out = sde_step(x, v, 1.0, 0.96, noise_level=0.7, t_max=0.96, noise=torch.zeros(2, 4))
    g = 0.7 * math.sqrt(1.0 / (1 - 0.96))
    assert out.std.flatten()[0].item() == pytest.approx(g * math.sqrt(0.04), rel=1e-5)
    assert torch.isfinite(out.mean).all()


def test_rescore_gives_identical_logprob_and_dtype_is_fp32():
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(3, 2, 4, 4, generator=g).bfloat16(), torch.randn(3, 2, 4, 4, generator=g).bfloat16()
    t = torch.tensor([0.9, 0.8, 0.7])
    first = sde_step(x, v, t, t - 0.1, noise_level=0.7, t_max=0.96, generator=g)
    again = sde_step(x, v, t, t - 0.1, noise_level=0.7, t_max=0.96, prev_sample=first.prev_sample)
    assert first.log_prob.dtype == torch.float32 and first.mean.dtype == torch.float32
    assert torch.equal(first.log_prob, again.log_prob)


def test_step_kl_closed_form_in_velocity_terms():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, 4, 4, generator=g)
    va, vb = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
    t, tn, a = 0.75, 0.6, 0.7
    sa = sde_step(x, va, t, tn, noise_level=a, t_max=0.96, noise=torch.zeros_like(x))
    sb = sde_step(x, vb, t, tn, noise_level=a, t_max=0.96, noise=torch.zeros_like(x))
    kl = step_kl(sa.mean, sb.mean, sa.std)
    gt = a * math.sqrt(t / (1 - t))
    closed = (abs(tn - t) / 2) * (1 / gt + gt * (1 - t) / (2 * t)) ** 2 * ((va - vb) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(kl, closed, rtol=1e-5, atol=0)
    assert torch.equal(step_kl(sa.mean, sa.mean, sa.std), torch.zeros(5))


def test_cps_step():
    x, v = torch.randn(2, 8), torch.randn(2, 8)
    t, tn, a = 0.8, 0.6, 0.5
    out = sde_step(x, v, t, tn, noise_level=a, t_max=0.96, kind="cps", noise=torch.zeros(2, 8))
    gg = tn * math.sin(a * math.pi / 2)
    mean = (1 - tn) * (x - t * v) + math.sqrt(tn**2 - gg**2) * (x + (1 - t) * v)
    torch.testing.assert_close(out.mean, mean)
    assert out.log_prob[0].item() == pytest.approx(-math.log(gg) - 0.5 * math.log(2 * math.pi), rel=1e-5)


def test_bad_inputs():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="kind"):
        sde_step(x, x, 0.5, 0.4, noise_level=0.7, t_max=0.96, kind="ddim")
    with pytest.raises(ValueError, match="time"):
        sde_step(x, x, torch.ones(3), 0.4, noise_level=0.7, t_max=0.96)
    with pytest.raises(ValueError, match="num_steps"):
        flow_schedule(0, 1.0)
