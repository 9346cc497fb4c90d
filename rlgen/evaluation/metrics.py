"""Evaluation metrics (registry) and the held-out accuracy / pass@k evaluation shared by eval and train."""
from __future__ import annotations

import math
import numbers
import statistics
from math import comb

import torch

from rlgen.data.chat import reward_view
from rlgen.errors import RlgenError, show_value
from rlgen.evaluation import diversity, kl, pareto
from rlgen.evaluation.reward_models import pair_accuracy
from rlgen.hookspecs import hookimpl
from rlgen.plugins import registry
from rlgen.rewards.base import RewardSet, RewardSpec
from rlgen.rollout.engine import SamplingParams
from rlgen.rollout.samplers import call_sampler


class MetricInputError(RlgenError, ValueError):
    """A metric's arguments are out of range (a ValueError too, for code that caught the old ValueError)."""


def _check_count(name: str, value, low: int, high: int | None, bounds: str) -> None:
    integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not integral or value < low or (high is not None and value > high):
        raise MetricInputError(f"pass@k: {name} must be an integer in {bounds}, got {show_value(value)}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k) for n samples with c correct.
    n >= 1, 0 <= c <= n and 1 <= k <= n, all integers (else a one-line MetricInputError)."""
    _check_count("n (samples per problem)", n, 1, None, "[1, inf)")
    _check_count("c (correct samples)", c, 0, n, f"[0, n] = [0, {n}]")
    if isinstance(k, numbers.Integral) and not isinstance(k, bool) and k > n >= 1:
        raise MetricInputError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    _check_count("k", k, 1, n, f"[1, n] = [1, {n}]")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def mean_accuracy(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


def reward_stats(values: list[float]) -> dict:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    if not kept:
        return {"count": 0}
    return {
        "count": len(kept),
        "mean": statistics.fmean(kept),
        # statistics.pstdev raises on an infinity; the spread of such values is undefined (NaN, null in JSON)
        "std": 0.0 if len(kept) == 1 else statistics.pstdev(kept) if all(map(math.isfinite, kept)) else math.nan,
        "min": min(kept),
        "max": max(kept),
    }


def reward_column(records: list[dict], field: str, source: str) -> list[float]:
    """The numbers in `field` of the records that have one (null / missing: left out); a string, list,
    boolean ... there is one RlgenError naming the file and line, as `rlgen pairs` reports it."""
    values = []
    for index, record in enumerate(records):
        value = record.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            where = f"{source}, line {record['_line']}" if "_line" in record else f"{source}, record {index + 1}"
            raise RlgenError(f"{where}: reward field {show_value(field)} must be a number or null, got {show_value(value)}")
        try:
            values.append(float(value))
        except OverflowError:  # an integer beyond float's range
            values.append(math.copysign(math.inf, value))
    return values


def correctness_rewards(task_rewards) -> RewardSet:
    return RewardSet([RewardSpec(name) for name in task_rewards])


def evaluate_model(engine, records: list[dict], rewards: RewardSet, max_new_tokens: int, k: int = 1,
                   temperature: float = 1.0, generator: torch.Generator | None = None, sampler: str | None = None,
                   sampler_rewards: RewardSet | None = None, sampler_options: dict | None = None,
                   sampling: dict | None = None, prompt_texts: list[str] | None = None) -> dict:
    """Accuracy on `records` (mean of the first, correctness, reward) of one completion per problem, and
    pass@k from k plain samples per problem at `temperature` when k > 1. Returns {"metrics", "samples" (the
    evaluated records with `completion` and `correct`), "rollouts" (their tokens)} and, when k > 1, the k
    samples per problem as "k_samples" (records) and "k_rollouts".

    The evaluated completion is greedy unless `sampler` names a registered sampler (`plain`, `best-of-n`,
    `smc` ...): then it is that sampler's output at `temperature`, guided by `sampler_rewards` (which sees
    the records' fields) with `sampler_options`; the metrics then say which sampler was used. `sampling`:
    further SamplingParams fields for every completion (min_p, repetition_penalty, stop). `prompt_texts`: the
    model text of each record's prompt (its chat template applied) when the records hold it otherwise; the
    rewards read the records (a message list as its text)."""
    prompts = list(prompt_texts) if prompt_texts is not None else [r["prompt"] for r in records]
    extra_params = dict(sampling or {})
    metrics: dict = {}
    if sampler is None:
        evaluated = engine.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, **extra_params))
    else:
        stats: dict = {}
        evaluated = call_sampler(registry("sampler").get(sampler), engine, prompts,
                                 SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, **extra_params), generator,
                                 rewards=sampler_rewards, records=records, stats=stats, options=sampler_options)
        metrics.update(sampler=sampler, sampler_options=dict(sampler_options or {}), temperature=temperature)
        if sampler_rewards is not None:
            metrics["sampler_reward"] = [spec.name if spec.weight == 1 else f"{spec.name}:{spec.weight:g}"
                                          for spec in sampler_rewards.specs]
        if stats:
            metrics["sampler_stats"] = stats
    samples = [{**reward_view(r), "completion": text} for r, text in zip(records, evaluated.texts)]
    components, _ = rewards.compute(samples)
    first = components[:, 0].tolist()
    for sample, value in zip(samples, first):
        sample["correct"] = value
    result = {"accuracy": mean_accuracy(first), "num_problems": len(records), **metrics}
    extra: dict = {"rollouts": evaluated}
    if k > 1:
        expanded = [p for p in prompts for _ in range(k)]
        sampled = engine.generate(expanded, SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, **extra_params),
                                  generator)
        sampled_records = [{**reward_view(r), "completion": sampled.texts[i * k + j]} for i, r in enumerate(records)
                           for j in range(k)]
        correct = rewards.compute(sampled_records)[0][:, 0].view(len(records), k)
        hits = [int((row == 1).sum()) for row in correct]
        for kk in sorted({1, k}):
            result[f"pass@{kk}"] = sum(pass_at_k(k, c, kk) for c in hits) / len(hits)
        for record, value in zip(sampled_records, correct.flatten().tolist()):
            record["correct"] = value
        extra.update(k_samples=sampled_records, k_rollouts=sampled)
    return {"metrics": result, "samples": samples, **extra}


def rm_pair_accuracy(model, tokenizer, pairs: list[dict], batch_size: int = 64) -> dict:
    """Pairwise accuracy of a reward model on preference pairs, RewardBench's convention (chosen must
    score strictly higher; a tie is wrong), overall and per `subset`
    (rlgen.evaluation.reward_models.pair_accuracy)."""
    return pair_accuracy(model, tokenizer, pairs, batch_size)


def kl_to_reference(policy, reference, tokenizer, prompts: list[str], completions: list[str], batch_size: int = 64) -> dict:
    """KL(policy || reference) on given samples: means of per-sequence k1 = sum(log p - log q) and
    k3 = sum((r - 1) - log r), r = q / p (rlgen.evaluation.kl)."""
    return kl.kl_to_reference(policy, reference, tokenizer, prompts, completions, batch_size)


@hookimpl
def register_metrics(register):
    register("accuracy", mean_accuracy, "mean of a 0/1 correctness reward over problems")
    register("pass@k", pass_at_k, "unbiased pass@k estimator from n samples with c correct")
    register("reward-stats", reward_stats, "count, mean, std, min, max of a reward column")
    register("vendi", diversity.vendi_score, "Vendi score of order q (effective number of distinct samples) of a "
             "similarity matrix; also on embeddings, n-grams, sentence embeddings (rlgen.evaluation.diversity)")
    register("distinct-n", diversity.distinct_n, "unique n-grams / total n-grams across a set of texts")
    register("self-bleu", diversity.self_bleu, "Texygen's Self-BLEU: mean smoothed sentence BLEU (brevity penalty, "
             "nltk method 1, orders 1..4) of each text against the others; higher = less diverse")
    register("ngram-overlap", diversity.ngram_overlap, "mean clipped n-gram precision (geometric mean over orders, no "
             "brevity penalty or smoothing) of each text against the others; higher = less diverse")
    register("pareto-front", pareto.pareto_front, "indices of the non-dominated points (every objective maximised)")
    register("hypervolume", pareto.hypervolume, "exact hypervolume of points (maximised) above a reference point")
    register("kl-to-reference", kl_to_reference, "KL(policy || reference) on samples: Schulman's k1 and k3 estimators")
    register("rm-pair-accuracy", rm_pair_accuracy, "reward-model pairwise accuracy (RewardBench convention)")
