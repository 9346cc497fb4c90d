"""Advantage estimators: small pure functions with a name (the registry is filled by register_advantage_estimators).

Every estimator takes `rewards` shaped [num_groups, group_size] (the weighted total per completion) and
keyword arguments it may ignore; it returns advantages of the same shape. Estimators that need more
declare it as function attributes (`needs_greedy_baseline`).
"""
from __future__ import annotations

import torch

from rlgen.hookspecs import hookimpl

EPS = 1e-4  # TRL's epsilon in the GRPO std normalisation


def _scale(centered: torch.Tensor, rewards: torch.Tensor, scale_rewards: str) -> torch.Tensor:
    if scale_rewards == "group":
        std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(rewards[:, :1])
        return centered / (std + EPS)
    if scale_rewards == "batch":
        std = rewards.std() if rewards.numel() > 1 else torch.zeros(())
        return centered / (std + EPS)
    if scale_rewards == "none":
        return centered
    raise ValueError(f"scale_rewards must be group, batch or none, got {scale_rewards!r}")


def grpo(rewards: torch.Tensor, scale_rewards: str = "group", **_) -> torch.Tensor:
    """GRPO: reward minus the group mean, divided by the group (or batch) std; Dr. GRPO: scale 'none'."""
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    return _scale(centered, rewards, scale_rewards)


def rloo(rewards: torch.Tensor, **_) -> torch.Tensor:
    """RLOO: reward minus the mean of the other completions of the same prompt (leave-one-out)."""
    group_size = rewards.shape[1]
    if group_size < 2:
        raise ValueError("rloo needs at least 2 completions per prompt")
    others_mean = (rewards.sum(dim=1, keepdim=True) - rewards) / (group_size - 1)
    return rewards - others_mean


def remax(rewards: torch.Tensor, baseline: torch.Tensor | None = None, **_) -> torch.Tensor:
    """ReMax: reward minus the reward of the greedy completion of the same prompt."""
    if baseline is None:
        raise ValueError("remax needs the greedy-rollout rewards as baseline")
    return rewards - baseline.reshape(-1, 1)


remax.needs_greedy_baseline = True


def _whiten(values: torch.Tensor) -> torch.Tensor:
    std = values.std() if values.numel() > 1 else torch.zeros(())
    return (values - values.mean()) / (std + EPS)


def reinforce_pp(rewards: torch.Tensor, **_) -> torch.Tensor:
    """REINFORCE++: outcome reward normalised over the whole batch (global baseline and scale)."""
    return _whiten(rewards)


def reinforce_pp_baseline(rewards: torch.Tensor, **_) -> torch.Tensor:
    """REINFORCE++-baseline: subtract the group mean, then normalise over the batch."""
    return _whiten(rewards - rewards.mean(dim=1, keepdim=True))


def gdpo(
    rewards: torch.Tensor,
    components: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    scale_rewards: str = "batch",
    **_,
) -> torch.Tensor:
    """GDPO: z-score each reward within its group, then take the weighted sum (optionally batch-normalised).

    components: [num_groups, group_size, num_rewards]; NaN (reward not applicable) counts as 0 after
    normalisation.
    """
    if components is None:
        components = rewards.unsqueeze(-1)
    if weights is None:
        weights = torch.ones(components.shape[-1], dtype=components.dtype)
    normalised = []
    for k in range(components.shape[-1]):
        column = components[..., k]
        valid = ~torch.isnan(column)
        filled = torch.where(valid, column, torch.zeros_like(column))
        count = valid.sum(dim=1, keepdim=True).clamp(min=1)
        mean = filled.sum(dim=1, keepdim=True) / count
        var = (torch.where(valid, column - mean, torch.zeros_like(column)) ** 2).sum(dim=1, keepdim=True)
        std = torch.sqrt(var / (count - 1).clamp(min=1))
        z = torch.where(valid, (column - mean) / (std + EPS), torch.zeros_like(column))
        normalised.append(z * weights[k])
    combined = torch.stack(normalised, dim=-1).sum(dim=-1)
    return _whiten(combined) if scale_rewards == "batch" else combined


ESTIMATORS = {
    "grpo": grpo,
    "rloo": rloo,
    "remax": remax,
    "reinforce++": reinforce_pp,
    "reinforce++-baseline": reinforce_pp_baseline,
    "gdpo": gdpo,
}


@hookimpl
def register_advantage_estimators(register):
    for name, fn in ESTIMATORS.items():
        register(name, fn)
