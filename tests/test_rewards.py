"""Built-in rewards and RewardSet (weighted totals, errors naming the reward and the sample)."""
import math
import sys
import types

import pytest
import torch

from rlgen.errors import RewardError, RlgenError
from rlgen.plugins import registry
from rlgen.rewards import builtin as B
from rlgen.rewards.base import RewardSet, RewardSpec


def s(completion, **fields):
    return {"prompt": "p", "completion": completion, **fields}


def test_builtin_rewards_registered():
    names = set(registry("reward").names())
    assert {"exact-match", "numeric-match", "format", "length", "countdown"} <= names
    assert registry("reward").get("format") is B.format_reward


# --- exact-match -------------------------------------------------------------------------------------

def test_exact_match():
    samples = [
        s("42", answer="42"),
        s("  42\n", answer=" 42 "),  # surrounding whitespace ignored on both sides
        s("42", answer=42),  # non-string answers compare as text
        s("042", answer="42"),  # not numerically compared
        s("41", answer="42"),
        s("42"),  # no answer: not applicable
        s("42", answer=None),
    ]
    assert B.exact_match(samples) == [1.0, 1.0, 1.0, 0.0, 0.0, None, None]


# --- numeric-match -----------------------------------------------------------------------------------

def test_numeric_match():
    samples = [
        s("The answer is 3.50", answer="3.5"),  # last number, compared as a number
        s("first 3 then 4", answer="3"),  # the LAST number counts: 4 != 3
        s("first 4 then 3", answer=3),
        s("no digits here", answer="3"),
        s("-7", answer="-7"),
        s("1e3", answer="1000"),
        s("1000000.5", answer="1000000"),  # relative tolerance 1e-6 * 1e6 = 1 -> |0.5| <= 1
        s("1.5", answer="1"),  # |0.5| > 1e-6 * max(1, 1)
        s("3", answer="three"),  # answer not a number: not applicable
        s("3"),  # no answer: not applicable
    ]
    assert B.numeric_match(samples) == [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, None, None]
    # a looser tolerance: |1.5 - 1| = 0.5 <= 0.5 * max(1, 1)
    assert B.numeric_match([s("1.5", answer="1")], tolerance=0.5) == [1.0]


# --- format ------------------------------------------------------------------------------------------

def test_format_default_pattern_is_an_integer():
    completions = ["12", " 12 \n", "-3", "12a", "1.5", "", "answer: 12"]
    assert B.format_reward([s(c) for c in completions]) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_format_custom_pattern_full_match_dotall():
    pattern = r"<think>.*</think>\s*<answer>\d+</answer>"
    samples = [
        s("<think>a\nb</think>\n<answer>7</answer>"),  # '.' matches newlines (DOTALL)
        s("<think>x</think><answer>7</answer> trailing"),  # must match the whole completion
        s("<answer>7</answer>"),
    ]
    assert B.format_reward(samples, pattern=pattern) == [1.0, 0.0, 0.0]


# --- length ------------------------------------------------------------------------------------------

def test_length():
    assert B.length([s("abcd"), s(""), s("  ab ")]) == [4.0, 0.0, 5.0]  # characters, not stripped
    assert B.length([s("abcd", completion_tokens=7), s("abc")], unit="tokens") == [7.0, 3.0]


# --- countdown ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("completion, numbers, target, expected", [
    ("3*5+7", [3, 5, 7], 22, 1.0),  # 15 + 7 = 22
    (" (7 - 5) * 3 ", [3, 5, 7], 6, 1.0),  # 2 * 3 = 6, whitespace stripped
    ("7*3", [3, 5, 7], 21, 1.0),  # a subset of the numbers is allowed (each at most once)
    ("7*3+5", [3, 5, 7], 22, 0.0),  # 26: wrong target
    ("7+7+7", [3, 5, 7], 21, 0.0),  # 7 used three times, available once
    ("7+7", [7, 7, 3], 14, 1.0),  # 7 available twice
    ("7+7+7", [7, 7, 3], 21, 0.0),  # ... but not three times
    ("3+4", [3, 5, 7], 7, 0.0),  # 4 is not one of the numbers
    ("42/2", [42, 2], 21, 0.0),  # '/' not allowed
    ("3**2", [3, 2], 9, 0.0),  # '**' not allowed
    ("-3+24", [3, 24], 21, 0.0),  # unary minus not allowed
    ("10.5*2", [10, 2], 21, 0.0),  # only integers
    ("hello world", [3, 5, 7], 22, 0.0),  # garbage
    ("7 *", [3, 5, 7], 21, 0.0),  # syntax error
    ("x", [3, 5, 7], 21, 0.0),  # a name
    ("", [3, 5, 7], 21, 0.0),
])
def test_countdown(completion, numbers, target, expected):
    assert B.countdown([s(completion, numbers=numbers, target=target)]) == [expected]


def test_countdown_string_fields_and_missing_fields():
    assert B.countdown([s("3*5+7", numbers=["3", "5", "7"], target="22")]) == [1.0]
    assert B.countdown([s("3*5", numbers=[3, 5]), s("3*5", target=15)]) == [None, None]


# --- RewardSet ---------------------------------------------------------------------------------------

@pytest.fixture
def custom_module(monkeypatch):
    """A throwaway module so rewards can be named 'rlgen_test_rewards_mod:fn'."""
    mod = types.ModuleType("rlgen_test_rewards_mod")

    def fragile(samples, **_):
        out = []
        for sample in samples:
            if sample["completion"] == "boom":
                raise ValueError("cannot score boom")
            out.append(1.0)
        return out

    def gives_nan(samples, **_):
        return [float("nan") if x["completion"] == "bad" else 0.5 for x in samples]

    def gives_inf(samples, **_):
        return [float("inf") for _ in samples]

    def wrong_count(samples, **_):
        return [1.0]

    def trl_style(prompts, completions, answer, **kwargs):
        return [float(c == a) * kwargs.get("scale", 1.0) for c, a in zip(completions, answer)]

    for fn in (fragile, gives_nan, gives_inf, wrong_count, trl_style):
        setattr(mod, fn.__name__, fn)
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return mod.__name__


def test_reward_set_weighted_total_with_not_applicable():
    rs = RewardSet([RewardSpec("exact-match", 2.0), RewardSpec("length", 0.5)])
    samples = [s("12", answer="12"), s("abc"), s("7", answer="8")]
    components, valid = rs.compute(samples)
    # exact-match: 1, None (no answer) -> NaN, 0; length: 2, 3, 1
    assert components.shape == (3, 2)
    assert components[0].tolist() == [1.0, 2.0]
    assert math.isnan(components[1, 0]) and components[1, 1] == 3.0
    assert components[2].tolist() == [0.0, 1.0]
    assert valid.tolist() == [True, True, True]
    # totals: 2*1 + 0.5*2 = 3;  NaN contributes nothing: 0.5*3 = 1.5;  2*0 + 0.5*1 = 0.5
    assert rs.total(components).tolist() == [3.0, 1.5, 0.5]
    assert rs.names == ["exact-match", "length"]
    assert rs.weights.tolist() == [2.0, 0.5]


def test_reward_set_all_not_applicable_total_is_zero():
    rs = RewardSet([RewardSpec("exact-match")])
    components, _ = rs.compute([s("1")])
    assert rs.total(components).tolist() == [0.0]


def test_reward_set_options_are_passed():
    rs = RewardSet([RewardSpec("format", 1.0, {"pattern": "[a-z]+"})])
    components, _ = rs.compute([s("abc"), s("12")])
    assert components[:, 0].tolist() == [1.0, 0.0]


def test_reward_set_dotted_and_trl_style(custom_module):
    rs = RewardSet([RewardSpec.parse(f"{custom_module}:trl_style:3")])
    rs.specs[0].options = {"scale": 0.5}
    components, _ = rs.compute([s("5", answer="5"), s("4", answer="5")])
    # TRL-style fn(prompts, completions, answer, **options): (1 * 0.5, 0 * 0.5); weight 3 -> totals 1.5, 0
    assert components[:, 0].tolist() == [0.5, 0.0]
    assert rs.total(components).tolist() == [1.5, 0.0]


def test_reward_raising_names_reward_and_sample(custom_module):
    name = f"{custom_module}:fragile"
    rs = RewardSet([RewardSpec(name)])
    with pytest.raises(RewardError) as info:
        rs.compute([s("ok"), s("fine"), s("boom")])
    message = str(info.value)
    assert f"reward '{name}'" in message
    assert "sample 2" in message
    assert "ValueError" in message and "cannot score boom" in message
    assert isinstance(info.value, RlgenError)


def test_reward_nan_is_an_error(custom_module):
    rs = RewardSet([RewardSpec(f"{custom_module}:gives_nan")])
    with pytest.raises(RewardError, match=r"gives_nan' returned a non-finite value on sample 1"):
        rs.compute([s("good"), s("bad")])
    with pytest.raises(RewardError, match="non-finite value on sample 0"):
        RewardSet([RewardSpec(f"{custom_module}:gives_inf")]).compute([s("x")])


def test_reward_wrong_number_of_values(custom_module):
    rs = RewardSet([RewardSpec(f"{custom_module}:wrong_count")])
    with pytest.raises(RewardError, match="returned 1 values for 2 samples"):
        rs.compute([s("a"), s("b")])


def test_on_error_skip_marks_samples_invalid(custom_module):
    rs = RewardSet([RewardSpec(f"{custom_module}:fragile"), RewardSpec(f"{custom_module}:gives_nan", 2.0)], on_error="skip")
    components, valid = rs.compute([s("ok"), s("boom"), s("bad")])
    # fragile: 1, (raised) NaN, 1; gives_nan: 0.5, 0.5, (NaN) NaN
    assert valid.tolist() == [True, False, False]
    assert components[0].tolist() == [1.0, 0.5]
    assert math.isnan(components[1, 0]) and components[1, 1] == 0.5
    assert components[2, 0] == 1.0 and math.isnan(components[2, 1])
    # totals: 1 + 2*0.5 = 2; 0 + 1 = 1; 1 + 0 = 1 (the trainer ignores invalid samples)
    assert rs.total(components).tolist() == [2.0, 1.0, 1.0]


def test_reward_set_configuration_errors():
    with pytest.raises(RlgenError, match="no reward"):
        RewardSet([])
    with pytest.raises(RlgenError, match="rewards_on_error"):
        RewardSet([RewardSpec("length")], on_error="ignore")
    with pytest.raises(RlgenError, match="reward listed twice: length"):
        RewardSet([RewardSpec("length"), RewardSpec("length", 2.0)])
    with pytest.raises(RlgenError, match="unknown reward 'no-such-reward'"):
        RewardSet([RewardSpec("no-such-reward")])
    with pytest.raises(RlgenError, match="cannot import module"):
        RewardSet([RewardSpec("no_such_module_xyz:fn")])


def test_components_dtype():
    components, valid = RewardSet([RewardSpec("length")]).compute([s("ab")])
    assert components.dtype == torch.float32 and valid.dtype == torch.bool
