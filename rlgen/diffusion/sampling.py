"""Sampling with per-step log-probs: the one code path behind `rlgen sample`, the trainers' rollouts,
reward backprop and test-time search."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from rlgen.diffusion.steps import StepResult, ddim_step, flow_sde_step
from rlgen.errors import RlgenError


@dataclass
class DiffusionSamplingParams:
    num_steps: int = 10
    guidance_scale: float = 1.0  # classifier-free guidance weight; 1 = off
    eta: float = 1.0  # DDIM noise for DDPM-family models (DDPO: 1.0); 0 = deterministic DDIM
    noise_level: float = 0.7  # Flow-GRPO's SDE noise `a` for flow models; 0 = the Euler ODE
    sde_window: tuple[int, int] | None = None  # only steps [start, end) are stochastic (Flow-GRPO-Fast)

    def validate(self):
        if self.num_steps < 1:
            raise RlgenError("the number of sampling steps (--num-steps, sampling.num_steps) must be >= 1")
        if self.eta < 0 or self.noise_level < 0:
            raise RlgenError("sampling eta and noise_level must be >= 0")

    def deterministic(self) -> "DiffusionSamplingParams":
        return DiffusionSamplingParams(self.num_steps, self.guidance_scale, 0.0, 0.0, None)


@dataclass
class Schedule:
    """Per-step coefficients: model timesteps [T] and either cumulative alphas (ddim) or sigmas (flow)."""
    family: str
    timesteps: torch.Tensor  # [T], the denoiser's timestep input
    current: torch.Tensor  # [T]: alpha_t (ddim) or sigma (flow)
    following: torch.Tensor  # [T]: alpha of the previous timestep (ddim) or sigma_next (flow)
    sigma_max: float = 1.0  # flow: the sigma after the first step, used in g at sigma == 1 (0 for one step)

    def __len__(self) -> int:
        return len(self.timesteps)

    def to(self, device: torch.device) -> "Schedule":
        """The schedule on `device`, where the steps (and training's per-sample step indices) read it."""
        return Schedule(self.family, self.timesteps.to(device), self.current.to(device), self.following.to(device),
                        self.sigma_max)


def make_schedule(model, num_steps: int) -> Schedule:
    """The coefficients, computed on the CPU (the same values for every device; `Schedule.to` moves them)."""
    scheduler = model.scheduler
    if model.family == "flow":
        scheduler.set_timesteps(num_steps)
        sigmas = scheduler.sigmas.float().cpu()
        # Flow-GRPO's sigma_max = sigmas[1]: with one step that is the terminal 0, so g stays finite at
        # sigma == 1 (a "largest sigma in (0, 1)" found none there and divided by 1 - 1)
        return Schedule("flow", scheduler.timesteps.float().cpu(), sigmas[:-1], sigmas[1:], float(sigmas[1]))
    from diffusers import DDIMScheduler

    ddim = scheduler if isinstance(scheduler, DDIMScheduler) else DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(num_steps)
    timesteps = ddim.timesteps.long().cpu()
    alphas = ddim.alphas_cumprod.float().cpu()
    step = ddim.config.num_train_timesteps // num_steps
    prev = timesteps - step
    final = float(ddim.final_alpha_cumprod)
    alpha_prev = torch.where(prev >= 0, alphas[prev.clamp(min=0)], torch.tensor(final))
    return Schedule("ddim", timesteps, alphas[timesteps], alpha_prev)


def _clip_range(model) -> float | None:
    cfg = model.scheduler.config
    return float(getattr(cfg, "clip_sample_range", 1.0)) if getattr(cfg, "clip_sample", False) else None


def stochastic(params: DiffusionSamplingParams, index: int) -> bool:
    window = params.sde_window
    return window is None or window[0] <= index < window[1]


def denoise_step(model, schedule: Schedule, index: int, x, cond, null, params: DiffusionSamplingParams, *,
                 prev_sample=None, noise=None, generator=None, reference: bool = False) -> StepResult:
    """One step from x at schedule position `index`; with `prev_sample` given, the log-prob of that sample."""
    output = model.predict(x, schedule.timesteps[index].to(x.device), cond, null, params.guidance_scale, reference=reference)
    noisy = True if torch.is_tensor(index) else stochastic(params, index)  # per-sample steps: training on stochastic ones
    current, following = schedule.current[index].to(x.device), schedule.following[index].to(x.device)
    if schedule.family == "flow":
        return flow_sde_step(output.float(), x.float(), current, following, params.noise_level if noisy else 0.0,
                             schedule.sigma_max, prev_sample=prev_sample, noise=noise, generator=generator)
    return ddim_step(output.float(), x.float(), current, following, params.eta if noisy else 0.0, model.prediction_type,
                     clip_sample_range=_clip_range(model), prev_sample=prev_sample, noise=noise, generator=generator)


@dataclass
class Trajectory:
    latents: torch.Tensor  # [B, T+1, C, H, W]: x_T ... x_0
    log_probs: torch.Tensor  # [B, T]
    schedule: Schedule
    images: torch.Tensor  # [B, C, H, W] in [0, 1] (keeps the graph under reward backprop)


def initial_noise(model, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """Drawn from the (CPU) generator, then moved: the same noise for a seed on every device."""
    return torch.randn((n, *model.latent_shape), generator=generator).to(model.device)


def step_noises(model, params: DiffusionSamplingParams, n: int, generator: torch.Generator | None) -> list:
    """The per-step noise `sample` draws for n samples, drawn the same way and in the same order (None for a
    deterministic step): drawn up front, a batch's draws can be sliced among processes."""
    noisy = _noisy(params, make_schedule(model, params.num_steps))
    return [torch.randn((n, *model.latent_shape), generator=generator).to(model.device)
            if stochastic(params, index) and noisy else None for index in range(params.num_steps)]


def sample(model, cond, null, params: DiffusionSamplingParams, generator: torch.Generator | None = None, *,
           noise: torch.Tensor | None = None, grad_last: int = 0, checkpointing: bool = True,
           keep_trajectory: bool = True, step_callback=None, step_noise: list | None = None) -> Trajectory:
    """Run the sampler from `noise` (drawn from `generator` when None).
    `step_noise` (from `step_noises`) gives every step's noise instead of drawing it from `generator`.

    grad_last = K > 0 keeps the autograd graph through the last K steps (DRaFT-K / AlignProp), each step
    recomputed in backward when `checkpointing`; earlier steps run without grad. `step_callback(index, x, x0_pred)`
    may return a replacement x (used by FK steering to resample particles)."""
    n = cond.shape[0] if cond is not None else (noise.shape[0] if noise is not None else 1)
    x = initial_noise(model, n, generator) if noise is None else noise
    schedule = make_schedule(model, params.num_steps).to(x.device)
    latents = [x.detach()] if keep_trajectory else []
    log_probs = []
    total = len(schedule)
    for index in range(total):
        with_grad = grad_last > 0 and index >= total - grad_last
        # drawn on the CPU, then moved, as the initial noise
        if step_noise is not None:
            noise_now = step_noise[index]
        else:
            noise_now = torch.randn(x.shape, generator=generator).to(x.device) if stochastic(params, index) and _noisy(params, schedule) else None
        if with_grad:
            if checkpointing and grad_last > 1:  # with one step there is nothing to save by recomputing
                result = checkpoint(_step_tensors, model, schedule, index, x, cond, null, params, noise_now, use_reentrant=False)
                result = StepResult(*result)
            else:
                result = denoise_step(model, schedule, index, x, cond, null, params, noise=noise_now)
        else:
            with torch.no_grad():
                result = denoise_step(model, schedule, index, x.detach(), cond, null, params, noise=noise_now)
        x = result.prev_sample
        log_probs.append(result.log_prob.detach())
        if step_callback is not None:
            replaced = step_callback(index, x, result.pred_original)
            if replaced is not None:
                x = replaced
        if keep_trajectory:
            latents.append(x.detach())
    if keep_trajectory:
        stacked = torch.stack(latents, dim=1)
    else:
        stacked = torch.empty(0, device=x.device)
    images = model.decode(x) if grad_last > 0 else _decode_no_grad(model, x)
    return Trajectory(stacked, torch.stack(log_probs, dim=1), schedule, images)


def _noisy(params: DiffusionSamplingParams, schedule: Schedule) -> bool:
    return (params.noise_level if schedule.family == "flow" else params.eta) > 0


def _step_tensors(model, schedule, index, x, cond, null, params, noise):
    r = denoise_step(model, schedule, index, x, cond, null, params, noise=noise)
    return r.prev_sample, r.log_prob, r.mean, r.std, r.kl_scale


def _decode_no_grad(model, x):
    with torch.no_grad():
        return model.decode(x)
