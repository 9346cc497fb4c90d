"""Evaluation metrics (registry) and the held-out accuracy / pass@k evaluation shared by eval and train."""
from __future__ import annotations

import math
import statistics
from math import comb

import torch

from rlgen.hookspecs import hookimpl
from rlgen.rewards.base import RewardSet, RewardSpec
from rlgen.rollout.engine import SamplingParams


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k) for n samples with c correct."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
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
        "std": statistics.pstdev(kept) if len(kept) > 1 else 0.0,
        "min": min(kept),
        "max": max(kept),
    }


def correctness_rewards(task_rewards) -> RewardSet:
    return RewardSet([RewardSpec(name) for name in task_rewards])


def evaluate_model(engine, records: list[dict], rewards: RewardSet, max_new_tokens: int, k: int = 1,
                   temperature: float = 1.0, generator: torch.Generator | None = None) -> dict:
    """Greedy accuracy on `records` (mean of the correctness reward), and pass@k from k samples per
    problem when k > 1. Returns the metrics and the greedy samples."""
    prompts = [r["prompt"] for r in records]
    greedy = engine.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
    samples = [{**r, "completion": text} for r, text in zip(records, greedy.texts)]
    components, _ = rewards.compute(samples)
    first = components[:, 0].tolist()
    for sample, value in zip(samples, first):
        sample["correct"] = value
    result = {"accuracy": mean_accuracy(first), "num_problems": len(records)}
    if k > 1:
        expanded = [p for p in prompts for _ in range(k)]
        sampled = engine.generate(expanded, SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature), generator)
        sampled_records = [{**r, "completion": sampled.texts[i * k + j]} for i, r in enumerate(records) for j in range(k)]
        correct = rewards.compute(sampled_records)[0][:, 0].view(len(records), k)
        hits = [int((row == 1).sum()) for row in correct]
        for kk in sorted({1, k}):
            result[f"pass@{kk}"] = sum(pass_at_k(k, c, kk) for c in hits) / len(hits)
    return {"metrics": result, "samples": samples}


@hookimpl
def register_metrics(register):
    register("accuracy", mean_accuracy, "mean of a 0/1 correctness reward over problems")
    register("pass@k", pass_at_k, "unbiased pass@k estimator from n samples with c correct")
    register("reward-stats", reward_stats, "count, mean, std, min, max of a reward column")
