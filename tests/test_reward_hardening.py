"""Issue 13, rewards: `module:function` imports leave sys.path as it was (item 5), reward return values are
checked (item 16), completions without any reward get advantage 0 outside the group statistics (item 24),
and a reward's required data fields are checked before training (part of item 14)."""
from __future__ import annotations

import importlib
import json
import math
import sys
from collections import deque
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rlgen.rollout.engine import SamplingParams

from cli_helpers import rlgen_process
from rlgen.distributed import Dist
from rlgen.algorithms import advantages as adv
from rlgen.algorithms.grpo import GRPOTrainer
from rlgen.errors import RewardError, RlgenError
from rlgen.rewards.base import RewardSet, RewardSpec

NAN = float("nan")
EPS = adv.EPS


# --- item 5: module:function rewards and sys.path ------------------------------------------------------

@pytest.fixture
def reward_dir(tmp_path, monkeypatch):
    """A cwd holding a reward module and a `colorsys.py` that would shadow the standard library's."""
    (tmp_path / "rlgen_cwd_reward.py").write_text("def fn(samples, **_):\n    return [1.0] * len(samples)\n")
    (tmp_path / "colorsys.py").write_text("SHADOWED = True\n")
    monkeypatch.chdir(tmp_path)
    # neither the startup cwd ('' / '.') nor tmp_path may be searched already
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    saved_colorsys = sys.modules.pop("colorsys", None)
    try:
        yield tmp_path
    finally:
        sys.modules.pop("rlgen_cwd_reward", None)
        sys.modules.pop("colorsys", None)
        if saved_colorsys is not None:
            sys.modules["colorsys"] = saved_colorsys


def test_dotted_reward_from_cwd_leaves_sys_path_unchanged(reward_dir):
    before = list(sys.path)
    rewards = RewardSet([RewardSpec("rlgen_cwd_reward:fn")])
    assert rewards.compute([{"prompt": "p", "completion": "c"}])[0].tolist() == [[1.0]]  # found in the cwd
    assert sys.path == before
    # a module imported later is the real one, not the cwd's `colorsys.py`
    colorsys = importlib.import_module("colorsys")
    assert not hasattr(colorsys, "SHADOWED")
    assert Path(colorsys.__file__).parent != reward_dir


def test_failed_dotted_import_leaves_sys_path_unchanged(reward_dir):
    before = list(sys.path)
    with pytest.raises(RlgenError, match="cannot import module"):
        RewardSet([RewardSpec("rlgen_no_such_module_abc:fn")])
    assert sys.path == before


# --- item 16: reward return values ---------------------------------------------------------------------

def give(samples, value=None, **_):
    """A reward returning whatever the test hands it (`value`, or `value(samples)` when callable)."""
    return value(samples) if callable(value) else value


def returning(value, on_error: str = "raise") -> RewardSet:
    return RewardSet([RewardSpec(f"{__name__}:give", options={"value": value})], on_error=on_error)


SAMPLES = [{"prompt": "p", "completion": "a"}, {"prompt": "q", "completion": "b"}]


@pytest.mark.parametrize("value, shown", [
    ({"x": 1.0, "y": 2.0}, "(dict)"),  # two keys for two samples: iterated silently before
    ("10", "'10' (str)"),  # two characters for two samples
    (b"10", "(bytes)"),
    ({1.0, 2.0}, "(set)"),
    (1.0, "1.0 (float)"),
    (None, "None (NoneType)"),
    (torch.ones(2, 1), "a Tensor of shape (2, 1)"),
    (np.ones((2, 1)), "a ndarray of shape (2, 1)"),
])
def test_malformed_return_value_is_one_line_error(value, shown):
    for on_error in ("raise", "skip"):  # a malformed return value is a bug of the reward, never skipped
        with pytest.raises(RewardError) as info:
            returning(value, on_error).compute(SAMPLES)
        message = str(info.value)
        assert f"reward '{__name__}:give' returned" in message and shown in message
        assert "\n" not in message


def test_malformed_return_value_message_is_shortened():
    with pytest.raises(RewardError) as info:
        returning("x" * 100_000).compute(SAMPLES)
    assert len(str(info.value)) < 400 and "100002 characters" in str(info.value)


def test_wrong_number_of_values_from_an_array():
    with pytest.raises(RewardError, match="returned 3 values for 2 samples"):
        returning(np.zeros(3)).compute(SAMPLES)


@pytest.mark.parametrize("value, expected", [
    ([1, 2.5], [1.0, 2.5]),
    ((0.5, None), [0.5, NAN]),
    ([True, False], [1.0, 0.0]),  # bools are 1 / 0, as TRL's torch.tensor conversion makes them
    (np.array([0.25, 3.0], dtype=np.float32), [0.25, 3.0]),
    (torch.tensor([4.0, -1.0], requires_grad=True), [4.0, -1.0]),
    ([np.float64(1.5), np.int64(2)], [1.5, 2.0]),
    ([torch.tensor(7.0), np.array(8)], [7.0, 8.0]),  # 0-d tensors and arrays
    (lambda samples: (len(s["completion"]) for s in samples), [1.0, 1.0]),  # a generator
])
def test_accepted_return_values(value, expected):
    got = returning(value).compute(SAMPLES)[0][:, 0].tolist()
    assert [("nan" if math.isnan(v) else v) for v in got] == [("nan" if math.isnan(v) else v) for v in expected]


@pytest.mark.parametrize("entry, shown", [
    ("1.5", "'1.5' (str)"),  # a string is not a number, even when it parses as one
    ([1.0], "[1.0] (list)"),  # nested lists
    ({"score": 1.0}, "(dict)"),
    (torch.ones(2), "a Tensor of shape (2,)"),
    (1 + 2j, "(complex)"),
])
def test_non_number_entry_names_reward_and_sample(entry, shown):
    with pytest.raises(RewardError) as info:
        returning([1.0, entry]).compute(SAMPLES)
    message = str(info.value)
    assert f"reward '{__name__}:give' returned" in message and shown in message and "sample 1" in message
    assert "\n" not in message
    # rewards_on_error=skip skips that sample only
    components, valid = returning([1.0, entry], "skip").compute(SAMPLES)
    assert valid.tolist() == [True, False]
    assert components[0, 0] == 1.0 and math.isnan(components[1, 0])


def test_huge_int_is_non_finite_not_an_internal_error():
    with pytest.raises(RewardError, match="returned a non-finite value on sample 1"):
        returning([1, 10**400]).compute(SAMPLES)


def test_raising_reward_message_is_one_short_line():
    def explode(samples):
        raise ValueError("first line\n" + "x" * 5000)

    with pytest.raises(RewardError) as info:
        returning(explode).compute(SAMPLES)
    message = str(info.value)
    assert "raised ValueError: first line xxx" in message and "\n" not in message and len(message) < 500


# --- item 24: completions whose every reward is None ---------------------------------------------------

def close(actual: torch.Tensor, expected: list, tol: float = 1e-6) -> None:
    assert actual.shape == torch.Size([len(expected)]) or actual.numel() == len(expected)
    for a, e in zip(actual.reshape(-1).tolist(), expected):
        assert abs(a - e) <= tol, (actual, expected)


def test_grpo_leaves_all_none_completion_out_of_the_group():
    rewards = torch.tensor([[1.0, 0.0, 3.0]])  # the middle one: every reward None (combined to 0)
    mask = torch.tensor([[True, False, True]])
    # mean 2, unbiased std over {1, 3}: sqrt(2)
    got = adv.grpo(rewards, mask=mask)
    close(got, [-1 / (math.sqrt(2) + EPS), 0.0, 1 / (math.sqrt(2) + EPS)])
    assert got[0, 1].item() == 0.0
    close(adv.grpo(rewards, scale_rewards="none", mask=mask), [-1.0, 0.0, 1.0])


def test_grpo_batch_scale_uses_counted_completions_only():
    rewards = torch.tensor([[1.0, 0.0, 3.0], [2.0, 4.0, 0.0]])
    mask = torch.tensor([[True, False, True], [True, True, False]])
    # centred: -1, 1 | -1, 1; batch std over the counted rewards {1, 3, 2, 4}: sqrt(5/3)
    std = math.sqrt(5 / 3)
    close(adv.grpo(rewards, scale_rewards="batch", mask=mask), [-1 / (std + EPS), 0, 1 / (std + EPS), -1 / (std + EPS), 1 / (std + EPS), 0])


def test_grpo_group_without_counted_completions_is_zero():
    got = adv.grpo(torch.tensor([[5.0, 7.0], [1.0, 2.0]]), mask=torch.tensor([[False, False], [True, False]]))
    assert got.tolist() == [[0.0, 0.0], [0.0, 0.0]]  # a lone counted completion has no spread: (1 - 1) / eps


def test_other_estimators_leave_all_none_completions_out():
    # rloo: leave-one-out mean over the other counted completions: 1 - (3+5)/2, 3 - (1+5)/2, 5 - (1+3)/2
    close(adv.rloo(torch.tensor([[1.0, 0.0, 3.0, 5.0]]), mask=torch.tensor([[True, False, True, True]])), [-3.0, 0.0, 0.0, 3.0])
    # rloo with one counted completion: no baseline, advantage 0
    close(adv.rloo(torch.tensor([[4.0, 0.0]]), mask=torch.tensor([[True, False]])), [0.0, 0.0])
    # reinforce++: whitened over the counted {1, 3, 5}: mean 3, std 2
    close(adv.reinforce_pp(torch.tensor([[1.0, 0.0], [3.0, 5.0]]), mask=torch.tensor([[True, False], [True, True]])),
          [-2 / (2 + EPS), 0.0, 0.0, 2 / (2 + EPS)])
    # reinforce++-baseline: group means 2 and 4 -> -1, 1, -2, 0, 2; batch std sqrt(10 / 4)
    std = math.sqrt(2.5)
    close(adv.reinforce_pp_baseline(torch.tensor([[1.0, 0.0, 3.0], [2.0, 4.0, 6.0]]),
                                    mask=torch.tensor([[True, False, True], [True, True, True]])),
          [-1 / (std + EPS), 0.0, 1 / (std + EPS), -2 / (std + EPS), 0.0, 2 / (std + EPS)])
    # remax: reward - greedy reward; a greedy completion without reward (NaN) gives its group 0
    close(adv.remax(torch.tensor([[1.0, 3.0], [5.0, 7.0]]), baseline=torch.tensor([2.0, NAN])), [-1.0, 1.0, 0.0, 0.0])
    close(adv.remax(torch.tensor([[1.0, 3.0]]), baseline=torch.tensor([2.0]), mask=torch.tensor([[True, False]])), [-1.0, 0.0])
    # gdpo: z-scores in the group (+-1/(sqrt2+eps)), then whitened over the two counted completions only
    z = 1 / (math.sqrt(2) + EPS)
    w = z / (z * math.sqrt(2) + EPS)
    close(adv.gdpo(torch.zeros(1, 3), components=torch.tensor([[[1.0], [NAN], [3.0]]]), mask=torch.tensor([[True, False, True]])),
          [-w, 0.0, w])


def test_estimators_without_mask_are_unchanged():
    rewards = torch.tensor([[1.0, 2.0, 4.0], [0.0, 0.0, 3.0]])
    full = torch.ones_like(rewards, dtype=torch.bool)
    for name in ("grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gdpo"):
        fn = getattr(adv, name)
        assert torch.allclose(fn(rewards), fn(rewards, mask=full))
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    assert torch.allclose(adv.grpo(rewards), centred / (rewards.std(dim=1, keepdim=True) + EPS))


def _trainer(advantage_fn, g: int, rewards: RewardSet, greedy_texts=()):
    engine = SimpleNamespace(generate=lambda prompts, params: SimpleNamespace(texts=list(greedy_texts)))
    return SimpleNamespace(
        config=SimpleNamespace(rollout=SimpleNamespace(num_generations=g, max_new_tokens=8),
                               algorithm=SimpleNamespace(scale_rewards="group")),
        advantage_fn=advantage_fn, engine=engine, rewards=rewards, dist=Dist(),
        prompt_text=lambda record: record["prompt"], params=SamplingParams(8, 1.0))


def test_grpo_trainer_gives_all_none_completion_zero_advantage():
    rewards = RewardSet([RewardSpec("exact-match"), RewardSpec("numeric-match")])
    samples = [{"prompt": "p", "completion": c, "answer": a} for c, a in (("1", "1"), ("x", None), ("3", "1"))]
    components, valid = rewards.compute(samples)
    total = rewards.total(components)  # 2, 0 (every reward None), 0
    assert total.tolist() == [2.0, 0.0, 0.0] and valid.all()
    trainer = _trainer(adv.grpo, 3, rewards)
    got = GRPOTrainer._advantages(trainer, [{"prompt": "p"}], components, total)
    # statistics over {2, 0}: mean 1, std sqrt(2); the all-None completion: exactly 0
    close(got, [1 / (math.sqrt(2) + EPS), 0.0, -1 / (math.sqrt(2) + EPS)])
    assert got[1].item() == 0.0


def test_grpo_trainer_zeroes_all_none_for_estimators_ignoring_mask():
    def plugin_estimator(rewards, **_):  # a plug-in written before `mask` existed
        return rewards + 10.0

    components = torch.tensor([[1.0], [NAN]])
    got = GRPOTrainer._advantages(_trainer(plugin_estimator, 2, RewardSet([RewardSpec("length")])), [{"prompt": "p"}],
                                  components, torch.tensor([1.0, 0.0]))
    assert got.tolist() == [11.0, 0.0]


def test_remax_greedy_without_any_reward_gives_group_zero():
    rewards = RewardSet([RewardSpec("exact-match")])
    records = [{"prompt": "a", "answer": "1"}, {"prompt": "b"}]  # the second greedy completion gets None
    trainer = _trainer(adv.remax, 2, rewards, greedy_texts=["1", "1"])
    got = GRPOTrainer._advantages(trainer, records, torch.tensor([[0.0], [1.0], [1.0], [0.0]]), torch.tensor([0.0, 1.0, 1.0, 0.0]))
    assert got.tolist() == [-1.0, 0.0, 0.0, 0.0]


def test_dynamic_sampling_spread_ignores_all_none_completions():
    from rlgen.algorithms.grpo import _group_spread, counted

    components = torch.tensor([[1.0], [NAN], [1.0], [2.0], [NAN], [0.0]])
    mask = counted(components, torch.ones(6, dtype=torch.bool))
    assert mask.tolist() == [True, False, True, True, False, True]
    total = torch.tensor([1.0, 0.0, 1.0, 2.0, 0.0, 0.0])
    # group 1: counted rewards {1, 1}: no spread although the totals 1, 0, 1 differ
    assert _group_spread(total.view(2, 3), mask.view(2, 3)).tolist() == [False, True]


# --- item 14 (rewards part): a reward's data fields are checked before training --------------------------

def test_check_fields_names_reward_field_and_source():
    rewards = RewardSet([RewardSpec("length"), RewardSpec("exact-match")])
    with pytest.raises(RlgenError) as info:
        rewards.check_fields([{"prompt": "1+1="}, {"prompt": "2+2=", "answer": None}], "data/train.jsonl")
    message = str(info.value)
    assert "reward 'exact-match'" in message and "'answer'" in message and "data/train.jsonl" in message
    rewards.check_fields([{"prompt": "1+1="}, {"prompt": "2+2=", "answer": "4"}], "x")  # one record suffices
    with pytest.raises(RlgenError, match="reward 'countdown' needs the field 'target'"):
        RewardSet([RewardSpec("countdown")]).check_fields([{"prompt": "p", "numbers": [1, 2]}], "x")


def test_check_fields_reference_shaping_needs_every_record():
    rewards = RewardSet([RewardSpec("length")], shaping="par:ref_field=ref")
    with pytest.raises(RlgenError, match="needs the field 'ref' in every record, but record 2 of d.jsonl"):
        rewards.check_fields([{"prompt": "a", "ref": "x"}, {"prompt": "b"}], "d.jsonl")


@pytest.mark.slow  # a fresh interpreter
def test_grpo_cli_without_answer_field_fails_before_the_model(tmp_path):
    data = tmp_path / "noanswer.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i}="}) + "\n" for i in range(4)))
    # a model directory that does not exist: the data check must come first
    args = ["train", "grpo", "--model", str(tmp_path / "no-model-here"), "--data", str(data), "--out", "run",
            "--steps", "1", "--set", "rollout.num_generations=2", "--set", "run.eval_every=0"]
    proc = rlgen_process(*args, cwd=tmp_path, timeout=180)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlgen: error:")
    assert "'exact-match'" in lines[0] and "'answer'" in lines[0] and "noanswer.jsonl" in lines[0]
    assert not (tmp_path / "run").exists()


def _image_trainer(g: int, tracker=None):
    return SimpleNamespace(
        config=SimpleNamespace(rollout=SimpleNamespace(num_generations=g),
                               algorithm=SimpleNamespace(scale_rewards="group", adv_clip_max=5.0)),
        tracker=tracker, advantage_fn=adv.grpo, rewards=RewardSet([RewardSpec("length")]))


def test_image_trainers_leave_images_without_reward_out_of_the_statistics():
    from rlgen.algorithms.diffusion.policy_gradient import DiffusionPolicyGradientTrainer
    from rlgen.diffusion.stat_tracking import PerPromptStatTracker

    components = torch.tensor([[1.0], [float("nan")], [3.0]])  # the middle image got no reward
    total = torch.tensor([1.0, 0.0, 3.0])
    mask = torch.tensor([True, False, True])
    records = [{"prompt": "p"}] * 3
    # group of the counted images {1, 3}: mean 2, std sqrt(2) (unbiased, as TRL's GRPO)
    got, _ = DiffusionPolicyGradientTrainer._advantages(_image_trainer(3), records, total, components, mask)
    expected = 1 / (math.sqrt(2) + 1e-4)
    assert got.tolist() == pytest.approx([-expected, 0.0, expected], abs=1e-5)
    # DDPO's per-prompt tracker: the uncounted image is neither pushed into the buffer nor given an advantage
    tracker = PerPromptStatTracker(16, 16)
    got, _ = DiffusionPolicyGradientTrainer._advantages(_image_trainer(3, tracker), records, total, components, mask)
    assert tracker.history["p"] == deque([1.0, 3.0])
    assert got.tolist() == pytest.approx([-1 / (1 + 1e-6), 0.0, 1 / (1 + 1e-6)], abs=1e-5)  # numpy std of {1, 3} = 1


# --- round 2: reward findings (F3, F7, weights, hidden `_line`) ------------------------------------------

@pytest.mark.parametrize("big", [1e308, 3.5e38, -1e300])
def test_reward_beyond_float32_range_is_a_non_finite_reward(big):
    spec = RewardSpec("give", options={"value": lambda s: [big] + [1.0] * (len(s) - 1)})
    rewards = RewardSet.__new__(RewardSet)
    rewards.specs, rewards.functions, rewards.on_error = [spec], [give], "raise"
    samples = [{"prompt": "p", "completion": "a"}, {"prompt": "p", "completion": "b"}]
    with pytest.raises(RewardError, match="beyond the float32 range"):
        rewards.compute(samples)
    rewards.on_error = "skip"
    components, valid = rewards.compute(samples)
    assert valid.tolist() == [False, True] and math.isnan(components[0, 0]) and components[1, 0] == 1.0


@pytest.mark.parametrize("source, expected", [
    ("def f(:\n", r"rlgen_synerr_mod\.py:1: syntax error"),
    ("raise ValueError('boom')\n", "importing it raised ValueError: boom"),
])
def test_reward_module_failing_at_import_is_one_error(reward_dir, source, expected):
    (reward_dir / "rlgen_synerr_mod.py").write_text(source)
    try:
        with pytest.raises(RlgenError, match=expected) as info:
            RewardSet([RewardSpec("rlgen_synerr_mod:f")])
        assert "cannot import module 'rlgen_synerr_mod'" in str(info.value) and "\n" not in str(info.value)
    finally:
        sys.modules.pop("rlgen_synerr_mod", None)


@pytest.mark.parametrize("text", ["length:nan", "length:1e999", "length:-inf"])
def test_non_finite_weight_is_an_error_naming_the_weight(text):
    with pytest.raises(RlgenError, match=r"weight '.*' is not a finite number"):
        RewardSpec.parse(text)
    assert RewardSpec.parse(text + ":2").name == text  # a function named like it still works with a weight


def test_missing_field_error_hides_the_line_bookkeeping():
    with pytest.raises(RlgenError) as info:
        RewardSet([RewardSpec("exact-match")]).check_fields([{"prompt": "p", "_line": 1}], "d.jsonl")
    assert "_line" not in str(info.value) and "'prompt'" in str(info.value)
