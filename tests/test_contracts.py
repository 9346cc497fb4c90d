"""Typed extension contracts: declared capabilities (and the adapter for old attribute-style items), the one
options validator, typed advantage estimators / policy losses / combiners / shapings / samplers, and per-token
advantages through the GRPO path."""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Annotated, Literal

import pytest
import torch

from rlgen.distributed import Dist
from rlgen.algorithms import advantages as adv
from rlgen.algorithms import losses as L
from rlgen.algorithms.contracts import (AdvantageInput, AdvantageOutput, LossContext, PolicyLossInput,
                                        PolicyLossOutput, estimate_advantages)
from rlgen.algorithms.grpo import GRPOTrainer
from rlgen.algorithms.preference_losses import needs_reference
from rlgen.config import PROBABILITY
from rlgen.errors import RlgenError
from rlgen.extension import Capabilities, capabilities, check_options, declare
from rlgen.rewards import combine as C
from rlgen.rewards.base import RewardSet, RewardSpec
from rlgen.rewards.contracts import CombineInput, CombineOutput, ShapingInput, ShapingOutput
from rlgen.rollout.contracts import SampleRequest
from rlgen.rollout.samplers import call_sampler, check_sampler

# --- capabilities -----------------------------------------------------------------------------------


def test_declared_capabilities_are_read_as_declared():
    @declare(needs_reference=False)
    def reference_free(scores, options):
        return None

    assert capabilities(reference_free) == Capabilities()
    # a declaration is complete: the kind's default (preference losses: needs a reference) does not apply
    assert needs_reference(reference_free) is False
    assert capabilities(adv.remax).needs_greedy_baseline and not capabilities(adv.grpo).needs_greedy_baseline
    assert capabilities(C.par).needs_reference and not capabilities(C.clip).needs_reference


def test_old_style_attributes_go_through_the_same_accessor():
    def old_loss(scores, options):
        return None

    assert needs_reference(old_loss) is True  # undeclared preference loss: the kind's default
    old_loss.needs_reference = False
    assert needs_reference(old_loss) is False

    def old_reward(samples, **_):
        return [1.0 for _ in samples]

    old_reward.is_correctness = 1  # truthy, as old plugins wrote it
    old_reward.required_fields = ["answer"]
    assert capabilities(old_reward) == Capabilities(is_correctness=True, required_fields=("answer",))


def test_reward_set_reads_declared_correctness_and_fields():
    @declare(is_correctness=True, required_fields=("label",))
    def matches_label(samples, **_):
        return [float(s["completion"] == s.get("label")) for s in samples]

    import sys
    sys.modules[__name__].matches_label = matches_label  # resolvable as `module:function`
    rewards = RewardSet([RewardSpec(f"{__name__}:matches_label")])
    with pytest.raises(RlgenError, match=r"needs the field 'label', but no record of data.jsonl has one"):
        rewards.check_fields([{"prompt": "p", "answer": "1"}], "data.jsonl")
    samples = [{"prompt": "p", "completion": c, "label": "a"} for c in ("a", "b", "a", "a")]
    components, valid, total = rewards.score(samples)
    assert rewards.metrics(components, total, valid)["accuracy"] == 0.75


def test_merger_capabilities_come_from_the_method():
    from rlgen.plugins import registry

    assert capabilities(registry("merger").get("linear")).needs_base is False
    assert capabilities(registry("merger").get("ties")).needs_base is True


# --- the one options validator ----------------------------------------------------------------------


def shaped(values, reference, *, scale: float = 1.0, steps: Annotated[int, PROBABILITY] = 0,
           mode: Literal["a", "b"] = "a", on: bool = False):
    return values


@pytest.mark.parametrize("options, message", [
    ({"scael": 2.0}, r"^reward-shaping 'shaped' has no option 'scael' \(its options: scale, steps, mode, on\)$"),
    ({"scale": "big"}, r"^option 'scale' of reward-shaping 'shaped' must be a number, got 'big'$"),
    ({"scale": float("inf")}, r"must be a finite number, got inf"),
    ({"steps": 0.5}, r"option 'steps' .* must be an integer, got 0.5"),
    ({"steps": 3}, r"option 'steps' .* must be an integer in \[0, 1\], got 3"),
    ({"mode": "c"}, r"option 'mode' .* must be one of a, b, got 'c'"),
    ({"on": 1}, r"option 'on' .* must be true or false, got 1"),
])
def test_check_options_names_item_key_and_accepted_keys(options, message):
    with pytest.raises(RlgenError, match=message):
        check_options("reward-shaping", "shaped", shaped, options, skip=2)
    check_options("reward-shaping", "shaped", shaped, {"scale": 2, "steps": 1, "mode": "b", "on": True}, skip=2)


def test_check_options_reads_a_declared_options_dataclass_and_reserved_keys():
    @dataclass
    class SmoothOptions:
        window: int = 3

    def smooth(values, reference, **options):  # open-ended signature, but the dataclass declares the options
        return values

    smooth.options = SmoothOptions
    with pytest.raises(RlgenError, match=r"has no option 'size' \(its options: window\)"):
        check_options("reward-shaping", "smooth", smooth, {"size": 2}, skip=2)
    with pytest.raises(RlgenError, match=r"^sampler 's': 'records' is not an option \(the caller gives it\)$"):
        check_options("sampler", "s", shaped, {"records": []}, skip=2, reserved={"records": " (the caller gives it)"})


def test_sampler_and_combiner_options_use_the_same_messages():
    from rlgen.rollout.samplers import best_of_n

    with pytest.raises(RlgenError, match=r"^sampler 'best-of-n' has no option 'k' \(its options: n\)$"):
        check_sampler("best-of-n", best_of_n, {"k": 4}, has_guide=True)
    with pytest.raises(RlgenError, match=r"^reward-combiner 'mean-minus-std' has no option 'kk' \(its options: k\)$"):
        C.Combiner("mean-minus-std:kk=1")


# --- typed advantage estimators and per-token advantages --------------------------------------------


@declare(per_token=True)
def per_token_grpo(batch: AdvantageInput) -> AdvantageOutput:
    """GRPO's advantage repeated on every completion token (a process-reward estimator in the simplest form)."""
    scalar = adv.grpo(batch.rewards, scale_rewards=batch.scale_rewards, mask=batch.mask)
    return AdvantageOutput(scalar.unsqueeze(-1).expand(*batch.token_mask.shape).clone())


def fake_trainer(estimator, g: int):
    return SimpleNamespace(
        config=SimpleNamespace(rollout=SimpleNamespace(num_generations=g, max_new_tokens=4),
                               algorithm=SimpleNamespace(scale_rewards="group")),
        advantage_fn=estimator, engine=None, rewards=RewardSet([RewardSpec("length")]), dist=Dist())


TOTAL = torch.tensor([1.0, 3.0, 0.0, 2.0])  # two groups of two
COMPONENTS = TOTAL.unsqueeze(-1)
TOKENS = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)


def test_grpo_path_takes_per_token_advantages_from_a_typed_estimator():
    scalar = GRPOTrainer._advantages(fake_trainer(adv.grpo, 2), [], COMPONENTS, TOTAL, None, TOKENS)
    per_token = GRPOTrainer._advantages(fake_trainer(per_token_grpo, 2), [], COMPONENTS, TOTAL, None, TOKENS)
    assert scalar.shape == (4,) and per_token.shape == (4, 3)
    # each group is {low, high}: the group z-score is -+ 1 / (sqrt(2) + eps) before the padding is zeroed
    expected = scalar.unsqueeze(-1) * TOKENS
    assert torch.equal(per_token, expected)
    assert per_token[0, 2] == 0 and per_token[0, 0] < 0 < per_token[1, 2]


def test_estimator_output_of_the_wrong_shape_is_one_line():
    def wrong(batch: AdvantageInput) -> AdvantageOutput:
        return AdvantageOutput(torch.zeros(3))

    batch = AdvantageInput(TOTAL.view(2, 2), torch.ones(2, 2, dtype=torch.bool), token_mask=TOKENS.view(2, 2, 3))
    with pytest.raises(RlgenError, match=r"advantage estimator 'wrong' returned shape \[3\]; expected \[2, 2\] or \[2, 2, 3\]"):
        estimate_advantages(wrong, batch)


def loss_and_grad(name, advantages, logp0, old, mask, ctx):
    logp = logp0.clone().requires_grad_(True)
    loss, stats = L.policy_loss(L.POLICY_LOSSES[name], logp, old, advantages, mask, ctx)
    loss.backward()
    return loss.detach(), logp.grad, stats


@pytest.mark.parametrize("name", sorted(L.POLICY_LOSSES))
def test_constant_per_token_advantages_equal_the_scalar_path_exactly(name):
    torch.manual_seed(0)
    old = -torch.rand(4, 3) - 0.5
    logp0 = old + 0.3 * torch.randn(4, 3)  # ratios far enough from 1 that some tokens clip
    mask = TOKENS.float()
    scalar = torch.tensor([0.7, -1.3, 0.0, 2.1])
    ctx = LossContext(epsilon=0.2, epsilon_high=0.28 if name != "cispo" else 5.0, max_completion_length=3)
    loss_s, grad_s, stats_s = loss_and_grad(name, scalar, logp0, old, mask, ctx)
    loss_t, grad_t, stats_t = loss_and_grad(name, scalar.unsqueeze(-1).expand(4, 3).clone(), logp0, old, mask, ctx)
    assert torch.equal(loss_s, loss_t) and torch.equal(grad_s, grad_t)
    assert {k: float(v) for k, v in stats_s.items()} == {k: float(v) for k, v in stats_t.items()}
    assert grad_s.abs().sum() > 0


def test_non_constant_per_token_advantages_give_the_hand_computed_loss():
    # row 0: ratios 1.5, 1.0 with A = 1, 2 -> clipped 1.2 * 1 and 1 * 2 -> per-token losses -1.2, -2
    # row 1: ratio 0.5 with A = -1 -> min(-0.5, 0.8 * -1) = -0.8 -> loss 0.8; padding tokens carry A = 9
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.5, 1.0], [0.5, 1.0]]))
    advantages = torch.tensor([[1.0, 2.0], [-1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    ctx = LossContext(epsilon=0.2)
    dapo, stats = L.policy_loss(L.dapo, logp, old, advantages, mask, ctx)  # mean over the 3 tokens
    assert dapo.item() == pytest.approx((-1.2 - 2.0 + 0.8) / 3)
    grpo, _ = L.policy_loss(L.grpo, logp, old, advantages, mask, ctx)  # per-sequence means, then their mean
    assert grpo.item() == pytest.approx(((-1.2 - 2.0) / 2 + 0.8) / 2)
    assert stats["clip_ratio/high_mean"].item() == pytest.approx(1 / 3)  # token (0, 0): ratio 1.5 > 1.2, A > 0
    assert stats["clip_ratio/low_mean"].item() == pytest.approx(1 / 3)  # token (1, 0): ratio 0.5 < 0.8, A < 0


def test_typed_policy_loss_with_its_own_aggregation():
    def reinforce(batch: PolicyLossInput) -> PolicyLossOutput:
        per_token = -batch.per_token_advantages * batch.logp

        def token_sum(per_token, mask, ctx):
            return (per_token * mask).sum()

        return PolicyLossOutput(per_token, token_sum, {"seen": batch.mask.sum()})

    logp = torch.tensor([[-1.0, -2.0], [-0.5, -4.0]])
    advantages = torch.tensor([[1.0, 3.0], [-2.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, stats = L.policy_loss(reinforce, logp, logp, advantages, mask, LossContext())
    # -(1 * -1 + 3 * -2 + -2 * -0.5) = -(-1 - 6 + 1) = 6
    assert loss.item() == pytest.approx(6.0) and stats["seen"].item() == 3


# --- typed combiners, shapings and samplers ---------------------------------------------------------


def test_typed_combiner_and_shaping_run_through_the_spec_objects(monkeypatch):
    from rlgen import plugins

    def largest(batch: CombineInput, floor: float = 0.0) -> CombineOutput:
        return CombineOutput(torch.nan_to_num(batch.components * batch.weights, nan=floor).amax(dim=1).clamp(min=floor))

    @declare(needs_reference=True)
    def margin(batch: ShapingInput, scale: float = 1.0) -> ShapingOutput:
        return ShapingOutput(scale * (batch.values - batch.reference))

    registries = plugins.registries()
    registries["reward-combiner"].add("test-largest", largest, "test")
    registries["reward-shaping"].add("test-margin", margin, "test")
    try:
        combiner = C.Combiner("test-largest:floor=-1")
        components = torch.tensor([[1.0, float("nan")], [float("nan"), float("nan")], [-3.0, 2.0]])
        assert combiner(components, torch.tensor([1.0, 2.0])).tolist() == [1.0, -1.0, 4.0]
        with pytest.raises(RlgenError, match=r"reward-combiner 'test-largest' has no option 'ceiling' \(its options: floor\)"):
            C.Combiner("test-largest:ceiling=1")
        shaping = C.Shaping("test-margin:scale=2,ref_field=answer")
        assert shaping.needs_reference and shaping.ref_field == "answer"
        assert shaping(torch.tensor([3.0, 1.0]), torch.tensor([1.0, 1.0])).tolist() == [4.0, 0.0]
    finally:
        plugins.reset()


def test_typed_sampler_gets_a_request_and_declares_its_guide():
    calls = []

    @declare(needs_guide=True)
    def echo(request: SampleRequest, repeat: int = 1):
        calls.append((request.prompts, request.records, request.rewards, repeat))
        return [p * repeat for p in request.prompts]

    with pytest.raises(RlgenError, match=r"sampler 'echo' needs a guide reward"):
        check_sampler("echo", echo, {"repeat": 2}, has_guide=False)
    with pytest.raises(RlgenError, match=r"option 'repeat' of sampler 'echo' must be an integer, got 'x'"):
        check_sampler("echo", echo, {"repeat": "x"}, has_guide=True)
    out = call_sampler(echo, None, ["ab"], None, rewards="guide", records=[{"prompt": "ab"}], options={"repeat": 2})
    assert out == ["abab"] and calls == [(["ab"], [{"prompt": "ab"}], "guide", 2)]


def test_reward_options_are_checked_when_the_reward_set_is_built():
    with pytest.raises(RlgenError, match=r"^reward 'numeric-match' has no option 'tolerence' \(its options: tolerance\)$"):
        RewardSet([RewardSpec("numeric-match", options={"tolerence": 0.1})])
    with pytest.raises(RlgenError, match=r"^option 'tolerance' of reward 'numeric-match' must be a number, got 'loose'$"):
        RewardSet([RewardSpec("numeric-match", options={"tolerance": "loose"})])
    rewards = RewardSet([RewardSpec("numeric-match", options={"tolerance": 0.1})])  # relative: 0.1 * 2 = 0.2
    samples = [{"prompt": "p", "completion": c, "answer": "2"} for c in ("2.1", "2.4")]
    assert rewards.compute(samples)[0][:, 0].tolist() == [1.0, 0.0]


# --- mergers --------------------------------------------------------------------------------------------


def test_merge_tensor_calls_either_form():
    from rlgen.merging.contracts import MergeInput, merge_tensor
    from rlgen.merging.methods import METHODS

    tensors = [torch.tensor([1.0, 3.0]), torch.tensor([3.0, 5.0])]
    batch = MergeInput("w", tensors, None, [{"weight": 1.0}, {"weight": 3.0}], {"normalize": True}, [0, 1], torch.float32)
    # old form: the built-in linear merge, (1 * [1, 3] + 3 * [3, 5]) / 4 = [2.5, 4.5]
    assert merge_tensor(METHODS["linear"].fn, batch).tolist() == [2.5, 4.5]

    def elementwise_max(batch: MergeInput) -> torch.Tensor:
        return torch.stack(batch.tensors).amax(dim=0).to(batch.out_dtype)

    assert merge_tensor(elementwise_max, batch).tolist() == [3.0, 5.0]


def test_grpo_training_with_constant_per_token_advantages_matches_the_scalar_run(tiny_model_dir, tmp_path):
    """End to end through the trainer: an estimator giving every token its sequence's GRPO advantage trains
    exactly as the built-in grpo estimator (same losses, gradient norms and final weights)."""
    import rlgen
    from rlgen import plugins
    from safetensors.torch import load_file

    plugins.registries()["advantage-estimator"].add("test-per-token-grpo", per_token_grpo, "test")
    runs = {}
    try:
        for name in ("grpo", "test-per-token-grpo"):
            runs[name] = rlgen.train(
                "grpo", model=str(tiny_model_dir), task="arithmetic", out=str(tmp_path / name), steps=2,
                rewards=["length:0.1", "exact-match"], model_defaults=False,
                sets=["rollout.prompts_per_step=2", "rollout.num_generations=3", "rollout.max_new_tokens=4",
                      "run.eval_every=0", "run.threads=1", "optim.lr=1e-2", f"algorithm.advantage={name}"])
    finally:
        plugins.reset()
    scalar, per_token = runs["grpo"], runs["test-per-token-grpo"]
    for key in ("loss", "grad_norm", "reward"):
        assert scalar.last_metrics[key] == per_token.last_metrics[key], key
    assert scalar.last_metrics["grad_norm"] > 0
    weights = [load_file(str(run.final_model / "model.safetensors")) for run in (scalar, per_token)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
