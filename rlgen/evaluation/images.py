"""Reward statistics of an image model on a prompt set: overall and per prompt, at fixed seeds."""
from __future__ import annotations

import torch

from rlgen.diffusion.generate import expand, generate_images
from rlgen.rollout.samplers import call_sampler


def reward_statistics(samples: list[dict], rewards) -> dict:
    """Mean / std / min / max of the combined reward, each reward's mean, and the mean per prompt."""
    components, valid, total = rewards.score(samples)
    values = total[valid]
    out = {
        "images": len(samples),
        "reward_mean": float(values.mean()) if values.numel() else float("nan"),
        "reward_std": float(values.std()) if values.numel() > 1 else 0.0,
        "reward_min": float(values.min()) if values.numel() else float("nan"),
        "reward_max": float(values.max()) if values.numel() else float("nan"),
    }
    for k, name in enumerate(rewards.names):
        out[f"rewards/{name}/mean"] = float(components[:, k].nanmean())
    per_prompt: dict[str, list[float]] = {}
    for sample, value, ok in zip(samples, total.tolist(), valid.tolist()):
        if ok:
            per_prompt.setdefault(str(sample["prompt"]), []).append(value)
    out["per_prompt"] = {prompt: round(sum(v) / len(v), 6) for prompt, v in per_prompt.items()}
    return out


def evaluate_image_model(model, records: list[dict], rewards, n: int, params, seed: int = 0, batch_size: int = 64,
                         sampler=None, sampler_options: dict | None = None, guide=None) -> tuple[dict, list[dict]]:
    """(statistics, samples): n images per record from `sampler` (default plain), scored by `rewards`."""
    if sampler is None:
        samples = generate_images(model, records, n, params, seed=seed, batch_size=batch_size)
    else:
        generator = torch.Generator().manual_seed(seed)
        expanded = expand(records, n)
        samples, stats = [], {}
        for start in range(0, len(expanded), batch_size):
            part = expanded[start : start + batch_size]
            with torch.enable_grad():
                samples.extend(call_sampler(sampler, model, [str(r["prompt"]) for r in part], params, generator,
                                            rewards=guide, records=part, stats=stats, options=sampler_options))
    return reward_statistics(samples, rewards), samples
