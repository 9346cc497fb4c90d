"""`rlgen train online-dpo`: iterate sample -> score -> pair -> preference update with the current
policy (online / iterative DPO; with `ref_update_every` the reference follows the policy, the batched
on-policy loop of Direct Nash Optimization). Rollouts go through the same code as GRPO
(rlgen.rollout.groups), pairs are each group's best against its worst completion, and the update is
the offline trainer's pair loss on the sampled tokens themselves (no re-tokenisation)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlgen.algorithms.dpo import PreferenceAlgoConfig, PreferenceTrainer
from rlgen.algorithms.grpo import RolloutConfig, check_context_length, data_source
from rlgen.algorithms.preference_losses import PreferenceOptions, needs_reference
from rlgen.errors import RlgenError
from rlgen.models.causal_lm import ModelConfig, is_peft
from rlgen.plugins import registry
from rlgen.rewards.base import RewardSet, RewardSpec, counted
from rlgen.rollout.engine import SamplingParams
from rlgen.rollout.groups import rollout_groups
from rlgen.training.data import PromptSampler
from rlgen.training.trainer import DataConfig, OptimConfig, RunConfig, load_records


@dataclass
class OnlineAlgoConfig(PreferenceAlgoConfig):
    ref_update_every: int = 0  # copy the policy into the reference every N steps (0 = the initial model throughout)

    def validate(self):
        super().validate()
        if self.ref_update_every < 0:
            raise RlgenError("config key 'algorithm.ref_update_every' must be >= 0")


def _default_rewards() -> list[RewardSpec]:
    return [RewardSpec("exact-match")]


@dataclass
class OnlineDPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(num_generations=4))
    algorithm: OnlineAlgoConfig = field(default_factory=OnlineAlgoConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6))
    run: RunConfig = field(default_factory=lambda: RunConfig(out="runs/online-dpo", steps=100))
    rewards: list[RewardSpec] = field(default_factory=_default_rewards)
    rewards_on_error: str = "raise"
    reward_combine: str = "weighted-sum"
    reward_shaping: str = ""


def best_worst_rows(total: torch.Tensor, valid: torch.Tensor, group_size: int) -> torch.Tensor:
    """Row indices [best_0, worst_0, best_1, worst_1, ...] of the groups whose valid rewards differ
    (first occurrence wins ties); groups without a spread give no pair."""
    scores = torch.where(valid, total, torch.full_like(total, float("nan"))).view(-1, group_size)
    rows = []
    for g, row in enumerate(scores):
        ok = ~torch.isnan(row)
        if int(ok.sum()) < 2:
            continue
        high = torch.where(ok, row, torch.full_like(row, float("-inf")))
        low = torch.where(ok, row, torch.full_like(row, float("inf")))
        best, worst = int(high.argmax()), int(low.argmin())
        if float(row[best]) > float(row[worst]):
            rows += [g * group_size + best, g * group_size + worst]
    return torch.tensor(rows, dtype=torch.long)


class OnlineDPOTrainer(PreferenceTrainer):
    config: OnlineDPOConfig

    def prepare_data(self) -> None:
        cfg = self.config
        self.records = load_records(cfg.data, cfg.data.split)
        self.sampler = PromptSampler(self.records, cfg.rollout.prompts_per_step, cfg.run.seed)
        self.rewards = RewardSet(cfg.rewards, cfg.rewards_on_error, combine=cfg.reward_combine, shaping=cfg.reward_shaping)
        self.rewards.check_fields(self.records, data_source(cfg.data))  # e.g. exact-match without `answer`
        self.loss_fn = registry("preference-loss").get(cfg.algorithm.loss_type)
        self.uses_reference = needs_reference(self.loss_fn)
        a = cfg.algorithm
        self.options = PreferenceOptions(a.beta, a.label_smoothing, a.simpo_gamma)
        self.params = SamplingParams(cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k)
        self.eval_pairs = None
        self.eval_records = load_records(cfg.data, cfg.data.eval_split)[: cfg.data.eval_samples] if cfg.run.eval_every else None
        self.pairs = []
        self.ref_cache = torch.zeros((0, 2), dtype=torch.float64)

    def prepare(self) -> None:
        check_context_length(self.model, self.tokenizer, self.records, self.config.rollout.max_new_tokens)
        if self.config.algorithm.ref_update_every and is_peft(self.model):
            raise RlgenError("config key 'algorithm.ref_update_every' needs full fine-tuning (model.lora_r = 0)")
        super().prepare()

    def eval_task_rewards(self) -> tuple[str, ...]:
        data = self.config.data
        return registry("task").get(data.task).default_rewards if data.task and not data.path else ("exact-match",)

    def extra_state(self) -> dict:
        return {"sampler": self.sampler.state(), "reward_shaping": self.rewards.state()}

    def restore_extra_state(self, state: dict) -> None:
        self.sampler.restore(state["sampler"])
        self.rewards.restore(state.get("reward_shaping", {}))

    def extra_tensors(self) -> dict:
        if self.config.algorithm.ref_update_every and self.reference is not None:
            return {"reference": self.reference.state_dict()}  # the moving reference is part of the run's state
        return {}

    def restore_extra_tensors(self, tensors: dict) -> None:
        if "reference" in tensors and self.reference is not None:
            self.reference.load_state_dict(tensors["reference"])

    def train_step(self) -> dict:
        cfg = self.config
        g = cfg.rollout.num_generations
        records = self.sampler.next_batch()
        rollouts, samples, components, valid, total = rollout_groups(self.engine, self.rewards, records, g, self.params,
                                                                     self.generator)
        metrics = self.rewards.metrics(components, total, valid)
        rows = best_worst_rows(total, counted(components, valid), g)  # completions without any reward never pair
        if len(rows) == 0:
            metrics.update(pairs=0, skipped_update=1)
            return metrics
        picked = rollouts.select(rows)
        inputs = (picked.prompt_ids, picked.prompt_mask, picked.completion_ids, picked.completion_mask)
        ref = self.frozen_logps(inputs).view(-1, 2) if self.uses_reference else None
        metrics.update(self.update(inputs, ref))
        every = cfg.algorithm.ref_update_every
        if every and self.reference is not None and self.step % every == 0:
            self.reference.load_state_dict(self.model.state_dict())
        return metrics

    @property
    def eval_max_new_tokens(self) -> int:
        return self.config.rollout.max_new_tokens
