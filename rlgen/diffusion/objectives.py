"""Denoising objectives (pure functions): how a clean image is noised at a random time and what the
denoiser must predict there. Shared by `train diffusion-sft` and `train diffusion-dpo`."""
from __future__ import annotations

import torch

from rlgen.diffusion.steps import mean_over_pixels


def sample_times(n: int, generator: torch.Generator | None, density: str = "uniform") -> torch.Tensor:
    """u in (0, 1) per sample: uniform, or SD3's logit-normal density (mean 0, std 1); drawn where the generator
    lives (the run's CPU one), `noised` moves them to the images' device."""
    if density == "logit-normal":
        return torch.sigmoid(torch.randn(n, generator=generator))
    return torch.rand(n, generator=generator).clamp(1e-4, 1 - 1e-4)


def flow_training_shift(scheduler) -> float:
    """The time shift of a flow-matching scheduler's training sigmas: its `shift` (SD3: 3.0), or 1 when it
    shifts dynamically by resolution (Flux), where diffusers' training scripts use the unshifted sigmas."""
    config = scheduler.config
    if getattr(config, "use_dynamic_shifting", False):
        return 1.0
    return float(getattr(config, "shift", 1.0) or 1.0)


def shifted_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    """FlowMatchEulerDiscreteScheduler's sigma mapping: shift * u / (1 + (shift - 1) * u) (identity at 1)."""
    return shift * u / (1 + (shift - 1) * u)


def noised(model, x0: torch.Tensor, noise: torch.Tensor, u: torch.Tensor):
    """(x_t, model timesteps [B], target) at times u in (0, 1).

    Flow matching: x = (1 - s) x0 + s * noise with s = shift * u / (1 + (shift - 1) * u), the noise level the
    scheduler's own training sigmas have (its `shift`, so a shift-3 SD3 model trains where it samples),
    target v = noise - x0, timestep s * T_train.
    DDPM family: t = floor(u * T_train), x = sqrt(a_t) x0 + sqrt(1 - a_t) noise, target in the scheduler's
    prediction type (epsilon, sample or v_prediction)."""
    steps = model.scheduler.config.num_train_timesteps
    u = u.to(x0.device)
    shape = (-1, *([1] * (x0.ndim - 1)))
    if model.family == "flow":
        shift = flow_training_shift(model.scheduler)
        sigma = u if shift == 1 else shifted_sigma(u, shift)
        s = sigma.to(x0.dtype).reshape(shape)
        return (1 - s) * x0 + s * noise, sigma * steps, noise - x0
    t = (u * steps).long().clamp(0, steps - 1)
    a = model.scheduler.alphas_cumprod.to(x0.device)[t].to(x0.dtype).reshape(shape)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    kind = model.prediction_type
    target = noise if kind == "epsilon" else x0 if kind == "sample" else a.sqrt() * noise - (1 - a).sqrt() * x0
    return x_t, t, target


def denoising_errors(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample squared error, mean over the non-batch dims."""
    return mean_over_pixels((prediction.float() - target.float()) ** 2)


def diffusion_dpo_loss(policy_errors: torch.Tensor, reference_errors: torch.Tensor, beta: float, loss_type: str = "sigmoid"):
    """Diffusion-DPO (Wallace et al.), in the convention of the paper's code and of diffusers'
    examples/research_projects/diffusion_dpo/train_diffusion_dpo_sdxl.py (beta default 5000).

    errors are [2P] per-sample denoising errors, winners first then losers, computed at a shared noise and
    time per pair. inside = -beta/2 * ((e_w - e_l) - (e_w_ref - e_l_ref)); sigmoid: -log sigmoid(inside),
    hinge: relu(1 - inside). Returns (per-pair loss [P], inside [P]).
    diffusers' SD1.5 script, train_diffusion_dpo.py, has no 1/2: its logits are beta * (ref gap - policy gap)
    with beta default 2500, the same effective scale as beta = 5000 here."""
    w, l = policy_errors.chunk(2)
    w_ref, l_ref = reference_errors.chunk(2)
    inside = -0.5 * beta * ((w - l) - (w_ref - l_ref))
    if loss_type == "sigmoid":
        loss = -torch.nn.functional.logsigmoid(inside)
    elif loss_type == "hinge":
        loss = torch.relu(1 - inside)
    else:
        raise ValueError(f"unknown diffusion-dpo loss_type {loss_type!r}")
    return loss, inside
