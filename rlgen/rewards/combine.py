"""Reward combiners and reward shapings: small pure functions with a name, plus the spec objects that
RewardSet holds (`Combiner`, `Shaping`).

Combiners turn the reward columns into one value per sample:
`fn(components [N, R], weights [R], **options) -> [N]`. NaN in `components` means "this reward does not
apply to this sample"; every built-in combiner works on the applicable entries of weight * component only,
and a sample for which no reward applies gets 0 under every combiner (weighted-sum's nansum has always given
0 there; a NaN total would poison the group baselines of the advantage estimators).

Shapings transform the combined value: `fn(values [N], reference [N] | None, **options) -> [N]`. A shaping
that needs the combined reward of a reference response to the same prompt declares it
(`@declare(needs_reference=True)`); RewardSet then scores a copy of each sample whose `completion` is the sample's
`ref_field` (an option every such shaping accepts; default "reference") and combines it the same way.

A shaping may freeze statistics from the first batch it sees: it names an `estimate(values) -> dict`
attribute returning the options to freeze when the user did not give them (ref-normalize: mean and std).
The `Shaping` object keeps the frozen values (`state()` / `restore()`, saved in training checkpoints), so the
functions themselves stay pure.

These are the old-style forms of the contracts in rlgen.rewards.contracts (CombineInput -> CombineOutput,
ShapingInput -> ShapingOutput); `Combiner` and `Shaping` call either form and check the options with
rlgen.extension.check_options.

Specs are strings "NAME" or "NAME:key=value,key=value"; values are TOML scalars (`k=0.5`,
`ref_field=answer`). A string value cannot contain a comma.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from rlgen.config import parse_value
from rlgen.errors import RlgenError
from rlgen.extension import capabilities, check_options, declare
from rlgen.hookspecs import hookimpl
from rlgen.plugins import registry
from rlgen.rewards.contracts import (REWARD_SHAPING_DEFAULTS, CombineInput, ShapingInput, combine, option_skip,
                                     shape)


# --- combiners ---------------------------------------------------------------------------------------

def _weighted(components: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight * component [N, R], applicable mask [N, R], number of applicable rewards [N])."""
    weighted = components * weights.to(components.dtype)
    mask = ~torch.isnan(weighted)
    return weighted, mask, mask.sum(dim=1)


def _masked_mean(weighted: torch.Tensor, mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    filled = torch.where(mask, weighted, torch.zeros_like(weighted))
    return filled.sum(dim=1) / count.clamp(min=1).to(weighted.dtype)


def weighted_sum(components: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum of weight * reward over the rewards that apply (the default)."""
    return torch.nansum(components * weights.to(components.dtype), dim=1)


def minimum(components: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Worst case: the minimum of weight * reward over the rewards that apply (WCO)."""
    weighted, mask, count = _weighted(components, weights)
    worst = torch.where(mask, weighted, torch.full_like(weighted, math.inf)).amin(dim=1) if weighted.shape[1] else torch.zeros(weighted.shape[0], dtype=weighted.dtype)
    return torch.where(count > 0, worst, torch.zeros_like(worst))


def mean(components: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Ensemble mean of weight * reward over the rewards that apply."""
    weighted, mask, count = _weighted(components, weights)
    return _masked_mean(weighted, mask, count)


def mean_minus_std(components: torch.Tensor, weights: torch.Tensor, k: float = 1.0) -> torch.Tensor:
    """Conservative ensemble: mean - k * std (population) of weight * reward over the rewards that apply."""
    weighted, mask, count = _weighted(components, weights)
    avg = _masked_mean(weighted, mask, count)
    deviation = torch.where(mask, weighted - avg.unsqueeze(1), torch.zeros_like(weighted))
    std = torch.sqrt((deviation**2).sum(dim=1) / count.clamp(min=1).to(weighted.dtype))
    return avg - k * std


COMBINERS = {
    "weighted-sum": (weighted_sum, "Sum of weight * reward over the rewards that apply (the default)."),
    "min": (minimum, "Worst case over the rewards (WCO): min of weight * reward over those that apply."),
    "mean": (mean, "Ensemble mean of weight * reward over the rewards that apply."),
    "mean-minus-std": (
        mean_minus_std,
        "Conservative ensemble (Coste et al.): mean - k * population std of weight * reward; option k=1.0.",
    ),
}


# --- shapings ----------------------------------------------------------------------------------------

@declare(needs_reference=True)
def par(values: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Preference As Reward (Fu et al. 2025): sigmoid(reward - reward of the reference response)."""
    return torch.sigmoid(values - reference)



@declare(needs_reference=True)
def center(values: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """reward - reward of the reference response (no squashing)."""
    return values - reference



def clip(values: torch.Tensor, reference: torch.Tensor | None = None, low: float | None = None, high: float | None = None) -> torch.Tensor:
    """Clamp the reward to [low, high] (either bound may be left out)."""
    return values.clamp(min=low, max=high)


def _check_clip(options: dict) -> None:
    low, high = options.get("low"), options.get("high")
    if low is None and high is None:
        raise RlgenError("reward-shaping 'clip' needs low=... and/or high=...")
    if low is not None and high is not None and low > high:
        raise RlgenError(f"reward-shaping 'clip': low={low} is above high={high}")


clip.check_options = _check_clip


def ref_normalize(values: torch.Tensor, reference: torch.Tensor | None = None, mean: float | None = None,
                  std: float | None = None, eps: float = 1e-6) -> torch.Tensor:
    """(reward - mean) / (std + eps) with frozen statistics (given, or taken from the first batch)."""
    if mean is None or std is None:
        raise RlgenError("reward-shaping 'ref-normalize' needs mean= and std= (or a first batch to estimate them)")
    return (values - mean) / (std + eps)


def _estimate_mean_std(values: torch.Tensor) -> dict:
    """Mean and population std of the first batch; a batch without spread (std 0) freezes std = 1, i.e.
    centring only, since dividing by eps would blow every later reward up."""
    values = values.double()
    std = float(values.std(unbiased=False)) if values.numel() > 1 else 0.0
    return {"mean": float(values.mean()), "std": std if std > 0 and math.isfinite(std) else 1.0}


def _check_ref_normalize(options: dict) -> None:
    if options.get("std") is not None and options["std"] <= 0:
        raise RlgenError(f"reward-shaping 'ref-normalize': std must be > 0, got {options['std']}")
    if options.get("eps", 1e-6) < 0:
        raise RlgenError(f"reward-shaping 'ref-normalize': eps must be >= 0, got {options['eps']}")


ref_normalize.estimate = _estimate_mean_std
ref_normalize.check_options = _check_ref_normalize

SHAPINGS = {
    "par": (
        par,
        "Preference As Reward (Fu et al. 2025): sigmoid(reward - reward of the reference response in the "
        "sample field ref_field, default 'reference').",
    ),
    "center": (center, "reward - reward of the reference response in the sample field ref_field (default 'reference')."),
    "clip": (clip, "Clamp the reward to [low, high]; options low=, high= (either may be left out)."),
    "ref-normalize": (
        ref_normalize,
        "(reward - mean) / (std + eps) with frozen stats: options mean=, std=, or taken from the first batch "
        "(in training the initial policy's; in `rlgen score` the whole input) and kept on resume; eps=1e-6.",
    ),
}


@hookimpl
def register_reward_combiners(register):
    for name, (fn, description) in COMBINERS.items():
        register(name, fn, description)


@hookimpl
def register_reward_shapings(register):
    for name, (fn, description) in SHAPINGS.items():
        register(name, fn, description)


# --- specs ---------------------------------------------------------------------------------------------

def parse_spec(text: str) -> tuple[str, dict[str, Any]]:
    """'NAME' or 'NAME:key=value,key=value' -> (NAME, {key: TOML value})."""
    name, sep, rest = text.strip().partition(":")
    name = name.strip()
    if not name:
        raise RlgenError(f"empty name in '{text}' (expected NAME or NAME:key=value,...)")
    options: dict[str, Any] = {}
    if sep:
        for part in rest.split(","):
            if not part.strip():
                continue
            key, eq, value = part.partition("=")
            key = key.strip()
            if not eq or not key:
                raise RlgenError(f"'{part.strip()}' in '{text}' is not key=value (expected NAME:key=value,key=value)")
            if key in options:
                raise RlgenError(f"option '{key}' given twice in '{text}'")
            options[key] = parse_value(value.strip())
    return name, options


class Combiner:
    """A parsed combiner spec: `combiner(components, weights) -> [N]`."""

    kind = "reward-combiner"

    def __init__(self, spec: str = "weighted-sum"):
        self.spec = spec.strip() or "weighted-sum"
        self.name, self.options = parse_spec(self.spec)
        self.fn = registry(self.kind).get(self.name)
        check_options(self.kind, self.name, self.fn, self.options, skip=option_skip(self.fn, CombineInput))

    def __call__(self, components: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return combine(self.fn, CombineInput(components, weights), self.options, self.name)


class Shaping:
    """A parsed shaping spec with its frozen statistics: `shaping(values, reference, valid) -> [N]`."""

    kind = "reward-shaping"

    def __init__(self, spec: str):
        self.spec = spec.strip()
        self.name, options = parse_spec(self.spec)
        self.fn = registry(self.kind).get(self.name)
        self.needs_reference = capabilities(self.fn, REWARD_SHAPING_DEFAULTS).needs_reference
        extra = ("ref_field",) if self.needs_reference else ()
        check_options(self.kind, self.name, self.fn, options, skip=option_skip(self.fn, ShapingInput), extra=extra)
        self.ref_field = str(options.pop("ref_field", "reference"))
        self.options = options
        self.estimate = getattr(self.fn, "estimate", None)
        self.frozen: dict[str, Any] | None = None  # estimated from the first batch (None: not yet)

    def __call__(self, values: torch.Tensor, reference: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
        if self.needs_reference and reference is None:
            raise RlgenError(f"reward-shaping '{self.name}' needs the reference rewards (field '{self.ref_field}')")
        options = dict(self.options)
        if self.estimate is not None:
            if self.frozen is None:
                seen = values if valid is None else values[valid]
                if seen.numel() == 0:
                    return values  # nothing valid to learn from (and nothing valid to shape): wait for a batch
                self.frozen = {k: v for k, v in self.estimate(seen).items() if options.get(k) is None}
            options.update(self.frozen)
        return shape(self.fn, ShapingInput(values, reference, valid), options, self.name)

    def state(self) -> dict:
        """JSON-safe frozen statistics (empty until the first batch, or when nothing is estimated)."""
        return {"name": self.name, "frozen": dict(self.frozen)} if self.frozen is not None else {}

    def restore(self, state: dict) -> None:
        if state and state.get("name") == self.name and state.get("frozen") is not None:
            self.frozen = dict(state["frozen"])
