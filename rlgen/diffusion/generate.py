"""Prompts -> images: the batched driver over rlgen.diffusion.sampling used by `rlgen sample`, `rlgen eval`
and every trainer's rollouts and held-out evaluation."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlgen.diffusion.sampling import DiffusionSamplingParams, Trajectory, initial_noise, sample


@dataclass
class Rollout:
    """A batch of sampled images with what training needs to re-score their steps."""
    samples: list[dict]  # the records plus `image` (tensor [C,H,W] in [0,1]) and `sample_index`
    trajectory: Trajectory
    cond: torch.Tensor | None
    null: torch.Tensor | None


def expand(records: list[dict], n: int) -> list[dict]:
    return [{**record, "sample_index": i} for record in records for i in range(n)]


def rollout(model, records: list[dict], params: DiffusionSamplingParams, generator: torch.Generator | None,
            noise: torch.Tensor | None = None, **sample_options) -> Rollout:
    prompts = [str(r["prompt"]) for r in records]
    cond = model.conditioning(prompts, records)
    null = model.null_conditioning(len(records)) if params.guidance_scale != 1.0 else None
    if cond is None and noise is None:
        noise = initial_noise(model, len(records), generator)
    trajectory = sample(model, cond, null, params, generator, noise=noise, **sample_options)
    images = trajectory.images.detach().cpu()
    samples = [{**record, "image": images[i]} for i, record in enumerate(records)]
    return Rollout(samples, trajectory, cond, null)


def generate_images(model, records: list[dict], n: int, params: DiffusionSamplingParams, seed: int = 0,
                    batch_size: int = 64, progress=None) -> list[dict]:
    """n images per record, deterministic given the seed and batch size."""
    generator = torch.Generator().manual_seed(seed)
    expanded = expand(records, n)
    out: list[dict] = []
    for start in range(0, len(expanded), batch_size):
        part = expanded[start : start + batch_size]
        with torch.no_grad():
            out.extend(rollout(model, part, params, generator, keep_trajectory=False).samples)
        if progress is not None:
            progress(len(part))
    return out
