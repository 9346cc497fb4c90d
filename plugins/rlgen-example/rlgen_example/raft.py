"""A trainer built from rlgen's public parts (`rlgen train example-raft`): RAFT, reward-ranked fine-tuning
(Dong et al., 2023). Each step samples `num_generations` completions of each prompt, keeps each prompt's
best one when its reward reaches `algorithm.min_reward`, and takes one supervised (negative log-likelihood)
step on the kept completions' tokens.

Everything comes from `rlgen.api` (the names rlgen exports for plugin trainers), nothing from rlgen's
internal modules: the config sections (`RewardedTrainConfig`, `RolloutConfig`, `setting`, `section`), the
data (`load_records`, `PromptSampler`), the rewards (`RewardSet`), the rollout (`GroupRollout`,
`SamplingParams`, `backbone_for` for the engine) and the forward pass (`sequence_logps`). The base
`Trainer` gives the loop, checkpoints, resume, the non-finite-step guard and the periodic evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from rlgen.api import (GroupRollout, LoadedModel, OptimConfig, PromptSampler, RewardedTrainConfig, RewardSet, RewardSpec,
                       RolloutConfig, RunConfig, SamplingParams, Trainer, backbone_for, load_records, section,
                       sequence_logps, setting)


@dataclass
class RaftOptions:
    min_reward: float = setting(1.0, "keep a prompt's best completion only when its reward reaches this")


@dataclass
class RaftConfig(RewardedTrainConfig):
    rollout: RolloutConfig = section(RolloutConfig, "completions sampled per step", num_generations=4, max_new_tokens=16)
    algorithm: RaftOptions = section(RaftOptions, "which completions are fine-tuned on")
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))
    run: RunConfig = field(default_factory=lambda: RunConfig(out="runs/example-raft", steps=20))
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec("exact-match")])


class RaftTrainer(Trainer):
    config: RaftConfig

    def prepare_data(self) -> None:  # no model needed: bad data or rewards fail before it loads
        cfg = self.config
        self.records = load_records(cfg.data, cfg.data.split)
        self.prompts = PromptSampler(self.records, cfg.rollout.prompts_per_step, cfg.run.seed)
        self.rewards = RewardSet(cfg.rewards, cfg.rewards_on_error, combine=cfg.reward_combine,
                                 shaping=cfg.reward_shaping)
        self.eval_records = load_records(cfg.data, cfg.data.eval_split)[: cfg.data.eval_samples] if cfg.run.eval_every else None

    def prepare(self) -> None:
        cfg = self.config
        backbone = backbone_for(cfg.model.path)
        self.engine = backbone.rollout_engine(LoadedModel(self.model, self.tokenizer, self.base_path))  # evaluate() samples with it too
        params = SamplingParams(cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k)
        self.group_rollout = GroupRollout(self.engine, self.rewards, cfg.rollout.num_generations, params, self.generator)

    def extra_state(self) -> dict:  # the data position, so that a resumed run draws the same prompts
        return {"prompts": self.prompts.state()}

    def restore_extra_state(self, state: dict) -> None:
        self.prompts.restore(state["prompts"])

    def train_step(self) -> dict:
        batch = self.group_rollout.sample(self.prompts.next_batch())
        metrics = self.rewards.metrics(batch.components, batch.total, batch.valid)
        scores = torch.where(batch.counted, batch.total, torch.full_like(batch.total, -float("inf")))
        best = scores.view(batch.num_groups, batch.group_size).argmax(1)  # each group's first best row
        rows = torch.arange(batch.num_groups) * batch.group_size + best
        rows = rows[scores[rows] >= self.config.algorithm.min_reward]
        metrics["kept"] = int(rows.numel())
        if rows.numel() == 0:  # nothing good enough this step: no update
            return metrics
        summed, tokens, _, _ = sequence_logps(self.model, batch.inputs.rows(rows))
        loss = -summed.sum() / tokens.sum()  # token-mean NLL of the kept completions
        loss.backward()
        metrics["loss"] = float(loss.detach())
        metrics["grad_norm"] = self.optimizer_step()
        return metrics

    @property
    def eval_max_new_tokens(self) -> int:
        return self.config.rollout.max_new_tokens


def example_raft():
    """RAFT (reward-ranked fine-tuning): SFT on each prompt's best sampled completion (rlgen-example)."""
    from rlgen.api import Algorithm

    return Algorithm(name="example-raft", config_cls=RaftConfig, trainer_cls=RaftTrainer,
                     description="RAFT: supervised steps on each prompt's best sampled completion (rlgen-example)")
