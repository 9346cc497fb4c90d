"""Group rollouts for on-policy trainers (GRPO family, online DPO): each prompt sampled G times through
the rollout engine, then scored by the reward set (`GroupRollout`), into one `RolloutBatch`. One part, so
every trainer rolls out alike, and a plugin trainer can too."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from rlgen.data.chat import reward_view
from rlgen.rewards.base import RewardSet, counted
from rlgen.rollout.engine import RolloutEngine, Rollouts, SamplingParams, concat_rollouts, draw_seed, row_seeds


class ModelInputs(NamedTuple):
    """The token tensors of a log-prob pass, in the order `completion_logprobs(model, *inputs)` takes them."""

    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P]
    completion_ids: torch.Tensor  # [B, C] right-padded
    completion_mask: torch.Tensor  # [B, C]; 1 up to and including the stop token

    @classmethod
    def of(cls, rollouts: Rollouts) -> "ModelInputs":
        return cls(rollouts.prompt_ids, rollouts.prompt_mask, rollouts.completion_ids, rollouts.completion_mask)

    def rows(self, index: torch.Tensor) -> "ModelInputs":
        """The inputs of the given rows, in that order (a micro-batch, the picked rows of a batch)."""
        return ModelInputs(*(t[index] for t in self))


@dataclass
class RolloutBatch:
    """G sampled completions of each prompt of a batch, the rows of a group next to each other, with their
    rewards. Trainers that need them fill in the old-policy and reference log-probs."""

    records: list[dict]  # one per group: the prompt record as drawn (never written to)
    group_size: int
    rollouts: Rollouts  # tokens, truncation flags and texts, one row per completion
    samples: list[dict]  # one per row: a copy of its record with `completion` and `completion_tokens`
    components: torch.Tensor  # [N, R] each reward's value (NaN where a reward does not apply)
    valid: torch.Tensor  # [N] bool: scored without a reward error
    total: torch.Tensor  # [N] the combined and shaped reward
    old_logps: torch.Tensor | None = None  # [N, C] per-token log-probs of the policy that sampled
    ref_logps: torch.Tensor | None = None  # [N, C] per-token log-probs of the reference policy

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_groups(self) -> int:
        return len(self.records)

    @property
    def group_index(self) -> torch.Tensor:
        """[N] the group (prompt) each row belongs to, on the batch's device."""
        return torch.arange(len(self), device=self.total.device) // self.group_size

    @property
    def inputs(self) -> ModelInputs:
        return ModelInputs.of(self.rollouts)

    @property
    def completion_lengths(self) -> torch.Tensor:
        """[N] tokens per completion, its stop token included."""
        return self.rollouts.completion_mask.sum(1)

    @property
    def counted(self) -> torch.Tensor:
        """[N] bool: the rows with at least one reward (not all None, not skipped after an error)."""
        return counted(self.components, self.valid)

    def select_groups(self, groups: list[int]) -> "RolloutBatch":
        """The given groups, in that order, with every per-row field (log-probs included) picked alike."""
        g = self.group_size
        picked = [k * g + j for k in groups for j in range(g)]
        rows = torch.tensor(picked, dtype=torch.long, device=self.total.device)
        return RolloutBatch(
            records=[self.records[k] for k in groups],
            group_size=g,
            rollouts=self.rollouts.select(rows),
            samples=[self.samples[i] for i in picked],
            components=self.components[rows],
            valid=self.valid[rows],
            total=self.total[rows],
            old_logps=None if self.old_logps is None else self.old_logps[rows],
            ref_logps=None if self.ref_logps is None else self.ref_logps[rows],
        )

    @staticmethod
    def concat(batches: list["RolloutBatch"], pad_id: int) -> "RolloutBatch":
        """Batches of the same group size, one after the other (token tensors padded to the widest), before
        any log-probs are filled in."""
        if len(batches) == 1:
            return batches[0]
        if len({b.group_size for b in batches}) != 1:
            raise ValueError("rollout batches of different group sizes do not concatenate")
        return RolloutBatch(
            records=[r for b in batches for r in b.records],
            group_size=batches[0].group_size,
            rollouts=concat_rollouts([b.rollouts for b in batches], pad_id),
            samples=[s for b in batches for s in b.samples],
            components=torch.cat([b.components for b in batches]),
            valid=torch.cat([b.valid for b in batches]),
            total=torch.cat([b.total for b in batches]),
        )


def scored(rewards: RewardSet, samples: list[dict], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`rewards.score(samples)` (components, valid, total), moved to `device`. The rewards score on the CPU and
    outside the trainer's autocast: a reward model's judgement does not depend on the training precision."""
    with torch.autocast("cpu", enabled=False):
        return tuple(t.to(device) for t in rewards.score(samples))


@dataclass
class GroupRollout:
    """Samples `group_size` completions of each prompt through the shared engine and scores them."""

    engine: RolloutEngine
    rewards: RewardSet
    group_size: int
    params: SamplingParams
    generator: torch.Generator | None = None  # the trainer's, so a resumed run draws the same completions
    # a record -> its prompt as model text (the trainer's, with the chat template); None: the prompt itself
    prompt_text: Callable[[dict], str] | None = None

    def sample(self, records: list[dict], first_row: int = 0) -> RolloutBatch:
        """The batch on the engine's (the model's) device. `records` may be one rank's share of a global batch
        whose completions start at row `first_row`: each completion samples from the stream of its global row
        (`row_seeds`), and every call draws one base seed from the generator, so all ranks stay in step."""
        base = draw_seed(self.generator)
        expanded = [r for r in records for _ in range(self.group_size)]
        seeds = row_seeds(base, first_row, len(expanded))
        texts = {id(r): self.prompt_text(r) if self.prompt_text else r["prompt"] for r in records}
        rollouts = self.engine.generate([texts[id(r)] for r in expanded], self.params, self.generator, seeds=seeds)
        lengths = rollouts.completion_mask.sum(1).tolist()
        # rewards read text (a message-list prompt as its contents), as in `rlgen score` and `rlgen eval`
        samples = [{**reward_view(r), "completion": text, "completion_tokens": n}
                   for r, text, n in zip(expanded, rollouts.texts, lengths)]
        components, valid, total = scored(self.rewards, samples, rollouts.completion_ids.device)
        return RolloutBatch(list(records), self.group_size, rollouts, samples, components, valid, total)
