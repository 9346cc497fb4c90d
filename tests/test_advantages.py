"""Advantage estimators against hand-computed values.

Conventions (TRL / verl / OpenRLHF): the std is torch.std (unbiased, divide by n - 1) and EPS = 1e-4 is
added to the std, not to the variance. Each expected number below is worked out in the comment next to it.
"""
import math

import pytest
import torch

from rlgen.algorithms import advantages as adv
from rlgen.extension import capabilities
from rlgen.plugins import registry

EPS = 1e-4
SQRT2 = math.sqrt(2.0)


def close(actual, expected, tol=1e-5):
    expected = torch.tensor(expected, dtype=torch.float32)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual.float(), expected, atol=tol, rtol=tol), (actual, expected)


def test_registry_has_every_estimator():
    names = set(registry("advantage-estimator").names())
    assert {"grpo", "rloo", "remax", "reinforce++", "reinforce++-baseline", "gdpo"} <= names
    assert registry("advantage-estimator").get("grpo") is adv.grpo
    assert registry("advantage-estimator").get("gdpo") is adv.gdpo
    assert adv.EPS == pytest.approx(1e-4)


# --- GRPO -------------------------------------------------------------------------------------------

def test_grpo_group_scaling():
    rewards = torch.tensor([[0.0, 1.0, 2.0], [3.0, 3.0, 3.0], [1.0, 3.0, 5.0]])
    # group 0: mean 1, deviations (-1, 0, 1), unbiased var (1 + 0 + 1) / 2 = 1, std 1 -> +-1 / 1.0001
    # group 1: all equal -> centred 0, std 0 -> 0 / 1e-4 = 0
    # group 2: mean 3, deviations (-2, 0, 2), var (4 + 0 + 4) / 2 = 4, std 2 -> +-2 / 2.0001
    close(adv.grpo(rewards, scale_rewards="group"), [
        [-1 / 1.0001, 0.0, 1 / 1.0001],
        [0.0, 0.0, 0.0],
        [-2 / 2.0001, 0.0, 2 / 2.0001],
    ])
    # the default is group scaling
    close(adv.grpo(rewards), adv.grpo(rewards, scale_rewards="group").tolist())


def test_grpo_unbiased_std_not_population_std():
    # G=2, rewards (0, 1): mean 0.5, unbiased std sqrt((0.25 + 0.25) / 1) = 0.70710678 (the population std
    # would be 0.5 and give +-1). A = +-0.5 / (0.70710678 + 0.0001) = +-0.70700682
    close(adv.grpo(torch.tensor([[0.0, 1.0]])), [[-0.70700682, 0.70700682]])


def test_grpo_batch_scaling():
    rewards = torch.tensor([[0.0, 1.0, 2.0], [3.0, 3.0, 3.0]])
    # centring is still per group: (-1, 0, 1) and (0, 0, 0)
    # std over the whole batch of 6: mean 2, deviations (-2, -1, 0, 1, 1, 1), squares sum 4+1+0+1+1+1 = 8,
    # unbiased var 8 / 5 = 1.6, std 1.26491106 -> divide by 1.26501106: 1 / 1.26501106 = 0.79050692
    close(adv.grpo(rewards, scale_rewards="batch"), [[-0.79050692, 0.0, 0.79050692], [0.0, 0.0, 0.0]])


def test_grpo_no_scaling_is_dr_grpo():
    rewards = torch.tensor([[0.0, 1.0, 2.0], [3.0, 3.0, 3.0], [1.0, 0.0, 0.0]])
    # reward minus group mean only: means 1, 3, 1/3
    close(adv.grpo(rewards, scale_rewards="none"), [
        [-1.0, 0.0, 1.0],
        [0.0, 0.0, 0.0],
        [2 / 3, -1 / 3, -1 / 3],
    ])


def test_grpo_bad_scale_rewards():
    with pytest.raises(ValueError, match="scale_rewards"):
        adv.grpo(torch.zeros(1, 2), scale_rewards="token")


def test_grpo_group_of_one_gives_zero():
    # a single completion has nothing to compare against: centred value 0
    close(adv.grpo(torch.tensor([[5.0], [2.0]])), [[0.0], [0.0]])


# --- RLOO -------------------------------------------------------------------------------------------

def test_rloo_leave_one_out():
    rewards = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.0]])
    # group 0: baselines (1+2)/2 = 1.5, (0+2)/2 = 1, (0+1)/2 = 0.5 -> 0-1.5, 1-1, 2-0.5
    # group 1 (1, 0, 0): baselines (0+0)/2 = 0, (1+0)/2 = 0.5, 0.5 -> 1, -0.5, -0.5
    close(adv.rloo(rewards), [[-1.5, 0.0, 1.5], [1.0, -0.5, -0.5]])


def test_rloo_group_of_four():
    # (1, 0, 0, 0): the 1 has baseline 0 -> 1; each 0 has baseline 1/3 -> -1/3
    close(adv.rloo(torch.tensor([[1.0, 0.0, 0.0, 0.0]])), [[1.0, -1 / 3, -1 / 3, -1 / 3]])
    # RLOO = G / (G - 1) * (r - mean): 4/3 * (0.75, -0.25, ...) = (1, -1/3, ...), consistent


def test_rloo_needs_two_completions():
    with pytest.raises(ValueError, match="at least 2"):
        adv.rloo(torch.tensor([[1.0], [0.0]]))


# --- ReMax ------------------------------------------------------------------------------------------

def test_remax_subtracts_greedy_reward():
    rewards = torch.tensor([[1.0, 0.0], [0.5, 1.0]])
    baseline = torch.tensor([0.5, 1.0])  # one greedy reward per prompt
    # (1 - 0.5, 0 - 0.5), (0.5 - 1, 1 - 1)
    close(adv.remax(rewards, baseline=baseline), [[0.5, -0.5], [-0.5, 0.0]])
    close(adv.remax(rewards, baseline=baseline.view(2, 1)), [[0.5, -0.5], [-0.5, 0.0]])
    assert capabilities(adv.remax).needs_greedy_baseline is True  # declared, read through the one accessor
    assert capabilities(adv.grpo).needs_greedy_baseline is False


def test_remax_without_baseline_raises():
    with pytest.raises(ValueError, match="baseline"):
        adv.remax(torch.zeros(2, 2))


# --- REINFORCE++ ------------------------------------------------------------------------------------

def test_reinforce_pp_batch_whitening():
    rewards = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    # batch of 4: mean 0.25, deviations (0.75, -0.25, -0.25, -0.25),
    # unbiased var (0.5625 + 3 * 0.0625) / 3 = 0.75 / 3 = 0.25, std 0.5 -> divide by 0.5001
    # 0.75 / 0.5001 = 1.49970006, -0.25 / 0.5001 = -0.49990002
    close(adv.reinforce_pp(rewards), [[1.49970006, -0.49990002], [-0.49990002, -0.49990002]])


def test_reinforce_pp_baseline_group_mean_then_batch_whitening():
    rewards = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # minus group mean: (0.5, -0.5), (0, 0); batch mean 0,
    # unbiased var (0.25 + 0.25 + 0 + 0) / 3 = 1/6, std 0.40824829 -> divide by 0.40834829
    # 0.5 / 0.40834829 = 1.22444469
    close(adv.reinforce_pp_baseline(rewards), [[1.22444469, -1.22444469], [0.0, 0.0]])
    # plain REINFORCE++ on the same rewards differs: batch (1, 0, 1, 1), mean 0.75, deviations
    # (0.25, -0.75, 0.25, 0.25), var (3 * 0.0625 + 0.5625) / 3 = 0.25, std 0.5 -> (0.4999, -1.4997, ...)
    close(adv.reinforce_pp(rewards), [[0.49990002, -1.49970006], [0.49990002, 0.49990002]])


# --- GDPO -------------------------------------------------------------------------------------------

# Worked example: G = 2, two 0/1 rewards.
#   prompt 0: rollout a satisfies nothing (0, 0), rollout b satisfies reward 1 only (1, 0): sums (0, 1)
#   prompt 1: rollout a satisfies nothing (0, 0), rollout b satisfies both (1, 1):          sums (0, 2)
WORKED = torch.tensor([
    [[0.0, 0.0], [1.0, 0.0]],
    [[0.0, 0.0], [1.0, 1.0]],
])
# z-score of (0, 1) with unbiased std: +-0.5 / (0.70710678 + 1e-4) = +-0.70700682
Z = 0.70700682


def test_gdpo_worked_example_grpo_collapses_the_two_groups():
    summed = WORKED.sum(-1)  # (0, 1) and (0, 2)
    # (0, 2): mean 1, std sqrt(2) = 1.41421356 -> +-1 / 1.41431356 = +-0.70705682: the same as (0, 1) up
    # to eps. (The brief's "(-1, +1)" would be the population std; with torch.std it is +-1/sqrt(2).)
    a = adv.grpo(summed, scale_rewards="group")
    close(a, [[-Z, Z], [-0.70705682, 0.70705682]])
    # GRPO cannot tell "one reward satisfied" from "two rewards satisfied"
    assert a[1, 1] == pytest.approx(float(a[0, 1]), abs=1e-4)


def test_gdpo_worked_example_separates_the_two_groups():
    summed_rewards = WORKED.sum(-1)
    a = adv.gdpo(summed_rewards, components=WORKED, scale_rewards="none")
    # prompt 0: reward 1 column (0, 1) -> (-Z, Z); reward 2 column (0, 0) -> 0 / 1e-4 = (0, 0); sum (-Z, Z)
    # prompt 1: both columns (0, 1) -> (-Z, Z) each; sum (-2Z, 2Z) = (-1.41401364, 1.41401364)
    close(a, [[-Z, Z], [-2 * Z, 2 * Z]])
    assert a[1, 1] > a[0, 1]  # satisfying two rewards beats satisfying one
    assert summed_rewards.shape == a.shape


def test_gdpo_weights():
    # weights (1, 0.5): prompt 0 -> 1 * (-Z, Z) + 0.5 * 0 = (-Z, Z)
    # prompt 1 -> 1 * (-Z, Z) + 0.5 * (-Z, Z) = (-1.5Z, 1.5Z) = (-1.06051023, 1.06051023)
    a = adv.gdpo(WORKED.sum(-1), components=WORKED, weights=torch.tensor([1.0, 0.5]), scale_rewards="none")
    close(a, [[-Z, Z], [-1.06051023, 1.06051023]])


def test_gdpo_batch_whitening():
    a = adv.gdpo(WORKED.sum(-1), components=WORKED, scale_rewards="batch")
    # combined before whitening: (-Z, Z, -2Z, 2Z): mean 0, unbiased var (1 + 1 + 4 + 4) Z^2 / 3 = 10/3 Z^2,
    # std Z * sqrt(10/3) = 0.70700682 * 1.82574186 = 1.29081926; + 1e-4 -> 1.29091926
    # Z / 1.29091926 = 0.54767886
    close(a, [[-0.54767886, 0.54767886], [-1.09535772, 1.09535772]])
    # 'batch' is gdpo's own default
    close(adv.gdpo(WORKED.sum(-1), components=WORKED), a.tolist())


def test_gdpo_nan_counts_as_zero_after_normalisation():
    # one group of 3, one reward; the third rollout's reward does not apply (NaN)
    components = torch.tensor([[[1.0], [0.0], [float("nan")]]])
    # valid (1, 0): mean 0.5, unbiased std over the 2 valid values 0.70710678 -> (Z, -Z); NaN -> 0
    a = adv.gdpo(torch.zeros(1, 3), components=components, scale_rewards="none")
    close(a, [[Z, -Z, 0.0]])
    assert not torch.isnan(a).any()


def test_gdpo_nan_in_one_of_two_rewards():
    # rollout 0: (1, NaN), rollout 1: (0, 1), rollout 2: (0, 0)
    components = torch.tensor([[[1.0, float("nan")], [0.0, 1.0], [0.0, 0.0]]])
    # reward 1 column (1, 0, 0): mean 1/3, deviations (2/3, -1/3, -1/3), var (4/9 + 1/9 + 1/9) / 2 = 1/3,
    #   std 0.57735027 + 1e-4 = 0.57745027 -> (0.66666667 / 0.57745027, -0.33333333 / 0.57745027, ...)
    #   = (1.15450057, -0.57725029, -0.57725029)
    # reward 2 column (NaN, 1, 0): valid (1, 0) -> (0, Z, -Z)
    # sum: (1.15450057, -0.57725029 + 0.70700682, -0.57725029 - 0.70700682) = (1.15450057, 0.12975653, -1.28425711)
    a = adv.gdpo(torch.zeros(1, 3), components=components, scale_rewards="none")
    close(a, [[1.15450057, 0.12975653, -1.28425711]])


def test_gdpo_all_nan_column_contributes_nothing():
    components = torch.tensor([[[1.0, float("nan")], [0.0, float("nan")]]])
    a = adv.gdpo(torch.zeros(1, 2), components=components, scale_rewards="none")
    close(a, [[Z, -Z]])


def test_gdpo_single_reward_equals_grpo_group():
    rewards = torch.tensor([[0.0, 1.0, 2.0], [1.0, 3.0, 5.0]])
    # without components gdpo z-scores the total itself: the same as GRPO's group scaling
    close(adv.gdpo(rewards, scale_rewards="none"), [[-1 / 1.0001, 0.0, 1 / 1.0001], [-2 / 2.0001, 0.0, 2 / 2.0001]])
