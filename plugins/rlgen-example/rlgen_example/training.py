"""Training parts: a policy loss, a preference loss and an algorithm (a preset of grpo)."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


# --- a policy loss (`--set algorithm.loss_type=example-unclipped` with grpo and its presets) ---------
# Contract: fn(logp, old_logp, advantages, mask, ctx) -> (per_token_loss [B, T], aggregation, stats).
# logp / old_logp: per-token log-probs [B, T] under the policy being trained and the one that sampled
# (old_logp is detached); advantages: [B] per sequence, or [B, T] per token; mask: [B, T], 1 on the
# completion's tokens; ctx: rlgen.algorithms.losses.LossContext (clip ranges, batch normalisers).
# aggregation names how per-token losses become one number: "sequence-mean" (grpo), "token-mean-local"
# (bnpo), "token-mean-global" (dapo) or "constant" (dr_grpo). stats: {name: scalar tensor}, logged.
# Lower is better: return the negated objective. rlgen adds beta * KL per token before aggregating.


def unclipped_surrogate(logp, old_logp, advantages, mask, ctx):
    """Vanilla policy gradient: -ratio * advantage per token, no clipping, each sequence's token mean."""
    token_advantages = advantages if advantages.dim() == 2 else advantages.unsqueeze(-1)
    ratio = torch.exp(logp - old_logp)  # 1 on-policy; its gradient is the REINFORCE gradient
    per_token = -ratio * token_advantages
    mean_ratio = (ratio * mask).sum() / mask.sum().clamp(min=1)
    return per_token, "sequence-mean", {"example/ratio_mean": mean_ratio.detach()}


# --- a preference loss (`--set algorithm.loss_type=example-ref-free` with dpo, online-dpo ...) --------
# Contract: fn(scores: PairScores, options: PreferenceOptions) -> PairLoss, from
# rlgen.algorithms.preference_losses. scores.chosen / scores.rejected: summed completion log-probs [B]
# under the policy; chosen_tokens / rejected_tokens: their lengths [B]; ref_chosen / ref_rejected:
# the same under the reference model, or None. options: beta, label_smoothing, simpo_gamma.
# Return per-pair losses [B] (the trainer averages them) and the implicit rewards it logs (detached).
# A loss that never reads the reference sets needs_reference = False: no reference model is loaded.


def reference_free_sigmoid(scores, options):
    """Reference-free DPO: -log sigmoid(beta * (chosen - rejected)) on summed log-probs, no reference model."""
    from rlgen.algorithms.preference_losses import PairLoss

    margin = options.beta * (scores.chosen - scores.rejected)
    return PairLoss(-F.logsigmoid(margin), options.beta * scores.chosen.detach(),
                    options.beta * scores.rejected.detach())


reference_free_sigmoid.needs_reference = False


# --- an algorithm (`rlgen train example-grpo`) ------------------------------------------------------
# Contract: an rlgen.algorithms.base.Algorithm(name, config_cls, trainer_cls, description, defaults,
# base). A preset reuses another algorithm's config and trainer classes with other defaults
# ({section: {key: value}}, overridable by the user's config and --set); `base` names the family, so
# that tools that ask "is this grpo-like?" treat it as grpo.


def example_grpo():
    """grpo with this plugin's rank advantages."""
    from rlgen.algorithms.builtin import ALGORITHMS

    grpo = next(algorithm for algorithm in ALGORITHMS if algorithm.name == "grpo")
    return dataclasses.replace(
        grpo, name="example-grpo", base="grpo",
        description="grpo preset with the rank advantage estimator (rlgen-example)",
        defaults={"algorithm": {"advantage": "rank"}},
    )
