"""`rlgen train rm`: a scalar reward model trained on preference pairs with the Bradley-Terry loss
(optional per-pair margin, ties as soft labels), TRL RewardTrainer's conventions. The result loads with
`--reward rm:PATH` anywhere a reward is taken. Multi-process, each rank scores its shard of the global batch;
the loss and the metrics are means over all of its pairs."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from rlgen.algorithms.dpo import disable_dropout
from rlgen.algorithms.preference_losses import bradley_terry
from rlgen.data.preferences import raw_rows, read_pairs
from rlgen.evaluation.reward_models import pair_accuracy
from rlgen.errors import RlgenError
from rlgen.models.causal_lm import resolve_model_path
from rlgen.models.reward_model import load_reward_model, reward_scores
from rlgen.training.data import PromptSampler
from rlgen.training.micro_batches import even_passes, micro_batches, pair_units
from rlgen.training.parts import summed_over_ranks
from rlgen.config import section, setting
from rlgen.training.config import OptimConfig, RunConfig, TrainConfig
from rlgen.training.trainer import Trainer


@dataclass
class RewardDataConfig:
    path: str | None = setting(None, "pairs: JSONL or Parquet with prompt, chosen, rejected (optional margin, tie)")
    eval_path: str | None = setting(None, "held-out pairs: pairwise accuracy every run.eval_every steps")
    task: str | None = setting(None, "unused by rm; accepted so that --task does not fail")


@dataclass
class RewardAlgoConfig:
    batch_size: int = setting(32, "pairs per optimiser step")
    head: Literal["auto", "sequence-classification", "value-head"] = setting("auto", "the scalar head: auto picks by the model's architecture")  # rlgen.models.reward_model.HEADS
    use_margin: bool = setting(False, "subtract each pair's `margin` field inside the sigmoid (Llama 2's margin loss)")
    center_rewards_coefficient: float = setting(0.0, "TRL: penalise (r_c + r_r)^2 to keep rewards centred near 0")
    disable_dropout: bool = setting(True, "dropout off, as TRL's RewardConfig: deterministic scores while training")


@dataclass
class RewardModelConfig(TrainConfig):
    data: RewardDataConfig = section(RewardDataConfig, "preference pairs (training and held-out)")
    algorithm: RewardAlgoConfig = section(RewardAlgoConfig, "reward-model head and loss options")
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))
    run: RunConfig = field(default_factory=lambda: RunConfig(out="runs/rm", steps=100))


class RewardModelTrainer(Trainer):
    config: RewardModelConfig
    supports_distributed = True

    def prepare_data(self) -> None:
        cfg = self.config
        if not cfg.data.path:
            raise RlgenError("no preference data: give --data PAIRS.jsonl (fields prompt, chosen, rejected)")
        self.pairs = read_pairs(cfg.data.path)
        if cfg.algorithm.use_margin and any("margin" not in p for p in self.pairs):
            missing = next(p for p in self.pairs if "margin" not in p)
            raise RlgenError(f"{cfg.data.path}, line {missing.get('_line', '?')}: algorithm.use_margin needs a 'margin' "
                             "(or chosen_score and rejected_score) on every pair")
        if cfg.model.lora_r > 0:
            raise RlgenError("config key 'model.lora_r': LoRA is not supported for reward models yet (use 0)")
        self.sampler = PromptSampler(self.pairs, cfg.algorithm.batch_size, cfg.run.seed)
        self.eval_pairs = read_pairs(cfg.data.eval_path) if cfg.data.eval_path else None

    def _load_model(self, checkpoint: Path | None):
        cfg = self.config
        base_path = resolve_model_path(cfg.model.path)
        model, tokenizer = load_reward_model(checkpoint / "model" if checkpoint else base_path, cfg.model.dtype,
                                             cfg.algorithm.head)
        return model, tokenizer, base_path

    def prepare(self) -> None:
        if self.config.algorithm.disable_dropout:
            disable_dropout(self.model)

    def extra_state(self) -> dict:
        return {"sampler": self.sampler.state()}

    def restore_extra_state(self, state: dict) -> None:
        self.sampler.restore(state["sampler"])

    def train_step(self) -> dict:
        cfg = self.config
        pairs = self.sampler.next_batch()  # the global batch: the same on every rank
        n = len(pairs)  # every mean is over the global batch
        shard = self.dist.shard(pairs)
        sums = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0, "rewards/chosen": 0.0, "rewards/rejected": 0.0}
        # a rank without pairs (a global batch smaller than the world) only joins the collectives
        budget = cfg.optim.max_tokens_per_micro_batch
        costs = None
        if budget and shard:  # tokens of each scored text (prompt + answer), rows [chosen_0, rejected_0, ...]
            costs = [len(ids) for ids in self.tokenizer([p + c for p, c in zip(*self.example_texts(*raw_rows(shard)))],
                                                        add_special_tokens=self.chat.add_special_tokens).input_ids]
        rows = micro_batches(2 * len(shard), budget, cfg.optim.gradient_accumulation_steps, costs, pair_units(2 * len(shard)))
        # under FSDP every rank runs as many passes as the others (the budget may split shards unevenly)
        for idx, real in even_passes([chunk[0::2] // 2 for chunk in rows], self.dist if self.fsdp and budget else None):
            part = [shard[i] for i in idx.tolist()]
            prompts, completions = self.example_texts(*raw_rows(part))
            scores = reward_scores(self.model, self.tokenizer, prompts, completions, self.chat.add_special_tokens)
            chosen, rejected = scores[0::2], scores[1::2]
            margin = torch.tensor([float(p["margin"]) for p in part], device=scores.device) if cfg.algorithm.use_margin else None
            tie = torch.tensor([bool(p.get("tie", False)) for p in part], device=scores.device)
            losses = bradley_terry(chosen, rejected, margin, tie if bool(tie.any()) else None)
            if cfg.algorithm.center_rewards_coefficient:
                losses = losses + cfg.algorithm.center_rewards_coefficient * (chosen + rejected) ** 2
            loss = losses.sum() / n
            if not real:  # a filler pass (FSDP): zero weight, no statistics
                self.backward(loss * 0.0)
                continue
            self.backward(loss)
            sums["loss"] += float(loss.detach())
            sums["accuracy"] += float((chosen > rejected).float().sum()) / n
            sums["margin"] += float((chosen - rejected).detach().sum()) / n
            sums["rewards/chosen"] += float(chosen.detach().sum()) / n
            sums["rewards/rejected"] += float(rejected.detach().sum()) / n
        grad_norm = self.optimizer_step()
        return {**summed_over_ranks(self.dist, sums), "grad_norm": grad_norm}

    def evaluate(self) -> dict:
        if not self.eval_pairs:
            return {}
        return {"eval/pair_accuracy": pair_accuracy(self.model, self.tokenizer, self.eval_pairs)["accuracy"]}
