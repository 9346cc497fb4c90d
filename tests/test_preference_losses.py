"""Preference losses (rlgen.algorithms.preference_losses) against values computed by hand with plain
Python math on three small pairs.

Shared pairs unless a test says otherwise (summed completion log-probs, token counts):

    pair               0      1      2
    chosen c         -3.0   -5.0   -2.0     (tokens 2, 4, 1)
    rejected r       -4.0   -3.5   -2.0     (tokens 3, 2, 5)
    ref chosen       -3.5   -4.0   -2.5
    ref rejected     -3.0   -4.0   -0.5
    c - ref_c         0.5   -1.0    0.5
    r - ref_r        -1.0    0.5   -1.5
    log-ratio margin  1.5   -1.5    2.0
"""
from __future__ import annotations

import math

import pytest
import torch

from rlgen.algorithms import preference_losses as P
from rlgen.algorithms.preference_losses import PairScores, PreferenceOptions
from rlgen.plugins import registry

C = [-3.0, -5.0, -2.0]
R = [-4.0, -3.5, -2.0]
REF_C = [-3.5, -4.0, -2.5]
REF_R = [-3.0, -4.0, -0.5]
TOK_C = [2, 4, 1]
TOK_R = [3, 2, 5]
CR = [c - rc for c, rc in zip(C, REF_C)]  # 0.5, -1.0, 0.5
RR = [r - rr for r, rr in zip(R, REF_R)]  # -1.0, 0.5, -1.5
H = [a - b for a, b in zip(CR, RR)]  # 1.5, -1.5, 2.0


def scores(c=C, r=R, ref_c=REF_C, ref_r=REF_R, tok_c=TOK_C, tok_r=TOK_R, grad=False) -> PairScores:
    t = lambda v: torch.tensor(v, dtype=torch.float32, requires_grad=grad)  # noqa: E731
    return PairScores(t(c), t(r), torch.tensor(tok_c, dtype=torch.float32), torch.tensor(tok_r, dtype=torch.float32),
                      None if ref_c is None else torch.tensor(ref_c), None if ref_r is None else torch.tensor(ref_r))


def logsig(x: float) -> float:
    return -math.log(1.0 + math.exp(-x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def close(actual, expected, tol=1e-5):
    got = [float(v) for v in actual.detach().reshape(-1)]
    assert got == pytest.approx(list(expected), rel=tol, abs=tol), (got, expected)


def test_registry_names_and_reference_flags():
    builtin = [e.name for e in registry("preference-loss") if e.provider == "rlgen"]  # not the example plugin's
    assert set(builtin) == {"sigmoid", "robust", "hinge", "ipo", "simpo", "orpo"}
    flags = {name: P.needs_reference(registry("preference-loss").get(name)) for name in builtin}
    assert flags == {"sigmoid": True, "robust": True, "hinge": True, "ipo": True, "simpo": False, "orpo": False}
    # a plugin loss without the attribute is assumed to need a reference (the safe default)
    assert P.needs_reference(lambda s, o: None) is True


@pytest.mark.parametrize("name", ["sigmoid", "robust", "hinge", "ipo"])
def test_reference_losses_refuse_missing_reference(name):
    with pytest.raises(ValueError, match="reference"):
        registry("preference-loss").get(name)(scores(ref_c=None, ref_r=None), PreferenceOptions())


# --- sigmoid (DPO / cDPO) --------------------------------------------------------------------------

def test_sigmoid_without_label_smoothing():
    beta = 0.5
    out = P.sigmoid(scores(), PreferenceOptions(beta=beta))
    # -log s(beta h): h = 1.5 -> -log s(0.75) = 0.38687, h = -1.5 -> 1.13687, h = 2 -> -log s(1) = 0.31326
    close(out.losses, [-logsig(beta * h) for h in H])
    assert float(out.losses[2]) == pytest.approx(math.log(1 + math.exp(-1.0)), rel=1e-6)


def test_sigmoid_with_label_smoothing():
    beta, ls = 0.5, 0.2
    out = P.sigmoid(scores(), PreferenceOptions(beta=beta, label_smoothing=ls))
    close(out.losses, [-(1 - ls) * logsig(beta * h) - ls * logsig(-beta * h) for h in H])
    # at h = 0 cDPO equals DPO: both log 2
    zero = P.sigmoid(scores(c=[-1.0], r=[-2.0], ref_c=[-1.0], ref_r=[-2.0], tok_c=[1], tok_r=[1]),
                     PreferenceOptions(beta=beta, label_smoothing=ls))
    close(zero.losses, [math.log(2)])


def test_sigmoid_rewards_are_beta_times_log_ratios_detached():
    beta = 0.5
    out = P.sigmoid(scores(grad=True), PreferenceOptions(beta=beta))
    close(out.chosen_rewards, [beta * x for x in CR])  # 0.25, -0.5, 0.25
    close(out.rejected_rewards, [beta * x for x in RR])  # -0.5, 0.25, -0.75
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    assert out.losses.requires_grad


@pytest.mark.parametrize("ls", [0.0, 0.3])
def test_sigmoid_gradient_is_analytic(ls):
    """d/dc [-(1-ls) log s(b h) - ls log s(-b h)] = -b ((1-ls) s(-b h) - ls s(b h)); d/dr is its negative."""
    beta = 0.5
    s = scores(grad=True)
    P.sigmoid(s, PreferenceOptions(beta=beta, label_smoothing=ls)).losses.sum().backward()
    expected = [-beta * ((1 - ls) * sig(-beta * h) - ls * sig(beta * h)) for h in H]
    close(s.chosen.grad, expected)
    close(s.rejected.grad, [-g for g in expected])
    if ls == 0.0:  # the DPO form: -beta * sigmoid(-beta * h)
        close(s.chosen.grad, [-beta * sig(-beta * h) for h in H])


# --- robust ------------------------------------------------------------------------------------------

def test_robust_with_label_smoothing():
    beta, ls = 0.5, 0.2
    out = P.robust(scores(), PreferenceOptions(beta=beta, label_smoothing=ls))
    expected = [((1 - ls) * -logsig(beta * h) + ls * logsig(-beta * h)) / (1 - 2 * ls) for h in H]
    close(out.losses, expected)
    # e.g. pair 0: (0.8 * 0.386871 + 0.2 * (-1.136871)) / 0.6 = 0.136871
    assert expected[0] == pytest.approx(0.136871, rel=1e-5)
    close(out.chosen_rewards, [beta * x for x in CR])


def test_robust_without_smoothing_equals_sigmoid():
    o = PreferenceOptions(beta=0.7, label_smoothing=0.0)
    close(P.robust(scores(), o).losses, [float(v) for v in P.sigmoid(scores(), o).losses], tol=1e-7)


def test_robust_rejects_half_label_smoothing():
    with pytest.raises(ValueError, match="label_smoothing"):
        P.robust(scores(), PreferenceOptions(label_smoothing=0.5))


# --- hinge -------------------------------------------------------------------------------------------

def test_hinge_both_sides():
    beta = 1.0
    s = scores(grad=True)
    out = P.hinge(s, PreferenceOptions(beta=beta))
    # 1 - beta h: 1 - 1.5 < 0 -> 0; 1 + 1.5 = 2.5; 1 - 2 < 0 -> 0
    close(out.losses, [0.0, 2.5, 0.0])
    out.losses.sum().backward()
    close(s.chosen.grad, [0.0, -beta, 0.0])  # only the pair inside the hinge pulls
    close(s.rejected.grad, [0.0, beta, 0.0])
    close(P.hinge(scores(), PreferenceOptions(beta=0.2)).losses, [1 - 0.2 * h for h in H])  # all inside: linear
    close(out.rejected_rewards, [beta * x for x in RR])


# --- ipo ---------------------------------------------------------------------------------------------

def test_ipo_averages_log_ratios_per_token():
    beta = 0.5
    out = P.ipo(scores(), PreferenceOptions(beta=beta))
    # per-token log-ratios: pair 0: 0.5/2 - (-1.0)/3 = 0.58333; pair 1: -1/4 - 0.5/2 = -0.5; pair 2: 0.5/1 + 1.5/5 = 0.8
    margins = [cr / tc - rr / tr for cr, rr, tc, tr in zip(CR, RR, TOK_C, TOK_R)]
    assert margins == pytest.approx([0.5833333, -0.5, 0.8], rel=1e-6)
    close(out.losses, [(m - 1 / (2 * beta)) ** 2 for m in margins])  # (m - 1)^2: 0.17361, 2.25, 0.04
    # TRL averages the log-probs for ipo, so its logged rewards are beta x the averaged log-ratios
    close(out.chosen_rewards, [beta * cr / tc for cr, tc in zip(CR, TOK_C)])
    close(out.rejected_rewards, [beta * rr / tr for rr, tr in zip(RR, TOK_R)])


def test_ipo_depends_on_lengths():
    beta = 0.5
    short = P.ipo(scores(), PreferenceOptions(beta=beta)).losses
    longer = P.ipo(scores(tok_c=[4, 4, 4]), PreferenceOptions(beta=beta)).losses
    assert float(short[0]) != pytest.approx(float(longer[0]))
    close(longer, [(cr / 4 - rr / tr - 1.0) ** 2 for cr, rr, tr in zip(CR, RR, TOK_R)])


# --- simpo -------------------------------------------------------------------------------------------

def test_simpo_length_normalised_with_gamma_and_no_reference():
    beta, gamma = 2.0, 1.0
    s = scores(ref_c=None, ref_r=None)
    out = P.simpo(s, PreferenceOptions(beta=beta, simpo_gamma=gamma))
    avg_c = [c / t for c, t in zip(C, TOK_C)]  # -1.5, -1.25, -2.0
    avg_r = [r / t for r, t in zip(R, TOK_R)]  # -1.3333, -1.75, -0.4
    expected = [-logsig(beta * (a - b) - gamma) for a, b in zip(avg_c, avg_r)]
    close(out.losses, expected)
    # pair 1 by hand: 2 (-1.25 + 1.75) - 1 = 0 -> log 2
    assert expected[1] == pytest.approx(math.log(2))
    close(out.chosen_rewards, [beta * a for a in avg_c])  # TRL CPO: beta x average log-prob
    close(out.rejected_rewards, [beta * b for b in avg_r])
    # gamma shifts the margin: without it, pair 1 has h = 1
    close(P.simpo(s, PreferenceOptions(beta=beta, simpo_gamma=0.0)).losses[1:2], [-logsig(1.0)])


def test_simpo_with_label_smoothing():
    beta, gamma, ls = 2.0, 0.5, 0.1
    out = P.simpo(scores(ref_c=None, ref_r=None), PreferenceOptions(beta=beta, simpo_gamma=gamma, label_smoothing=ls))
    hs = [beta * (c / tc - r / tr) - gamma for c, r, tc, tr in zip(C, R, TOK_C, TOK_R)]
    close(out.losses, [-(1 - ls) * logsig(h) - ls * logsig(-h) for h in hs])


# --- orpo --------------------------------------------------------------------------------------------

def log1mexp(x: float) -> float:
    return math.log(1.0 - math.exp(x))  # float64: accurate enough for the values below


def test_orpo_log_odds_on_both_sides_of_minus_log2():
    beta = 0.25
    # average log-probs: chosen -0.2 (> -log 2), -2.0 (< -log 2), -0.3; rejected -3.0, -0.25, -1e-5 (tiny)
    c, tc = [-0.4, -6.0, -0.9], [2, 3, 3]
    r, tr = [-3.0, -0.5, -2e-5], [1, 2, 2]
    out = P.orpo(scores(c=c, r=r, ref_c=None, ref_r=None, tok_c=tc, tok_r=tr), PreferenceOptions(beta=beta))
    expected = []
    for ci, ri, a, b in zip(c, r, tc, tr):
        ac, ar = ci / a, ri / b
        log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
        expected.append(-beta * logsig(log_odds))
    # pair 0 by hand: log odds(-0.2) = -0.2 - log(1 - e^-0.2) = 1.50777; log odds(-3) = -3 - log(1 - e^-3) = -2.94893
    assert expected[0] == pytest.approx(-beta * logsig(1.5077718 + 2.9489308), rel=1e-6)
    # pair 2: rejected avg -1e-5 has log odds 11.513 (chosen's: 1.050), so the loss is ~ beta * 10.46 and
    # sensitive to how log(1 - e^x) is computed near 0 (the naive float32 form is off by ~5e-4 relative here)
    assert expected[2] == pytest.approx(-beta * logsig(1.0502256 - 11.5129205), rel=1e-6)
    assert expected[2] > 2.5
    close(out.losses, expected, tol=2e-6)
    close(out.chosen_rewards, [beta * ci / a for ci, a in zip(c, tc)])
    close(out.rejected_rewards, [beta * ri / b for ri, b in zip(r, tr)])


def test_orpo_gradient_finite_near_zero_log_prob():
    s = scores(c=[-1e-9, -0.5], r=[-3.0, -1e-9], ref_c=None, ref_r=None, tok_c=[1, 1], tok_r=[1, 1], grad=True)
    out = P.orpo(s, PreferenceOptions(beta=0.1))
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all()
    assert torch.isfinite(s.chosen.grad).all() and torch.isfinite(s.rejected.grad).all()
    assert float(s.chosen.grad[1]) < 0 and float(s.rejected.grad[1]) > 0  # raise chosen, lower rejected


# --- kto ---------------------------------------------------------------------------------------------

LOGRATIOS = [0.5, -0.3, 1.2, -2.0]
DESIRABLE = [True, True, False, False]


@pytest.mark.parametrize("kl_value,z", [(-0.4, 0.0), (0.3, 0.3)])
def test_kto_desirable_undesirable_with_kl_clamped_at_zero(kl_value, z):
    beta, wd, wu = 0.5, 1.5, 0.5
    kl = torch.tensor(kl_value, requires_grad=True)
    logratios = torch.tensor(LOGRATIOS, requires_grad=True)
    losses = P.kto_losses(logratios, torch.tensor(DESIRABLE), kl, beta, wd, wu)
    expected = [wd * (1 - sig(beta * (x - z))) if d else wu * (1 - sig(beta * (z - x))) for x, d in zip(LOGRATIOS, DESIRABLE)]
    close(losses, expected)
    losses.sum().backward()
    assert kl.grad is None  # the reference point is detached
    # d/dr of w_d (1 - s(b (r - z))) = -w_d b s(1 - s); undesirable: +w_u b s(1 - s)
    grads = []
    for x, d in zip(LOGRATIOS, DESIRABLE):
        u = sig(beta * (x - z)) if d else sig(beta * (z - x))
        grads.append(-wd * beta * u * (1 - u) if d else wu * beta * u * (1 - u))
    close(logratios.grad, grads)


def test_kto_default_weights_at_zero_ratio_is_half():
    losses = P.kto_losses(torch.zeros(2), torch.tensor([True, False]), torch.tensor(0.0), 0.1)
    close(losses, [0.5, 0.5])


# --- bradley-terry -----------------------------------------------------------------------------------

def test_bradley_terry_plain_and_with_margin():
    chosen = torch.tensor([1.0, 0.2, -0.5])
    rejected = torch.tensor([0.0, 0.7, -0.5])
    d = [1.0, -0.5, 0.0]
    close(P.bradley_terry(chosen, rejected), [-logsig(x) for x in d])  # 0.31326, 0.97408, log 2
    margin = torch.tensor([0.5, 0.0, 1.0])
    close(P.bradley_terry(chosen, rejected, margin), [-logsig(x - m) for x, m in zip(d, [0.5, 0.0, 1.0])])


def test_bradley_terry_ties_are_soft_half_labels():
    chosen = torch.tensor([1.0, 0.8, 0.0, -0.8], requires_grad=True)
    rejected = torch.zeros(4)
    tie = torch.tensor([False, True, True, True])
    losses = P.bradley_terry(chosen, rejected, torch.tensor([0.5, 9.0, 9.0, 9.0]), tie)  # a tie ignores the margin
    tie_loss = lambda x: -(logsig(x) + logsig(-x)) / 2  # noqa: E731
    close(losses, [-logsig(0.5), tie_loss(0.8), math.log(2), tie_loss(-0.8)])
    # the tie loss is smallest at equal rewards, symmetric, and has zero gradient there
    values = losses.detach()
    assert float(values[2]) < float(values[1]) and float(values[1]) == pytest.approx(float(values[3]))
    losses.sum().backward()
    assert float(chosen.grad[2]) == pytest.approx(0.0, abs=1e-7)
    assert float(chosen.grad[1]) > 0 > float(chosen.grad[3])  # pulled back towards equality
