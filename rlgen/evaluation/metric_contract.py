"""The metric contract: what `rlgen eval --metric NAME` runs.

A metric registered through the `register_metrics` hook is a callable

    metric(samples: list[dict], **options) -> dict[str, float | None]

over scored samples: the records `rlgen sample` / `rlgen score` write (`prompt`, `completion`, `reward`,
`reward_<name>`, the dataset's fields such as `answer`). It returns named numbers (None where a number is
undefined, e.g. over no samples); options are keyword arguments (`--metric NAME:key=value,...`) and are
checked against its signature before it runs.

Several built-in metrics are building blocks with other signatures (pass@k takes counts, vendi a
similarity matrix ...): `samples_metric(name)` gives each of those that makes sense over samples an
adapter that follows the contract, and refuses the others (pareto-front, hypervolume, kl-to-reference,
rm-pair-accuracy need points or models, not samples) with one line. A plugin's metric is used as it is.
"""
from __future__ import annotations

import math
import numbers
from typing import Annotated, Callable, Literal, Protocol

from rlgen.config import COUNT
from rlgen.errors import RlgenError, show_value
from rlgen.evaluation import diversity, metrics
from rlgen.extension import check_options
from rlgen.plugins import BUILTIN_PROVIDER, registry
from rlgen.rewards.combine import parse_spec


class Metric(Protocol):
    def __call__(self, samples: list[dict], **options) -> dict[str, float | None]: ...


def _column(samples: list[dict], field: str) -> list[float]:
    return metrics.reward_column(samples, field, "samples")


def accuracy(samples: list[dict], field: str = "reward") -> dict[str, float | None]:
    """Mean of a 0/1 correctness column (`field`, e.g. reward_exact-match) over the samples that have it."""
    values = _column(samples, field)
    return {"accuracy": metrics.mean_accuracy(values), "count": float(len(values))}


def reward_stats(samples: list[dict], field: str = "reward") -> dict[str, float | None]:
    """count, mean, std (population), min, max of a reward column."""
    stats = metrics.reward_stats(_column(samples, field))
    return {key: float(value) for key, value in stats.items()}


def pass_at_k(samples: list[dict], k: Annotated[int, COUNT] = 1, field: str = "reward") -> dict[str, float | None]:
    """Unbiased pass@k per prompt (samples grouped by `prompt`; a sample is correct when `field` is 1),
    averaged over prompts. Every prompt needs at least k samples."""
    problems: dict[str, list[int]] = {}
    for index, sample in enumerate(samples):
        value = sample.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise RlgenError(f"samples, record {index + 1}: field {show_value(field)} must be a number or null, "
                             f"got {show_value(value)}")
        problems.setdefault(str(sample.get("prompt", "")), []).append(int(value == 1))
    if not problems:
        return {f"pass@{k}": None, "num_problems": 0.0}
    scores = [metrics.pass_at_k(len(hits), sum(hits), k) for hits in problems.values()]
    return {f"pass@{k}": sum(scores) / len(scores), "num_problems": float(len(scores))}


def _texts(samples: list[dict]) -> list[str]:
    return [str(sample.get("completion", "")) for sample in samples]


def _diversity(name: str, fn: Callable[[list[str]], float | None], samples: list[dict], by_prompt: bool) -> dict:
    if not by_prompt:
        return {name: fn(_texts(samples))}
    grouped = diversity.groupwise(fn, diversity.group_texts(samples))
    return {name: grouped["mean"], "groups": float(grouped["groups"])}


# Annotated bounds and Literal units let check_metric refuse bad options (naming them) before any sample is read.
Unit = Literal["word", "char"]


def distinct_n(samples: list[dict], n: Annotated[int, COUNT] = 1, unit: Unit = "word", by_prompt: bool = False) -> dict:
    """Distinct-n of the completions (all together, or the mean over prompts with `by_prompt`)."""
    return _diversity("distinct-n", lambda texts: diversity.distinct_n(texts, n, unit), samples, by_prompt)


def self_bleu(samples: list[dict], max_n: Annotated[int, COUNT] = 4, unit: Unit = "word", by_prompt: bool = False) -> dict:
    """Texygen's Self-BLEU of the completions (higher = less diverse)."""
    return _diversity("self-bleu", lambda texts: diversity.self_bleu(texts, max_n, unit), samples, by_prompt)


def ngram_overlap(samples: list[dict], max_n: Annotated[int, COUNT] = 4, unit: Unit = "word", by_prompt: bool = False) -> dict:
    """Clipped n-gram overlap of the completions (higher = less diverse)."""
    return _diversity("ngram-overlap", lambda texts: diversity.ngram_overlap(texts, max_n, unit), samples, by_prompt)


def vendi(samples: list[dict], n: Annotated[int, COUNT] = 2, q: float = 1.0, unit: Unit = "word", by_prompt: bool = False) -> dict:
    """Vendi score of the completions under n-gram cosine similarity (deterministic: no embedding model)."""
    def score(texts):
        return diversity.vendi_ngram(texts, n, q, unit) if texts else None

    return _diversity("vendi", score, samples, by_prompt)


# registered built-in item -> its samples adapter
ADAPTERS: dict[Callable, Callable] = {
    metrics.mean_accuracy: accuracy,
    metrics.reward_stats: reward_stats,
    metrics.pass_at_k: pass_at_k,
    diversity.distinct_n: distinct_n,
    diversity.self_bleu: self_bleu,
    diversity.ngram_overlap: ngram_overlap,
    diversity.vendi_score: vendi,
}


def samples_metric(name: str) -> Callable:
    """The registered metric `name` as a callable that follows the contract."""
    entry = registry("metric").entry(name)
    if entry.item in ADAPTERS:
        return ADAPTERS[entry.item]
    if entry.provider == BUILTIN_PROVIDER or not callable(entry.item):
        usable = ", ".join(n for n in registry("metric").names() if registry("metric").get(n) in ADAPTERS
                           or registry("metric").entry(n).provider != BUILTIN_PROVIDER)
        raise RlgenError(f"metric '{name}' is a building block of rlgen eval, not a metric over samples "
                         f"(metrics over samples: {usable})")
    return entry.item


def check_metric(name: str, options: dict) -> Callable:
    """The metric `name` (following the contract), with `options` checked against its signature: an unknown
    metric or option is one RlgenError line, before any sample is drawn."""
    fn = samples_metric(name)
    check_options("metric", name, fn, options, skip=1)
    return fn


def run_metric(name: str, samples: list[dict], **options) -> dict[str, float | None]:
    """Run the registered metric `name` on scored samples; options are checked against its signature and
    the result against the contract (one RlgenError line naming the metric otherwise)."""
    fn = check_metric(name, options)
    try:
        result = fn(list(samples), **options)
    except RlgenError:
        raise  # already one line naming what is wrong (a record's field ...)
    except Exception as exc:  # noqa: BLE001 - the metric's own code (a plugin's, or a value no check caught)
        message = " ".join(str(exc).split())[:300]
        raise RlgenError(f"metric '{name}' failed: {type(exc).__name__}" + (f": {message}" if message else "")) from None
    if not isinstance(result, dict):
        raise RlgenError(f"metric '{name}' returned {type(result).__name__}, expected a dict of name -> number")
    out: dict[str, float | None] = {}
    for key, value in result.items():
        if not isinstance(key, str):
            raise RlgenError(f"metric '{name}' returned the key {show_value(key)}: keys must be strings")
        if value is None:
            out[key] = None
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            number = float(value)
            out[key] = None if math.isnan(number) else number
        else:
            raise RlgenError(f"metric '{name}' returned {show_value(value)} for '{key}': values must be numbers or None")
    return out


def parse_metric(spec: str) -> tuple[str, dict]:
    """'NAME' or 'NAME:key=value,...' (TOML values), as --metric takes it."""
    return parse_spec(spec)
