"""Parts that trainers of any algorithm share and that need nothing from rlgen.algorithms (the group
rollout and its batch live in rlgen.rollout.groups; the preference update in rlgen.algorithms.parts)."""
from __future__ import annotations

import torch

from rlgen.distributed import Dist
from rlgen.models.sequences import pad_tokens
from rlgen.rollout.groups import ModelInputs


def summed_over_ranks(dist: Dist, values: dict[str, float]) -> dict[str, float]:
    """Each value summed over the ranks in one collective (metric numerators and counts of a sharded
    global batch; the values themselves on one process)."""
    if not dist.enabled:
        return dict(values)
    keys = list(values)
    totals = dist.sum(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
    return dict(zip(keys, totals.tolist()))


class PairEncoder:
    """Preference pairs (`prompt`, `chosen`, `rejected`) -> `ModelInputs` with the rows [chosen_0, rejected_0,
    chosen_1, ...]: each pair's two rows share a prompt and sit next to each other, so the prompt runs once
    for both through the shared-prefix path.

    The pairs of `dataset` (the run's training pairs) are tokenised once per run, the first time they are
    encoded; later epochs only pad. Any other pair (held-out, sampled online) is tokenised each time. A pair
    is known by identity, so nothing is written into the records."""

    def __init__(self, tokenizer, engine, dataset: list[dict] | None = None, texts=None):
        self.tokenizer = tokenizer
        self.texts = texts  # (prompts, completions) -> their model texts (Trainer.example_texts), or None
        self.engine = engine  # its completion tokenisation: each answer ends with the stop token, as if sampled
        self.dataset = dataset or []  # kept referenced, so that no id below can be reused by another object
        self._position = {id(pair): k for k, pair in enumerate(self.dataset)}
        self._tokens: dict[int, tuple[list[int], list[int], list[int]]] = {}  # by position in `dataset`

    def positions(self, pairs: list[dict]) -> list[int]:
        """Each pair's index in `dataset` (a KeyError for a pair that is not one of its records)."""
        return [self._position[id(pair)] for pair in pairs]

    def encode(self, pairs: list[dict]) -> ModelInputs:
        known = [self._position.get(id(pair)) for pair in pairs]
        new = [k for k, position in enumerate(known) if position is None or position not in self._tokens]
        tokens: dict[int, tuple[list[int], list[int], list[int]]] = {}  # by row in `pairs`, for those not cached
        if new:
            prompts, answers = [pairs[k]["prompt"] for k in new], [text for k in new for text in (pairs[k]["chosen"], pairs[k]["rejected"])]
            if self.texts is not None:  # chat templates: rendered prompts and assistant turns
                prompts, answers = self.texts([p for p in prompts for _ in range(2)], answers)
                prompts = prompts[0::2]
            prompt_tokens = self.tokenizer(prompts, add_special_tokens=self.engine.add_special_tokens).input_ids
            answers = self.engine.tokenize_completions(answers)
            for j, k in enumerate(new):
                entry = (prompt_tokens[j], answers[2 * j], answers[2 * j + 1])
                if known[k] is None:
                    tokens[k] = entry
                else:
                    self._tokens[known[k]] = entry
        entries = [self._tokens[position] if position is not None else tokens[k] for k, position in enumerate(known)]
        prompt_ids, prompt_mask = pad_tokens([e[0] for e in entries for _ in range(2)], self.engine.pad_id, left=True)
        prompt_ids, prompt_mask = prompt_ids.to(self.engine.device), prompt_mask.to(self.engine.device)
        completion_ids, completion_mask = self.engine.pad_completions([answer for e in entries for answer in e[1:]])
        return ModelInputs(prompt_ids, prompt_mask, completion_ids, completion_mask)
