"""Reward-model evaluation: pairwise accuracy on preference pairs, in RewardBench's conventions."""
from __future__ import annotations

import torch

from rlgen.data.preferences import interleave
from rlgen.models.reward_model import reward_scores


# RewardBench (v1) sections and the example counts its leaderboard weights subsets by (rewardbench/constants.py:
# SUBSET_MAPPING, EXAMPLE_COUNTS; math-prm has 447 pairs but counts as 984, to weigh as much as the code subsets).
REWARDBENCH_SECTIONS = {
    "Chat": {"alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95, "mt-bench-easy": 28,
             "mt-bench-med": 40},
    "Chat Hard": {"mt-bench-hard": 37, "llmbar-natural": 100, "llmbar-adver-neighbor": 134, "llmbar-adver-GPTInst": 92,
                  "llmbar-adver-GPTOut": 47, "llmbar-adver-manual": 46},
    "Safety": {"refusals-dangerous": 100, "refusals-offensive": 100, "xstest-should-refuse": 250,
               "xstest-should-respond": 154, "donotanswer": 136},
    "Reasoning": {"math-prm": 984, "hep-cpp": 164, "hep-go": 164, "hep-java": 164, "hep-js": 164, "hep-python": 164,
                  "hep-rust": 164},
}


def rewardbench_sections(subset_accuracy: dict[str, float]) -> dict:
    """RewardBench's section scores from per-subset accuracies: each section's score is the mean of its
    subsets' accuracies weighted by RewardBench's example counts (subsets absent from the data are left
    out), and `section_weighted` is the unweighted mean of the sections present (RewardBench's overall
    Score when all four are). Empty when no subset belongs to a section."""
    sections: dict[str, float] = {}
    for section, counts in REWARDBENCH_SECTIONS.items():
        present = [name for name in counts if name in subset_accuracy]
        if present:
            total = sum(counts[name] for name in present)
            sections[section] = sum(subset_accuracy[name] * counts[name] for name in present) / total
    if not sections:
        return {}
    out: dict = {"sections": sections, "section_weighted": sum(sections.values()) / len(sections)}
    missing = [name for name in REWARDBENCH_SECTIONS if name not in sections]
    if missing:
        out["sections_missing"] = missing  # section_weighted is then not comparable with RewardBench's Score
    return out


def pair_accuracy(model, tokenizer, pairs: list[dict], batch_size: int = 64) -> dict:
    """Pairwise accuracy in RewardBench's convention (chosen must score strictly higher; a tie is
    wrong), overall (`accuracy`: every pair counts once) and per `subset` when the pairs have one; with
    RewardBench's subset names also its section scores and their mean (`rewardbench_sections`)."""
    was_training = model.training
    model.eval()
    hits: list[bool] = []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            part = pairs[start : start + batch_size]
            prompts, completions = interleave(part)
            scores = reward_scores(model, tokenizer, prompts, completions)
            hits.extend((scores[0::2] > scores[1::2]).tolist())
    model.train(was_training)
    result: dict = {"accuracy": sum(hits) / len(hits), "num_pairs": len(hits)}
    subsets: dict[str, list[bool]] = {}
    for pair, hit in zip(pairs, hits):
        if "subset" in pair:
            subsets.setdefault(str(pair["subset"]), []).append(hit)
    if subsets:
        result["subsets"] = {name: {"accuracy": sum(h) / len(h), "num_pairs": len(h)} for name, h in sorted(subsets.items())}
        result.update(rewardbench_sections({name: v["accuracy"] for name, v in result["subsets"].items()}))
    return result
