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
from rlgen.models.causal_lm import ModelConfig
from rlgen.plugins import registry
from rlgen.training.data import PromptSampler
from rlgen.training.trainer import OptimConfig, RunConfig


@dataclass
class KTOAlgoConfig:
    beta: float = 0.1
    desirable_weight: float = 1.0  # TRL's names; balance them when one kind dominates the data
    undesirable_weight: float = 1.0
    batch_size: int = 32  # examples per optimiser step (the KL estimate needs >= 2)
    shared_prefix: bool = True
    disable_dropout: bool = True  # as TRL
    max_new_tokens: int = 16  # for the held-out greedy evaluation

    def validate(self):
        if self.beta <= 0:
            raise RlgenError("config key 'algorithm.beta' must be > 0")
        if self.batch_size < 2:
            raise RlgenError("config key 'algorithm.batch_size' must be >= 2 (the KL reference point mixes examples)")
        if self.desirable_weight < 0 or self.undesirable_weight < 0:
            raise RlgenError("config keys 'algorithm.desirable_weight' and 'undesirable_weight' must be >= 0")


@dataclass
class KTOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    algorithm: KTOAlgoConfig = field(default_factory=KTOAlgoConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6))
    run: RunConfig = field(default_factory=lambda: RunConfig(out="runs/kto", steps=100))


class KTOTrainer(PreferenceTrainer):
    config: KTOConfig

    def prepare_data(self) -> None:
        cfg = self.config
        if not cfg.data.path:
            raise RlgenError("no data: give --data FILE with prompt, completion, label (or prompt, chosen, rejected)")
        self.examples = read_unpaired(cfg.data.path)
        for index, example in enumerate(self.examples):
            example["_index"] = index
        self.sampler = PromptSampler(self.examples, cfg.algorithm.batch_size, cfg.run.seed)
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
        batch = self.sampler.next_batch()
        prompts = [e["prompt"] for e in batch]
        completions = [e["completion"] for e in batch]
        inputs = self.encode_examples(prompts, completions)
        # Mismatched pairs for the KL reference point: prompt i with completion i-1.
        kl_inputs = self.encode_examples(prompts, completions[-1:] + completions[:-1])
        index = torch.tensor([e["_index"] for e in batch])
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
