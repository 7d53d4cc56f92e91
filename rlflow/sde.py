"""Stateless step kernels shared by rollout and training (ALGORITHMS.md section 1).

Conventions: ``t`` runs from 1 (noise) to 0 (data), ``x_t = (1 - t) x0 + t eps``, the network predicts
the velocity ``v ~ eps - x0``. Every log-prob and KL is reduced with a MEAN over the non-batch elements
(the thresholds of the losses are calibrated to that). All Gaussian arithmetic is fp32.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from rlflow.types import StepOut

__all__ = ["StepOut", "sde_step", "step_kl", "flow_schedule", "STEP_KINDS"]

STEP_KINDS = ("sde", "cps", "ode")
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _as_time(t: float | Tensor, batch: int, ndim: int, device: torch.device) -> Tensor:
    """A float or ``[B]`` tensor as an fp32 ``[B, 1, ...]`` tensor of rank ``ndim``."""
    tt = torch.as_tensor(t, dtype=torch.float32, device=device)
    if tt.ndim == 0:
        tt = tt.expand(batch)
    if tt.shape != (batch,):
        raise ValueError(f"time must be a float or a [B]={batch} tensor, got shape {tuple(tt.shape)}")
    return tt.reshape(batch, *([1] * (ndim - 1)))


def _mean_over_sample(x: Tensor) -> Tensor:
    return x.flatten(1).mean(dim=1)


def _gaussian_log_prob(sample: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Mean over D of the isotropic Gaussian log-density; zero where ``std == 0``."""
    safe_std = torch.where(std > 0, std, torch.ones_like(std))
    lp = -((sample - mean) ** 2) / (2 * safe_std**2) - torch.log(safe_std) - _HALF_LOG_2PI
    lp = torch.where(std > 0, lp, torch.zeros_like(lp))
    return _mean_over_sample(lp)


def _sde_coefficients(
    x: Tensor, v: Tensor, t: Tensor, dt: Tensor, noise_level: float, t_max: float
) -> tuple[Tensor, Tensor]:
    """Flow-SDE Euler-Maruyama step: mean and std (``g = a sqrt(t / (1 - t_safe))``)."""
    t_safe = torch.where(t < 1, t, torch.full_like(t, t_max))
    g = noise_level * torch.sqrt(t / (1 - t_safe))
    mean = x * (1 + g**2 * dt / (2 * t)) + v * (1 + g**2 * (1 - t) / (2 * t)) * dt
    std = g * torch.sqrt(-dt)
    return mean, std


def _cps_coefficients(x: Tensor, v: Tensor, t: Tensor, t_next: Tensor, noise_level: float) -> tuple[Tensor, Tensor]:
    """Coefficients-preserving step: ``std = t' sin(a pi / 2)``."""
    g = t_next * math.sin(noise_level * math.pi / 2)
    x0_hat = x - t * v
    eps_hat = x + (1 - t) * v
    mean = (1 - t_next) * x0_hat + torch.sqrt(torch.clamp(t_next**2 - g**2, min=0.0)) * eps_hat
    return mean, g


def sde_step(
    x: Tensor,
    v: Tensor,
    t: float | Tensor,
    t_next: float | Tensor,
    *,
    noise_level: float,
    t_max: float,
    kind: str = "sde",
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOut:
    """One step of the rollout policy from ``(x, t)`` to ``t_next`` (``t_next < t``).

    Args:
        x: ``[B, ...]`` current state (any float dtype; maths runs in fp32).
        v: ``[B, ...]`` predicted velocity at ``(x, t)``.
        t, t_next: floats or ``[B]`` tensors on the grid; ``t = 1`` is pure noise.
        noise_level: ``a``; for ``kind="sde"`` ``g = a sqrt(t / (1 - t_safe))``.
        t_max: the first grid value below 1, used in place of ``t`` inside the square root at ``t = 1``.
        kind: ``"sde"`` (Flow-GRPO's SDE), ``"cps"`` (coefficients-preserving) or ``"ode"`` (Euler).
        noise: ``[B, ...]`` standard normal noise ``xi`` (drawn from ``generator`` when omitted).
        prev_sample: re-score mode: the recorded ``x_t'``; its log-prob under this step is returned.

    Returns:
        :class:`StepOut`. ``log_prob`` is the Gaussian log-density of ``prev_sample`` (detached), MEAN-reduced
        over the non-batch elements; for CPS it is the proper normalised density with ``std = g``
        (flow_grpo's code drops the normaliser and the ``1 / (2 g^2)`` factor; we do not). A deterministic
        step (``"ode"``, or ``std == 0``) has ``log_prob == 0``.
    """
    if kind not in STEP_KINDS:
        raise ValueError(f"kind must be one of {STEP_KINDS}, got {kind!r}")
    x32, v32 = x.float(), v.float()
    tt = _as_time(t, x.shape[0], x.ndim, x.device)
    tn = _as_time(t_next, x.shape[0], x.ndim, x.device)
    dt = tn - tt
    if kind == "ode" or noise_level == 0:
        mean = x32 + v32 * dt
        std = torch.zeros_like(tt)
    elif kind == "sde":
        mean, std = _sde_coefficients(x32, v32, tt, dt, noise_level, t_max)
    else:
        mean, std = _cps_coefficients(x32, v32, tt, tn, noise_level)
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float32, device=x.device)
        prev_sample = mean + std * noise.float()
    prev_sample = prev_sample.detach().float()
    return StepOut(prev_sample, mean, std, _gaussian_log_prob(prev_sample, mean, std))


def step_kl(mean_a: Tensor, mean_b: Tensor, std: Tensor) -> Tensor:
    """Exact KL between two step policies with the same isotropic std, mean-reduced over D: ``[B]`` fp32.

    ``KL = mean_D (mean_a - mean_b)^2 / (2 std^2)``; symmetric because the covariances are equal.
    """
    diff = mean_a.float() - mean_b.float()
    return _mean_over_sample(diff**2 / (2 * std.float() ** 2))


def flow_schedule(num_steps: int, shift: float, num_train_timesteps: int = 1000) -> Tensor:
    """The sampling grid ``t_0 = 1 > ... > t_K = 0``: ``[num_steps + 1]`` fp32.

    Equals diffusers' ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(num_steps).sigmas``
    (static shift ``t <- s t / (1 + (s - 1) t)``), including its shifted ``sigma_min`` end point.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    n = num_train_timesteps
    train = torch.from_numpy(np.linspace(1, n, n, dtype=np.float32)[::-1].copy()) / n
    train = shift * train / (1 + (shift - 1) * train)
    sigma_max, sigma_min = train[0].item(), train[-1].item()
    sigmas = np.linspace(sigma_max * n, sigma_min * n, num_steps) / n
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    grid = torch.from_numpy(sigmas).to(torch.float32)
    return torch.cat([grid, torch.zeros(1)])

