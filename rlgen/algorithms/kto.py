"""`rlgen train kto`: Kahneman-Tversky optimisation on unpaired desirable / undesirable answers
(`prompt`, `completion`, `label`; pair files are split into one of each). TRL KTOTrainer's
conventions: the reference point z is the batch KL estimated on mismatched (prompt, completion) pairs,
made by cycling the batch's completions by one, detached and clamped at 0."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlgen.algorithms.dpo import PreferenceDataConfig, PreferenceTrainer, sequence_logps
from rlgen.algorithms.preference_losses import PreferenceOptions, kto_losses
from rlgen.data.preferences import read_pairs, read_unpaired
from rlgen.errors import RlgenError
from rlgen.plugins import registry
from rlgen.training.data import PromptSampler
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
        prompt_ids, prompt_mask = self.engine.encode_prompts(prompts)
        completion_ids, completion_mask = self.engine.encode_completions(completions)
        return prompt_ids, prompt_mask, completion_ids, completion_mask

    def train_step(self) -> dict:
        a = self.config.algorithm
        rows = self.sampler.next_batch()
        batch = [self.examples[k] for k in rows]
        prompts = [e["prompt"] for e in batch]
        completions = [e["completion"] for e in batch]
        inputs = self.encode_examples(prompts, completions)
        # Mismatched pairs for the KL reference point: prompt i with completion i-1.
        kl_inputs = self.encode_examples(prompts, completions[-1:] + completions[:-1])
        index = torch.tensor(rows)
        missing = torch.isnan(self.ref_cache[index])
        if bool(missing.any()):
            self.ref_cache[index] = torch.where(missing, self.frozen_logps(inputs).double(), self.ref_cache[index])
        ref = self.ref_cache[index].float()
        with torch.no_grad():
            kl = (sequence_logps(self.model, kl_inputs, 1.0, a.shared_prefix)[0] - self.frozen_logps(kl_inputs)).mean()
        summed, tokens, _, entropy = sequence_logps(self.model, inputs, 1.0, a.shared_prefix)
        desirable = torch.tensor([bool(e["label"]) for e in batch])
        logratios = summed - ref
        losses = kto_losses(logratios, desirable, kl, a.beta, a.desirable_weight, a.undesirable_weight)
        loss = losses.mean()
        loss.backward()
        grad_norm = self.optimizer_step()
        rewards = a.beta * logratios.detach()
        mask = inputs[3].float()
        metrics = {"loss": float(loss.detach()), "kl": float(kl), "grad_norm": grad_norm,
                   "entropy": float((entropy.detach() * mask).sum() / mask.sum().clamp(min=1)),
                   "desirable_fraction": float(desirable.float().mean())}
        if bool(desirable.any()):
            metrics["rewards/chosen"] = float(rewards[desirable].mean())
            metrics["logps/chosen"] = float(summed.detach()[desirable].mean())
        if bool((~desirable).any()):
            metrics["rewards/rejected"] = float(rewards[~desirable].mean())
            metrics["logps/rejected"] = float(summed.detach()[~desirable].mean())
        return metrics

    def extra_tensors(self) -> dict:
        return {"ref_cache": self.ref_cache}
