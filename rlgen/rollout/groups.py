"""Group rollouts for on-policy trainers (GRPO family, online DPO): each prompt sampled G times through
the rollout engine, then scored by the reward set. One function, so every trainer rolls out alike."""
from __future__ import annotations


def rollout_groups(engine, rewards, records: list[dict], num_generations: int, params, generator):
    """(rollouts, samples, components [N, R], valid [N], total [N]) for N = len(records) * G rows, the G
    rows of a prompt next to each other; `total` is the combined and shaped reward."""
    expanded = [r for r in records for _ in range(num_generations)]
    rollouts = engine.generate([r["prompt"] for r in expanded], params, generator)
    lengths = rollouts.completion_mask.sum(1)
    samples = [{**r, "completion": text, "completion_tokens": int(n)} for r, text, n in zip(expanded, rollouts.texts, lengths)]
    components, valid, total = rewards.score(samples)
    return rollouts, samples, components, valid, total
