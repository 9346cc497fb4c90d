"""rlgen-example: a template third-party rlgen plugin.

rlgen finds this module through the entry point in pyproject.toml (`[project.entry-points.rlgen]`)
and calls the functions marked `@hookimpl` below. Each hook gets a `register(name, item,
description="")` callable; call it once per item you provide. The first line of an item's
docstring is its description in `rlgen plugins` unless you pass one.
"""
from __future__ import annotations

import torch

from rlgen.hookspecs import hookimpl

__version__ = "0.1.0"


# --- a reward -------------------------------------------------------------------------------------
# Contract: fn(samples, **options) -> list[float | None], one value per sample, where each sample is
# a dict with 'prompt', 'completion' and the dataset's fields ('answer', ...). Return None where the
# reward does not apply: rlgen skips it for that sample instead of counting it as 0.


def digit_overlap(samples, **_):
    """Partial credit: fraction of the answer's characters the completion matches position by position."""
    out = []
    for sample in samples:
        if sample.get("answer") is None:
            out.append(None)  # nothing to compare against
            continue
        answer = str(sample["answer"]).strip()
        completion = str(sample["completion"]).strip()
        # Divide by the longer string so trailing junk after a right prefix costs credit and only an
        # exact match scores 1.0: '42' vs answer '42' -> 1.0, '45' -> 0.5, '42xx' -> 0.5.
        longest = max(len(answer), len(completion))
        if longest == 0:
            out.append(1.0)  # both empty
            continue
        matched = sum(a == c for a, c in zip(answer, completion))
        out.append(matched / longest)
    return out


# Rewards that say whether an answer is *right* set is_correctness = True (their mean is reported as
# `accuracy`). Partial credit is not correctness.
digit_overlap.is_correctness = False


# --- an advantage estimator -----------------------------------------------------------------------
# Contract: fn(rewards, **kwargs) -> Tensor. `rewards` is the weighted total reward shaped
# [num_groups, group_size] (one row per prompt); return advantages of the same shape. rlgen passes
# extra keyword arguments (components, weights, scale_rewards, ...): accept and ignore what you don't use.


def rank(rewards: torch.Tensor, **_) -> torch.Tensor:
    """Rank-based: each completion's centred rank within its group, in [-1, 1]; ties share their average rank."""
    group_size = rewards.shape[1]
    if group_size < 2:
        return torch.zeros_like(rewards)
    # Pairwise comparisons within each group: [num_groups, group_size (i), group_size (j)].
    below = (rewards.unsqueeze(1) < rewards.unsqueeze(2)).sum(dim=2)  # how many j have r_j < r_i
    equal = (rewards.unsqueeze(1) == rewards.unsqueeze(2)).sum(dim=2)  # how many j have r_j == r_i (i included)
    ranks = below + (equal - 1) / 2  # 0-based average rank: 0 = worst, group_size - 1 = best
    # Centre on the mean rank (group_size - 1) / 2 and scale to [-1, 1].
    return (2 * ranks - (group_size - 1)) / (group_size - 1)


# --- the hooks ------------------------------------------------------------------------------------
# Names are global across rlgen and every installed plugin: a name registered twice is an error
# naming both packages, so choose distinctive names.


@hookimpl
def register_rewards(register):
    register("digit-overlap", digit_overlap)


@hookimpl
def register_advantage_estimators(register):
    register("rank", rank)
