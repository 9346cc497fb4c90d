"""`rlgen train kto`: Kahneman-Tversky optimisation on unpaired desirable / undesirable answers
(`prompt`, `completion`, `label`; pair files are split into one of each). TRL KTOTrainer's
conventions: the reference point z is the batch KL estimated on mismatched (prompt, completion) pairs,
made by cycling the batch's completions by one, detached and clamped at 0.

Multi-process, every rank draws the same global batch, scores its shard, and the means (the loss, the KL
estimate, the metrics) are over the global batch."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlgen.algorithms.dpo import PreferenceDataConfig, PreferenceTrainer, sequence_logps
from rlgen.algorithms.preference_losses import PreferenceOptions, kto_losses
from rlgen.data.preferences import read_pairs, read_unpaired
from rlgen.errors import RlgenError
from rlgen.plugins import registry
from rlgen.rollout.groups import ModelInputs
from rlgen.training.data import PromptSampler
from rlgen.training.micro_batches import even_passes, map_micro_batches, micro_batches, row_costs, trimmed
from rlgen.training.parts import summed_over_ranks
from rlgen.config import section, setting
from rlgen.training.config import OptimConfig, RunConfig, TrainConfig


@dataclass
class KTOAlgoConfig:
    beta: float = setting(0.1, "inverse temperature of the implicit reward (> 0)")
    desirable_weight: float = setting(1.0, "loss weight of desirable answers (TRL's name; balance when one kind dominates)")
    undesirable_weight: float = setting(1.0, "loss weight of undesirable answers")
    batch_size: int = setting(32, "examples per optimiser step (the KL estimate needs >= 2)")
    shared_prefix: bool = setting(True, "one prompt forward per example pair (same result, faster)")
    disable_dropout: bool = setting(True, "the policy's dropout off, as TRL")
    max_new_tokens: int = setting(16, "completion length of the held-out greedy evaluation")

    def validate(self):
        if self.beta <= 0:
            raise RlgenError("config key 'algorithm.beta' must be > 0")
        if self.batch_size < 2:
            raise RlgenError("config key 'algorithm.batch_size' must be >= 2 (the KL reference point mixes examples)")


@dataclass
class KTOConfig(TrainConfig):
    data: PreferenceDataConfig = section(PreferenceDataConfig, "examples (prompt, completion, label, or pairs) and the held-out evaluation")
    algorithm: KTOAlgoConfig = section(KTOAlgoConfig, "KTO's loss options")
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6))
    run: RunConfig = field(default_factory=lambda: RunConfig(out="runs/kto", steps=100))


class KTOTrainer(PreferenceTrainer):
    config: KTOConfig
    supports_distributed = True

    def prepare_data(self) -> None:
        cfg = self.config
        if not cfg.data.path:
            raise RlgenError("no data: give --data FILE with prompt, completion, label (or prompt, chosen, rejected)")
        self.examples = read_unpaired(cfg.data.path)
        # drawn by position (the same order as drawing the records), which keys the reference cache
        self.sampler = PromptSampler(list(range(len(self.examples))), cfg.algorithm.batch_size, cfg.run.seed)
        self.loss_fn = registry("preference-loss").get("sigmoid")  # its implicit reward, for held-out pair accuracy
        self.uses_reference = True
        self.options = PreferenceOptions(beta=cfg.algorithm.beta)  # for the held-out pair accuracy
        self.eval_pairs = read_pairs(cfg.data.eval_path) if cfg.data.eval_path else None
        self.eval_records = None
        if cfg.run.eval_every and cfg.data.task:
            self.eval_records = registry("task").get(cfg.data.task).split(cfg.data.eval_split)[: cfg.data.eval_samples]
        self.ref_cache = torch.full((len(self.examples),), float("nan"), dtype=torch.float64)

    def encode_examples(self, prompts: list[str], completions: list[str]):
        prompts, completions = self.example_texts(prompts, completions)
        prompt_ids, prompt_mask = self.engine.encode_prompts(prompts)
        completion_ids, completion_mask = self.engine.encode_completions(completions)
        return prompt_ids, prompt_mask, completion_ids, completion_mask

    def train_step(self) -> dict:
        a = self.config.algorithm
        rows = self.sampler.next_batch()  # the global batch: the same on every rank
        n = len(rows)
        prompts = [self.examples[k]["prompt"] for k in rows]
        completions = [self.examples[k]["completion"] for k in rows]
        # Mismatched pairs for the KL reference point: prompt i with completion i-1 (of the global batch).
        mismatched = completions[-1:] + completions[:-1]
        shard = self.dist.shard(list(range(n)))
        sums = dict.fromkeys(("loss", "entropy_sum", "tokens", "desirable", "rewards/chosen", "logps/chosen",
                              "rewards/rejected", "logps/rejected"), 0.0)
        # a rank without examples (a global batch smaller than the world) only joins the collectives
        kl_sum = torch.zeros((), device=self.device)
        budget = self.config.optim.max_tokens_per_micro_batch
        even = self.dist if self.fsdp and budget else None  # FSDP: every rank runs as many policy passes as the others
        if shard:
            inputs = self.encode_examples([prompts[i] for i in shard], [completions[i] for i in shard])
            kl_inputs = self.encode_examples([prompts[i] for i in shard], [mismatched[i] for i in shard])
            with torch.no_grad():
                policy_kl = map_micro_batches(lambda part: sequence_logps(self.model, part, 1.0, a.shared_prefix)[0],
                                              ModelInputs(*kl_inputs), budget, dist=even)
                kl_sum = (policy_kl - self.frozen_logps(kl_inputs)).sum()
        ref = self.cached_reference(rows, lambda missing: self.frozen_logps(inputs)[missing])
        kl = self.dist.sum(kl_sum) / n  # the global batch's estimate: the same reference point on every rank
        if shard:
            inputs = ModelInputs(*inputs)
            desirable_all = torch.tensor([bool(self.examples[rows[i]]["label"]) for i in shard], device=ref.device)
            chunks = micro_batches(len(shard), budget, 1, row_costs(inputs) if budget else None)
            for idx, real in even_passes(chunks, even):
                part = inputs.rows(idx.to(inputs.prompt_ids.device))
                part = trimmed(part) if budget else part  # a short micro-batch computes on its own width only
                summed, _, _, entropy = sequence_logps(self.model, part, 1.0, a.shared_prefix)
                idx = idx.to(ref.device)
                desirable = desirable_all[idx]
                logratios = summed - ref[idx]
                losses = kto_losses(logratios, desirable, kl, a.beta, a.desirable_weight, a.undesirable_weight)
                loss = losses.sum() / n
                if not real:  # a filler pass (FSDP): zero weight, no statistics
                    self.backward(loss * 0.0)
                    continue
                self.backward(loss)
                rewards = a.beta * logratios.detach()
                mask = part.completion_mask.float()
                for key, value in (("loss", loss.detach()), ("entropy_sum", (entropy.detach() * mask).sum()),
                                   ("tokens", mask.sum()), ("desirable", desirable.sum()),
                                   ("rewards/chosen", rewards[desirable].sum()),
                                   ("logps/chosen", summed.detach()[desirable].sum()),
                                   ("rewards/rejected", rewards[~desirable].sum()),
                                   ("logps/rejected", summed.detach()[~desirable].sum())):
                    sums[key] += float(value)
        grad_norm = self.optimizer_step()
        sums = summed_over_ranks(self.dist, sums)
        desirable_count = sums["desirable"]
        metrics = {"loss": sums["loss"], "kl": float(kl), "grad_norm": grad_norm,
                   "entropy": sums["entropy_sum"] / max(sums["tokens"], 1.0), "desirable_fraction": desirable_count / n}
        if desirable_count:
            metrics["rewards/chosen"] = sums["rewards/chosen"] / desirable_count
            metrics["logps/chosen"] = sums["logps/chosen"] / desirable_count
        if desirable_count < n:
            metrics["rewards/rejected"] = sums["rewards/rejected"] / (n - desirable_count)
            metrics["logps/rejected"] = sums["logps/rejected"] / (n - desirable_count)
        return metrics

    def reference_dummy_pass(self) -> None:
        example = self.examples[0]
        self.frozen_logps(self.encode_examples([example["prompt"]], [example["completion"]]))

    def extra_tensors(self) -> dict:
        return {"ref_cache": self.ref_cache}
