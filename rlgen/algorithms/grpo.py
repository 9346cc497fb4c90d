"""GRPO and its family (RLOO, ReMax, REINFORCE++, DAPO, Dr. GRPO, GDPO, GSPO, CISPO) for causal LMs.

Data flows one way: prompts -> rollout engine -> rewards -> advantage estimator -> policy loss -> update.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from rlgen.models.logprobs import completion_logprobs
from rlgen.algorithms.contracts import ADVANTAGE_ESTIMATOR_DEFAULTS, AdvantageInput, estimate_advantages
from rlgen.algorithms.losses import KL_ESTIMATORS, LossContext, policy_loss
from rlgen.errors import RlgenError
from rlgen.extension import capabilities
from rlgen.models.sequences import prefix_runs, supports_shared_prefix
from rlgen.plugins import registry
from rlgen.rewards.base import RewardSet, RewardSpec, counted
from rlgen.rollout.engine import HFEngine, SamplingParams, check_context
from rlgen.rollout.groups import GroupRollout, RolloutBatch, scored
from rlgen.training.data import PromptSampler
from rlgen.config import section, setting
from rlgen.training.config import (DataConfig, GroupRolloutConfig, OptimConfig, RegisteredName, RewardedTrainConfig, RunConfig,
                                   ScaleRewards)
from rlgen.training.trainer import Trainer, load_records


@dataclass
class RolloutConfig(GroupRolloutConfig):
    """How training completions are sampled (TRL's generation settings)."""
    max_new_tokens: int = setting(256, "completion length limit in tokens (TRL's max_completion_length)")
    temperature: float = setting(1.0, "sampling temperature (> 0 for training rollouts)")
    top_p: float = setting(1.0, "nucleus sampling: keep the smallest token set with this much probability; 1 = off")
    top_k: int = setting(0, "keep the k most likely tokens; 0 = off")

    def validate(self):
        if self.num_generations < 2:
            raise RlgenError("config key 'rollout.num_generations' must be >= 2 (groups need a spread)")
        if self.temperature <= 0:
            raise RlgenError("config key 'rollout.temperature' must be > 0 for training rollouts")


@dataclass
class GRPOAlgoConfig:
    advantage: str = setting("grpo", "advantage estimator: grpo | rloo | remax | reinforce++ | reinforce++-baseline | gdpo | plugin name")
    scale_rewards: ScaleRewards = setting("group", "reward standard-deviation scaling: per group, over the batch, or none (Dr. GRPO)")
    loss_type: str = setting("dapo", "policy loss: grpo | bnpo | dr_grpo | dapo | gspo | cispo | plugin name (TRL's default: dapo)")
    epsilon: float = setting(0.2, "PPO clip: the ratio is clipped to [1 - epsilon, 1 + epsilon_high]")
    epsilon_high: float | None = setting(None, "upper clip (DAPO clip-higher 0.28; CISPO's epsilon_max 5.0); unset = epsilon")
    delta: float | None = setting(None, "two-sided clipping bound on the ratio (> 1 + epsilon); unset = off")
    importance_sampling_level: Literal["token", "sequence"] = setting("token", "importance ratio per token, or per sequence (GSPO)")
    beta: float = setting(0.0, "KL coefficient to the frozen reference policy; 0 = no reference model")
    kl_estimator: Literal["k1", "k2", "k3"] = setting("k3", "KL estimator (Schulman's k1, k2, k3)")
    num_iterations: int = setting(1, "updates per rollout batch (mu); the old log-probs are kept")
    dynamic_sampling: bool = setting(False, "DAPO: drop groups whose rewards are all equal and sample new ones")
    max_resample_rounds: int = setting(4, "dynamic sampling: at most this many refills per step")
    overlong_buffer: int = setting(0, "DAPO soft overlong punishment: buffer in tokens (0 = off, -1 = max_new_tokens / 4)")
    overlong_penalty: float = setting(1.0, "DAPO: the penalty at the length limit (linear over the buffer)")
    mask_truncated_completions: bool = setting(False, "DAPO: no loss on completions that hit the length limit")
    shared_prefix: bool = setting(True, "run each group's prompt once and share its KV cache (same result, faster)")

    def registered_names(self) -> list[RegisteredName]:
        return [("algorithm.advantage", "advantage-estimator", self.advantage), ("algorithm.loss_type", "policy-loss", self.loss_type)]


def _default_rewards() -> list[RewardSpec]:
    return [RewardSpec("exact-match")]


@dataclass
class GRPOConfig(RewardedTrainConfig):
    rollout: RolloutConfig = section(RolloutConfig, "how many completions per step and how they are sampled")
    algorithm: GRPOAlgoConfig = section(GRPOAlgoConfig, "advantage estimator, policy loss and their options")
    optim: OptimConfig = section(OptimConfig, "optimiser and learning-rate schedule", lr=1e-6)  # TRL's GRPO default
    run: RunConfig = section(RunConfig, "run directory, length, seed, checkpoints, evaluation", out="runs/grpo", steps=100)
    rewards: list[RewardSpec] = field(default_factory=_default_rewards)


class GRPOTrainer(Trainer):
    config: GRPOConfig

    def prepare_data(self) -> None:
        cfg = self.config
        self.records = load_records(cfg.data, cfg.data.split)
        self.sampler = PromptSampler(self.records, cfg.rollout.prompts_per_step, cfg.run.seed)
        self.rewards = RewardSet(cfg.rewards, cfg.rewards_on_error, combine=cfg.reward_combine, shaping=cfg.reward_shaping)
        self.rewards.check_fields(self.records, data_source(cfg.data))  # e.g. exact-match without `answer`
        self.advantage_fn = registry("advantage-estimator").get(cfg.algorithm.advantage)
        self.loss_fn = registry("policy-loss").get(cfg.algorithm.loss_type)
        self.kl_fn = KL_ESTIMATORS[cfg.algorithm.kl_estimator]
        self.params = SamplingParams(cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k)
        self.eval_records = None
        if cfg.run.eval_every:
            self.eval_records = load_records(cfg.data, cfg.data.eval_split)[: cfg.data.eval_samples]

    def prepare(self) -> None:
        check_context_length(self.model, self.tokenizer, self.records, self.config.rollout.max_new_tokens)
        self.engine = HFEngine(self.model, self.tokenizer)
        self.reference = self.reference_policy() if self.config.algorithm.beta > 0 else None

    def extra_state(self) -> dict:
        # the reward shaping's frozen statistics (ref-normalize: the first batch's), so a resumed run keeps them
        return {"sampler": self.sampler.state(), "reward_shaping": self.rewards.state()}

    def restore_extra_state(self, state: dict) -> None:
        self.sampler.restore(state["sampler"])
        self.rewards.restore(state.get("reward_shaping", {}))

    # --- rollouts and rewards ---
    def _rollout_groups(self, records: list[dict]) -> RolloutBatch:
        return GroupRollout(self.engine, self.rewards, self.config.rollout.num_generations, self.params,
                            self.generator).sample(records)

    def _shape_overlong(self, total: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        a = self.config.algorithm
        max_new = self.config.rollout.max_new_tokens
        buffer = max(1, max_new // 4) if a.overlong_buffer == -1 else a.overlong_buffer
        if buffer <= 0:
            return total
        expected = max_new - buffer
        penalty = ((expected - lengths.float()) / buffer * a.overlong_penalty).clamp(max=0)
        return total + penalty

    def _collect(self) -> tuple[RolloutBatch, float, int]:
        """Roll out one batch, its `total` with the overlong shaping; with dynamic sampling keep only groups with
        a reward spread, refilling. -> (batch, fraction of the first round's groups without a spread, rounds)."""
        cfg = self.config
        n, g = cfg.rollout.prompts_per_step, cfg.rollout.num_generations
        batches = [self._rollout_groups(self.sampler.next_batch())]
        zero_std_fraction = None
        rounds = 1
        while True:
            merged = RolloutBatch.concat(batches, self.engine.pad_id)
            batch = replace(merged, total=self._shape_overlong(merged.total, merged.completion_lengths))
            spread = _group_spread(batch.total.view(-1, g), batch.counted.view(-1, g))
            if zero_std_fraction is None:
                zero_std_fraction = float((~spread).float().mean())
            if not cfg.algorithm.dynamic_sampling:
                break
            keep = spread.nonzero().flatten().tolist()
            if len(keep) >= n or rounds >= cfg.algorithm.max_resample_rounds:
                batch = batch.select_groups(keep[:n])
                break
            batches.append(self._rollout_groups(self.sampler.next_batch()))
            rounds += 1
        return batch, zero_std_fraction, rounds

    def _advantages(self, records, components, total, valid: torch.Tensor | None = None,
                    token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Advantages of the completions, [B] or per token [B, T] (`token_mask` [B, T]: the completion tokens,
        which a per-token estimator shapes its output after); one whose every reward is None (or that was
        skipped) gets exactly 0 and is left out of its group's statistics (the estimators' `mask`)."""
        cfg = self.config
        g = cfg.rollout.num_generations
        mask = counted(components, torch.ones_like(total, dtype=torch.bool) if valid is None else valid)
        batch = AdvantageInput(
            rewards=total.view(-1, g),
            mask=mask.view(-1, g),
            components=components.view(-1, g, components.shape[-1]),
            weights=self.rewards.weights.to(total.device),
            scale_rewards=cfg.algorithm.scale_rewards,
            token_mask=None if token_mask is None else token_mask.bool().view(-1, g, token_mask.shape[-1]),
        )
        if capabilities(self.advantage_fn, ADVANTAGE_ESTIMATOR_DEFAULTS).needs_greedy_baseline:
            greedy = self.engine.generate([r["prompt"] for r in records], SamplingParams(cfg.rollout.max_new_tokens, 0.0))
            samples = [{**r, "completion": t} for r, t in zip(records, greedy.texts)]
            greedy_components, greedy_valid, baseline = scored(self.rewards, samples, total.device)  # as the rollouts
            no_baseline = ~counted(greedy_components, greedy_valid)
            batch.baseline = torch.where(no_baseline, torch.full_like(baseline, float("nan")), baseline)
        advantages = estimate_advantages(self.advantage_fn, batch).advantages  # 0 outside mask
        return advantages.reshape(total.shape[0], *advantages.shape[2:])

    # --- the update ---
    def train_step(self) -> dict:
        cfg = self.config
        started = time.perf_counter()
        batch, zero_std, rounds = self._collect()
        rollout_time = time.perf_counter() - started
        metrics = self._reward_metrics(batch, zero_std, rounds)
        if not batch.records:
            metrics["skipped_update"] = 1
            return metrics
        rollouts, valid = batch.rollouts, batch.valid
        advantages = self._advantages(batch.records, batch.components, batch.total, valid, rollouts.completion_mask)
        mask = rollouts.completion_mask.float()
        if cfg.algorithm.mask_truncated_completions:
            mask = mask * (~rollouts.truncated).float().unsqueeze(-1)
        mask = mask * valid.float().unsqueeze(-1)
        row_valid = valid if advantages.dim() == 1 else valid.unsqueeze(-1)  # per-token advantages: [B, T]
        advantages = torch.where(row_valid, advantages, torch.zeros_like(advantages))
        metrics.update(self._update(batch, mask, advantages))
        elapsed = time.perf_counter() - started
        metrics["rollout_time"] = rollout_time
        metrics["completions_per_s"] = len(batch) / elapsed
        metrics["tokens_per_s"] = rollouts.num_tokens / elapsed
        if advantages.dim() == 1:
            metrics["advantage_abs_mean"] = float(advantages.abs().mean())
        else:  # per token: over the completion tokens
            tokens = rollouts.completion_mask.float()
            metrics["advantage_abs_mean"] = float((advantages.abs() * tokens).sum() / tokens.sum().clamp(min=1))
        return metrics

    def _update(self, batch: RolloutBatch, mask, advantages) -> dict:
        """The policy update on a rollout batch; the old-policy and reference log-probs it needs are filled in."""
        cfg = self.config
        a = cfg.algorithm
        rows = advantages.shape[0]
        shared = a.shared_prefix  # one prompt forward per group (see completion_logprobs)
        chunks, n_micro = _micro_batches(self.model, batch.rollouts, cfg.optim.gradient_accumulation_steps, shared)
        ctx = LossContext(
            epsilon=a.epsilon,
            epsilon_high=a.epsilon_high,
            delta=a.delta,
            importance_sampling_level=a.importance_sampling_level,
            max_completion_length=cfg.rollout.max_new_tokens,
            num_items_in_batch=float(mask.sum().clamp(min=1)),
            num_sequences_in_batch=float(rows),
            num_micro_batches=n_micro,
        )
        inputs = batch.inputs
        temperature = cfg.rollout.temperature
        if a.num_iterations > 1:
            batch.old_logps = _frozen_logprobs(self.model, inputs, chunks, temperature, shared)
        if a.beta > 0:
            batch.ref_logps = self._reference_logprobs(inputs, chunks, temperature, shared)
        old_logps, ref_logps = batch.old_logps, batch.ref_logps
        sums: dict[str, float] = {}
        for _ in range(a.num_iterations):
            for idx in chunks:
                logp, entropy = completion_logprobs(self.model, *[t[idx] for t in inputs], temperature, shared)
                old = logp.detach() if old_logps is None else old_logps[idx]
                kl = self.kl_fn(logp, ref_logps[idx]) if ref_logps is not None else None
                loss, stats = policy_loss(self.loss_fn, logp, old, advantages[idx], mask[idx], ctx, kl, a.beta,
                                          ref_logp=None if ref_logps is None else ref_logps[idx], name=a.loss_type)
                self.backward(loss)
                m = mask[idx]
                weight = float(m.sum()) / ctx.num_items_in_batch
                _accumulate(sums, "loss", float(loss.detach()))
                _accumulate(sums, "entropy", float((entropy.detach() * m).sum() / m.sum().clamp(min=1)) * weight)
                if kl is not None:
                    _accumulate(sums, "kl", float((kl.detach() * m).sum() / m.sum().clamp(min=1)) * weight)
                for key, value in stats.items():
                    _accumulate(sums, key, float(value) * weight)
            sums["grad_norm"] = self.optimizer_step()
        return {k: (v / a.num_iterations if k != "grad_norm" else v) for k, v in sums.items()}

    def _reference_logprobs(self, inputs, chunks, temperature, shared: bool = True) -> torch.Tensor:
        with self.reference.forward() as reference:
            return _frozen_logprobs(reference, inputs, chunks, temperature, shared)

    def _reward_metrics(self, batch: RolloutBatch, zero_std: float, rounds: int) -> dict:
        metrics = self.rewards.metrics(batch.components, batch.total, batch.valid)
        metrics["completion_length"] = float(batch.completion_lengths.float().mean())
        metrics["truncated_fraction"] = float(batch.rollouts.truncated.float().mean())
        metrics["frac_reward_zero_std"] = zero_std
        metrics["sampling_rounds"] = rounds
        metrics["rewards/skipped"] = int((~batch.valid).sum())
        return metrics

    @property
    def eval_max_new_tokens(self) -> int:
        return self.config.rollout.max_new_tokens


def check_context_length(model, tokenizer, records: list[dict], max_new_tokens: int) -> None:
    """Prompt plus completion must fit the model's declared context (the helper `sample` and `eval` use too)."""
    check_context(model, tokenizer, [r["prompt"] for r in records], max_new_tokens, "rollout.max_new_tokens")


def data_source(data: DataConfig) -> str:
    """The data's name for error messages: its file, or the task."""
    return str(data.path) if data.path else f"task '{data.task}'"


def _group_spread(total: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[num_groups] bool: whether the counted completions of each group have different rewards."""
    high = torch.where(mask, total, torch.full_like(total, float("-inf"))).amax(dim=1)
    low = torch.where(mask, total, torch.full_like(total, float("inf"))).amin(dim=1)
    return high > low


def _accumulate(sums: dict, key: str, value: float) -> None:
    sums[key] = sums.get(key, 0.0) + value


@torch.no_grad()
def _frozen_logprobs(model, inputs, chunks, temperature, shared) -> torch.Tensor:
    """Log-probs without gradient (old policy, reference), micro-batch by micro-batch."""
    return torch.cat([completion_logprobs(model, *[t[i] for t in inputs], temperature, shared)[0] for i in chunks])


def _micro_batches(model, rollouts, accumulation_steps: int, shared: bool):
    """(row indices of each micro-batch, number of micro-batches). When the prompt forward is shared
    (`shared` and the model supports it), micro-batches hold whole groups of identical prompts, so no
    group's prompt is run twice; otherwise rows are chunked as before."""
    rows = rollouts.prompt_ids.shape[0]
    device = rollouts.prompt_ids.device  # the indices select rows of tensors there
    if shared and supports_shared_prefix(model):
        starts, _ = prefix_runs(rollouts.prompt_ids, rollouts.prompt_mask)
        if len(starts) < rows:
            bounds = starts.tolist() + [rows]
            pieces = torch.arange(len(starts)).tensor_split(min(accumulation_steps, len(starts)))
            chunks = [torch.arange(bounds[int(p[0])], bounds[int(p[-1]) + 1], device=device) for p in pieces]
            return chunks, len(chunks)
    n_micro = min(accumulation_steps, rows)
    return torch.arange(rows, device=device).chunk(n_micro), n_micro
