"""Rewards: batched callables, samples in, one float or None (not applicable) per sample out.

A reward function is `fn(samples: list[dict], **options) -> list[float | None]`, where each sample has
`prompt`, `completion` and the dataset's other fields (`answer` ...). TRL-style functions
`fn(prompts, completions, **columns)` are accepted too, so existing reward code carries over.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from rlgen.errors import RewardError, RlgenError


@dataclass
class RewardSpec:
    name: str
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> "RewardSpec":
        """'exact-match', 'format:0.2', 'my.module:fn', 'my.module:fn:0.5'."""
        head, sep, tail = text.rpartition(":")
        if sep:
            try:
                weight = float(tail)
            except ValueError:
                weight = None
            if weight is not None and math.isfinite(weight):
                return cls(head, weight)
        return cls(text)


def _is_trl_style(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "completions" in params


def resolve_reward(name: str) -> Callable:
    from rlgen.plugins import load_dotted, registry

    rewards = registry("reward")
    if name in rewards:
        return rewards.get(name)
    if ":" in name:
        fn = load_dotted(name)
        if not callable(fn):
            raise RlgenError(f"reward '{name}' is not callable")
        return fn
    rewards.get(name)  # raises 'unknown reward' with the known names
    raise AssertionError  # pragma: no cover


def call_reward(fn: Callable, samples: list[dict], options: dict) -> list:
    if _is_trl_style(fn):
        columns = {k: [s.get(k) for s in samples] for k in samples[0] if k not in ("prompt", "completion")}
        return list(fn(prompts=[s["prompt"] for s in samples], completions=[s["completion"] for s in samples], **columns, **options))
    return list(fn(samples, **options))


class RewardSet:
    """The configured rewards with weights: computes one column per reward and the weighted total."""

    def __init__(self, specs: list[RewardSpec], on_error: str = "raise"):
        if not specs:
            raise RlgenError("no reward given (use --reward NAME)")
        if on_error not in ("raise", "skip"):
            raise RlgenError(f"config key 'rewards_on_error' must be 'raise' or 'skip', got {on_error!r}")
        self.specs = specs
        self.on_error = on_error
        self.functions = [resolve_reward(spec.name) for spec in specs]
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise RlgenError(f"reward listed twice: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.specs]

    @property
    def weights(self) -> torch.Tensor:
        return torch.tensor([spec.weight for spec in self.specs], dtype=torch.float32)

    def compute(self, samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """(components [N, R] with NaN where not applicable, valid [N] bool: False for skipped samples)."""
        n = len(samples)
        columns = []
        valid = torch.ones(n, dtype=torch.bool)
        for spec, fn in zip(self.specs, self.functions):
            values = self._column(spec, fn, samples, valid)
            columns.append(values)
        components = torch.stack(columns, dim=1) if columns else torch.zeros((n, 0))
        return components, valid

    def _column(self, spec: RewardSpec, fn: Callable, samples: list[dict], valid: torch.Tensor) -> torch.Tensor:
        try:
            values = call_reward(fn, samples, spec.options)
            if len(values) != len(samples):
                raise RewardError(f"reward '{spec.name}' returned {len(values)} values for {len(samples)} samples")
        except RewardError:
            raise
        except Exception:
            values = [self._one(spec, fn, s, i, valid) for i, s in enumerate(samples)]
        out = torch.empty(len(samples), dtype=torch.float32)
        for i, value in enumerate(values):
            if value is None:
                out[i] = float("nan")
                continue
            try:
                value = float(value)
            except (TypeError, ValueError):
                self._fail(spec, samples[i], i, valid, f"returned a non-number ({type(value).__name__})")
                out[i] = float("nan")
                continue
            if not math.isfinite(value):
                self._fail(spec, samples[i], i, valid, "returned a non-finite value")
                value = float("nan")
            out[i] = value
        return out

    def _one(self, spec, fn, sample, index, valid):
        try:
            return call_reward(fn, [sample], spec.options)[0]
        except Exception as exc:  # noqa: BLE001 - any failure of user code is reported the same way
            self._fail(spec, sample, index, valid, f"raised {type(exc).__name__}: {exc}")
            return None

    def _fail(self, spec, sample, index, valid, what):
        if self.on_error == "skip":
            valid[index] = False
            return
        prompt = str(sample.get("prompt", ""))[:60]
        raise RewardError(f"reward '{spec.name}' {what} on sample {index} (prompt {prompt!r}, completion {str(sample.get('completion', ''))[:60]!r})")

    def total(self, components: torch.Tensor) -> torch.Tensor:
        """Weighted sum over rewards; a reward that does not apply (NaN) contributes nothing."""
        return torch.nansum(components * self.weights, dim=1)
