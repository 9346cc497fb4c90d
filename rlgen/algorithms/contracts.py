"""Contracts of the algorithm hooks: advantage estimators, policy losses, loss aggregations, preference losses.

Each hook kind has an input dataclass, an output dataclass and a Protocol. A plugin implements the typed form
by annotating its first parameter with the input dataclass:

    @declare(per_token=True)
    def my_estimator(batch: AdvantageInput) -> AdvantageOutput: ...

Older plain functions (`fn(rewards, **kwargs) -> Tensor`, `fn(logp, old_logp, advantages, mask, ctx) ->
(per_token, aggregation, stats)`) keep working: `estimate_advantages` and `run_policy_loss` call either form.
Capabilities are read with rlgen.extension.capabilities (defaults per kind below).

Shapes: G prompts (groups), K completions per prompt, T completion tokens, B = G * K rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Union

import torch

from rlgen.errors import RlgenError
from rlgen.extension import Capabilities, takes

# --- advantage estimators ----------------------------------------------------------------------------


@dataclass
class AdvantageInput:
    rewards: torch.Tensor  # [G, K] the combined (and shaped) reward of each completion
    mask: torch.Tensor  # [G, K] bool: the completions that count (others: every reward None, or skipped)
    components: torch.Tensor | None = None  # [G, K, R] each reward's value (NaN: does not apply)
    weights: torch.Tensor | None = None  # [R] the rewards' weights
    scale_rewards: str = "group"  # group | batch | none (algorithm.scale_rewards)
    baseline: torch.Tensor | None = None  # [G] reward of a greedy completion (NaN: none); needs_greedy_baseline
    token_rewards: torch.Tensor | None = None  # [G, K, T] per-token (process) rewards, when the trainer has them
    token_mask: torch.Tensor | None = None  # [G, K, T] bool: the completion tokens (None: not known)

    @property
    def num_groups(self) -> int:
        return self.rewards.shape[0]

    @property
    def group_size(self) -> int:
        return self.rewards.shape[1]


@dataclass
class AdvantageOutput:
    advantages: torch.Tensor  # [G, K], or [G, K, T] per token (declare per_token=True)


class AdvantageEstimator(Protocol):
    def __call__(self, batch: AdvantageInput) -> AdvantageOutput: ...


ADVANTAGE_ESTIMATOR_DEFAULTS = Capabilities()


def estimate_advantages(fn: Callable, batch: AdvantageInput, name: str = "") -> AdvantageOutput:
    """Run an estimator of either form; the result is checked ([G, K] or [G, K, T]) and is exactly 0 outside
    `mask` (and outside `token_mask` per token), also for estimators that ignore the masks."""
    label = name or getattr(fn, "__name__", "?")
    if takes(fn, AdvantageInput):
        out = fn(batch)
        if not isinstance(out, AdvantageOutput):
            raise RlgenError(f"advantage estimator '{label}' returned {type(out).__name__}, not an AdvantageOutput")
        advantages = out.advantages
    else:  # old style: rewards positional, the rest as keyword arguments it may ignore
        kwargs = {"components": batch.components, "weights": batch.weights, "scale_rewards": batch.scale_rewards,
                  "mask": batch.mask}
        if batch.baseline is not None:
            kwargs["baseline"] = batch.baseline
        advantages = fn(batch.rewards, **kwargs)
    groups = tuple(batch.rewards.shape)
    if tuple(advantages.shape) == groups:
        return AdvantageOutput(torch.where(batch.mask, advantages, torch.zeros_like(advantages)))
    if batch.token_mask is not None and tuple(advantages.shape) == tuple(batch.token_mask.shape):
        keep = batch.mask.unsqueeze(-1) & batch.token_mask.bool()
        return AdvantageOutput(torch.where(keep, advantages, torch.zeros_like(advantages)))
    wanted = f"{list(groups)}" + (f" or {list(batch.token_mask.shape)}" if batch.token_mask is not None else "")
    raise RlgenError(f"advantage estimator '{label}' returned shape {list(advantages.shape)}; expected {wanted}")


# --- policy losses and their aggregation ----------------------------------------------------------


@dataclass
class LossContext:
    epsilon: float = 0.2  # lower clip range (and upper unless epsilon_high is set)
    epsilon_high: float | None = None  # DAPO clip-higher; CISPO's epsilon_max
    delta: float | None = None  # two-sided clip (INTELLECT-2): ratio capped at delta for A < 0
    importance_sampling_level: str = "token"  # token | sequence (GSPO)
    max_completion_length: int = 1  # Dr. GRPO's constant normaliser
    num_items_in_batch: float | None = None  # DAPO: active tokens over the whole accumulated batch
    num_sequences_in_batch: float | None = None  # sequences over the whole accumulated batch
    num_micro_batches: int = 1  # bnpo's local token mean is averaged over micro-batches

    @property
    def eps_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


def token_advantages(advantages: torch.Tensor) -> torch.Tensor:
    """Advantages that broadcast against [B, T]: per-sequence [B] -> [B, 1]; per-token [B, T] as they are."""
    return advantages if advantages.dim() == 2 else advantages.unsqueeze(-1)


@dataclass
class PolicyLossInput:
    logp: torch.Tensor  # [B, T] log-probs of the completion tokens under the current policy
    old_logp: torch.Tensor  # [B, T] under the policy that sampled them (detached)
    advantages: torch.Tensor  # [B] per sequence, or [B, T] per token
    mask: torch.Tensor  # [B, T] float: the tokens that count
    ctx: LossContext = field(default_factory=LossContext)
    ref_logp: torch.Tensor | None = None  # [B, T] under the frozen reference (when beta > 0)

    @property
    def per_token_advantages(self) -> torch.Tensor:
        """[B, T] or [B, 1]: advantages ready to multiply per-token terms."""
        return token_advantages(self.advantages)


class LossAggregation(Protocol):
    """How per-token losses become one number (TRL's loss_type reduction)."""

    def __call__(self, per_token: torch.Tensor, mask: torch.Tensor, ctx: LossContext) -> torch.Tensor: ...


@dataclass
class PolicyLossOutput:
    per_token_loss: torch.Tensor  # [B, T]
    aggregation: Union[str, LossAggregation] = "token-mean-global"  # a name in losses.AGGREGATIONS, or one
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # logged, weighted by each micro-batch's tokens


class PolicyLoss(Protocol):
    def __call__(self, batch: PolicyLossInput) -> PolicyLossOutput: ...


POLICY_LOSS_DEFAULTS = Capabilities()


def run_policy_loss(fn: Callable, batch: PolicyLossInput, name: str = "") -> PolicyLossOutput:
    """Run a policy loss of either form."""
    if takes(fn, PolicyLossInput):
        out = fn(batch)
        if not isinstance(out, PolicyLossOutput):
            label = name or getattr(fn, "__name__", "?")
            raise RlgenError(f"policy loss '{label}' returned {type(out).__name__}, not a PolicyLossOutput")
        return out
    per_token, aggregation, stats = fn(batch.logp, batch.old_logp, batch.advantages, batch.mask, batch.ctx)
    return PolicyLossOutput(per_token, aggregation, stats)


# --- preference losses ------------------------------------------------------------------------------


@dataclass
class PairScores:
    chosen: torch.Tensor  # [B] summed log-prob of the chosen completion under the policy
    rejected: torch.Tensor  # [B]
    chosen_tokens: torch.Tensor  # [B] completion lengths (tokens scored)
    rejected_tokens: torch.Tensor  # [B]
    ref_chosen: torch.Tensor | None = None  # [B] under the reference model (None: reference-free)
    ref_rejected: torch.Tensor | None = None


@dataclass
class PreferenceOptions:
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5


@dataclass
class PairLoss:
    losses: torch.Tensor  # [B]
    chosen_rewards: torch.Tensor  # [B] implicit rewards (detached), as TRL logs them
    rejected_rewards: torch.Tensor  # [B]


class PreferenceLoss(Protocol):
    def __call__(self, scores: PairScores, options: PreferenceOptions) -> PairLoss: ...


# A preference loss without a declaration compares against the reference (DPO's log-ratios), as before.
PREFERENCE_LOSS_DEFAULTS = Capabilities(needs_reference=True)
