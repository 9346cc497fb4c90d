"""Offline preference optimisation on prompt / chosen / rejected pairs: DPO (and its loss_type
variants ipo, hinge, robust), SimPO, RPO and ORPO, all through `PreferenceTrainer`.

Data flows one way: pairs -> tokens (chosen and rejected interleaved, so each pair's prompt runs once
through the shared-prefix path) -> sequence log-probs on the native kernels -> loss from the
preference-loss registry -> update. Reference log-probs are computed once per pair, cached, and kept in
checkpoints.

Multi-process, every rank draws the same global batch of pairs and trains on its shard of it (losses over
the global pair and token counts: `PairwiseUpdate`); the reference cache is filled shard by shard and
exchanged, so that it is the same on every rank. Under FSDP the frozen reference is sharded too, and every
rank runs it as many times (a rank with no rows to fill runs a dummy pass).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from rlgen.algorithms.parts import PairwiseUpdate, sequence_logps
from rlgen.algorithms.preference_losses import PairScores, PreferenceOptions, needs_reference
from rlgen.data.preferences import read_pairs
from rlgen.errors import RlgenError
from rlgen.plugins import registry
from rlgen.rollout.groups import ModelInputs
from rlgen.training.data import PromptSampler
from rlgen.training.micro_batches import map_micro_batches, pair_units
from rlgen.training.parts import PairEncoder
from rlgen.config import section, setting
from rlgen.training.config import OptimConfig, RegisteredName, RunConfig, TrainConfig
from rlgen.training.trainer import Trainer


@dataclass
class PreferenceDataConfig:
    path: str | None = setting(None, "pairs: JSONL or Parquet with prompt, chosen, rejected")
    task: str | None = setting(None, "a task whose held-out split is scored greedily every run.eval_every steps")
    eval_path: str | None = setting(None, "held-out pairs: accuracy of the implicit reward, every run.eval_every steps")
    eval_split: str = setting("test", "the task's held-out split")
    eval_samples: int = setting(200, "held-out problems of the task (0 = none)")
    chat_template: Literal["auto", "always", "never"] = setting("auto", "apply the tokenizer's chat template to prompts and answers (strings or lists of messages): auto (when the tokenizer has one), always, never")
    system_prompt: str = setting("", "a system message put first in every prompt (with a chat template)")

    def registered_names(self) -> list[RegisteredName]:
        return [("data.task", "task", self.task)] if self.task else []


@dataclass
class PreferenceAlgoConfig:
    loss_type: str = setting("sigmoid", "preference loss: sigmoid | ipo | hinge | robust | simpo | orpo | plugin name (TRL's names)")
    beta: float = setting(0.1, "inverse temperature of the implicit reward (> 0)")
    label_smoothing: float = setting(0.0, "assumed fraction of flipped labels (cDPO / robust DPO)")
    simpo_gamma: float = setting(0.5, "SimPO's target reward margin (TRL CPOConfig.simpo_gamma)")
    rpo_alpha: float = setting(0.0, "weight of the NLL of the chosen answers (RPO; ORPO uses 1.0)")
    batch_size: int = setting(32, "pairs per optimiser step")
    precompute_ref_log_probs: bool = setting(False, "all reference log-probs before step 1 (else each pair's when first seen)")
    shared_prefix: bool = setting(True, "one prompt forward per pair (same result, faster)")
    disable_dropout: bool = setting(True, "the policy's dropout off, as TRL, so implicit rewards carry no dropout noise")
    max_new_tokens: int = setting(16, "completion length of the held-out greedy evaluation")

    def validate(self):
        if self.beta <= 0:
            raise RlgenError("config key 'algorithm.beta' must be > 0")

    def registered_names(self) -> list[RegisteredName]:
        return [("algorithm.loss_type", "preference-loss", self.loss_type)]


@dataclass
class DPOConfig(TrainConfig):
    data: PreferenceDataConfig = section(PreferenceDataConfig, "preference pairs and the held-out evaluation")
    algorithm: PreferenceAlgoConfig = section(PreferenceAlgoConfig, "preference loss and its options")
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6))  # TRL's DPO default
    run: RunConfig = field(default_factory=lambda: RunConfig(out="runs/dpo", steps=100))


def disable_dropout(model) -> None:
    """Set every nn.Dropout's rate to 0 (LoRA's own `lora_dropout`, chosen explicitly, is kept)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and "lora_dropout" not in name:
            module.p = 0.0


class PreferenceTrainer(Trainer):
    """dpo, simpo, rpo, orpo (and any registered preference loss) on a fixed set of pairs."""

    config: DPOConfig
    supports_distributed = True

    # --- data and model ---
    def prepare_data(self) -> None:
        cfg = self.config
        if not cfg.data.path:
            raise RlgenError("no preference data: give --data PAIRS.jsonl (fields prompt, chosen, rejected)")
        self.pairs = read_pairs(cfg.data.path)
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
        self.engine = self.text_engine()
        # KTO shares this set-up: it has no pairs to cache and no rpo_alpha
        self.pair_encoder = PairEncoder(self.tokenizer, self.engine, getattr(self, "pairs", None), self.example_texts)
        a = self.config.algorithm
        self.pairwise_update = PairwiseUpdate(self.model, self.loss_fn, self.options, self.optimizer_step,
                                              getattr(a, "rpo_alpha", 0.0), a.shared_prefix,
                                              self.config.optim.gradient_accumulation_steps, self.backward, self.dist,
                                              self.config.optim.max_tokens_per_micro_batch, self.fsdp)
        self.eval_ref_cache: list[torch.Tensor] = []  # per chunk of held-out pairs
        self.reference = self.reference_policy() if self.uses_reference else None
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
        """Model inputs of interleaved pairs (`PairEncoder`: the run's pairs are tokenised once)."""
        return self.pair_encoder.encode(pairs)

    @torch.no_grad()
    def frozen_logps(self, inputs, units: list[list[int]] | None = None) -> torch.Tensor:
        """Summed reference log-probs per row: the frozen copy, or the base without the LoRA adapter; by
        micro-batches of optim.max_tokens_per_micro_batch (keeping `units` whole) when set. Under FSDP the
        reference is sharded: every rank calls this as often as the others (`reference_dummy_pass`) and runs
        as many micro-batches (`dist`)."""
        shared = self.config.algorithm.shared_prefix
        with self.reference.forward() as reference:
            return map_micro_batches(lambda part: sequence_logps(reference, part, 1.0, shared)[0], ModelInputs(*inputs),
                                     self.config.optim.max_tokens_per_micro_batch, units,
                                     self.dist if self.fsdp else None)

    def reference_logps(self, pairs: list[dict], inputs=None) -> torch.Tensor:
        """[S, 2] (chosen, rejected) reference log-probs of this rank's shard (S pairs) of `pairs`, a global
        batch of the run's pairs; `inputs` are the shard's, encoded already (used when all its pairs are new)."""
        shard = self.dist.shard(pairs)

        def compute(missing: torch.Tensor) -> torch.Tensor:
            todo = [p for p, m in zip(shard, missing.tolist()) if m]
            encoded = inputs if inputs is not None and len(todo) == len(shard) else self.encode(todo)
            return self.frozen_logps(encoded, pair_units(2 * len(todo))).view(-1, 2)

        return self.cached_reference(self.pair_encoder.positions(pairs), compute)

    def cached_reference(self, keys: list[int], compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """This rank's share of the `ref_cache` rows `keys` (a global batch's, the same on every rank), on the
        model's device. Rows not cached yet are computed first, each rank its shard's (`compute(missing)`: the
        log-probs of the shard's rows flagged in `missing`), and exchanged: every rank keeps the same cache,
        and rank 0's checkpoint holds all of it."""
        index = torch.tensor(keys, dtype=torch.long)
        span = self.dist.share(len(keys))
        missing = torch.isnan(self.ref_cache[index].view(len(keys), -1)[:, 0])
        if bool(missing.any()):
            found = torch.zeros((len(keys), *self.ref_cache.shape[1:]), dtype=torch.float64)
            local = missing[span.start:span.stop]
            if bool(local.any()):
                found[span.start:span.stop][local] = compute(local).double().cpu()
            elif self.fsdp:
                # The sharded reference gathers its weights in every forward (rlgen.training.fsdp): a rank with
                # nothing to compute runs the pass its peers run, on a dummy row, and drops the result.
                self.reference_dummy_pass()
            found = self.dist.sum(found)  # each row is filled on exactly one rank
            self.ref_cache[index[missing]] = found[missing]
        return self.ref_cache[index[span.start:span.stop]].float().to(self.device)

    def reference_dummy_pass(self) -> None:
        """One reference forward whose result is discarded: what `compute` in `cached_reference` runs (one
        `frozen_logps` call: a sharded model takes the one-forward path, rlgen.models.logprobs)."""
        self.frozen_logps(self.encode(self.pairs[:1]))

    # --- the update ---
    def train_step(self) -> dict:
        pairs = self.sampler.next_batch()  # the global batch: the same on every rank
        inputs = self.encode(self.dist.shard(pairs))
        return self.pairwise_update.step(inputs, self.reference_logps(pairs, inputs) if self.uses_reference else None)

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
            inputs = self.encode(pairs[start : start + 64])
            summed, tokens, _, _ = sequence_logps(self.model, inputs, 1.0, self.config.algorithm.shared_prefix)
            ref = None
            if self.uses_reference and keep:
                if chunk == len(self.eval_ref_cache):
                    self.eval_ref_cache.append(self.frozen_logps(inputs, pair_units(inputs[0].shape[0])).view(-1, 2))
                ref = self.eval_ref_cache[chunk]
            elif self.uses_reference:
                ref = self.frozen_logps(inputs, pair_units(inputs[0].shape[0])).view(-1, 2)
            scores = PairScores(summed[0::2], summed[1::2], tokens[0::2], tokens[1::2],
                                ref[:, 0] if ref is not None else None, ref[:, 1] if ref is not None else None)
            out = self.loss_fn(scores, self.options)
            correct += int((out.chosen_rewards > out.rejected_rewards).sum())
        return correct / len(pairs)

    @property
    def eval_max_new_tokens(self) -> int:
        return self.config.algorithm.max_new_tokens
