"""Test-time search for image models (`rlgen sample --sampler NAME` on a diffusers pipeline).

Every image sampler has the LM samplers' calling convention, `fn(engine, prompts, params, generator, *,
records, rewards=None, stats=None, **options)`, where `engine` is the DiffusionModel and `params` the
DiffusionSamplingParams, and returns one sample dict (record + `image`) per prompt. Option ranges are
`Annotated[type, Bounds]` annotations, checked by rlgen.rollout.samplers.check_sampler before any model loads. They all drive
rlgen.diffusion.sampling.sample, the sampler the trainers use.
"""
from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Annotated, Literal

import torch

from rlgen.config import COUNT, NON_NEGATIVE, POSITIVE, PROBABILITY
from rlgen.diffusion.generate import rollout
from rlgen.diffusion.sampling import initial_noise, sample
from rlgen.errors import RlgenError, show_value
from rlgen.hookspecs import hookimpl
from rlgen.rollout.samplers import effective_sample_size, resample_indices


def _records(prompts, records):
    return records if records is not None else [{"prompt": p} for p in prompts]


def _scores(rewards, samples: list[dict]) -> torch.Tensor:
    """The guide's totals for picking the best: -inf where there is none (so it never wins)."""
    return torch.nan_to_num(_rewards_or_nan(rewards, samples), nan=-math.inf)


def _rewards_or_nan(rewards, samples: list[dict]) -> torch.Tensor:
    """The guide's totals, NaN where a sample was skipped or has no number."""
    _, valid, total = rewards.score(samples)
    return torch.where(valid, total, torch.full_like(total, math.nan))


def plain(engine, prompts, params, generator=None, *, records=None, **_):
    return rollout(engine, _records(prompts, records), params, generator, keep_trajectory=False).samples


def best_of_n(engine, prompts, params, generator=None, *, rewards, records=None, n: Annotated[int, COUNT] = 8,
              stats=None):
    """n images per prompt; keep the one the guide scores highest."""
    if n < 1:
        raise RlgenError("--sampler-opt n must be >= 1")
    records = _records(prompts, records)
    expanded = [r for r in records for _ in range(n)]
    candidates = rollout(engine, expanded, params, generator, keep_trajectory=False).samples
    best = _scores(rewards, candidates).view(len(records), n).argmax(dim=1)
    return [candidates[i * n + int(b)] for i, b in enumerate(best)]


def chi_norm_penalty(noise: torch.Tensor) -> torch.Tensor:
    """ReNO's regulariser, per sample: 0.5 * ||z||^2 - (d - 1) * log ||z||, the negative log-density (up to a
    constant) of the chi law with d degrees of freedom that ||z|| follows for Gaussian z in d dimensions.
    Smallest at ||z|| = sqrt(d - 1), so it keeps z in the typical set; not divided by d, as in ReNO's code,
    whose weight (0.01) it therefore shares. Computed in float32 (ReNO: to avoid overflow in half precision)."""
    d = noise[0].numel()
    norm = torch.linalg.vector_norm(noise.flatten(1).float(), dim=1)
    return 0.5 * norm**2 - (d - 1) * torch.log(norm)


def reno(engine, prompts, params, generator=None, *, rewards, records=None, iterations: Annotated[int, COUNT] = 10,
         lr: Annotated[float, POSITIVE] = 1.0, reg: Annotated[float, NON_NEGATIVE] = 0.01,
         grad_clip: Annotated[float, POSITIVE] = 0.1, stats=None):
    """ReNO: gradient ascent on the initial noise against the guide's differentiable form, through the
    whole (deterministic) sampling chain with per-step checkpointing; keeps the best iterate per image.
    The loss per image is -reward + reg * chi_norm_penalty(noise) (ReNO's form and default weight 0.01)."""
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
            loss = (-score + reg * chi_norm_penalty(noise).to(score.dtype)).sum()
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


FKPotential = Literal["difference", "max", "sum"]
FK_POTENTIALS: tuple[str, ...] = typing.get_args(FKPotential)


@dataclass
class FKState:
    """What FK steering remembers per particle [B, K]: `memory` of the rewards so far (difference: the last
    one, starting at 0; max: the running maximum, starting at -inf; sum: the running sum, starting at 0),
    and `log_product`, the log of the product of the potentials along the particle's ancestry (the final
    correction divides it out). Both follow a particle when it is resampled."""
    memory: torch.Tensor
    log_product: torch.Tensor

    @classmethod
    def start(cls, potential: str, shape: tuple[int, int]) -> "FKState":
        memory = torch.full(shape, -math.inf) if potential == "max" else torch.zeros(shape)
        return cls(memory, torch.zeros(shape))

    def select(self, ancestors: torch.Tensor) -> "FKState":
        return FKState(torch.gather(self.memory, 1, ancestors), torch.gather(self.log_product, 1, ancestors))


def fk_log_potentials(potential: str, rewards: torch.Tensor, state: FKState, lam: float,
                      final: bool = False) -> tuple[torch.Tensor, FKState]:
    """log G_t per particle [B, K] for the rewards r_t [B, K] of this step's predicted clean images, and the
    new state (Singhal et al. 2025, "A General Framework for Inference-time Scaling and Steering of Diffusion
    Models", and their reference code):
      difference: lam * (r_t - r_{t-1})   (r_{-1} = 0)
      max:        lam * max_{s<=t} r_s
      sum:        lam * sum_{s<=t} r_s
    With `final`, G_T = exp(lam * r_T) / (product of the earlier potentials along the ancestry), so the
    product of all of them is exp(lam * r_T): the weighted particles then target p(x0) exp(lam * r(x0)).
    (The reference code divides exp(lam * running max / running sum) there, which targets those instead.)
    A non-finite reward gives weight 0 (log G = -inf, as the reference's w[isnan(w)] = 0) and leaves the
    particle's state as it was."""
    finite = torch.isfinite(rewards)
    r = torch.where(finite, rewards, torch.zeros_like(rewards))
    if potential == "difference":
        memory = r
        log_g = lam * (r - state.memory)
    elif potential == "max":
        memory = torch.maximum(state.memory, r)
        log_g = lam * memory
    elif potential == "sum":
        memory = state.memory + r
        log_g = lam * memory
    else:
        raise RlgenError(f"--sampler-opt potential must be one of {', '.join(FK_POTENTIALS)}, got {show_value(potential)}")
    if final:
        log_g = lam * r - state.log_product
    log_g = torch.where(finite, log_g, torch.full_like(log_g, -math.inf))
    new_state = FKState(torch.where(finite, memory, state.memory),
                        torch.where(finite, state.log_product + log_g, state.log_product))
    return log_g, new_state


def add_log_potentials(log_weights: torch.Tensor, log_g: torch.Tensor) -> torch.Tensor:
    """log w += log G; a prompt whose particles all have weight 0 starts again from equal weights (the
    reference code's `if w.sum() == 0: w = ones`), so its ESS and resampling stay defined."""
    updated = log_weights + log_g
    hopeless = torch.isneginf(updated).all(dim=1, keepdim=True)
    return torch.where(hopeless, torch.zeros_like(updated), updated)


def fk_steering(engine, prompts, params, generator=None, *, rewards, records=None, particles: Annotated[int, COUNT] = 8,
                lam: float = 10.0, resample_every: Annotated[int, COUNT] = 2,
                ess_threshold: Annotated[float, PROBABILITY] = 0.5, potential: FKPotential = "difference", stats=None):
    """Feynman-Kac steering: `particles` trajectories per prompt; at every `resample_every`-th step each
    particle's weight is multiplied by its potential G_t (see fk_log_potentials: `difference`, `max` or
    `sum` of the guide's rewards r_t of the step's predicted clean images), and the particles are resampled
    when the ESS falls below ess_threshold * K. A particle whose reward is not a number gets weight 0.
    Returns the particle with the highest final reward (so the final correction of the potentials, which only
    reweights, does not change the result)."""
    if particles < 1 or resample_every < 1:
        raise RlgenError("--sampler-opt particles and resample_every must be >= 1")
    if potential not in FK_POTENTIALS:
        raise RlgenError(f"--sampler-opt potential must be one of {', '.join(FK_POTENTIALS)}, got {show_value(potential)}")
    records = _records(prompts, records)
    expanded = [r for r in records for _ in range(particles)]
    k, b = particles, len(records)
    log_weights = torch.zeros(b, k)
    state = FKState.start(potential, (b, k))
    resamples = [0]

    def steer(index, x, x0_pred):
        nonlocal log_weights, state
        last = index == params.num_steps - 1
        if last or (index + 1) % resample_every or x0_pred is None:
            return None
        with torch.no_grad():
            images = engine.decode(x0_pred)
        scores = _rewards_or_nan(rewards, [{**r, "image": images[i].cpu()} for i, r in enumerate(expanded)]).view(b, k).float()
        log_g, state = fk_log_potentials(potential, scores, state, lam)
        log_weights = add_log_potentials(log_weights, log_g)
        low = effective_sample_size(log_weights) < ess_threshold * k
        if not bool(low.any()):
            return None
        ancestors = torch.arange(k).expand(b, k).clone()
        ancestors[low] = resample_indices(log_weights[low], generator)
        flat = (ancestors + torch.arange(b).unsqueeze(1) * k).flatten()
        log_weights = torch.where(low.unsqueeze(1), torch.zeros_like(log_weights), log_weights)
        state = state.select(ancestors)
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
    register("reno", reno, "ReNO: optimise the initial noise against a differentiable guide (iterations=10, lr=1.0, "
                           "reg=0.01 on the chi-law norm penalty)")
    register("fk-steering", fk_steering, "Feynman-Kac steering: reward-resampled particles (particles=8, lam=10, "
                                         "resample_every=2, ess_threshold=0.5, potential=difference|max|sum)")
