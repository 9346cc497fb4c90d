"""GRPO and its family (RLOO, ReMax, REINFORCE++, DAPO, Dr. GRPO, GDPO, GSPO, CISPO) for causal LMs.

Data flows one way: prompts -> rollout engine -> rewards -> advantage estimator -> policy loss -> update.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from rlgen.models.logprobs import completion_logprobs
from rlgen.algorithms.losses import KL_ESTIMATORS, LossContext, policy_loss
from rlgen.errors import RlgenError
from rlgen.models.causal_lm import ModelConfig, is_peft, load_model
from rlgen.plugins import registry
from rlgen.rewards.base import RewardSet, RewardSpec, counted
from rlgen.rollout.engine import HFEngine, SamplingParams
from rlgen.rollout.groups import rollout_groups
from rlgen.training.data import PromptSampler
from rlgen.training.trainer import DataConfig, OptimConfig, RunConfig, Trainer, load_records


@dataclass
class RolloutConfig:
    prompts_per_step: int = 16
    num_generations: int = 8  # completions per prompt (the group)
    max_new_tokens: int = 256  # TRL's max_completion_length default
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def validate(self):
        if self.num_generations < 2:
            raise RlgenError("config key 'rollout.num_generations' must be >= 2 (groups need a spread)")
        if self.prompts_per_step < 1 or self.max_new_tokens < 1:
            raise RlgenError("config keys 'rollout.prompts_per_step' and 'rollout.max_new_tokens' must be >= 1")
        if self.temperature <= 0:
            raise RlgenError("config key 'rollout.temperature' must be > 0 for training rollouts")


@dataclass
class GRPOAlgoConfig:
    advantage: str = "grpo"  # grpo | rloo | remax | reinforce++ | reinforce++-baseline | gdpo | plugin name
    scale_rewards: str = "group"  # group | batch | none (Dr. GRPO)
    loss_type: str = "dapo"  # grpo | bnpo | dr_grpo | dapo | gspo | cispo | plugin name (TRL's default: dapo)
    epsilon: float = 0.2
    epsilon_high: float | None = None  # DAPO clip-higher (0.28); CISPO's epsilon_max (5.0)
    delta: float | None = None  # two-sided clipping bound (> 1 + epsilon)
    importance_sampling_level: str = "token"  # token | sequence (GSPO)
    beta: float = 0.0  # KL coefficient to the frozen reference; 0 = no reference model
    kl_estimator: str = "k3"  # k1 | k2 | k3
    num_iterations: int = 1  # updates per rollout batch (mu); old log-probs are kept
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal and refill
    max_resample_rounds: int = 4
    overlong_buffer: int = 0  # DAPO soft overlong punishment: buffer in tokens (0 = off, -1 = max_new_tokens / 4)
    overlong_penalty: float = 1.0
    mask_truncated_completions: bool = False  # DAPO: no loss on completions without a stop token
    shared_prefix: bool = True  # run each group's prompt once and share its KV cache (same result, faster)

    def validate(self):
        if self.scale_rewards not in ("group", "batch", "none"):
            raise RlgenError(f"config key 'algorithm.scale_rewards' must be group, batch or none, got {self.scale_rewards!r}")
        if self.importance_sampling_level not in ("token", "sequence"):
            raise RlgenError("config key 'algorithm.importance_sampling_level' must be token or sequence")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise RlgenError(f"config key 'algorithm.kl_estimator' must be one of {', '.join(KL_ESTIMATORS)}")
        if self.num_iterations < 1:
            raise RlgenError("config key 'algorithm.num_iterations' must be >= 1")
        if self.overlong_buffer < -1:
            raise RlgenError("config key 'algorithm.overlong_buffer' must be >= 0 (or -1 for a quarter of max_new_tokens)")


def _default_rewards() -> list[RewardSpec]:
    return [RewardSpec("exact-match")]


@dataclass
class GRPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: GRPOAlgoConfig = field(default_factory=GRPOAlgoConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6))  # TRL's GRPO default
    run: RunConfig = field(default_factory=lambda: RunConfig(out="runs/grpo", steps=100))
    rewards: list[RewardSpec] = field(default_factory=_default_rewards)
    rewards_on_error: str = "raise"  # raise | skip (skipped samples are counted in the metrics)
    # How the reward columns become one value (a reward-combiner spec: weighted-sum | min | mean |
    # mean-minus-std:k=1.0 | plugin) and how that value is shaped before the advantages ("" = none;
    # par:ref_field=answer | center | clip:low=..,high=.. | ref-normalize[:mean=..,std=..] | plugin).
    # The gdpo advantage normalises the reward columns itself and ignores both.
    reward_combine: str = "weighted-sum"
    reward_shaping: str = ""


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
        self.reference = None
        if self.config.algorithm.beta > 0 and not is_peft(self.model):
            self.reference = load_model(self.base_path, self.config.model.dtype).eval().requires_grad_(False)

    def extra_state(self) -> dict:
        # the reward shaping's frozen statistics (ref-normalize: the first batch's), so a resumed run keeps them
        return {"sampler": self.sampler.state(), "reward_shaping": self.rewards.state()}

    def restore_extra_state(self, state: dict) -> None:
        self.sampler.restore(state["sampler"])
        self.rewards.restore(state.get("reward_shaping", {}))

    # --- rollouts and rewards ---
    def _rollout_groups(self, records: list[dict]):
        return rollout_groups(self.engine, self.rewards, records, self.config.rollout.num_generations, self.params,
                              self.generator)

    def _shape_overlong(self, total: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        a = self.config.algorithm
        max_new = self.config.rollout.max_new_tokens
        buffer = max(1, max_new // 4) if a.overlong_buffer == -1 else a.overlong_buffer
        if buffer <= 0:
            return total
        expected = max_new - buffer
        penalty = ((expected - lengths.float()) / buffer * a.overlong_penalty).clamp(max=0)
        return total + penalty

    def _collect(self):
        """Roll out one batch; with dynamic sampling keep only groups with a reward spread, refilling."""
        cfg = self.config
        n, g = cfg.rollout.prompts_per_step, cfg.rollout.num_generations
        records = self.sampler.next_batch()
        batches = [(records, *self._rollout_groups(records))]
        zero_std_fraction = None
        rounds = 1
        while True:
            records, rollouts, samples, components, valid, shaped = _merge(batches, self.engine.pad_id)
            total = self._shape_overlong(shaped, rollouts.completion_mask.sum(1))
            spread = _group_spread(total.view(-1, g), counted(components, valid).view(-1, g))
            if zero_std_fraction is None:
                zero_std_fraction = float((~spread).float().mean())
            if not cfg.algorithm.dynamic_sampling:
                break
            keep = spread.nonzero().flatten().tolist()
            if len(keep) >= n or rounds >= cfg.algorithm.max_resample_rounds:
                keep = keep[:n] if keep else []
                records, rollouts, samples, components, valid, total = _select_groups(
                    keep, g, records, rollouts, samples, components, valid, total
                )
                break
            more = self.sampler.next_batch()
            batches.append((more, *self._rollout_groups(more)))
            rounds += 1
        return records, rollouts, samples, components, valid, total, zero_std_fraction, rounds

    def _advantages(self, records, components, total, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Advantages of the completions; one whose every reward is None (or that was skipped) gets exactly 0
        and is left out of its group's statistics (the estimators' `mask`)."""
        cfg = self.config
        g = cfg.rollout.num_generations
        mask = counted(components, torch.ones_like(total, dtype=torch.bool) if valid is None else valid)
        kwargs = {
            "components": components.view(-1, g, components.shape[-1]),
            "weights": self.rewards.weights,
            "scale_rewards": cfg.algorithm.scale_rewards,
            "mask": mask.view(-1, g),
        }
        if getattr(self.advantage_fn, "needs_greedy_baseline", False):
            greedy = self.engine.generate([r["prompt"] for r in records], SamplingParams(cfg.rollout.max_new_tokens, 0.0))
            samples = [{**r, "completion": t} for r, t in zip(records, greedy.texts)]
            greedy_components, greedy_valid, baseline = self.rewards.score(samples)  # combined and shaped like the rollouts
            no_baseline = ~counted(greedy_components, greedy_valid)
            kwargs["baseline"] = torch.where(no_baseline, torch.full_like(baseline, float("nan")), baseline)
        advantages = self.advantage_fn(total.view(-1, g), **kwargs).reshape(-1)
        return torch.where(mask, advantages, torch.zeros_like(advantages))  # also for estimators ignoring `mask`

    # --- the update ---
    def train_step(self) -> dict:
        cfg = self.config
        started = time.perf_counter()
        records, rollouts, samples, components, valid, total, zero_std, rounds = self._collect()
        rollout_time = time.perf_counter() - started
        metrics = self._reward_metrics(components, total, valid, rollouts, zero_std, rounds)
        if not records:
            metrics["skipped_update"] = 1
            return metrics
        advantages = self._advantages(records, components, total, valid)
        mask = rollouts.completion_mask.float()
        if cfg.algorithm.mask_truncated_completions:
            mask = mask * (~rollouts.truncated).float().unsqueeze(-1)
        mask = mask * valid.float().unsqueeze(-1)
        advantages = torch.where(valid, advantages, torch.zeros_like(advantages))
        metrics.update(self._update(rollouts, mask, advantages))
        elapsed = time.perf_counter() - started
        metrics["rollout_time"] = rollout_time
        metrics["completions_per_s"] = len(samples) / elapsed
        metrics["tokens_per_s"] = rollouts.num_tokens / elapsed
        metrics["advantage_abs_mean"] = float(advantages.abs().mean())
        return metrics

    def _update(self, rollouts, mask, advantages) -> dict:
        cfg = self.config
        a = cfg.algorithm
        rows = advantages.shape[0]
        shared = a.shared_prefix  # one prompt forward per group (see completion_logprobs)
        chunks, n_micro = _micro_batches(self.model, rollouts, cfg.optim.gradient_accumulation_steps, shared)
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
        inputs = (rollouts.prompt_ids, rollouts.prompt_mask, rollouts.completion_ids, rollouts.completion_mask)
        temperature = cfg.rollout.temperature
        old_logps = ref_logps = None
        if a.num_iterations > 1:
            old_logps = _frozen_logprobs(self.model, inputs, chunks, temperature, shared)
        if a.beta > 0:
            ref_logps = self._reference_logprobs(inputs, chunks, temperature, shared)
        sums: dict[str, float] = {}
        for _ in range(a.num_iterations):
            for idx in chunks:
                logp, entropy = completion_logprobs(self.model, *[t[idx] for t in inputs], temperature, shared)
                old = logp.detach() if old_logps is None else old_logps[idx]
                kl = self.kl_fn(logp, ref_logps[idx]) if ref_logps is not None else None
                loss, stats = policy_loss(self.loss_fn, logp, old, advantages[idx], mask[idx], ctx, kl, a.beta)
                loss.backward()
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
        if self.reference is not None:
            return _frozen_logprobs(self.reference, inputs, chunks, temperature, shared)
        with self.model.disable_adapter():  # LoRA: the reference is the base without the adapter
            return _frozen_logprobs(self.model, inputs, chunks, temperature, shared)

    def _reward_metrics(self, components, total, valid, rollouts, zero_std, rounds) -> dict:
        metrics = self.rewards.metrics(components, total, valid)
        lengths = rollouts.completion_mask.sum(1).float()
        metrics["completion_length"] = float(lengths.mean())
        metrics["truncated_fraction"] = float(rollouts.truncated.float().mean())
        metrics["frac_reward_zero_std"] = zero_std
        metrics["sampling_rounds"] = rounds
        metrics["rewards/skipped"] = int((~valid).sum())
        return metrics

    @property
    def eval_max_new_tokens(self) -> int:
        return self.config.rollout.max_new_tokens


def check_context_length(model, tokenizer, records: list[dict], max_new_tokens: int) -> None:
    """Prompt plus completion must fit the model's declared context (the helper `sample` and `eval` use too)."""
    from rlgen.rollout.engine import check_context

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


def _merge(batches, pad_id):
    from rlgen.rollout.engine import concat_rollouts

    if len(batches) == 1:
        return batches[0]
    records = [r for b in batches for r in b[0]]
    rollouts = concat_rollouts([b[1] for b in batches], pad_id)
    samples = [s for b in batches for s in b[2]]
    components = torch.cat([b[3] for b in batches])
    valid = torch.cat([b[4] for b in batches])
    total = torch.cat([b[5] for b in batches])
    return records, rollouts, samples, components, valid, total


def _select_groups(keep, g, records, rollouts, samples, components, valid, total):
    rows = torch.tensor([k * g + j for k in keep for j in range(g)], dtype=torch.long)
    picked = rollouts.select(rows)
    return ([records[k] for k in keep], picked, [samples[i] for i in rows.tolist()], components[rows], valid[rows], total[rows])


def _micro_batches(model, rollouts, accumulation_steps: int, shared: bool):
    """(row indices of each micro-batch, number of micro-batches). When the prompt forward is shared
    (`shared` and the model supports it), micro-batches hold whole groups of identical prompts, so no
    group's prompt is run twice; otherwise rows are chunked as before."""
    from rlgen.models.sequences import prefix_runs, supports_shared_prefix

    rows = rollouts.prompt_ids.shape[0]
    if shared and supports_shared_prefix(model):
        starts, _ = prefix_runs(rollouts.prompt_ids, rollouts.prompt_mask)
        if len(starts) < rows:
            bounds = torch.cat([starts, torch.tensor([rows])]).tolist()
            pieces = torch.arange(len(starts)).tensor_split(min(accumulation_steps, len(starts)))
            chunks = [torch.arange(bounds[int(p[0])], bounds[int(p[-1]) + 1]) for p in pieces]
            return chunks, len(chunks)
    n_micro = min(accumulation_steps, rows)
    return torch.arange(rows).chunk(n_micro), n_micro
