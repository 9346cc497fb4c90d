"""Test-time search for image models (`rlgen sample --sampler NAME` on a diffusers pipeline).

Every image sampler has the LM samplers' calling convention, `fn(engine, prompts, params, generator, *,
records, rewards=None, stats=None, **options)`, where `engine` is the DiffusionModel and `params` the
DiffusionSamplingParams, and returns one sample dict (record + `image`) per prompt. They all drive
rlgen.diffusion.sampling.sample, the sampler the trainers use.
"""
from __future__ import annotations

import math

import torch

from rlgen.diffusion.generate import rollout
from rlgen.diffusion.sampling import initial_noise, sample
from rlgen.errors import RlgenError
from rlgen.hookspecs import hookimpl
from rlgen.rollout.samplers import effective_sample_size, resample_indices, update_log_weights


def _records(prompts, records):
    return records if records is not None else [{"prompt": p} for p in prompts]


def _scores(rewards, samples: list[dict]) -> torch.Tensor:
    _, valid, total = rewards.score(samples)
    return torch.where(valid, torch.nan_to_num(total, nan=-math.inf), torch.full_like(total, -math.inf))


def plain(engine, prompts, params, generator=None, *, records=None, **_):
    return rollout(engine, _records(prompts, records), params, generator, keep_trajectory=False).samples


def best_of_n(engine, prompts, params, generator=None, *, rewards, records=None, n: int = 8, stats=None):
    """n images per prompt; keep the one the guide scores highest."""
    if n < 1:
        raise RlgenError("--sampler-opt n must be >= 1")
    records = _records(prompts, records)
    expanded = [r for r in records for _ in range(n)]
    candidates = rollout(engine, expanded, params, generator, keep_trajectory=False).samples
    best = _scores(rewards, candidates).view(len(records), n).argmax(dim=1)
    return [candidates[i * n + int(b)] for i, b in enumerate(best)]


def chi2_norm_penalty(noise: torch.Tensor) -> torch.Tensor:
    """ReNO's regulariser: the negative log-density of ||z||^2 under the chi-square law with d degrees of
    freedom that it follows for Gaussian z (up to a constant), per sample: keeps z in the typical set."""
    d = noise[0].numel()
    r = noise.flatten(1).pow(2).sum(dim=1)
    return -((d / 2 - 1) * torch.log(r) - r / 2) / d


def reno(engine, prompts, params, generator=None, *, rewards, records=None, iterations: int = 10, lr: float = 1.0,
         reg: float = 0.01, grad_clip: float = 0.1, stats=None):
    """ReNO: gradient ascent on the initial noise against the guide's differentiable form, through the
    whole (deterministic) sampling chain with per-step checkpointing; keeps the best iterate per image."""
    rewards.require_differentiable()
    records = _records(prompts, records)
    cond = engine.conditioning([str(r["prompt"]) for r in records], records)
    null = engine.null_conditioning(len(records)) if params.guidance_scale != 1.0 else None
    noise = initial_noise(engine, len(records), generator)
    noise.requires_grad_(True)
    optimizer = torch.optim.SGD([noise], lr=lr, momentum=0.9, nesterov=True)
    deterministic = params.deterministic()
    best_score = torch.full((len(records),), -math.inf)
    best_images = None
    trainable = [(p, p.requires_grad) for p in engine.parameters()]
    engine.requires_grad_(False)  # only the noise is optimised
    try:
        for _ in range(iterations + 1):
            trajectory = sample(engine, cond, null, deterministic, noise=noise, grad_last=deterministic.num_steps,
                                checkpointing=True, keep_trajectory=False)
            score = rewards.differentiable_total(trajectory.images, records)
            with torch.no_grad():
                better = score.detach().cpu() > best_score
                best_score = torch.where(better, score.detach().cpu(), best_score)
                images = trajectory.images.detach().cpu()
                best_images = images if best_images is None else torch.where(better.view(-1, 1, 1, 1), images, best_images)
            loss = (-score + reg * chi2_norm_penalty(noise)).sum()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([noise], grad_clip)
            optimizer.step()
    finally:
        for p, flag in trainable:
            p.requires_grad_(flag)
    if stats is not None:
        stats["reno_best_mean"] = round(float(best_score.mean()), 4)
    return [{**r, "image": best_images[i]} for i, r in enumerate(records)]


def fk_steering(engine, prompts, params, generator=None, *, rewards, records=None, particles: int = 8, lam: float = 10.0,
                resample_every: int = 2, ess_threshold: float = 0.5, stats=None):
    """Feynman-Kac steering: `particles` trajectories per prompt; at every `resample_every`-th step each
    particle's weight is multiplied by exp(lam * (r_t - r_prev)), r_t the guide's reward of the step's
    predicted clean image, and the particles are resampled when the ESS falls below ess_threshold * K.
    Returns the particle with the highest final reward."""
    if particles < 1 or resample_every < 1:
        raise RlgenError("--sampler-opt particles and resample_every must be >= 1")
    records = _records(prompts, records)
    expanded = [r for r in records for _ in range(particles)]
    k, b = particles, len(records)
    log_weights = torch.zeros(b, k)
    potential = torch.zeros(b, k)
    resamples = [0]

    def steer(index, x, x0_pred):
        nonlocal log_weights, potential
        last = index == params.num_steps - 1
        if last or (index + 1) % resample_every or x0_pred is None:
            return None
        with torch.no_grad():
            images = engine.decode(x0_pred)
        scores = _scores(rewards, [{**r, "image": images[i].cpu()} for i, r in enumerate(expanded)]).view(b, k)
        scores = torch.where(torch.isfinite(scores), scores, torch.zeros_like(scores))
        log_weights = update_log_weights(log_weights, potential, scores, lam)
        potential = scores
        low = effective_sample_size(log_weights) < ess_threshold * k
        if not bool(low.any()):
            return None
        ancestors = torch.arange(k).expand(b, k).clone()
        ancestors[low] = resample_indices(log_weights[low], generator)
        flat = (ancestors + torch.arange(b).unsqueeze(1) * k).flatten()
        log_weights = torch.where(low.unsqueeze(1), torch.zeros_like(log_weights), log_weights)
        potential = torch.gather(potential, 1, ancestors)
        resamples[0] += int(low.sum())
        return x[flat.to(x.device)]

    with torch.no_grad():
        drawn = rollout(engine, expanded, params, generator, keep_trajectory=False, step_callback=steer).samples
    final = _scores(rewards, drawn).view(b, k).argmax(dim=1)
    if stats is not None:
        stats["resamples"] = stats.get("resamples", 0) + resamples[0]
    return [drawn[i * k + int(j)] for i, j in enumerate(final)]


@hookimpl
def register_image_samplers(register):
    register("plain", plain, "sample once per prompt (DDIM / SDE / ODE as set by --eta)")
    register("best-of-n", best_of_n, "best of n images per prompt under the --sampler-reward guide (option n=8)")
    register("reno", reno, "ReNO: optimise the initial noise against a differentiable guide (iterations=10, lr=1.0, reg=0.01)")
    register("fk-steering", fk_steering, "Feynman-Kac steering: reward-resampled particles (particles=8, lam=10, resample_every=2)")
