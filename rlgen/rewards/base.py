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
from rlgen.rewards.combine import Combiner, Shaping


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
    if name.startswith("rm:"):  # a trained reward model directory
        from rlgen.models.reward_model import reward_model_reward

        return reward_model_reward(name[3:])
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
    """The configured rewards with weights: computes one column per reward, combines the columns into one
    value per sample (`combine`, a reward-combiner spec; default the weighted sum) and optionally shapes that
    value (`shaping`, a reward-shaping spec such as "par:ref_field=answer"; "" = none). See
    rlgen.rewards.combine for both."""

    def __init__(self, specs: list[RewardSpec], on_error: str = "raise", combine: str = "weighted-sum", shaping: str = ""):
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
        self.combiner = Combiner(combine or "weighted-sum")
        self.shaping = Shaping(shaping) if shaping and shaping.strip() else None

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
        field = "completion" if "completion" in sample or not isinstance(sample.get("image"), str) else "image"
        raise RewardError(f"reward '{spec.name}' {what} on sample {index} (prompt {prompt!r}, {field} {str(sample.get(field, ''))[:60]!r})")

    def total(self, components: torch.Tensor) -> torch.Tensor:
        """The combined reward per sample, before shaping (default: the weighted sum, where a reward that does
        not apply (NaN) contributes nothing)."""
        return self.combiner(components, self.weights)

    def score(self, samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(components [N, R], valid [N], final score [N]): the combined reward with the shaping applied.

        A shaping that needs a reference scores a copy of each sample whose completion is the sample's
        `ref_field`, combined the same way; a sample whose reference fails to score (on_error=skip) is
        invalid."""
        components, valid = self.compute(samples)
        combined = self.total(components)
        if self.shaping is None:
            return components, valid, combined
        reference = None
        if self.shaping.needs_reference:
            ref_components, ref_valid = self.compute(self._reference_samples(samples))
            reference = self.total(ref_components)
            valid = valid & ref_valid
        return components, valid, self.shaping(combined, reference, valid)

    def _reference_samples(self, samples: list[dict]) -> list[dict]:
        field_name = self.shaping.ref_field
        out = []
        for i, sample in enumerate(samples):
            value = sample.get(field_name)
            if value is None:
                raise RlgenError(
                    f"reward-shaping '{self.shaping.name}' needs the reference completion in field '{field_name}', "
                    f"but sample {i} has none (set ref_field=FIELD)"
                )
            # the reference's own text; token counts of the policy's completion do not carry over
            copy = {k: v for k, v in sample.items() if k != "completion_tokens"}
            copy["completion"] = value if isinstance(value, str) else str(value)
            out.append(copy)
        return out

    def metrics(self, components: torch.Tensor, total: torch.Tensor, valid: torch.Tensor) -> dict:
        """Per-step reward metrics of scored rollouts: `reward` (mean final score), each reward's mean and std
        over the samples it applies to, and `accuracy` (the first correctness reward's mean)."""
        metrics = {"reward": float(total[valid].mean()) if bool(valid.any()) else float("nan")}
        for k, name in enumerate(self.names):
            column = components[:, k][valid]
            column = column[~torch.isnan(column)]
            metrics[f"rewards/{name}/mean"] = float(column.mean()) if column.numel() else float("nan")
            metrics[f"rewards/{name}/std"] = float(column.std()) if column.numel() > 1 else 0.0
            if getattr(self.functions[k], "is_correctness", False) and "accuracy" not in metrics:
                metrics["accuracy"] = metrics[f"rewards/{name}/mean"]
        return metrics

    def require_differentiable(self) -> None:
        """Reward backprop and ReNO need every reward in a `.differentiable` form (image rewards: pixels -> [B])."""
        for spec, fn in zip(self.specs, self.functions):
            if getattr(fn, "differentiable", None) is None:
                raise RlgenError(f"reward '{spec.name}' is not differentiable (reward backprop and reno need rewards with a "
                                 f"`.differentiable` form, e.g. digit-classifier, brightness, contrast, aesthetic)")

    def differentiable_total(self, images: torch.Tensor, samples: list[dict]) -> torch.Tensor:
        """Weighted sum of the rewards' differentiable forms, [B] with the graph to the pixels."""
        total = torch.zeros(images.shape[0], dtype=images.dtype, device=images.device)
        for spec, fn in zip(self.specs, self.functions):
            total = total + spec.weight * fn.differentiable(images, samples, **spec.options)
        return total

    def state(self) -> dict:
        """JSON-safe state to keep across a resumed run (the shaping's frozen statistics)."""
        return self.shaping.state() if self.shaping is not None else {}

    def restore(self, state: dict) -> None:
        if self.shaping is not None and state:
            self.shaping.restore(state)
