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
from rlgen.algorithms.losses import KL_ESTIMATORS, LossContext, engine_is_weights, policy_loss
from rlgen.errors import RlgenError
from rlgen.extension import capabilities
from rlgen.models.sequences import prefix_runs, supports_shared_prefix
from rlgen.plugins import registry
from rlgen.rewards.base import RewardSet, RewardSpec, counted
from rlgen.rollout.engine import SamplingParams, check_context
from rlgen.rollout.groups import GroupRollout, ModelInputs, RolloutBatch, scored
from rlgen.training.data import PromptSampler
from rlgen.training.micro_batches import even_passes, micro_batches, pad_to, row_costs, trimmed
from rlgen.training.parts import summed_over_ranks
from rlgen.config import POSITIVE, PROBABILITY, Bounds, section, setting
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
    min_p: float = setting(0.0, "drop tokens below this fraction of the most likely token's probability; 0 = off", bounds=PROBABILITY)
    repetition_penalty: float = setting(1.0, "CTRL's penalty on tokens already in the prompt or completion (vLLM's / transformers'); 1 = off", bounds=POSITIVE)
    stop: list[str] = setting(doc="stop strings: a completion ends with the token that completes one (the text leaves it out)", factory=list)
    engine: Literal["hf", "vllm"] = setting("hf", "rollout engine: hf (rlgen's KV-cached loop on the policy) | vllm (colocated vLLM, weights synced after every update)")
    vllm_gpu_memory_utilization: float = setting(0.3, "vllm on a GPU: the fraction of its memory vLLM may take (TRL's colocate default)", bounds=PROBABILITY)
    vllm_enable_sleep_mode: bool = setting(False, "vllm on a GPU: free the engine's weights and KV cache during each update (woken, and synced, for the next rollout)")
    vllm_kv_cache_gib: float = setting(0.0, "vllm on a CPU: GiB of KV cache; 0 = enough for one step's rollouts")
    vllm_dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting("auto", "vllm: the engine's weight dtype; auto = the policy's (bf16 generation beside fp32 training is where the off-policy correction matters)")
    vllm_mode: Literal["colocate", "server"] = setting("colocate", "vllm: colocate (an engine in each training process) | server (generation by `rlgen serve` on other devices or another machine; TRL's vllm_mode)")
    vllm_server_host: str = setting("127.0.0.1", "vllm_mode = server: the host of `rlgen serve`")
    vllm_server_port: int = setting(8000, "vllm_mode = server: its HTTP port (rlgen serve --port)", bounds=Bounds(1, 65535))
    vllm_group_port: int = setting(51216, "vllm_mode = server: the port of the weight-sync group, on the server's host (TRL's vllm_group_port)", bounds=Bounds(1, 65535))
    vllm_server_timeout: float = setting(240.0, "vllm_mode = server: seconds to wait for the server to come up, and for one request or weight transfer", bounds=POSITIVE)

    def sampling_params(self) -> SamplingParams:
        """These settings as the rollout engine's SamplingParams."""
        return SamplingParams(self.max_new_tokens, self.temperature, self.top_p, self.top_k, self.min_p,
                              self.repetition_penalty, tuple(self.stop))

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
    engine_is_correction: Literal["none", "tis", "mis"] = setting(
        "tis", "a rollout engine with its own weights (vllm): weight each token's loss by the trainer / engine probability "
        "ratio, truncated at engine_is_cap (tis: TRL's vllm_importance_sampling_correction, verl's TIS), or drop what exceeds "
        "it (mis: masked IS); none = off")
    engine_is_cap: float = setting(3.0, "the ratio cap of engine_is_correction (TRL's vllm_importance_sampling_cap)", bounds=POSITIVE)
    engine_is_level: Literal["token", "sequence"] = setting("token", "engine_is_correction per token, or per sequence (the product of its tokens' ratios)")

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
    """Multi-process (torchrun), every rank draws the same global prompt batch and rolls out its contiguous
    share of the prompts (a prompt's group stays on one rank), each completion from its own seeded stream
    (rlgen.rollout.engine.row_seeds: the same text whichever rank samples it). Rewards score per rank; the
    rewards are then gathered, so advantages (group and batch statistics), dynamic sampling and the reward
    metrics are the global batch's on every rank; the loss is normalised by global token / sequence counts
    and the gradients summed over ranks: the update of the single-process run, up to floating-point order."""

    config: GRPOConfig
    supports_distributed = True

    def prepare_data(self) -> None:
        cfg = self.config
        self.records, self.eval_records = self.split_held_out(load_records(cfg.data, cfg.data.split))
        self.sampler = PromptSampler(self.records, cfg.rollout.prompts_per_step, cfg.run.seed)
        self.rewards = RewardSet(cfg.rewards, cfg.rewards_on_error, combine=cfg.reward_combine, shaping=cfg.reward_shaping)
        self.rewards.check_fields(self.records, data_source(cfg.data))  # e.g. exact-match without `answer`
        self.advantage_fn = registry("advantage-estimator").get(cfg.algorithm.advantage)
        self.loss_fn = registry("policy-loss").get(cfg.algorithm.loss_type)
        self.kl_fn = KL_ESTIMATORS[cfg.algorithm.kl_estimator]
        self.params = cfg.rollout.sampling_params()
        if self.dist.enabled:
            self.check_distributed()

    def check_distributed(self) -> None:
        """What multi-process GRPO cannot do, refused before the model loads."""
        cfg = self.config
        world = self.dist.world_size
        check_rollout_shares(cfg, self.rewards, world)
        if self.fsdp:  # FSDP gathers weights in every forward: ranks must run equally many
            if cfg.rollout.prompts_per_step % world:
                raise RlgenError(f"rollout.prompts_per_step = {cfg.rollout.prompts_per_step} must be a multiple of the {world} "
                                 "processes under run.distributed = fsdp (every rank runs the same forward passes)")
            if cfg.algorithm.dynamic_sampling:
                raise RlgenError("algorithm.dynamic_sampling does not run with run.distributed = fsdp (the kept groups, "
                                 "hence the forward passes, differ between ranks); use run.distributed = ddp")

    def prepare(self) -> None:
        check_context_length(self.model, self.tokenizer, self.rendered(self.records), self.config.rollout.max_new_tokens,
                             self.chat.add_special_tokens)
        self.engine = self.text_engine()
        self.reference = self.reference_policy() if self.config.algorithm.beta > 0 else None

    def extra_state(self) -> dict:
        # the reward shaping's frozen statistics (ref-normalize: the first batch's), so a resumed run keeps them
        return {"sampler": self.sampler.state(), "reward_shaping": self.rewards.state()}

    def restore_extra_state(self, state: dict) -> None:
        self.sampler.restore(state["sampler"])
        self.rewards.restore(state.get("reward_shaping", {}))

    # --- rollouts and rewards ---
    def _rollout_groups(self, records: list[dict]) -> RolloutBatch:
        """This rank's share of a global prompt batch, rolled out and scored (the whole batch on one process)."""
        span = self.dist.share(len(records))
        g = self.config.rollout.num_generations
        return GroupRollout(self.engine, self.rewards, g, self.params, self.generator, self.prompt_text).sample(
            records[span.start:span.stop], first_row=span.start * g)

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
        a reward spread, refilling. -> (batch, fraction of the first round's groups without a spread, rounds).
        Multi-process, each round's groups are this rank's share; whether a group has a spread is decided on
        the gathered rewards, and the groups kept are the first n of the global batch in the single-process
        order (round by round), so a rank may keep fewer groups than another, or none."""
        cfg = self.config
        n, g = cfg.rollout.prompts_per_step, cfg.rollout.num_generations
        batches: list[RolloutBatch] = []
        spreads: list[torch.Tensor] = []  # per round: [groups of the global round] bool, the same on every rank
        local_groups: list[range] = []  # per round: this rank's groups among them
        zero_std_fraction = None
        rounds = 0
        while True:
            records = self.sampler.next_batch()
            part = self._rollout_groups(records)
            part = replace(part, total=self._shape_overlong(part.total, part.completion_lengths))
            batches.append(part)
            local_groups.append(self.dist.share(len(records)))
            spreads.append(self.dist.all_gather_rows(_group_spread(part.total.view(-1, g), part.counted.view(-1, g))))
            rounds += 1
            if zero_std_fraction is None:
                zero_std_fraction = float((~spreads[0]).float().mean())
            if not cfg.algorithm.dynamic_sampling:
                break
            kept = int(sum(int(spread.sum()) for spread in spreads))
            if kept >= n or rounds >= cfg.algorithm.max_resample_rounds:
                break
        batch = RolloutBatch.concat(batches, self.engine.pad_id)
        if cfg.algorithm.dynamic_sampling:
            chosen, seen, offset = [], 0, 0  # `seen`: groups kept so far in the global order
            for spread, mine in zip(spreads, local_groups):
                for group in spread.nonzero().flatten().tolist():
                    if seen < n and group in mine:
                        chosen.append(offset + group - mine.start)
                    seen += 1
                offset += len(mine)
            batch = batch.select_groups(chosen)
        return batch, zero_std_fraction, rounds

    def _advantages(self, records, components, total, valid: torch.Tensor | None = None,
                    token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Advantages of the completions, [B] or per token [B, T] (`token_mask` [B, T]: the completion tokens,
        which a per-token estimator shapes its output after); one whose every reward is None (or that was
        skipped) gets exactly 0 and is left out of its group's statistics (the estimators' `mask`).
        Multi-process, the inputs are this rank's rows: the estimator runs on the gathered global batch (its
        batch statistics are the single-process ones) and this rank's rows of the result come back."""
        cfg = self.config
        g = cfg.rollout.num_generations
        mask = counted(components, torch.ones_like(total, dtype=torch.bool) if valid is None else valid)
        baseline = greedy_baseline(self.engine, self.rewards, records, cfg.rollout.max_new_tokens, total.device,
                                   self.prompt_text, self.params) if capabilities(
            self.advantage_fn, ADVANTAGE_ESTIMATOR_DEFAULTS).needs_greedy_baseline else None
        gather = self.dist.all_gather_rows
        rows = total.shape[0]
        first = self.dist.row_offset(rows)
        total_all = gather(total)
        token_all = None if token_mask is None else gather(token_mask)
        batch = AdvantageInput(
            rewards=total_all.view(-1, g),
            mask=gather(mask).view(-1, g),
            components=gather(components).view(-1, g, components.shape[-1]),
            weights=self.rewards.weights.to(total.device),
            scale_rewards=cfg.algorithm.scale_rewards,
            token_mask=None if token_all is None else token_all.bool().view(-1, g, token_all.shape[-1]),
            baseline=None if baseline is None else gather(baseline),
        )
        advantages = estimate_advantages(self.advantage_fn, batch).advantages  # 0 outside mask
        advantages = advantages.reshape(total_all.shape[0], *advantages.shape[2:])[first:first + rows]
        return advantages if advantages.dim() == 1 else advantages[:, : token_mask.shape[-1]]

    # --- the update ---
    def train_step(self) -> dict:
        cfg = self.config
        started = time.perf_counter()
        batch, zero_std, rounds = self._collect()
        rollout_time = time.perf_counter() - started
        if self.completions_due():
            self.log_completions(completion_rows(batch, self.rewards.names))
        everywhere = GatheredRewards.of(batch, self.dist)  # the global batch's (this rank's rows on one process)
        metrics = self._reward_metrics(everywhere, zero_std, rounds)
        if not len(everywhere.total):  # decided on the global batch: every rank skips, or none
            metrics["skipped_update"] = 1
            return metrics
        rollouts, valid = batch.rollouts, batch.valid
        advantages = self._advantages(batch.records, batch.components, batch.total, valid, rollouts.completion_mask)
        release_engine(self.engine)  # the step's generation is over: an engine with memory of its own frees it
        mask = rollouts.completion_mask.float()
        if cfg.algorithm.mask_truncated_completions:
            mask = mask * (~rollouts.truncated).float().unsqueeze(-1)
        mask = mask * valid.float().unsqueeze(-1)
        row_valid = valid if advantages.dim() == 1 else valid.unsqueeze(-1)  # per-token advantages: [B, T]
        advantages = torch.where(row_valid, advantages, torch.zeros_like(advantages))
        metrics.update(self._update(batch, mask, advantages))
        elapsed = time.perf_counter() - started
        metrics["rollout_time"] = rollout_time
        metrics["completions_per_s"] = len(everywhere.total) / elapsed
        metrics["tokens_per_s"] = float(everywhere.lengths.sum()) / elapsed
        if advantages.dim() == 1:  # the global mean: this rank's sum over all ranks' rows, summed over ranks
            share = {"advantage_abs_mean": float(advantages.abs().sum()) / len(everywhere.total)}
        else:  # per token: over the completion tokens
            tokens = rollouts.completion_mask.float()
            share = {"advantage_abs_mean": float((advantages.abs() * tokens).sum()) / max(float(everywhere.lengths.sum()), 1.0)}
        metrics.update(summed_over_ranks(self.dist, share))
        return metrics

    def _update(self, batch: RolloutBatch, mask, advantages) -> dict:
        """The policy update on a rollout batch; the old-policy and reference log-probs it needs are filled in.
        Multi-process, `batch` holds this rank's rows (maybe none): the loss normalisers are the global batch's
        token and sequence counts, and the statistics are summed over ranks."""
        cfg = self.config
        a = cfg.algorithm
        rows = advantages.shape[0]
        shared = a.shared_prefix  # one prompt forward per group (see completion_logprobs)
        budget = cfg.optim.max_tokens_per_micro_batch
        chunks = _micro_batches(self.model, batch.inputs, cfg.optim.gradient_accumulation_steps, shared, budget)
        # FSDP: every rank runs as many passes as the others (fillers at zero weight)
        passes = even_passes(chunks, self.dist if self.fsdp else None)
        ctx = LossContext(
            epsilon=a.epsilon,
            epsilon_high=a.epsilon_high,
            delta=a.delta,
            importance_sampling_level=a.importance_sampling_level,
            max_completion_length=cfg.rollout.max_new_tokens,
            num_items_in_batch=max(float(self.dist.sum(float(mask.sum()))), 1.0),
            num_sequences_in_batch=float(self.dist.sum(rows)),
            # bnpo's per-micro-batch token mean: the mean over the ranks holding rows of each rank's mean over its
            # micro-batches (TRL's per-device batches)
            num_micro_batches=max(len(chunks), 1) * max(int(self.dist.sum(1 if rows else 0)), 1),
        )
        inputs = batch.inputs
        temperature = cfg.rollout.temperature
        if a.num_iterations > 1 and chunks:
            batch.old_logps = _frozen_logprobs(self.model, inputs, passes, temperature, shared, budget)
        if a.beta > 0 and chunks:
            batch.ref_logps = self._reference_logprobs(inputs, passes, temperature, shared, budget)
        old_logps, ref_logps = batch.old_logps, batch.ref_logps
        engine_logps = batch.rollouts.logprobs  # None: the policy sampled (the HF engine), nothing to correct
        sums: dict[str, float] = {}
        ratio_max = 0.0
        grad_norm = 0.0
        for _ in range(a.num_iterations):
            for idx, real in passes:
                part = _micro_inputs(inputs, idx, budget)
                logp, entropy = completion_logprobs(self.model, *part, temperature, shared)
                if not real:  # an FSDP filler pass: its forward and backward gather like the others', at zero weight
                    self.backward(logp.sum() * 0.0)
                    continue
                w = logp.shape[1]  # the micro-batch's completion width (trimmed under a token budget)
                old = logp.detach() if old_logps is None else old_logps[idx, :w]
                ref = None if ref_logps is None else ref_logps[idx, :w]
                kl = self.kl_fn(logp, ref) if ref is not None else None
                adv = advantages[idx] if advantages.dim() == 1 else advantages[idx, :w]
                m = mask[idx, :w]
                token_weights = None
                if engine_logps is not None:
                    token_weights, engine_stats = engine_is_weights(old, engine_logps[idx, :w], m, a.engine_is_correction,
                                                                    a.engine_is_cap, a.engine_is_level)
                    ratio_max = max(ratio_max, float(engine_stats.pop("ratio_max")))
                    for key, value in engine_stats.items():
                        _accumulate(sums, f"engine/{key}", float(value) * float(m.sum()) / ctx.num_items_in_batch)
                    if a.engine_is_correction == "none":
                        token_weights = None
                loss, stats = policy_loss(self.loss_fn, logp, old, adv, m, ctx, kl, a.beta, ref_logp=ref, name=a.loss_type,
                                          token_weights=token_weights)
                self.backward(loss)
                weight = float(m.sum()) / ctx.num_items_in_batch
                _accumulate(sums, "loss", float(loss.detach()))
                _accumulate(sums, "entropy", float((entropy.detach() * m).sum() / m.sum().clamp(min=1)) * weight)
                if kl is not None:
                    _accumulate(sums, "kl", float((kl.detach() * m).sum() / m.sum().clamp(min=1)) * weight)
                for key, value in stats.items():
                    _accumulate(sums, key, float(value) * weight)
            grad_norm = self.optimizer_step()
        if self.dist.enabled:  # every rank reports every key (a rank without rows has none of its own)
            keys = sorted({key for keys in self.dist.all_gather_json(sorted(sums)) for key in keys})
            sums = summed_over_ranks(self.dist, {key: sums.get(key, 0.0) for key in keys})
        out = {k: v / a.num_iterations for k, v in sums.items()}
        if engine_logps is not None:  # the largest ratio of any rank's tokens
            out["engine/ratio_max"] = max(self.dist.all_gather_json(ratio_max))
        out["grad_norm"] = grad_norm
        return out

    def _reference_logprobs(self, inputs, passes, temperature, shared: bool = True, budget: int = 0) -> torch.Tensor:
        with self.reference.forward() as reference:
            return _frozen_logprobs(reference, inputs, passes, temperature, shared, budget)

    def _reward_metrics(self, batch: "GatheredRewards", zero_std: float, rounds: int) -> dict:
        metrics = self.rewards.metrics(batch.components, batch.total, batch.valid)
        metrics["completion_length"] = float(batch.lengths.float().mean())
        metrics["truncated_fraction"] = float(batch.truncated.float().mean())
        metrics["frac_reward_zero_std"] = zero_std
        metrics["sampling_rounds"] = rounds
        metrics["rewards/skipped"] = int((~batch.valid).sum())
        return metrics

    @property
    def eval_max_new_tokens(self) -> int:
        return self.config.rollout.max_new_tokens


@dataclass
class GatheredRewards:
    """The per-completion rewards and lengths of a step's global batch, on every rank (what the reward metrics
    and the skip decision need; the tokens stay on their rank)."""

    components: torch.Tensor  # [N, R]
    total: torch.Tensor  # [N]
    valid: torch.Tensor  # [N] bool
    lengths: torch.Tensor  # [N] completion tokens
    truncated: torch.Tensor  # [N] bool

    @classmethod
    def of(cls, batch: RolloutBatch, dist) -> "GatheredRewards":
        gather = dist.all_gather_rows
        return cls(gather(batch.components), gather(batch.total), gather(batch.valid), gather(batch.completion_lengths),
                   gather(batch.rollouts.truncated))


def release_engine(engine) -> None:
    """Between a step's generation and its update: an engine with its own weights and KV cache (vLLM with
    rollout.vllm_enable_sleep_mode) frees them, to be woken and synced before its next generation."""
    sleep = getattr(engine, "sleep", None)
    if sleep is not None:
        sleep()


def completion_rows(batch: RolloutBatch, reward_names: list[str]) -> list[dict]:
    """A rollout batch's completions as table rows: prompt (as given: a string or a message list), completion,
    the combined reward (as the advantages see it) and each reward's value (reward_NAME; None where it does
    not apply)."""
    total = batch.total.detach().double().cpu().tolist()
    components = batch.components.detach().double().cpu().tolist()
    rows = []
    for row_index, (sample, reward, values) in enumerate(zip(batch.samples, total, components)):
        prompt = batch.records[row_index // batch.group_size]["prompt"]  # as drawn (samples hold the rewards' text)
        row = {"prompt": prompt, "completion": sample["completion"], "reward": reward}
        row.update({f"reward_{name}": value for name, value in zip(reward_names, values)})
        rows.append(row)
    return rows


def greedy_baseline(engine, rewards: RewardSet, records: list[dict], max_new_tokens: int, device, prompt_text=None,
                    params: SamplingParams | None = None) -> torch.Tensor:
    """[groups] the reward of each prompt's greedy completion (ReMax's baseline), scored and shaped as the
    rollouts are; NaN where it has no reward. `prompt_text`: a record's prompt as model text (the chat
    template's); `params`: the rollouts' settings, decoded greedily."""
    if not records:  # a rank that kept no group (dynamic sampling) has no prompt to decode
        return torch.empty(0, device=device)
    greedy_params = replace(params, temperature=0.0) if params is not None else SamplingParams(max_new_tokens, 0.0)
    greedy = engine.generate([prompt_text(r) if prompt_text else r["prompt"] for r in records], greedy_params)
    samples = [{**r, "completion": t} for r, t in zip(records, greedy.texts)]
    greedy_components, greedy_valid, baseline = scored(rewards, samples, device)
    no_baseline = ~counted(greedy_components, greedy_valid)
    return torch.where(no_baseline, torch.full_like(baseline, float("nan")), baseline)


def check_rollout_shares(cfg, rewards: RewardSet, world: int) -> None:
    """What prompt-sharded rollouts (GRPO, online DPO) need on `world` processes: a prompt for every rank, and
    reward statistics that do not depend on a rank's own batch."""
    if cfg.rollout.prompts_per_step < world:
        raise RlgenError(f"rollout.prompts_per_step = {cfg.rollout.prompts_per_step} gives some of the {world} processes "
                         "no prompt: use at least one prompt per process")
    shaping = rewards.shaping
    if shaping is not None and shaping.estimate is not None and any(
            shaping.options.get(key) is None for key in shaping.estimate(torch.zeros(2))):
        raise RlgenError(f"reward_shaping = '{cfg.reward_shaping}' estimates its statistics from a rank's first batch, "
                         "which differs between processes: give them as options (e.g. ref-normalize:mean=..,std=..)")


def check_context_length(model, tokenizer, records: list[dict], max_new_tokens: int, add_special_tokens: bool = True) -> None:
    """Prompt plus completion must fit the model's declared context (the helper `sample` and `eval` use too)."""
    check_context(model, tokenizer, [r["prompt"] for r in records], max_new_tokens, "rollout.max_new_tokens", add_special_tokens)


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
def _frozen_logprobs(model, inputs, passes, temperature, shared, budget: int = 0) -> torch.Tensor:
    """Log-probs without gradient (old policy, reference), pass by pass (`even_passes`: filler passes run and
    are dropped), in the batch's row order and width."""
    rows, width = inputs.completion_ids.shape
    out = None
    for idx, real in passes:
        logp = completion_logprobs(model, *_micro_inputs(inputs, idx, budget), temperature, shared)[0]
        if not real:
            continue
        if out is None:
            out = logp.new_zeros((rows, width))
        out[idx.to(logp.device)] = pad_to(logp, width)
    return out


def _micro_inputs(inputs: ModelInputs, idx: torch.Tensor, budget: int) -> ModelInputs:
    """A micro-batch's inputs; under a token budget without its all-padding columns, so that a micro-batch of
    short completions computes on short tensors."""
    part = inputs.rows(idx.to(inputs.prompt_ids.device))
    return trimmed(part) if budget > 0 else part


def _micro_batches(model, inputs: ModelInputs, accumulation_steps: int, shared: bool, budget: int = 0) -> list[torch.Tensor]:
    """Row indices of the update's micro-batches: by token budget (`optim.max_tokens_per_micro_batch`) when
    set, else `accumulation_steps` near-equal parts. When the prompt forward is shared (`shared` and the model
    supports it), micro-batches hold whole runs of identical prompts (a group), so no prompt is run twice."""
    rows = inputs.prompt_ids.shape[0]
    device = inputs.prompt_ids.device  # the indices select rows of tensors there
    units = None
    if rows and shared and supports_shared_prefix(model):
        starts, _ = prefix_runs(inputs.prompt_ids, inputs.prompt_mask)
        if len(starts) < rows:
            bounds = starts.tolist() + [rows]
            units = [list(range(bounds[k], bounds[k + 1])) for k in range(len(starts))]
            if budget <= 0:  # near-equal numbers of groups per micro-batch
                pieces = torch.arange(len(units)).tensor_split(min(accumulation_steps, len(units)))
                return [torch.arange(bounds[int(p[0])], bounds[int(p[-1]) + 1], device=device) for p in pieces]
    return [chunk.to(device) for chunk in micro_batches(rows, budget, accumulation_steps,
                                                        row_costs(inputs) if budget > 0 else None, units)]
