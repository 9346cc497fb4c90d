"""Policy losses, aggregation and KL estimators against hand-computed values.

Shared setup unless a test says otherwise: B = 2 sequences, T = 3 positions, the last position of
sequence 1 is padding; advantages A = (+1, -2).
"""
import math

import pytest
import torch

from rlgen.algorithms import losses as L
from rlgen.algorithms.losses import LossContext
from rlgen.plugins import registry

MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
ADV = torch.tensor([1.0, -2.0])
# per-token log-probs of the current policy (the padded value -3 must never matter)
LOGP = [[-1.0, -2.0, -0.5], [-1.0, -1.0, -3.0]]


def logp_leaf(values=LOGP):
    return torch.tensor(values, requires_grad=True)


def with_ratios(ratios, values=LOGP):
    """(logp leaf, old_logp) such that exp(logp - old_logp) == ratios token by token."""
    logp = logp_leaf(values)
    old = logp.detach() - torch.log(torch.tensor(ratios))
    return logp, old


def run(name, logp, old, ctx=None, advantages=ADV, mask=MASK, **kw):
    fn = registry("policy-loss").get(name)
    loss, stats = L.policy_loss(fn, logp, old, advantages, mask, ctx or LossContext(), **kw)
    return loss, stats


def grad_of(name, logp, old, ctx=None, **kw):
    loss, _ = run(name, logp, old, ctx, **kw)
    loss.backward()
    return logp.grad


def val(t):
    return float(t.detach())


def close(actual, expected, tol=1e-5):
    expected = torch.tensor(expected, dtype=torch.float32)
    assert torch.allclose(actual.detach().float(), expected, atol=tol, rtol=tol), (actual, expected)


def test_registry_has_every_loss():
    assert set(registry("policy-loss").names()) >= {"grpo", "bnpo", "dr_grpo", "dapo", "gspo", "cispo"}


# --- ratio 1 (on-policy): per-token loss is -A --------------------------------------------------------
# per-token loss: sequence 0: (-1, -1, -1); sequence 1: (2, 2, pad)
# active-token sum: -3 + 4 = 1, active tokens: 5

@pytest.mark.parametrize("name, ctx, expected", [
    # mean over tokens per sequence (-1 and 2), then over sequences: (-1 + 2) / 2
    ("grpo", LossContext(), 0.5),
    # token mean over the local batch: 1 / 5
    ("bnpo", LossContext(), 0.2),
    # sum / (B * max_completion_length) = 1 / (2 * 3)
    ("dr_grpo", LossContext(max_completion_length=3), 1 / 6),
    # ... with a larger constant 1 / (2 * 4)
    ("dr_grpo", LossContext(max_completion_length=4), 1 / 8),
    # token mean over the (here: local) batch: 1 / 5
    ("dapo", LossContext(), 0.2),
    # global token count of the accumulated batch: 1 / 10
    ("dapo", LossContext(num_items_in_batch=10), 0.1),
    # sequence ratio exp(mean log ratio) = exp(0) = 1: same as grpo
    ("gspo", LossContext(), 0.5),
])
def test_on_policy_loss_values(name, ctx, expected):
    logp = logp_leaf()
    loss, stats = run(name, logp, logp.detach(), ctx)
    assert val(loss) == pytest.approx(expected, abs=1e-6)
    assert float(stats["clip_ratio/low_mean"]) == 0.0
    assert float(stats["clip_ratio/high_mean"]) == 0.0
    assert float(stats["clip_ratio/region_mean"]) == 0.0


def test_on_policy_cispo_is_reinforce():
    # epsilon_high = 5 (CISPO's epsilon_max): weight = min(1, 5) = 1, per-token loss = -A * logp
    # sequence 0: -1 * (-1, -2, -0.5) = (1, 2, 0.5); sequence 1: 2 * (-1, -1) = (-2, -2)
    # token mean over 5 tokens: (3.5 - 4) / 5 = -0.1
    logp = logp_leaf()
    loss, _ = run("cispo", logp, logp.detach(), LossContext(epsilon_high=5.0))
    assert val(loss) == pytest.approx(-0.1, abs=1e-6)
    loss.backward()
    # d/dlogp = -w * A / 5: sequence 0 -1/5, sequence 1 2/5, padding 0
    close(logp.grad, [[-0.2, -0.2, -0.2], [0.4, 0.4, 0.0]])


@pytest.mark.parametrize("name, ctx, expected", [
    # d loss / d logp at ratio 1 = -A * (d ratio / d logp = 1) / normaliser
    # grpo: / (T_i * B): sequence 0 -1 / (3 * 2); sequence 1 2 / (2 * 2)
    ("grpo", LossContext(), [[-1 / 6, -1 / 6, -1 / 6], [0.5, 0.5, 0.0]]),
    ("gspo", LossContext(), [[-1 / 6, -1 / 6, -1 / 6], [0.5, 0.5, 0.0]]),
    # bnpo / dapo: / 5 active tokens
    ("bnpo", LossContext(), [[-0.2, -0.2, -0.2], [0.4, 0.4, 0.0]]),
    ("dapo", LossContext(), [[-0.2, -0.2, -0.2], [0.4, 0.4, 0.0]]),
    # dr_grpo: / (B * L) = 6
    ("dr_grpo", LossContext(max_completion_length=3), [[-1 / 6, -1 / 6, -1 / 6], [1 / 3, 1 / 3, 0.0]]),
])
def test_on_policy_gradients(name, ctx, expected):
    logp = logp_leaf()
    close(grad_of(name, logp, logp.detach(), ctx), expected)


# --- off-policy ratios and clipping ------------------------------------------------------------------
# ratios: sequence 0 (A = +1): (1.5, 0.5, 1.1); sequence 1 (A = -2): (0.5, 1.5, pad 0.1)
RATIOS = [[1.5, 0.5, 1.1], [0.5, 1.5, 0.1]]


def test_clipping_epsilon():
    # epsilon 0.2, clip range [0.8, 1.2]; per token -min(r A, clip(r) A):
    #   seq 0, A=1:  r=1.5 -> min(1.5, 1.2) = 1.2 -> -1.2 (high clip);  r=0.5 -> min(0.5, 0.8) = 0.5 -> -0.5
    #                r=1.1 -> -1.1
    #   seq 1, A=-2: r=0.5 -> min(-1.0, -1.6) = -1.6 -> 1.6 (low clip); r=1.5 -> min(-3.0, -2.4) = -3 -> 3
    # grpo: seq means (-1.2 - 0.5 - 1.1) / 3 = -0.93333333 and (1.6 + 3) / 2 = 2.3; mean 0.68333333
    logp, old = with_ratios(RATIOS)
    loss, stats = run("grpo", logp, old)
    assert val(loss) == pytest.approx(0.68333333, abs=1e-5)
    # 1 high-clipped and 1 low-clipped token of 5 active; the padded ratio 0.1 (A < 0) is not counted
    assert float(stats["clip_ratio/low_mean"]) == pytest.approx(0.2)
    assert float(stats["clip_ratio/high_mean"]) == pytest.approx(0.2)
    assert float(stats["clip_ratio/region_mean"]) == pytest.approx(0.4)
    loss.backward()
    # gradients: clipped tokens 0; else -A r / (T_i B):
    #   seq 0: r=0.5 -> -0.5 / 6 = -0.08333333; r=1.1 -> -1.1 / 6 = -0.18333333
    #   seq 1: r=1.5 (unclipped, pessimistic side) -> 2 * 1.5 / (2 * 2) = 0.75
    close(logp.grad, [[0.0, -0.5 / 6, -1.1 / 6], [0.0, 0.75, 0.0]])


def test_clipping_same_per_token_for_every_ppo_loss_type():
    # the same per-token values aggregated differently: sum over active tokens
    # -1.2 - 0.5 - 1.1 + 1.6 + 3 = 1.8
    logp, old = with_ratios(RATIOS)
    assert val(run("dapo", logp, old)[0]) == pytest.approx(1.8 / 5, abs=1e-5)
    assert val(run("bnpo", logp, old)[0]) == pytest.approx(1.8 / 5, abs=1e-5)
    assert val(run("dr_grpo", logp, old, LossContext(max_completion_length=3))[0]) == pytest.approx(1.8 / 6, abs=1e-5)


def test_clip_higher():
    # epsilon 0.2, epsilon_high 0.6: range [0.8, 1.6]: seq 0's r=1.5 is no longer clipped -> -1.5
    # seq 0 mean (-1.5 - 0.5 - 1.1) / 3 = -1.03333333; seq 1 unchanged 2.3; mean 0.63333333
    logp, old = with_ratios(RATIOS)
    ctx = LossContext(epsilon=0.2, epsilon_high=0.6)
    loss, stats = run("grpo", logp, old, ctx)
    assert val(loss) == pytest.approx(0.63333333, abs=1e-5)
    assert float(stats["clip_ratio/high_mean"]) == 0.0
    assert float(stats["clip_ratio/low_mean"]) == pytest.approx(0.2)  # lower bound still 0.8
    loss.backward()
    # r=1.5 now carries gradient -1 * 1.5 / 6 = -0.25
    close(logp.grad, [[-0.25, -0.5 / 6, -1.1 / 6], [0.0, 0.75, 0.0]])
    assert ctx.eps_high == 0.6 and LossContext(epsilon=0.3).eps_high == 0.3


def test_two_sided_clip_delta():
    # delta 1.3 caps the unclipped ratio: seq 1 (A=-2) r=1.5 -> min(1.3 * -2, 1.2 * -2) = -2.6 -> 2.6 (no grad)
    # seq 0 (A=+1) r=1.5: min(1.3, 1.2) = 1.2, unchanged
    # seq means -0.93333333 and (1.6 + 2.6) / 2 = 2.1; mean 0.58333333
    logp, old = with_ratios(RATIOS)
    loss, _ = run("grpo", logp, old, LossContext(delta=1.3))
    assert val(loss) == pytest.approx(0.58333333, abs=1e-5)
    loss.backward()
    close(logp.grad, [[0.0, -0.5 / 6, -1.1 / 6], [0.0, 0.0, 0.0]])


def test_token_log_ratio_is_plain_difference():
    logp = torch.tensor([[-1.0, -2.0]])
    old = torch.tensor([[-1.5, -1.0]])
    close(L.log_ratio(logp, old, torch.ones(1, 2), "token"), [[0.5, -1.0]])
    with pytest.raises(ValueError, match="importance_sampling_level"):
        L.log_ratio(logp, old, torch.ones(1, 2), "group")


# --- GSPO: sequence-level ratio ----------------------------------------------------------------------

def test_gspo_sequence_ratio_value():
    # token ratios seq 0 (2, 0.5, 1): mean log = (log 2 - log 2 + 0) / 3 = 0 -> s = 1
    # seq 1 (4, 1, pad 100): mean over 2 active tokens = log 4 / 2 = log 2 -> s = 2 (the pad is ignored)
    logp, old = with_ratios([[2.0, 0.5, 1.0], [4.0, 1.0, 100.0]])
    seq = L.log_ratio(logp, old, MASK, "sequence")
    close(seq.exp()[:, :2], [[1.0, 1.0], [2.0, 2.0]])


def test_gspo_loss_and_gradient():
    logp, old = with_ratios([[2.0, 0.5, 1.0], [4.0, 1.0, 100.0]])
    # s = (1, 2), epsilon 0.2: seq 0 (A=+1): -1; seq 1 (A=-2): -min(2 * -2, 1.2 * -2) = 4
    # token-level clipping would have clipped seq 0's ratio 2; the sequence ratio 1 is not clipped
    loss, stats = run("gspo", logp, old)
    assert val(loss) == pytest.approx((-1 + 4) / 2, abs=1e-5)
    assert float(stats["clip_ratio/region_mean"]) == 0.0
    loss.backward()
    # GSPO gradient: d s_i / d logp_t = s_i / |y_i|; per-sequence loss -A s_i, then mean over B = 2:
    #   seq 0: -1 * 1 / 3 / 2 = -1/6 for every token (same for all three despite token ratios 2, 0.5, 1)
    #   seq 1: 2 * 2 / 2 / 2 = 1 for each active token, 0 for the pad
    close(logp.grad, [[-1 / 6, -1 / 6, -1 / 6], [1.0, 1.0, 0.0]])


def test_gspo_clipped_sequence_has_no_gradient():
    # seq 1 token ratios (0.25, 1): s = exp(log 0.25 / 2) = 0.5 < 0.8 with A = -2:
    #   -min(0.5 * -2, 0.8 * -2) = 1.6, clipped -> no gradient
    logp, old = with_ratios([[2.0, 0.5, 1.0], [0.25, 1.0, 1.0]])
    loss, stats = run("gspo", logp, old)
    assert val(loss) == pytest.approx((-1 + 1.6) / 2, abs=1e-5)
    # statistics are token-weighted: seq 1's 2 tokens of 5 active tokens are low-clipped
    assert float(stats["clip_ratio/low_mean"]) == pytest.approx(0.4)
    loss.backward()
    close(logp.grad, [[-1 / 6, -1 / 6, -1 / 6], [0.0, 0.0, 0.0]])


def test_gspo_equals_grpo_with_sequence_level():
    logp, old = with_ratios(RATIOS)
    gspo, _ = run("gspo", logp, old)
    grpo_seq, _ = run("grpo", logp, old, LossContext(importance_sampling_level="sequence"))
    assert val(gspo) == pytest.approx(val(grpo_seq))
    # the caller's context is not changed
    ctx = LossContext()
    run("gspo", logp, old, ctx)
    assert ctx.importance_sampling_level == "token"


# --- CISPO -------------------------------------------------------------------------------------------

def test_cispo_weight_is_capped_and_detached():
    # ratios seq 0 (A=+1): (5.5, 0.5, 1); seq 1 (A=-2): (5.5, 0.1, pad); epsilon_high 5 -> weights
    # (5, 0.5, 1), (5, 0.1): no lower clipping in CISPO
    logp, old = with_ratios([[5.5, 0.5, 1.0], [5.5, 0.1, 1.0]])
    loss, stats = run("cispo", logp, old, LossContext(epsilon_high=5.0))
    # per token -w A logp: seq 0: -5 * 1 * -1 = 5, -0.5 * 1 * -2 = 1, -1 * 1 * -0.5 = 0.5  (sum 6.5)
    #                      seq 1: -5 * -2 * -1 = -10, -0.1 * -2 * -1 = -0.2              (sum -10.2)
    # token mean over 5: -3.7 / 5 = -0.74
    assert val(loss) == pytest.approx(-0.74, abs=1e-5)
    loss.backward()
    # gradient -w A / 5 (the weight is a constant): capped tokens still get a gradient, unlike PPO clipping
    close(logp.grad, [[-1.0, -0.1, -0.2], [2.0, 0.04, 0.0]])
    # TRL's cispo_clip_ratio: weight capped (ratio > epsilon_high) with A > 0 -> seq 0 token 0 only, 1 / 5
    assert float(stats["clip_ratio/high_mean"]) == pytest.approx(0.2)
    assert float(stats["clip_ratio/region_mean"]) == pytest.approx(0.2)
    assert float(stats["clip_ratio/low_mean"]) == 0.0


def test_cispo_uses_global_token_count():
    logp = logp_leaf()
    loss, _ = run("cispo", logp, logp.detach(), LossContext(epsilon_high=5.0, num_items_in_batch=10))
    assert val(loss) == pytest.approx(-0.5 / 10, abs=1e-6)


# --- micro-batch aggregation -------------------------------------------------------------------------
# 4 sequences, T = 3, ratio 1 so the per-token loss is -A:
MB_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
MB_ADV = torch.tensor([1.0, 2.0, -1.0, 0.5])
# sequence sums: -3 (3 tokens), -2 (1 token), +2 (2 tokens), -1.5 (3 tokens); total -4.5 over 9 tokens
# sequence means: -1, -2, +1, -0.5
MB_LOGP = [[-1.0, -0.5, -2.0], [-0.3, -1.0, -1.0], [-0.7, -1.2, -9.0], [-0.1, -0.2, -0.3]]


def micro_losses(name, ctx_full, ctx_micro):
    logp = torch.tensor(MB_LOGP, requires_grad=True)
    fn = registry("policy-loss").get(name)
    full, _ = L.policy_loss(fn, logp, logp.detach(), MB_ADV, MB_MASK, ctx_full)
    parts = [
        L.policy_loss(fn, logp[rows], logp.detach()[rows], MB_ADV[rows], MB_MASK[rows], ctx_micro)[0]
        for rows in (slice(0, 2), slice(2, 4))
    ]
    full_grad = torch.autograd.grad(full, logp)[0]
    micro_grad = torch.autograd.grad(parts[0] + parts[1], logp)[0]
    return val(full), [val(p) for p in parts], full_grad, micro_grad


@pytest.mark.parametrize("name, ctx_full, ctx_micro, full_value, part_values", [
    # dapo: -4.5 / 9 = -0.5; micro-batches -5 / 9 and 0.5 / 9 with the global count 9
    ("dapo", LossContext(), LossContext(num_items_in_batch=9), -0.5, [-5 / 9, 0.5 / 9]),
    # grpo: (-1 - 2 + 1 - 0.5) / 4 = -0.625; micro-batches (-1 - 2) / 4 = -0.75, (1 - 0.5) / 4 = 0.125
    ("grpo", LossContext(), LossContext(num_sequences_in_batch=4), -0.625, [-0.75, 0.125]),
    # dr_grpo: -4.5 / (4 * 3) = -0.375; micro-batches -5 / 12, 0.5 / 12
    ("dr_grpo", LossContext(max_completion_length=3), LossContext(max_completion_length=3, num_sequences_in_batch=4),
     -0.375, [-5 / 12, 0.5 / 12]),
])
def test_micro_batches_sum_to_full_batch(name, ctx_full, ctx_micro, full_value, part_values):
    full, parts, full_grad, micro_grad = micro_losses(name, ctx_full, ctx_micro)
    assert full == pytest.approx(full_value, abs=1e-6)
    assert parts == pytest.approx(part_values, abs=1e-6)
    assert sum(parts) == pytest.approx(full, abs=1e-6)
    assert torch.allclose(full_grad, micro_grad, atol=1e-6)


def test_micro_batches_without_global_normaliser_do_not_add_up():
    # grpo without num_sequences_in_batch: each micro-batch averages over its own 2 sequences:
    # (-1 - 2) / 2 = -1.5 and (1 - 0.5) / 2 = 0.25: sum -1.25 = 2 x the full-batch loss
    full, parts, _, _ = micro_losses("grpo", LossContext(), LossContext())
    assert parts == pytest.approx([-1.5, 0.25])
    assert sum(parts) == pytest.approx(2 * full)


def test_bnpo_averages_local_token_means():
    # bnpo with 2 micro-batches: local token means -5 / 4 = -1.25 and 0.5 / 5 = 0.1, each / 2:
    # -0.625 + 0.05 = -0.575, which is not the full-batch token mean -0.5 (token counts differ: 4 vs 5)
    full, parts, _, _ = micro_losses("bnpo", LossContext(), LossContext(num_micro_batches=2))
    assert full == pytest.approx(-0.5)
    assert parts == pytest.approx([-0.625, 0.05])
    assert sum(parts) == pytest.approx(-0.575)


def test_aggregate_unknown_mode():
    with pytest.raises(ValueError, match="aggregation"):
        L.aggregate(torch.zeros(1, 1), torch.ones(1, 1), "token-sum", LossContext())


def test_all_padding_row_is_safe():
    mask = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    logp = logp_leaf()
    loss, _ = run("grpo", logp, logp.detach(), advantages=ADV, mask=mask)
    # seq 0 mean -1, seq 1 has no tokens: 0 / clamp(0, min=1) = 0 -> (-1 + 0) / 2
    assert val(loss) == pytest.approx(-0.5)
    assert math.isfinite(val(loss))


# --- KL ----------------------------------------------------------------------------------------------

def test_kl_estimators_hand_values():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0])
    # k1 = logp - ref: 1, -1
    close(L.kl_k1(logp, ref), [1.0, -1.0])
    # k2 = (logp - ref)^2 / 2: 0.5, 0.5
    close(L.kl_k2(logp, ref), [0.5, 0.5])
    # k3 = exp(ref - logp) - (ref - logp) - 1: e^-1 + 1 - 1 = 0.36787944; e^1 - 1 - 1 = 0.71828183
    close(L.kl_k3(logp, ref), [0.36787944, 0.71828183])
    # all estimators are 0 when the policies agree; k3 is never negative
    same = torch.tensor([-0.7])
    for fn in (L.kl_k1, L.kl_k2, L.kl_k3):
        assert float(fn(same, same)) == 0.0
    assert set(L.KL_ESTIMATORS) == {"k1", "k2", "k3"}


def test_kl_is_added_per_token_before_aggregation():
    logp = logp_leaf()
    kl = torch.tensor([[0.3, 0.3, 0.3], [1.0, 1.0, 100.0]])  # the padded 100 must be ignored
    # grpo: per-token -A + 0.1 kl: seq 0 mean -1 + 0.03 = -0.97; seq 1 mean 2 + 0.1 = 2.1; mean 0.565
    loss, _ = run("grpo", logp, logp.detach(), kl=kl, beta=0.1)
    assert val(loss) == pytest.approx(0.565, abs=1e-6)
    # dapo: token mean (1 + 0.1 * (0.9 + 2.0)) / 5 = 1.29 / 5 = 0.258
    # (a sequence-then-batch mean of the KL would differ: 0.2 + 0.1 * 0.65 = 0.265)
    loss, _ = run("dapo", logp, logp.detach(), kl=kl, beta=0.1)
    assert val(loss) == pytest.approx(0.258, abs=1e-6)
    # beta 0 ignores the KL, as does no KL
    assert val(run("dapo", logp, logp.detach(), kl=kl, beta=0.0)[0]) == pytest.approx(0.2)
    assert val(run("dapo", logp, logp.detach(), kl=None, beta=0.1)[0]) == pytest.approx(0.2)
