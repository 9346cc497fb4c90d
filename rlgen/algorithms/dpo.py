"""Offline preference optimisation on prompt / chosen / rejected pairs: DPO (and its loss_type
variants ipo, hinge, robust), SimPO, RPO and ORPO, all through `PreferenceTrainer`.

Data flows one way: pairs -> tokens (chosen and rejected interleaved, so each pair's prompt runs once
through the shared-prefix path) -> sequence log-probs on the native kernels -> loss from the
preference-loss registry -> update. Reference log-probs are computed once per pair, cached, and kept in
checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlgen.models.logprobs import completion_logprobs
from rlgen.algorithms.preference_losses import PairScores, PreferenceOptions, needs_reference
from rlgen.data.preferences import read_pairs
from rlgen.errors import RlgenError
from rlgen.models.causal_lm import ModelConfig, is_peft, load_model
from rlgen.plugins import registry
from rlgen.rollout.engine import HFEngine
from rlgen.models.sequences import pad_tokens
from rlgen.training.data import PromptSampler
from rlgen.training.trainer import OptimConfig, RunConfig, Trainer


@dataclass
class PreferenceDataConfig:
    path: str | None = None  # pairs: JSONL or Parquet with prompt, chosen, rejected
    task: str | None = None  # a task whose held-out split is scored greedily every run.eval_every steps
    eval_path: str | None = None  # held-out pairs: accuracy of the implicit reward, every run.eval_every steps
    eval_split: str = "test"
    eval_samples: int = 200


@dataclass
class PreferenceAlgoConfig:
    loss_type: str = "sigmoid"  # sigmoid | ipo | hinge | robust | simpo | orpo | plugin name (TRL's names)
    beta: float = 0.1
    label_smoothing: float = 0.0  # cDPO / robust DPO
    simpo_gamma: float = 0.5  # SimPO's target reward margin (TRL CPOConfig.simpo_gamma)
    rpo_alpha: float = 0.0  # weight of the NLL of the chosen answers (RPO; ORPO uses 1.0)
    batch_size: int = 32  # pairs per optimiser step
    precompute_ref_log_probs: bool = False  # all reference log-probs before step 1 (else each pair's when first seen)
    shared_prefix: bool = True  # one prompt forward per pair (same result, faster)
    disable_dropout: bool = True  # as TRL: the policy's dropout off, so implicit rewards carry no dropout noise
    max_new_tokens: int = 16  # for the held-out greedy evaluation

    def validate(self):
        if self.beta <= 0:
            raise RlgenError("config key 'algorithm.beta' must be > 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise RlgenError("config key 'algorithm.label_smoothing' must be in [0, 0.5)")
        if self.batch_size < 1:
            raise RlgenError("config key 'algorithm.batch_size' must be >= 1")
        if self.rpo_alpha < 0:
            raise RlgenError("config key 'algorithm.rpo_alpha' must be >= 0")


@dataclass
class DPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    algorithm: PreferenceAlgoConfig = field(default_factory=PreferenceAlgoConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6))  # TRL's DPO default
    run: RunConfig = field(default_factory=lambda: RunConfig(out="runs/dpo", steps=100))


def sequence_logps(model, inputs, temperature: float = 1.0, shared_prefix: bool = True):
    """(summed log-prob per row [B], token count per row [B], per-token log-probs [B, C], entropy)."""
    logp, entropy = completion_logprobs(model, *inputs, temperature, shared_prefix)
    mask = inputs[3].to(logp.dtype)
    return (logp * mask).sum(1), mask.sum(1), logp, entropy


def disable_dropout(model) -> None:
    """Set every nn.Dropout's rate to 0 (LoRA's own `lora_dropout`, chosen explicitly, is kept)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and "lora_dropout" not in name:
            module.p = 0.0


class PreferenceTrainer(Trainer):
    """dpo, simpo, rpo, orpo (and any registered preference loss) on a fixed set of pairs."""

    config: DPOConfig

    # --- data and model ---
    def prepare_data(self) -> None:
        cfg = self.config
        if not cfg.data.path:
            raise RlgenError("no preference data: give --data PAIRS.jsonl (fields prompt, chosen, rejected)")
        self.pairs = read_pairs(cfg.data.path)
        for index, pair in enumerate(self.pairs):
            pair["_index"] = index
        self.sampler = PromptSampler(self.pairs, cfg.algorithm.batch_size, cfg.run.seed)
        self.loss_fn = registry("preference-loss").get(cfg.algorithm.loss_type)
        self.uses_reference = needs_reference(self.loss_fn)
        self.options = PreferenceOptions(cfg.algorithm.beta, cfg.algorithm.label_smoothing, cfg.algorithm.simpo_gamma)
        self.eval_pairs = read_pairs(cfg.data.eval_path) if cfg.data.eval_path else None
        self.eval_records = None
        if cfg.run.eval_every and cfg.data.task:
            self.eval_records = registry("task").get(cfg.data.task).split(cfg.data.eval_split)[: cfg.data.eval_samples]
        self.ref_cache = torch.full((len(self.pairs), 2), float("nan"), dtype=torch.float64)

    def prepare(self) -> None:
        # The reference runs in eval mode; with dropout in the policy pass the implicit rewards would carry
        # dropout noise (DPO's step 1 would not be log 2). TRL's disable_dropout=True; LoRA's own is kept.
        if getattr(self.config.algorithm, "disable_dropout", True):
            disable_dropout(self.model)
        self.engine = HFEngine(self.model, self.tokenizer)
        self.token_cache: dict[int, tuple[list[int], list[int], list[int]]] = {}
        self.eval_ref_cache: list[torch.Tensor] = []  # per chunk of held-out pairs
        self.reference = None
        if self.uses_reference and not is_peft(self.model):
            self.reference = load_model(self.base_path, self.config.model.dtype).eval().requires_grad_(False)
        if self.uses_reference and getattr(self.config.algorithm, "precompute_ref_log_probs", False) and not self.resume:
            self.reporter.log(f"computing reference log-probs of {len(self.pairs)} pairs")
            size = max(64, self.config.algorithm.batch_size)
            for start in range(0, len(self.pairs), size):
                self.reference_logps(self.pairs[start : start + size])

    def eval_task_rewards(self) -> tuple[str, ...]:
        return registry("task").get(self.config.data.task).default_rewards

    def extra_state(self) -> dict:
        return {"sampler": self.sampler.state()}

    def restore_extra_state(self, state: dict) -> None:
        self.sampler.restore(state["sampler"])

    def extra_tensors(self) -> dict:
        return {"ref_cache": self.ref_cache} if self.uses_reference else {}

    def restore_extra_tensors(self, tensors: dict) -> None:
        if "ref_cache" in tensors and tensors["ref_cache"].shape == self.ref_cache.shape:
            self.ref_cache = tensors["ref_cache"]

    # --- log-probs ---
    def encode(self, pairs: list[dict]):
        """Model inputs of interleaved pairs. Each pair is tokenised once per run (the first time it is
        drawn); later epochs only pad."""
        cache = self.token_cache
        new = [p for p in pairs if "_index" not in p or p["_index"] not in cache]
        if new:
            prompt_tokens = self.tokenizer([p["prompt"] for p in new]).input_ids
            answers = self.engine.tokenize_completions([text for p in new for text in (p["chosen"], p["rejected"])])
            for k, pair in enumerate(new):
                entry = (prompt_tokens[k], answers[2 * k], answers[2 * k + 1])
                if "_index" in pair:
                    cache[pair["_index"]] = entry
                else:
                    pair["_tokens"] = entry
        entries = [cache[p["_index"]] if "_index" in p and p["_index"] in cache else p.pop("_tokens") for p in pairs]
        prompt_ids, prompt_mask = pad_tokens([e[0] for e in entries for _ in range(2)], self.engine.pad_id, left=True)
        completion_ids, completion_mask = self.engine.pad_completions([t for e in entries for t in e[1:]])
        return prompt_ids, prompt_mask, completion_ids, completion_mask

    @torch.no_grad()
    def frozen_logps(self, inputs) -> torch.Tensor:
        """Summed reference log-probs per row: the frozen copy, or the base without the LoRA adapter."""
        shared = self.config.algorithm.shared_prefix
        if self.reference is not None:
            return sequence_logps(self.reference, inputs, 1.0, shared)[0]
        was_training = self.model.training
        self.model.eval()
        with self.model.disable_adapter():
            logps = sequence_logps(self.model, inputs, 1.0, shared)[0]
        self.model.train(was_training)
        return logps

    def reference_logps(self, pairs: list[dict], inputs=None) -> torch.Tensor:
        """[B, 2] (chosen, rejected) reference log-probs, computed for the pairs not yet in the cache."""
        index = torch.tensor([p["_index"] for p in pairs])
        missing = torch.isnan(self.ref_cache[index, 0])
        if bool(missing.any()):
            todo = [p for p, m in zip(pairs, missing.tolist()) if m]
            logps = self.frozen_logps(self.encode(todo) if inputs is None or len(todo) < len(pairs) else inputs)
            self.ref_cache[index[missing]] = logps.view(-1, 2).double()
        return self.ref_cache[index].float()

    # --- the update ---
    def pair_loss(self, model_inputs, ref: torch.Tensor | None, total_pairs: int, total_chosen_tokens: float):
        """Loss of one micro-batch of interleaved pairs, scaled to its share of the step, and its stats."""
        a = self.config.algorithm
        summed, tokens, logp, entropy = sequence_logps(self.model, model_inputs, 1.0, a.shared_prefix)
        scores = PairScores(summed[0::2], summed[1::2], tokens[0::2], tokens[1::2],
                            ref[:, 0] if ref is not None else None, ref[:, 1] if ref is not None else None)
        out = self.loss_fn(scores, self.options)
        loss = out.losses.sum() / total_pairs
        nll = -summed[0::2].sum() / max(total_chosen_tokens, 1.0)  # token mean over the step's chosen answers
        if a.rpo_alpha > 0:
            loss = loss + a.rpo_alpha * nll
        mask = model_inputs[3].float()
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

    def update(self, inputs, ref: torch.Tensor | None) -> dict:
        """One optimiser step on interleaved pairs (micro-batched for gradient accumulation) -> metrics."""
        n = inputs[0].shape[0] // 2
        chosen_tokens = float(inputs[3][0::2].sum())
        sums: dict[str, float] = {"loss": 0.0, "nll": 0.0}
        for idx in torch.arange(n).chunk(min(self.config.optim.gradient_accumulation_steps, n)):
            rows = torch.stack([2 * idx, 2 * idx + 1], dim=1).flatten()
            loss, nll, stats = self.pair_loss([t[rows] for t in inputs], ref[idx] if ref is not None else None, n,
                                              chosen_tokens)
            loss.backward()
            sums["loss"] += float(loss.detach())
            sums["nll"] += nll
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        metrics = {k: v / n for k, v in sums.items() if k.startswith(("rewards/", "logps/"))}
        metrics.update(loss=sums["loss"], nll=sums["nll"], entropy=sums["entropy_sum"] / max(sums["tokens"], 1.0),
                       grad_norm=self.optimizer_step(), pairs=n)
        return metrics

    def train_step(self) -> dict:
        pairs = self.sampler.next_batch()
        inputs = self.encode(pairs)
        return self.update(inputs, self.reference_logps(pairs, inputs) if self.uses_reference else None)

    # --- held-out evaluation ---
    def evaluate(self) -> dict:
        metrics = super().evaluate()
        if self.eval_pairs:
            metrics["eval/pair_accuracy"] = self.pair_accuracy(self.eval_pairs)
        self.model.train()
        return metrics

    @torch.no_grad()
    def pair_accuracy(self, pairs: list[dict]) -> float:
        """Fraction of pairs whose implicit reward ranks chosen above rejected (ties are wrong). The frozen
        reference's log-probs of the run's held-out pairs (`eval_pairs`) are computed once and kept."""
        keep = pairs is self.eval_pairs
        self.model.eval()
        correct = 0
        for chunk, start in enumerate(range(0, len(pairs), 64)):
            inputs = self.encode([{k: v for k, v in p.items() if k != "_index"} for p in pairs[start : start + 64]])
            summed, tokens, _, _ = sequence_logps(self.model, inputs, 1.0, self.config.algorithm.shared_prefix)
            ref = None
            if self.uses_reference and keep:
                if chunk == len(self.eval_ref_cache):
                    self.eval_ref_cache.append(self.frozen_logps(inputs).view(-1, 2))
                ref = self.eval_ref_cache[chunk]
            elif self.uses_reference:
                ref = self.frozen_logps(inputs).view(-1, 2)
            scores = PairScores(summed[0::2], summed[1::2], tokens[0::2], tokens[1::2],
                                ref[:, 0] if ref is not None else None, ref[:, 1] if ref is not None else None)
            out = self.loss_fn(scores, self.options)
            correct += int((out.chosen_rewards > out.rejected_rewards).sum())
        return correct / len(pairs)

    @property
    def eval_max_new_tokens(self) -> int:
        return self.config.algorithm.max_new_tokens
