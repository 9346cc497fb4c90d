"""Preference losses: small pure functions of sequence log-probs, one per `algorithm.loss_type`.

A pairwise loss takes `PairScores` (summed completion log-probs of the chosen and rejected answers
under the policy, and under the reference when it needs one) and `PreferenceOptions`, and returns
`PairLoss(losses [B], chosen_rewards [B], rejected_rewards [B])`; the trainer averages `losses` over
pairs (the contract: rlgen.algorithms.contracts.PreferenceLoss; whether a loss needs the reference is
declared with `@declare(needs_reference=...)`). Names and conventions follow TRL (DPOConfig / CPOConfig / ORPO / KTOConfig) so that
hyper-parameters carry over:

- sigmoid  (DPO): -(1-ls) log s(b h) - ls log s(-b h),   h = (c - c_ref) - (r - r_ref)  (ls = label_smoothing, cDPO)
- robust   (rDPO): ((1-ls)(-log s(b h)) + ls log s(-b h)) / (1 - 2 ls)
- hinge    (SLiC): relu(1 - b h)
- ipo      (IPO): (h_avg - 1/(2 b))^2, with log-ratios averaged per token (TRL's normalisation)
- simpo    (SimPO): -log s(b (c/|c| - r/|r|) - gamma), reference-free (TRL's simpo_gamma)
- orpo     (ORPO): -b log s(log odds(c_avg) - log odds(r_avg)), reference-free; the trainer adds the NLL
The trainer adds `rpo_alpha` x NLL of the chosen tokens (RPO; ORPO's own NLL term) to any of them.

KTO is unpaired and has its own function, `kto_losses`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rlgen.algorithms.contracts import PREFERENCE_LOSS_DEFAULTS, PairLoss, PairScores, PreferenceOptions
from rlgen.extension import capabilities, declare
from rlgen.hookspecs import hookimpl

__all__ = ["PairScores", "PreferenceOptions", "PairLoss", "needs_reference", "PAIR_LOSSES", "kto_losses", "bradley_terry"]


def needs_reference(fn) -> bool:
    """Whether a preference loss compares against the reference's log-probs (declared; default yes)."""
    return capabilities(fn, PREFERENCE_LOSS_DEFAULTS).needs_reference


def _logratios(s: PairScores):
    if s.ref_chosen is None or s.ref_rejected is None:
        raise ValueError("this loss needs reference log-probs")
    return s.chosen - s.ref_chosen, s.rejected - s.ref_rejected


def _dpo_rewards(o: PreferenceOptions, chosen_ratio, rejected_ratio):
    return o.beta * chosen_ratio.detach(), o.beta * rejected_ratio.detach()


@declare(needs_reference=True)
def sigmoid(s: PairScores, o: PreferenceOptions) -> PairLoss:
    """DPO (Rafailov et al. 2023); label_smoothing > 0 gives conservative DPO (cDPO)."""
    cr, rr = _logratios(s)
    h = o.beta * (cr - rr)
    losses = -(1 - o.label_smoothing) * F.logsigmoid(h) - o.label_smoothing * F.logsigmoid(-h)
    return PairLoss(losses, *_dpo_rewards(o, cr, rr))


@declare(needs_reference=True)
def robust(s: PairScores, o: PreferenceOptions) -> PairLoss:
    """Robust DPO (Chowdhury et al. 2024): unbiased under a label-flip rate of label_smoothing."""
    if not 0.0 <= o.label_smoothing < 0.5:
        raise ValueError("loss_type 'robust' needs 0 <= label_smoothing < 0.5")
    cr, rr = _logratios(s)
    h = o.beta * (cr - rr)
    losses = (-(1 - o.label_smoothing) * F.logsigmoid(h) + o.label_smoothing * F.logsigmoid(-h)) / (1 - 2 * o.label_smoothing)
    return PairLoss(losses, *_dpo_rewards(o, cr, rr))


@declare(needs_reference=True)
def hinge(s: PairScores, o: PreferenceOptions) -> PairLoss:
    """SLiC-HF hinge loss on the reference-relative margin."""
    cr, rr = _logratios(s)
    return PairLoss(torch.relu(1 - o.beta * (cr - rr)), *_dpo_rewards(o, cr, rr))


@declare(needs_reference=True)
def ipo(s: PairScores, o: PreferenceOptions) -> PairLoss:
    """IPO (Azar et al. 2023): squared distance of the per-token log-ratio margin to 1/(2 beta)."""
    cr, rr = _logratios(s)
    cr, rr = cr / s.chosen_tokens.clamp(min=1), rr / s.rejected_tokens.clamp(min=1)
    # TRL averages the log-probs themselves for ipo, so its logged rewards are beta x the averaged log-ratios
    return PairLoss((cr - rr - 1 / (2 * o.beta)) ** 2, *_dpo_rewards(o, cr, rr))


@declare(needs_reference=False)
def simpo(s: PairScores, o: PreferenceOptions) -> PairLoss:
    """SimPO (Meng et al. 2024): length-normalised log-prob as the reward, target margin gamma, no reference."""
    chosen_avg = s.chosen / s.chosen_tokens.clamp(min=1)
    rejected_avg = s.rejected / s.rejected_tokens.clamp(min=1)
    h = o.beta * (chosen_avg - rejected_avg) - o.simpo_gamma
    losses = -(1 - o.label_smoothing) * F.logsigmoid(h) - o.label_smoothing * F.logsigmoid(-h)
    return PairLoss(losses, o.beta * chosen_avg.detach(), o.beta * rejected_avg.detach())


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@declare(needs_reference=False)
def orpo(s: PairScores, o: PreferenceOptions) -> PairLoss:
    """ORPO (Hong et al. 2024): log-sigmoid of the log odds ratio of the average token probabilities,
    weighted by beta (the paper's lambda); the NLL on chosen comes from rpo_alpha (1.0 in the preset)."""
    chosen_avg = s.chosen / s.chosen_tokens.clamp(min=1)
    rejected_avg = s.rejected / s.rejected_tokens.clamp(min=1)
    log_odds = (chosen_avg - rejected_avg) - (_log1mexp(chosen_avg) - _log1mexp(rejected_avg))
    return PairLoss(-o.beta * F.logsigmoid(log_odds), o.beta * chosen_avg.detach(), o.beta * rejected_avg.detach())


PAIR_LOSSES = {"sigmoid": sigmoid, "robust": robust, "hinge": hinge, "ipo": ipo, "simpo": simpo, "orpo": orpo}


def kto_losses(logratios: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float,
               desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024), per example: desirable w_d (1 - s(b (r - z))), undesirable
    w_u (1 - s(b (z - r))), with r the policy/reference log-ratio and z the batch KL reference point
    (detached, clamped at 0, as in TRL)."""
    z = kl.detach().clamp(min=0)
    good = desirable_weight * (1 - torch.sigmoid(beta * (logratios - z)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z - logratios)))
    return torch.where(desirable, good, bad)


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                  tie: torch.Tensor | None = None) -> torch.Tensor:
    """Reward-model loss per pair: -log s(r_c - r_r - margin); a tie is a soft label of 1/2
    (-(log s(d) + log s(-d)) / 2), which is minimal at equal rewards."""
    d = chosen - rejected
    strict = -F.logsigmoid(d - (margin if margin is not None else 0.0))
    if tie is None:
        return strict
    return torch.where(tie, -(F.logsigmoid(d) + F.logsigmoid(-d)) / 2, strict)


@hookimpl
def register_preference_losses(register):
    for name, fn in PAIR_LOSSES.items():
        register(name, fn)
