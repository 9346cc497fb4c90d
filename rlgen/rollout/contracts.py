"""Contract of the sampler hooks (`rlgen sample --sampler NAME`, text and image models).

Typed form: the first parameter is annotated `SampleRequest`, options follow as keyword arguments, and a
sampler that needs a guide reward declares it:

    @declare(needs_guide=True)
    def best_of_two(request: SampleRequest, temperature_boost: float = 0.0) -> Rollouts: ...

Old form (every built-in): `fn(engine, prompts, params, generator=None, *, rewards, records, stats, **options)`,
where `rewards`, `records` and `stats` are passed only when named, and a `rewards` parameter without a default
means the sampler needs a guide. `call_sampler` / `check_sampler` (rlgen.rollout.samplers) handle both.
A text sampler returns Rollouts with one row per prompt; an image sampler one sample dict per prompt.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from rlgen.extension import Capabilities, capabilities, takes

SAMPLER_DEFAULTS = Capabilities()
RESERVED = ("rewards", "records", "stats")  # given by the caller, never as --sampler-opt
POSITIONAL = ("engine", "prompts", "params", "generator")


@dataclass
class SampleRequest:
    engine: Any  # the rollout engine (text) or the DiffusionModel (images)
    prompts: list[str]
    params: Any  # SamplingParams (text) or DiffusionSamplingParams (images)
    generator: torch.Generator | None = None
    rewards: Any = None  # the guide, a RewardSet (None without --sampler-reward)
    records: list[dict] | None = None  # the input records aligned with `prompts`
    stats: dict | None = None  # diagnostics the sampler may add to (counts; summed over batches)


class Sampler(Protocol):
    def __call__(self, request: SampleRequest, **options: Any) -> Any: ...


def sampler_capabilities(fn: Callable) -> Capabilities:
    """Declared capabilities; an old-style sampler needs a guide when its `rewards` parameter has no default."""
    if takes(fn, SampleRequest):
        return capabilities(fn, SAMPLER_DEFAULTS)
    try:
        guide = inspect.signature(fn).parameters.get("rewards")
    except (TypeError, ValueError):
        guide = None
    needs = guide is not None and guide.default is inspect.Parameter.empty
    return capabilities(fn, Capabilities(needs_guide=needs))


def option_skip(fn: Callable) -> int | tuple[str, ...]:
    """The parameters that are inputs rather than options."""
    return 1 if takes(fn, SampleRequest) else POSITIONAL
