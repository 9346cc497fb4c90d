"""`rlgen train online-dpo`: iterate sample -> score -> pair -> preference update with the current
policy (online / iterative DPO; with `ref_update_every` the reference follows the policy, the batched
on-policy loop of Direct Nash Optimization). Built from the shared parts: a `GroupRollout` (the same
rollouts as GRPO), pairing as `rlgen pairs` pairs scored samples (each group's best against its worst,
rlgen.data.preferences.make_pairs), and the offline trainers' `PairwiseUpdate` on the sampled tokens
themselves (no re-tokenisation)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from rlgen.algorithms.dpo import PreferenceAlgoConfig, PreferenceTrainer
from rlgen.algorithms.grpo import (RolloutConfig, check_context_length, check_rollout_shares, completion_rows, data_source,
                                   release_engine)
from rlgen.algorithms.preference_losses import PreferenceOptions, needs_reference
from rlgen.data.preferences import make_pairs
from rlgen.errors import RlgenError
from rlgen.models.causal_lm import is_peft
from rlgen.plugins import registry
from rlgen.rewards.base import RewardSet, RewardSpec
from rlgen.rollout.groups import GroupRollout, RolloutBatch
from rlgen.training.data import PromptSampler
from rlgen.config import section, setting
from rlgen.training.config import OptimConfig, RewardedTrainConfig, RunConfig
from rlgen.training.trainer import load_records


@dataclass
class OnlineAlgoConfig(PreferenceAlgoConfig):
    ref_update_every: int = setting(0, "copy the policy into the reference every N steps (0 = the initial model throughout)")


def _default_rewards() -> list[RewardSpec]:
    return [RewardSpec("exact-match")]


@dataclass
class OnlineDPOConfig(RewardedTrainConfig):
    rollout: RolloutConfig = section(RolloutConfig, "how many completions per step and how they are sampled", num_generations=4)
    algorithm: OnlineAlgoConfig = section(OnlineAlgoConfig, "preference loss, its options, and how the reference follows the policy")
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6))
    run: RunConfig = field(default_factory=lambda: RunConfig(out="runs/online-dpo", steps=100))
    rewards: list[RewardSpec] = field(default_factory=_default_rewards)


def best_worst_pairs(batch: RolloutBatch) -> tuple[list[dict], torch.Tensor]:
    """(pairs, rows): each group's best against its worst completion, paired as `rlgen pairs --mode
    best-worst` pairs scored samples (the first of the highest against the last of the lowest; equal
    completions count once; a group without a spread gives no pair), and the batch rows of the pairs
    interleaved [chosen_0, rejected_0, chosen_1, ...], so that the update reads the sampled tokens.
    Completions without any reward never pair."""
    scores = [float(score) if ok and not math.isnan(score) else None
              for score, ok in zip(batch.total.tolist(), batch.counted.tolist())]
    groups = batch.group_index.tolist()
    # fresh records: the user's own fields (a `reward`, a `group`) can neither clash nor leak into the pairs
    samples = [{"group": g, "completion": text, "reward": score}
               for g, text, score in zip(groups, batch.rollouts.texts, scores)]
    pairs = make_pairs(samples, mode="best-worst", field="reward", group_by="group")
    row_of: dict[tuple[int, str], int] = {}  # the first scored row of each text in its group, as make_pairs keeps
    for row, (g, text, score) in enumerate(zip(groups, batch.rollouts.texts, scores)):
        if score is not None:
            row_of.setdefault((g, text), row)
    rows = [row_of[(p["group"], text)] for p in pairs for text in (p["chosen"], p["rejected"])]
    return pairs, torch.tensor(rows, dtype=torch.long, device=batch.total.device)


class OnlineDPOTrainer(PreferenceTrainer):
    """Multi-process, each rank rolls out its share of the prompts (as GRPO does: each completion from its own
    seeded stream), pairs its own groups, and the preference update averages over the pairs of all ranks."""

    config: OnlineDPOConfig
    supports_distributed = True

    def prepare_data(self) -> None:
        cfg = self.config
        self.records, self.eval_records = self.split_held_out(load_records(cfg.data, cfg.data.split))
        self.sampler = PromptSampler(self.records, cfg.rollout.prompts_per_step, cfg.run.seed)
        self.rewards = RewardSet(cfg.rewards, cfg.rewards_on_error, combine=cfg.reward_combine, shaping=cfg.reward_shaping)
        self.rewards.check_fields(self.records, data_source(cfg.data))  # e.g. exact-match without `answer`
        self.loss_fn = registry("preference-loss").get(cfg.algorithm.loss_type)
        self.uses_reference = needs_reference(self.loss_fn)
        a = cfg.algorithm
        self.options = PreferenceOptions(a.beta, a.label_smoothing, a.simpo_gamma)
        self.params = cfg.rollout.sampling_params()
        self.eval_pairs = None
        self.pairs = []
        self.ref_cache = torch.zeros((0, 2), dtype=torch.float64)  # the offline trainers' CPU cache: unused here
        if self.dist.enabled:
            check_rollout_shares(cfg, self.rewards, self.dist.world_size)
            if self.fsdp:
                raise RlgenError("online-dpo does not run with run.distributed = fsdp (the pairs, hence the forward passes, "
                                 "differ between ranks); use run.distributed = ddp")

    def prepare(self) -> None:
        check_context_length(self.model, self.tokenizer, self.rendered(self.records), self.config.rollout.max_new_tokens,
                             self.chat.add_special_tokens)
        if self.config.algorithm.ref_update_every and is_peft(self.model):
            raise RlgenError("config key 'algorithm.ref_update_every' needs full fine-tuning (model.lora_r = 0)")
        super().prepare()
        self.group_rollout = GroupRollout(self.engine, self.rewards, self.config.rollout.num_generations, self.params,
                                          self.generator, self.prompt_text)

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
        records = self.sampler.next_batch()
        span = self.dist.share(len(records))  # this rank's prompts (all of them on one process)
        batch = self.group_rollout.sample(records[span.start:span.stop], first_row=span.start * cfg.rollout.num_generations)
        if self.completions_due():
            self.log_completions(completion_rows(batch, self.rewards.names))
        gather = self.dist.all_gather_rows
        metrics = self.rewards.metrics(gather(batch.components), gather(batch.total), gather(batch.valid))
        release_engine(self.engine)  # the step's generation is over (vLLM sleep mode frees its memory for the update)
        pairs, rows = best_worst_pairs(batch)
        if not self.dist.sum(len(pairs)):  # no pair on any rank: every rank skips
            metrics.update(pairs=0, skipped_update=1)
            return metrics
        inputs = batch.inputs.rows(rows)
        if not self.uses_reference:
            ref = None
        elif pairs:
            ref = self.frozen_logps(inputs).view(-1, 2)
        else:  # this rank has no pair: it only joins the update's collectives
            ref = torch.zeros((0, 2), device=batch.total.device)
        metrics.update(self.pairwise_update.step(inputs, ref))
        every = cfg.algorithm.ref_update_every
        if every and self.reference is not None and self.step % every == 0:
            self.reference.load_state_dict(self.model.state_dict())
        return metrics

    @property
    def eval_max_new_tokens(self) -> int:
        return self.config.rollout.max_new_tokens
