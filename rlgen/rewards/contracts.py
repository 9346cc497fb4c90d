"""Contracts of the reward hooks: rewards' declared capabilities, reward combiners, reward shapings.

Combiners and shapings come in two forms. The typed form annotates its first parameter with the input
dataclass and takes its options as keyword arguments:

    def trimmed(batch: CombineInput, cut: float = 0.1) -> CombineOutput: ...

The old form, `fn(components, weights, **options) -> [N]` / `fn(values, reference, **options) -> [N]`, keeps
working; `combine` and `shape` call either. Options are checked by rlgen.extension.check_options (keywords
after the input). A shaping declares `@declare(needs_reference=True)` when it compares with the reward of a
reference response; it may carry `estimate(values) -> dict` (statistics to freeze from the first batch) and
`check_options(options)` (rules across options).

Rewards declare `@declare(is_correctness=True, required_fields=("answer",))` (read with
`capabilities(fn, REWARD_DEFAULTS)`); old attributes (`fn.is_correctness = True`) are read the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from rlgen.errors import RlgenError
from rlgen.extension import Capabilities, takes

REWARD_DEFAULTS = Capabilities()
REWARD_SHAPING_DEFAULTS = Capabilities()


@dataclass
class CombineInput:
    components: torch.Tensor  # [N, R] each reward's value (NaN: does not apply to that sample)
    weights: torch.Tensor  # [R]


@dataclass
class CombineOutput:
    values: torch.Tensor  # [N] one combined reward per sample (0 where no reward applies)


class RewardCombiner(Protocol):
    def __call__(self, batch: CombineInput, **options: Any) -> CombineOutput: ...


@dataclass
class ShapingInput:
    values: torch.Tensor  # [N] the combined reward
    reference: torch.Tensor | None = None  # [N] the combined reward of each sample's reference response
    valid: torch.Tensor | None = None  # [N] bool: samples not skipped after a reward error


@dataclass
class ShapingOutput:
    values: torch.Tensor  # [N]


class RewardShaping(Protocol):
    def __call__(self, batch: ShapingInput, **options: Any) -> ShapingOutput: ...


def option_skip(fn: Callable, input_type: type) -> int:
    """How many leading parameters are inputs, not options: one for the typed form, two for the old one."""
    return 1 if takes(fn, input_type) else 2


def combine(fn: Callable, batch: CombineInput, options: dict, name: str = "") -> torch.Tensor:
    """[N] from a combiner of either form."""
    if takes(fn, CombineInput):
        out = fn(batch, **options)
        if not isinstance(out, CombineOutput):
            raise RlgenError(f"reward-combiner '{name}' returned {type(out).__name__}, not a CombineOutput")
        return out.values
    return fn(batch.components, batch.weights, **options)


def shape(fn: Callable, batch: ShapingInput, options: dict, name: str = "") -> torch.Tensor:
    """[N] from a shaping of either form."""
    if takes(fn, ShapingInput):
        out = fn(batch, **options)
        if not isinstance(out, ShapingOutput):
            raise RlgenError(f"reward-shaping '{name}' returned {type(out).__name__}, not a ShapingOutput")
        return out.values
    return fn(batch.values, batch.reference, **options)
