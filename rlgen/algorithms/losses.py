"""Policy losses (TRL `loss_type` names) and KL estimators: small pure functions with a name.

A built-in policy loss maps per-token log-probs of the current policy (`logp`), of the policy that sampled
(`old_logp`), `advantages` ([B] per sequence or [B, T] per token) and the completion `mask` [B, T] to
`(per_token_loss [B, T], aggregation name, statistics)`: the old-style form of the policy-loss contract
(rlgen.algorithms.contracts: PolicyLossInput -> PolicyLossOutput). `policy_loss` runs either form and
aggregates (AGGREGATIONS, or the loss's own LossAggregation) into one number. `ctx` carries the clip ranges
and normalisers (LossContext).
"""
from __future__ import annotations

import torch

from rlgen.algorithms.contracts import LossContext, PolicyLossInput, run_policy_loss, token_advantages
from rlgen.hookspecs import hookimpl

__all__ = ["LossContext", "PolicyLossInput", "policy_loss", "aggregate", "AGGREGATIONS", "POLICY_LOSSES", "KL_ESTIMATORS"]


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """Per-token log importance ratio; 'sequence' (GSPO) uses the length-normalised sequence ratio with
    the token-level gradient of GSPO-token: sg[s_i] * pi / sg[pi]."""
    token = logp - old_logp
    if level == "token":
        return token
    if level == "sequence":
        seq = (token * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        return seq.detach() + logp - logp.detach()
    raise ValueError(f"importance_sampling_level must be token or sequence, got {level!r}")


def clip_stats(ratio, advantages, mask, ctx: LossContext) -> dict[str, torch.Tensor]:
    adv = token_advantages(advantages).expand_as(ratio)
    low = ((ratio < 1 - ctx.epsilon) & (adv < 0)).float()
    high = ((ratio > 1 + ctx.eps_high) & (adv > 0)).float()
    return {
        "clip_ratio/low_mean": masked_mean(low, mask).detach(),
        "clip_ratio/high_mean": masked_mean(high, mask).detach(),
        "clip_ratio/region_mean": masked_mean(((low + high) > 0).float(), mask).detach(),
    }


def clipped_surrogate(logp, old_logp, advantages, mask, ctx: LossContext):
    """PPO's clipped objective per token (negated, so lower is better), with clip-higher and delta."""
    ratio = torch.exp(log_ratio(logp, old_logp, mask, ctx.importance_sampling_level))
    adv = token_advantages(advantages)
    unclipped = ratio if ctx.delta is None else torch.clamp(ratio, max=ctx.delta)
    clipped = torch.clamp(ratio, 1 - ctx.epsilon, 1 + ctx.eps_high)
    per_token = -torch.min(unclipped * adv, clipped * adv)
    return per_token, clip_stats(ratio, advantages, mask, ctx)


# --- aggregation: how per-token losses become one number (the heart of TRL's loss_type) ---

def sequence_mean(per_token: torch.Tensor, mask: torch.Tensor, ctx: LossContext) -> torch.Tensor:
    """grpo: mean over each sequence's tokens, then over sequences."""
    per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    if ctx.num_sequences_in_batch:
        return per_seq.sum() / ctx.num_sequences_in_batch
    return per_seq.mean()


def token_mean_local(per_token: torch.Tensor, mask: torch.Tensor, ctx: LossContext) -> torch.Tensor:
    """bnpo: token mean over this (micro-)batch."""
    return (per_token * mask).sum() / mask.sum().clamp(min=1) / ctx.num_micro_batches


def constant(per_token: torch.Tensor, mask: torch.Tensor, ctx: LossContext) -> torch.Tensor:
    """dr_grpo: divide by batch size x max completion length."""
    rows = ctx.num_sequences_in_batch or per_token.shape[0]
    return (per_token * mask).sum() / (rows * ctx.max_completion_length)


def token_mean_global(per_token: torch.Tensor, mask: torch.Tensor, ctx: LossContext) -> torch.Tensor:
    """dapo: token mean over the whole accumulated batch."""
    total = ctx.num_items_in_batch or mask.sum().clamp(min=1)
    return (per_token * mask).sum() / total


# Loss aggregations by name (rlgen.algorithms.contracts.LossAggregation); a policy loss names one of these
# in its output, or returns its own aggregation function.
AGGREGATIONS = {
    "sequence-mean": sequence_mean,
    "token-mean-local": token_mean_local,
    "constant": constant,
    "token-mean-global": token_mean_global,
}


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode, ctx: LossContext) -> torch.Tensor:
    """One number from per-token losses: `mode` is an AGGREGATIONS name or a LossAggregation."""
    if callable(mode):
        return mode(per_token, mask, ctx)
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r} (known: {', '.join(AGGREGATIONS)})")
    return AGGREGATIONS[mode](per_token, mask, ctx)


def _ppo_loss(mode: str):
    def loss(logp, old_logp, advantages, mask, ctx: LossContext):
        per_token, stats = clipped_surrogate(logp, old_logp, advantages, mask, ctx)
        return per_token, mode, stats

    return loss


def grpo(logp, old_logp, advantages, mask, ctx):
    """GRPO: clipped surrogate, each sequence's token mean, then the mean over sequences."""
    return _ppo_loss("sequence-mean")(logp, old_logp, advantages, mask, ctx)


def bnpo(logp, old_logp, advantages, mask, ctx):
    """BNPO: clipped surrogate averaged over the active tokens of the local batch."""
    return _ppo_loss("token-mean-local")(logp, old_logp, advantages, mask, ctx)


def dr_grpo(logp, old_logp, advantages, mask, ctx):
    """Dr. GRPO: clipped surrogate summed and divided by a constant (batch x max completion length)."""
    return _ppo_loss("constant")(logp, old_logp, advantages, mask, ctx)


def dapo(logp, old_logp, advantages, mask, ctx):
    """DAPO: clipped surrogate averaged over all active tokens of the accumulated batch."""
    return _ppo_loss("token-mean-global")(logp, old_logp, advantages, mask, ctx)


def gspo(logp, old_logp, advantages, mask, ctx):
    """GSPO: sequence-level (length-normalised) importance ratio, clipped, per-sequence mean."""
    seq_ctx = LossContext(**{**ctx.__dict__, "importance_sampling_level": "sequence"})
    return _ppo_loss("sequence-mean")(logp, old_logp, advantages, mask, seq_ctx)


def cispo(logp, old_logp, advantages, mask, ctx):
    """CISPO: REINFORCE weighted by the clipped, detached importance ratio (ratio <= epsilon_high)."""
    ratio = torch.exp(logp - old_logp)
    weight = torch.clamp(ratio, max=ctx.eps_high).detach()
    adv = token_advantages(advantages)
    per_token = -weight * adv * logp
    # CISPO only caps the weight from above, at epsilon_high itself (not 1 + epsilon_high): count, as TRL's
    # cispo_clip_ratio does, the tokens with A > 0 whose weight was capped; nothing is clipped below.
    high = ((ratio > ctx.eps_high) & (adv > 0)).float()
    stats = {
        "clip_ratio/low_mean": torch.zeros((), device=logp.device),
        "clip_ratio/high_mean": masked_mean(high, mask).detach(),
        "clip_ratio/region_mean": masked_mean(high, mask).detach(),
    }
    return per_token, "token-mean-global", stats


POLICY_LOSSES = {"grpo": grpo, "bnpo": bnpo, "dr_grpo": dr_grpo, "dapo": dapo, "gspo": gspo, "cispo": cispo}


def policy_loss(fn, logp, old_logp, advantages, mask, ctx: LossContext, kl: torch.Tensor | None = None,
                beta: float = 0.0, ref_logp: torch.Tensor | None = None, name: str = "",
                token_weights: torch.Tensor | None = None):
    """Apply a registered loss (either form), weight each token's loss by `token_weights` [B, T] (the rollout
    engine's importance weights, `engine_is_weights`), add beta * per-token KL before aggregation (both as TRL
    does), aggregate. `advantages` may be per sequence [B] or per token [B, T]."""
    out = run_policy_loss(fn, PolicyLossInput(logp, old_logp, advantages, mask, ctx, ref_logp), name)
    per_token = out.per_token_loss
    if token_weights is not None:
        per_token = per_token * token_weights
    if kl is not None and beta:
        per_token = per_token + beta * kl
    return aggregate(per_token, mask, out.aggregation, ctx), out.stats


# --- the rollout engine's off-policy correction ---

def engine_is_weights(trainer_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor, mode: str, cap: float,
                      level: str = "token") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Importance weights [B, T] (no gradient) for completions a separate engine sampled (vLLM, whose kernels,
    precision or weights differ from the trainer's): the ratio pi_trainer / pi_engine of each token (`level` =
    "token") or of each sequence (the product of its tokens' ratios, on every token of it), with
    `mode` = "tis" truncated at `cap` (min(ratio, cap): TRL's vllm_importance_sampling_correction, verl's TIS),
    "mis" zero where the ratio exceeds `cap` (masked IS), "none" all ones. `trainer_logp` is the trainer's
    log-prob of the sampled token under the policy that sampled (the old policy), `engine_logp` the engine's.
    Stats over the completion tokens (`mask`): `kl`, the k3 estimate of KL(engine || trainer); `ratio_max`;
    `masked_fraction`, the share of tokens whose ratio exceeded the cap (capped under tis, dropped under mis)."""
    with torch.no_grad():
        m = mask.float()
        log_ratio = (trainer_logp.float() - engine_logp.float()) * m
        token_ratio = log_ratio.exp()
        ratio = (log_ratio.sum(-1, keepdim=True).exp().expand_as(log_ratio) if level == "sequence" else token_ratio)
        over = (ratio > cap).float() * m
        if mode == "tis":
            weights = ratio.clamp(max=cap)
        elif mode == "mis":
            weights = ratio * (1.0 - over)
        else:
            weights = torch.ones_like(ratio)
        tokens = m.sum().clamp(min=1)
        stats = {"kl": ((token_ratio - 1 - log_ratio) * m).sum() / tokens,
                 "ratio_max": (ratio * m).max() if m.any() else ratio.new_tensor(1.0),
                 "masked_fraction": over.sum() / tokens}
        return weights * m, stats


# --- KL estimators between the policy and a frozen reference (Schulman's k1 / k2 / k3) ---

def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


@hookimpl
def register_policy_losses(register):
    for name, fn in POLICY_LOSSES.items():
        register(name, fn)
