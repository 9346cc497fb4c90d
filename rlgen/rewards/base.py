"""Rewards: batched callables, samples in, one float or None (not applicable) per sample out.

A reward function is `fn(samples: list[dict], **options) -> list[float | None]`, where each sample has
`prompt`, `completion` and the dataset's other fields (`answer` ...). TRL-style functions
`fn(prompts, completions, **columns)` are accepted too, so existing reward code carries over. The return
value must hold exactly one entry per sample (a list, tuple, iterator, 1-D numpy array or torch tensor);
each entry is a real number (bool counts as 0 / 1) or None. Anything else is a RewardError naming the
reward (see `reward_values`, `reward_number`).

`module:function` rewards import (i.e. run) the user's module, found in the current directory first during
that import only (rlgen.plugins.load_dotted). A reward may declare `required_fields` (exact-match: `answer`;
`@declare(required_fields=(...))`, or the old attribute; rlgen.rewards.contracts);
training checks them against the data before the model loads (`RewardSet.check_fields`).
"""
from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from rlgen.errors import RewardError, RlgenError, show_value
from rlgen.extension import capabilities, check_options
from rlgen.models.reward_model import reward_model_reward
from rlgen.plugins import load_dotted, registry
from rlgen.rewards.combine import Combiner, Shaping
from rlgen.rewards.contracts import REWARD_DEFAULTS


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
            if weight is not None:  # 'length:nan', 'length:1e999': a weight, but not a usable one
                raise RlgenError(f"reward {show_value(text)}: weight {show_value(tail)} is not a finite number "
                                 f"(a function named like it: give a weight too, '{text}:1')")
        return cls(text)


_SCORING_DEVICE: ContextVar[torch.device] = ContextVar("rlgen_scoring_device", default=torch.device("cpu"))


@contextmanager
def scoring_device(device):
    """Inside this block the rewards that run a model (rm:PATH, the image classifiers) run it on `device`
    (`rlgen score --device`); elsewhere on the CPU, where the trainers score their samples."""
    token = _SCORING_DEVICE.set(torch.device(device))
    try:
        yield
    finally:
        _SCORING_DEVICE.reset(token)


def current_scoring_device() -> torch.device:
    return _SCORING_DEVICE.get()


class _ModelOnScoringDevice:
    """A reward model reward (rm:PATH; one loaded copy per path) that moves its model to the scoring device
    when it is called; its other attributes (description, is_correctness ...) are the reward's own."""

    def __init__(self, reward):
        self.reward = reward

    def __getattr__(self, name):
        return getattr(self.reward, name)

    def __call__(self, samples: list[dict], **options) -> list:
        self.reward.model.to(current_scoring_device())
        return self.reward(samples, **options)


def _is_trl_style(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "completions" in params


def resolve_reward(name: str) -> Callable:
    rewards = registry("reward")
    if name in rewards:
        return rewards.get(name)
    if name.startswith("rm:"):  # a trained reward model directory
        return _ModelOnScoringDevice(reward_model_reward(name[3:]))
    if ":" in name:
        fn = load_dotted(name)
        if not callable(fn):
            raise RlgenError(f"reward '{name}' is not callable")
        return fn
    rewards.get(name)  # raises 'unknown reward' with the known names
    raise AssertionError  # pragma: no cover


def call_reward(fn: Callable, samples: list[dict], options: dict, name: str = "") -> list:
    """The reward's values for `samples`, checked by `reward_values` (one number or None per sample)."""
    if _is_trl_style(fn):
        columns = {k: [s.get(k) for s in samples] for k in samples[0] if k not in ("prompt", "completion")}
        returned = fn(prompts=[s["prompt"] for s in samples], completions=[s["completion"] for s in samples], **columns, **options)
    else:
        returned = fn(samples, **options)
    return reward_values(name or getattr(fn, "__name__", repr(fn)), returned, len(samples))


def _one_line(text: str, limit: int = 200) -> str:
    """User text (an exception's message) on one line, cut to `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else f"{text[:limit]}..."


def _describe(value: Any) -> str:
    """A one-line description of a returned value for an error message (array reprs span lines)."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return f"a {type(value).__name__} of shape {tuple(value.shape)}"
    return f"{show_value(value)} ({type(value).__name__})"


def reward_values(name: str, returned: Any, count: int) -> list:
    """A reward's return value as a list of `count` entries, or a one-line RewardError.

    Accepted: a list or tuple (or an iterator, as TRL accepts), a 1-D numpy array or torch tensor. A str,
    bytes, dict, set or scalar is refused: iterating it would silently give characters or keys. The entries
    themselves are checked per sample by `reward_number` (so rewards_on_error=skip applies to them)."""
    if isinstance(returned, (torch.Tensor, np.ndarray)):
        if returned.ndim != 1:
            raise RewardError(f"reward '{name}' returned {_describe(returned)}; expected one value per sample ({count})")
        values = returned.tolist()
    elif isinstance(returned, (list, tuple, Iterator)):
        values = list(returned)
    else:
        raise RewardError(f"reward '{name}' returned {_describe(returned)}; expected a list of {count} numbers or None, "
                          f"one per sample")
    if len(values) != count:
        raise RewardError(f"reward '{name}' returned {len(values)} values for {count} samples")
    return values


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def reward_number(value: Any) -> float | None:
    """One returned entry as a float (NaN/inf kept for the caller to report), None for "does not apply";
    TypeError for anything else. int, float, bool (True = 1.0, as torch.tensor converts it in TRL) and numpy
    / torch scalars are numbers; strings are not, even "1.5"."""
    if value is None:
        return None
    is_scalar_tensor = isinstance(value, torch.Tensor) and value.ndim == 0 and not value.dtype.is_complex
    is_scalar_array = isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "biuf"
    if not (is_scalar_tensor or is_scalar_array or isinstance(value, (numbers.Real, np.bool_))):
        raise TypeError(type(value).__name__)
    try:
        return float(value)
    except OverflowError:  # an int beyond float's range: reported as non-finite
        return math.inf


class RewardSet:
    """The configured rewards with weights: computes one column per reward, combines the columns into one
    value per sample (`combine`, a reward-combiner spec; default the weighted sum) and optionally shapes that
    value (`shaping`, a reward-shaping spec such as "par:ref_field=answer"; "" = none). See
    rlgen.rewards.combine for both."""

    dtype = torch.float32

    def __init__(self, specs: list[RewardSpec], on_error: str = "raise", combine: str = "weighted-sum", shaping: str = "",
                 dtype: torch.dtype = torch.float32):
        # float32 for training; `rlgen score` computes in float64, so that written rewards are the reward
        # functions' own values (-0.2, not -0.20000000298)
        self.dtype = dtype
        if not specs:
            raise RlgenError("no reward given (use --reward NAME)")
        if on_error not in ("raise", "skip"):
            raise RlgenError(f"config key 'rewards_on_error' must be 'raise' or 'skip', got {on_error!r}")
        self.specs = specs
        self.on_error = on_error
        self.functions = [resolve_reward(spec.name) for spec in specs]
        for spec, fn in zip(specs, self.functions):  # a misspelt option fails here, not silently at every step
            inputs = ("prompts", "completions") if _is_trl_style(fn) else 1
            check_options("reward", spec.name, fn, spec.options, skip=inputs)
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise RlgenError(f"reward listed twice: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
        self.combiner = Combiner(combine or "weighted-sum")
        self.shaping = Shaping(shaping) if shaping and shaping.strip() else None

    def check_fields(self, records: list[dict], source: str) -> None:
        """Fail before training when the data cannot feed the rewards: a reward declaring
        `required_fields` (exact-match: `answer`) needs each field in at least one record (records without
        it are "not applicable"; with none the reward would be None throughout and GRPO would learn
        nothing), and a shaping that needs a reference needs its `ref_field` in every record."""
        for spec, fn in zip(self.specs, self.functions):
            for name in capabilities(fn, REWARD_DEFAULTS).required_fields:
                if not any(record.get(name) is not None for record in records):
                    fields = show_value(sorted({str(key) for record in records[:100] for key in record if key != "_line"}))
                    raise RlgenError(f"reward '{spec.name}' needs the field '{name}', but no record of {source} has "
                                     f"one (its fields: {fields})")
        if self.shaping is not None and self.shaping.needs_reference:
            name = self.shaping.ref_field
            for index, record in enumerate(records):
                if record.get(name) is None:
                    raise RlgenError(f"reward-shaping '{self.shaping.name}' needs the field '{name}' in every record, "
                                     f"but record {index + 1} of {source} has none (set ref_field=FIELD)")

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.specs]

    @property
    def weights(self) -> torch.Tensor:
        return torch.tensor([spec.weight for spec in self.specs], dtype=self.dtype)

    def compute(self, samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """(components [N, R] with NaN where not applicable, valid [N] bool: False for skipped samples)."""
        n = len(samples)
        columns = []
        valid = torch.ones(n, dtype=torch.bool)
        for spec, fn in zip(self.specs, self.functions):
            values = self._column(spec, fn, samples, valid)
            columns.append(values)
        components = torch.stack(columns, dim=1) if columns else torch.zeros((n, 0), dtype=self.dtype)
        return components, valid

    def _column(self, spec: RewardSpec, fn: Callable, samples: list[dict], valid: torch.Tensor) -> torch.Tensor:
        try:
            values = call_reward(fn, samples, spec.options, spec.name)
        except RewardError:  # a malformed return value is a bug of the reward, not of one sample
            raise
        except Exception:
            values = [self._one(spec, fn, s, i, valid) for i, s in enumerate(samples)]
        out = torch.empty(len(samples), dtype=self.dtype)
        for i, value in enumerate(values):
            try:
                number = reward_number(value)
            except TypeError:
                self._fail(spec, samples[i], i, valid, f"returned {_describe(value)}, not a number or None")
                number = float("nan")
            if number is None:
                number = float("nan")
            elif not math.isfinite(number):
                self._fail(spec, samples[i], i, valid, "returned a non-finite value")
                number = float("nan")
            elif abs(number) > _FLOAT32_MAX:  # finite, but infinite once stored as float32
                self._fail(spec, samples[i], i, valid, f"returned {show_value(number)}, beyond the float32 range "
                           "(a non-finite value)")
                number = float("nan")
            out[i] = number
        return out

    def _one(self, spec, fn, sample, index, valid):
        try:
            return call_reward(fn, [sample], spec.options, spec.name)[0]
        except RewardError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of user code is reported the same way
            self._fail(spec, sample, index, valid, f"raised {type(exc).__name__}: {_one_line(str(exc))}")
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
            if capabilities(self.functions[k], REWARD_DEFAULTS).is_correctness and "accuracy" not in metrics:
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


def counted(components: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[N] bool, from `RewardSet.score`'s components and valid mask: the samples that count in the advantage statistics, those with at least one reward
    that is not None (NaN) and not skipped after a reward error."""
    return valid & ~torch.isnan(components).all(dim=1)
