"""Trainer parts that need the algorithms' objectives: the preference update (`PairwiseUpdate`), which the
offline preference trainers and online DPO share, and `sequence_logps`, the per-sequence log-probs it scores."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from rlgen.algorithms.preference_losses import PairLoss, PairScores, PreferenceOptions
from rlgen.distributed import Dist
from rlgen.models.logprobs import completion_logprobs
from rlgen.rollout.groups import ModelInputs
from rlgen.training.micro_batches import even_passes, micro_batches, pair_units, row_costs, trimmed
from rlgen.training.parts import summed_over_ranks


def sequence_logps(model, inputs, temperature: float = 1.0, shared_prefix: bool = True):
    """(summed log-prob per row [B], token count per row [B], per-token log-probs [B, C], entropy)."""
    logp, entropy = completion_logprobs(model, *inputs, temperature, shared_prefix)
    mask = inputs[3].to(logp.dtype)
    return (logp * mask).sum(1), mask.sum(1), logp, entropy


STAT_KEYS = ("loss", "nll", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected", "entropy_sum", "tokens")  # what a step sums: its own terms and `pair_loss`'s stats


@dataclass
class PairwiseUpdate:
    """One optimiser step of a preference loss on interleaved pairs (`PairEncoder`'s rows [chosen_0,
    rejected_0, ...]), micro-batched by whole pairs (`accumulation_steps` of them, or by the token budget
    `max_tokens`) -> the step's metrics.

    `optimizer_step` applies the accumulated gradient and returns its norm (the trainer's, which clips and
    stops on non-finite updates); `backward` is the trainer's backward pass (its fp16 loss scaling). The loss
    is the mean over the step's pairs, plus `rpo_alpha` x the NLL of the chosen answers (token mean over the
    whole step). Multi-process (`dist`), `inputs` are this rank's shard of the step's pairs: the means are
    over the pairs and chosen tokens of all ranks, so the gradients summed over ranks are the 1-process
    ones, and the metrics are the global batch's on every rank."""

    model: torch.nn.Module
    loss_fn: Callable[[PairScores, PreferenceOptions], PairLoss]
    options: PreferenceOptions
    optimizer_step: Callable[[], float]
    rpo_alpha: float = 0.0
    shared_prefix: bool = True
    accumulation_steps: int = 1
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward
    dist: Dist = field(default_factory=Dist)
    max_tokens: int = 0  # optim.max_tokens_per_micro_batch: micro-batches of whole pairs by token budget
    fsdp: bool = False  # the model is FSDP-sharded: every rank runs as many passes as the others

    def step(self, inputs: ModelInputs, ref: torch.Tensor | None) -> dict:
        """`ref`: [B, 2] (chosen, rejected) summed reference log-probs, or None for a reference-free loss."""
        inputs = ModelInputs(*inputs)
        local_pairs = inputs.prompt_ids.shape[0] // 2
        totals = summed_over_ranks(self.dist, {"pairs": local_pairs, "chosen_tokens": float(inputs.completion_mask[0::2].sum())})
        n, chosen_tokens = int(totals["pairs"]), totals["chosen_tokens"]
        sums: dict[str, float] = dict.fromkeys(STAT_KEYS, 0.0)
        # a rank with no pairs (a global batch smaller than the world) still joins the collectives below
        budget = self.max_tokens
        chunks = micro_batches(2 * local_pairs, budget, self.accumulation_steps, row_costs(inputs) if budget else None,
                               pair_units(2 * local_pairs))
        # under FSDP every rank runs as many passes as the others (the budget may split shards unevenly)
        for rows, real in even_passes(chunks, self.dist if self.fsdp and budget else None):
            if not real:  # a filler pass: one whole pair, zero weight
                rows = torch.cat([rows - rows % 2, rows - rows % 2 + 1])
            idx = rows[0::2] // 2
            part = inputs.rows(rows.to(inputs.prompt_ids.device))
            loss, nll, stats = self.pair_loss(trimmed(part) if budget else part, ref[idx] if ref is not None else None, n,
                                              chosen_tokens)
            if not real:
                self.backward(loss * 0.0)
                continue
            self.backward(loss)
            sums["loss"] += float(loss.detach())
            sums["nll"] += nll
            for key, value in stats.items():
                sums[key] += float(value)
        sums = summed_over_ranks(self.dist, sums)
        metrics = {k: v / n for k, v in sums.items() if k.startswith(("rewards/", "logps/"))}
        metrics.update(loss=sums["loss"], nll=sums["nll"], entropy=sums["entropy_sum"] / max(sums["tokens"], 1.0),
                       grad_norm=self.optimizer_step(), pairs=n)
        return metrics

    def pair_loss(self, inputs: ModelInputs, ref: torch.Tensor | None, total_pairs: int, total_chosen_tokens: float):
        """(loss of one micro-batch of interleaved pairs scaled to its share of the step, its NLL term, its
        summed statistics)."""
        summed, tokens, _, entropy = sequence_logps(self.model, inputs, 1.0, self.shared_prefix)
        scores = PairScores(summed[0::2], summed[1::2], tokens[0::2], tokens[1::2],
                            ref[:, 0] if ref is not None else None, ref[:, 1] if ref is not None else None)
        out = self.loss_fn(scores, self.options)
        loss = out.losses.sum() / total_pairs
        nll = -summed[0::2].sum() / max(total_chosen_tokens, 1.0)  # token mean over the step's chosen answers
        if self.rpo_alpha > 0:
            loss = loss + self.rpo_alpha * nll
        mask = inputs.completion_mask.float()
        stats = {
            "rewards/chosen": out.chosen_rewards.sum(),
            "rewards/rejected": out.rejected_rewards.sum(),
            "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float().sum(),
            "rewards/margins": (out.chosen_rewards - out.rejected_rewards).sum(),
            "logps/chosen": scores.chosen.detach().sum(),
            "logps/rejected": scores.rejected.detach().sum(),
            "entropy_sum": (entropy.detach() * mask).sum(),
            "tokens": mask.sum(),
        }
        return loss, float(nll.detach()), stats

