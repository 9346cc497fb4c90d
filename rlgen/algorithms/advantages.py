"""Advantage estimators: small pure functions with a name (the registry is filled by register_advantage_estimators).

Every built-in estimator takes `rewards` shaped [num_groups, group_size] (the weighted total per completion)
and keyword arguments it may ignore; it returns advantages of the same shape. This is the old-style form of
the advantage-estimator contract (rlgen.algorithms.contracts: AdvantageInput -> AdvantageOutput, which may
also give per-token advantages); trainers call both forms through `estimate_advantages`. An estimator that
needs more declares it (`@declare(needs_greedy_baseline=True)`, read with rlgen.extension.capabilities).

`mask` (bool, same shape; default all True) marks the completions that count: GRPO passes False for a
completion whose every reward is None (TRL's "not applicable") or that was skipped after a reward error.
The built-in estimators leave those out of every mean and std and give them advantage exactly 0; the
trainer zeroes them for plug-in estimators that ignore `mask`.
"""
from __future__ import annotations

import torch

from rlgen.extension import declare
from rlgen.hookspecs import hookimpl

EPS = 1e-4  # TRL's epsilon in the GRPO std normalisation


def _full_mask(rewards: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask.reshape(rewards.shape).bool()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over the entries in `mask` (0 where there are none); keeps `dim` for broadcasting."""
    filled = torch.where(mask, values, torch.zeros_like(values))
    if dim is None:
        return filled.sum() / mask.sum().clamp(min=1)
    return filled.sum(dim=dim, keepdim=True) / mask.sum(dim=dim, keepdim=True).clamp(min=1)


def _masked_std(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Unbiased std (as torch.std) over the entries in `mask`; 0 where fewer than two entries."""
    mean = _masked_mean(values, mask, dim)
    squares = torch.where(mask, values - mean, torch.zeros_like(values)) ** 2
    count = mask.sum() if dim is None else mask.sum(dim=dim, keepdim=True)
    total = squares.sum() if dim is None else squares.sum(dim=dim, keepdim=True)
    return torch.where(count > 1, torch.sqrt(total / (count - 1).clamp(min=1)), torch.zeros_like(total))


def _scale(centered: torch.Tensor, rewards: torch.Tensor, scale_rewards: str, mask: torch.Tensor) -> torch.Tensor:
    if scale_rewards == "group":
        return centered / (_masked_std(rewards, mask, dim=1) + EPS)
    if scale_rewards == "batch":
        return centered / (_masked_std(rewards, mask) + EPS)
    if scale_rewards == "none":
        return centered
    raise ValueError(f"scale_rewards must be group, batch or none, got {scale_rewards!r}")


def _only(mask: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """Advantage exactly 0 outside `mask` (completions without any reward, skipped samples)."""
    return torch.where(mask, advantages, torch.zeros_like(advantages))


def grpo(rewards: torch.Tensor, scale_rewards: str = "group", mask: torch.Tensor | None = None, **_) -> torch.Tensor:
    """GRPO: reward minus the group mean, divided by the group (or batch) std; Dr. GRPO: scale 'none'.

    `mask` [num_groups, group_size] (default all True): the completions that count; the others (every
    reward None, or skipped) get advantage 0 and are left out of the mean and std."""
    mask = _full_mask(rewards, mask)
    centered = rewards - _masked_mean(rewards, mask, dim=1)
    return _only(mask, _scale(centered, rewards, scale_rewards, mask))


def rloo(rewards: torch.Tensor, mask: torch.Tensor | None = None, **_) -> torch.Tensor:
    """RLOO: reward minus the mean of the other completions of the same prompt (leave-one-out); with a
    `mask`, of the other counted completions (a completion without another one counted gets 0)."""
    group_size = rewards.shape[1]
    if group_size < 2:
        raise ValueError("rloo needs at least 2 completions per prompt")
    mask = _full_mask(rewards, mask)
    filled = torch.where(mask, rewards, torch.zeros_like(rewards))
    others = mask.sum(dim=1, keepdim=True) - 1
    others_mean = (filled.sum(dim=1, keepdim=True) - filled) / others.clamp(min=1)
    return _only(mask & (others > 0), rewards - others_mean)


@declare(needs_greedy_baseline=True)
def remax(rewards: torch.Tensor, baseline: torch.Tensor | None = None, mask: torch.Tensor | None = None, **_) -> torch.Tensor:
    """ReMax: reward minus the reward of the greedy completion of the same prompt (a NaN baseline, i.e. a
    greedy completion without any reward, gives the group advantage 0)."""
    if baseline is None:
        raise ValueError("remax needs the greedy-rollout rewards as baseline")
    baseline = baseline.reshape(-1, 1)
    mask = _full_mask(rewards, mask) & ~torch.isnan(baseline)
    return _only(mask, rewards - baseline)



def _whiten(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    mask = _full_mask(values, mask)
    return _only(mask, (values - _masked_mean(values, mask)) / (_masked_std(values, mask) + EPS))


def reinforce_pp(rewards: torch.Tensor, mask: torch.Tensor | None = None, **_) -> torch.Tensor:
    """REINFORCE++: outcome reward normalised over the whole batch (global baseline and scale)."""
    return _whiten(rewards, mask)


def reinforce_pp_baseline(rewards: torch.Tensor, mask: torch.Tensor | None = None, **_) -> torch.Tensor:
    """REINFORCE++-baseline: subtract the group mean, then normalise over the batch."""
    mask = _full_mask(rewards, mask)
    return _whiten(rewards - _masked_mean(rewards, mask, dim=1), mask)


def gdpo(
    rewards: torch.Tensor,
    components: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    scale_rewards: str = "batch",
    mask: torch.Tensor | None = None,
    **_,
) -> torch.Tensor:
    """GDPO: z-score each reward within its group, then take the weighted sum (optionally batch-normalised).

    components: [num_groups, group_size, num_rewards]; NaN (reward not applicable) counts as 0 after
    normalisation. Completions outside `mask` count in no statistic and get 0.
    """
    mask = _full_mask(rewards, mask)
    if components is None:
        components = rewards.unsqueeze(-1)
    if weights is None:
        weights = torch.ones(components.shape[-1], dtype=components.dtype, device=components.device)
    normalised = []
    for k in range(components.shape[-1]):
        column = components[..., k]
        valid = ~torch.isnan(column) & mask
        filled = torch.where(valid, column, torch.zeros_like(column))
        count = valid.sum(dim=1, keepdim=True).clamp(min=1)
        mean = filled.sum(dim=1, keepdim=True) / count
        var = (torch.where(valid, column - mean, torch.zeros_like(column)) ** 2).sum(dim=1, keepdim=True)
        std = torch.sqrt(var / (count - 1).clamp(min=1))
        z = torch.where(valid, (column - mean) / (std + EPS), torch.zeros_like(column))
        normalised.append(z * weights[k])
    combined = torch.stack(normalised, dim=-1).sum(dim=-1)
    return _whiten(combined, mask) if scale_rewards == "batch" else _only(mask, combined)


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
