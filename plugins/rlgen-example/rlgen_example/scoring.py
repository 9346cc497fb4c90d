"""Scoring parts: a reward combiner, a reward shaping and a metric."""
from __future__ import annotations

import math

import torch


# --- a reward combiner (`rlgen score --combine example-max`, `reward.combine` in training) -----------
# Contract: fn(components [N, R], weights [R], **options) -> [N]. components holds one column per
# reward, NaN where that reward does not apply to the sample; combine weight * component over the
# applicable entries, and give 0 to a sample where none applies (a NaN would poison group baselines).
# Options come from the spec "NAME:key=value,...", as keyword arguments.


def maximum(components, weights):
    """Best case: the maximum of weight * reward over the rewards that apply (0 where none does)."""
    weighted = components * weights.to(components.dtype)
    applicable = ~torch.isnan(weighted)
    best = torch.where(applicable, weighted, torch.full_like(weighted, -math.inf)).amax(dim=1) \
        if weighted.shape[1] else torch.zeros(weighted.shape[0], dtype=weighted.dtype)
    return torch.where(applicable.any(dim=1), best, torch.zeros_like(best))


# --- a reward shaping (`rlgen score --shape example-affine:scale=2,shift=-1`) ------------------------
# Contract: fn(values [N], reference [N] | None, **options) -> [N]: a transform of the combined reward.
# A shaping that compares with the reward of a reference response sets needs_reference = True and
# then receives it in `reference`; this one does not, so `reference` is None.


def affine(values, reference=None, scale: float = 1.0, shift: float = 0.0):
    """scale * reward + shift (options scale=1.0, shift=0.0)."""
    return values * scale + shift


# --- a metric (rlgen.evaluation.metric_contract: `rlgen eval --metric example-well-formed`) ---------
# Contract: fn(samples: list[dict], **options) -> dict[str, float]. samples are scored JSONL records
# (prompt, completion, reward, reward_<name> ...); return named numbers (None where undefined).


def well_formed(samples, **_):
    """Fraction of completions that are a plain integer (digits, optional leading minus), and the count."""
    def is_integer(text):
        text = str(text).strip()
        return text.lstrip("-").isdigit() and text.count("-") <= 1

    count = len(samples)
    hits = sum(is_integer(sample.get("completion", "")) for sample in samples)
    return {"well_formed": hits / count if count else None, "count": float(count)}
