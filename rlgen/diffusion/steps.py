"""One denoising step with its log-probability: small pure functions, shared by sampling and training.

Conventions follow the reference trainers so their hyper-parameters carry over:
- the per-step log-prob is the Gaussian log-density of the next latent, reduced as the MEAN over all
  non-batch dimensions (DDPO, Flow-GRPO, DanceGRPO), which is why their PPO clip ranges are ~1e-4;
- the next latent is detached inside the log-prob, so gradients flow through the step's mean only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class StepResult:
    prev_sample: torch.Tensor  # the next (less noisy) latent
    log_prob: torch.Tensor  # [B]; zeros for a deterministic step
    mean: torch.Tensor  # the step's Gaussian mean (differentiable)
    std: torch.Tensor  # [B, 1, ...] standard deviation (0 for a deterministic step)
    kl_scale: torch.Tensor  # the variance the KL to a reference step is divided by (see flow_sde_step)
    pred_original: torch.Tensor | None = None  # the step's prediction of the clean sample x0


def mean_over_pixels(values: torch.Tensor) -> torch.Tensor:
    return values.mean(dim=tuple(range(1, values.ndim)))


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2) per element, averaged over the non-batch dims; x is treated as data."""
    x = x.detach()
    log_density = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI
    return mean_over_pixels(log_density)


def _per_sample(value, like: torch.Tensor) -> torch.Tensor:
    """A scalar or [B] coefficient as a tensor broadcastable against [B, C, H, W]."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return value.reshape(-1, *([1] * (like.ndim - 1))) if value.ndim else value


def _finish(mean, std, prev_sample, noise, generator, kl_scale, x0) -> StepResult:
    deterministic = bool((std == 0).all())
    if prev_sample is None:
        if deterministic:
            prev_sample = mean
        else:
            if noise is None:
                noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
            prev_sample = mean + std * noise
    if deterministic:
        log_prob = torch.zeros(mean.shape[0], dtype=mean.dtype, device=mean.device)
    else:
        log_prob = gaussian_log_prob(prev_sample, mean, std)
    return StepResult(prev_sample, log_prob, mean, std, kl_scale, x0)


def predicted_x0_eps(model_output, x_t, alpha_t, prediction_type: str):
    """(x0, eps) from a denoiser output in the DDPM parameterisations diffusers uses."""
    a = alpha_t
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
    elif prediction_type == "sample":
        x0 = model_output
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
    elif prediction_type == "v_prediction":
        x0 = a.sqrt() * x_t - (1 - a).sqrt() * model_output
        eps = a.sqrt() * model_output + (1 - a).sqrt() * x_t
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    return x0, eps


def ddim_step(model_output, x_t, alpha_t, alpha_prev, eta: float, prediction_type: str = "epsilon", *,
              clip_sample_range: float | None = None, prev_sample=None, noise=None, generator=None) -> StepResult:
    """DDIM step x_t -> x_t' with noise eta (DDPO's Gaussian policy; eta=1 is DDPM-like, eta=0 the ODE).

    alpha_t / alpha_prev are the cumulative alphas (scalars or [B]) of this and the previous timestep."""
    a_t = _per_sample(alpha_t, x_t)
    a_prev = _per_sample(alpha_prev, x_t)
    x0, eps = predicted_x0_eps(model_output, x_t, a_t, prediction_type)
    if clip_sample_range is not None:  # as diffusers / DDPO: the clipped x0, the model's own epsilon
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.clamp(min=0).sqrt() * torch.ones_like(a_t)
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    return _finish(mean, std, prev_sample, noise, generator, std**2, x0)


def flow_sde_step(velocity, x, sigma, sigma_next, noise_level: float, sigma_max=None, *,
                  prev_sample=None, noise=None, generator=None) -> StepResult:
    """Flow-GRPO's marginal-preserving SDE step (rectified flow x_s = (1-s) x0 + s eps, v = eps - x0).

    g = a * sqrt(sigma / (1 - sigma)) with a = noise_level (at sigma == 1 the denominator uses sigma_max,
    Flow-GRPO's sigmas[1]: the next sigma, 0 when sampling in one step); noise_level = 0 gives exactly the
    Euler ODE step x + v * dt with g = 0 (never 0 * inf).
    kl_scale is g^2 (without the |dt| factor), as Flow-GRPO divides its KL term, so its beta carries over."""
    s = _per_sample(sigma, x)
    s_next = _per_sample(sigma_next, x)
    s_max = s_next if sigma_max is None else _per_sample(sigma_max, x)  # at sigma == 1, sigmas[1] is sigma_next
    dt = s_next - s
    if noise_level == 0:
        g = torch.zeros_like(s)
        mean = x + velocity * dt
    else:
        g = noise_level * (s / (1 - torch.where(s >= 1, s_max, s))).sqrt() * torch.ones_like(s)
        mean = x * (1 + g**2 / (2 * s) * dt) + velocity * (1 + g**2 * (1 - s) / (2 * s)) * dt
    std = g * (-dt).clamp(min=0).sqrt()
    return _finish(mean, std, prev_sample, noise, generator, g**2, x - s * velocity)


def step_kl(mean, ref_mean, kl_scale) -> torch.Tensor:
    """KL-like penalty between the policy's and the reference's step means: mean_pixels((mu - mu_ref)^2)
    / (2 * kl_scale), per sample (Flow-GRPO's `kl_loss`)."""
    scale = kl_scale.reshape(kl_scale.shape[0], -1)[:, 0] if kl_scale.ndim else kl_scale
    return mean_over_pixels((mean - ref_mean) ** 2) / (2 * scale.clamp(min=1e-12))
