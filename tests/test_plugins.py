"""The plugin system: listing, provider attribution, duplicate names, the example plugin
(plugins/rlgen-example, installed in CI), `module:function` rewards, and a training run using plugin items.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
import textwrap

import pytest
import torch

from cli_helpers import rlgen_process
from rlgen import plugins
from rlgen.errors import RlgenError
from rlgen.hookspecs import hookimpl
from rlgen.rewards.base import RewardSet, RewardSpec

# The example plugin (plugins/rlgen-example) is part of the test install (README, .ci/run): its tests
# fail, rather than skip, when it is missing.
def needs_example(test):
    return test


def test_example_plugin_is_installed():
    assert importlib.util.find_spec("rlgen_example") is not None, (
        "the example plugin is not installed: pip install -e plugins/rlgen-example"
    )


@pytest.fixture
def fresh_plugins():
    """A freshly built plugin manager; every extra in-process plugin is forgotten afterwards."""
    plugins.reset()
    try:
        yield plugins.plugin_manager()
    finally:
        plugins.reset()


# --- listing -------------------------------------------------------------------------------------


@needs_example
def test_plugins_json_lists_builtins_and_example_plugin():
    listing = json.loads(rlgen_process("plugins", "--json", check=True).stdout)
    providers = {(kind, e["name"]): e["provider"] for kind, entries in listing.items() for e in entries}
    for key in [
        ("reward", "exact-match"),
        ("algorithm", "grpo"),
        ("advantage-estimator", "rloo"),
        ("task", "arithmetic"),
        ("model", "tiny-arith"),
    ]:
        assert providers.get(key) == "rlgen", key
    assert providers[("reward", "digit-overlap")] == "rlgen-example"
    assert providers[("advantage-estimator", "rank")] == "rlgen-example"
    # The description is the first docstring line.
    rewards = {e["name"]: e for e in listing["reward"]}
    assert rewards["digit-overlap"]["description"].startswith("Partial credit")


# --- in-process plugins and duplicate names -------------------------------------------------------


class _ClashingPlugin:
    @hookimpl
    def register_rewards(self, register):
        register("exact-match", lambda samples, **_: [0.0] * len(samples))


class _ExtraPlugin:
    @hookimpl
    def register_rewards(self, register):
        register("always-one", lambda samples, **_: [1.0] * len(samples), "constant 1.0")


def test_in_process_plugin_is_attributed_to_its_registration_name(fresh_plugins):
    fresh_plugins.register(_ExtraPlugin(), name="my-extra-plugin")
    plugins.registries.cache_clear()
    rewards = plugins.registry("reward")
    assert rewards.entry("always-one").provider == "my-extra-plugin"
    assert rewards.entry("always-one").description == "constant 1.0"
    assert rewards.entry("exact-match").provider == "rlgen"
    if "digit-overlap" in rewards:  # entry-point plugins keep their distribution's name
        assert rewards.entry("digit-overlap").provider == "rlgen-example"


def test_duplicate_registration_keeps_the_builtin_and_warns_once(fresh_plugins, capsys):
    fresh_plugins.register(_ClashingPlugin(), name="clashing-plugin")
    rewards = plugins.registry("reward")  # no exception: the clash is reported, not raised
    assert rewards.entry("exact-match").provider == "rlgen"  # built-ins win
    samples = [{"prompt": "1+1=", "completion": "2", "answer": "2"}]
    assert rewards.get("exact-match")(samples) == [1.0]  # the built-in, not the clashing constant 0
    plugins.registry("reward")
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["rlgen: warning: reward 'exact-match' is registered twice: by package 'rlgen' (kept) and "
                     "by package 'clashing-plugin' (dropped)"]
    assert plugins.clashes() == [plugins.Clash("reward", "exact-match", "rlgen", "clashing-plugin")]


def test_reset_forgets_in_process_plugins(fresh_plugins):
    fresh_plugins.register(_ClashingPlugin(), name="clashing-plugin")
    plugins.reset()
    assert "exact-match" in plugins.registry("reward")  # no clash after reset


# --- the example plugin's items -------------------------------------------------------------------


@needs_example
def test_digit_overlap_values():
    import rlgen_example

    fn = plugins.registry("reward").get("digit-overlap")
    assert fn is rlgen_example.digit_overlap
    samples = [
        {"prompt": "2+40=", "completion": "42", "answer": "42"},  # exact: 2/2
        {"prompt": "2+40=", "completion": "45", "answer": "42"},  # first digit only: 1/2
        {"prompt": "20+4=", "completion": "124", "answer": "125"},  # 2 of 3
        {"prompt": "2+40=", "completion": "42xx", "answer": "42"},  # trailing junk: 2 of max(2, 4)
        {"prompt": "2+40=", "completion": "", "answer": "42"},  # nothing: 0
        {"prompt": "2+40=", "completion": " 42\n", "answer": 42},  # whitespace stripped, int answer
        {"prompt": "9-20=", "completion": "-13", "answer": "-11"},  # '-', '1' match: 2/3
        {"prompt": "hello", "completion": "42"},  # no answer: not applicable
    ]
    got = fn(samples)
    expected = [1.0, 0.5, 2 / 3, 0.5, 0.0, 1.0, 2 / 3, None]
    assert got[-1] is None
    assert got[:-1] == pytest.approx(expected[:-1])
    assert getattr(fn, "is_correctness", False) is False


@needs_example
def test_digit_overlap_in_a_reward_set():
    rewards = RewardSet([RewardSpec("digit-overlap"), RewardSpec("exact-match", 2.0)])
    samples = [
        {"prompt": "p", "completion": "45", "answer": "42"},
        {"prompt": "p", "completion": "42", "answer": "42"},
        {"prompt": "p", "completion": "42"},
    ]
    components, valid = rewards.compute(samples)
    assert valid.all()
    assert components[0].tolist() == [0.5, 0.0]
    assert components[1].tolist() == [1.0, 1.0]
    assert math.isnan(components[2, 0]) and math.isnan(components[2, 1])
    assert rewards.total(components).tolist() == [0.5, 3.0, 0.0]


@needs_example
def test_rank_estimator_values():
    import rlgen_example

    fn = plugins.registry("advantage-estimator").get("rank")
    assert fn is rlgen_example.rank
    # Distinct rewards: ranks 0..3 -> (2r - 3) / 3.
    got = fn(torch.tensor([[0.0, 1.0, 2.0, 3.0]]))
    assert torch.allclose(got, torch.tensor([[-1.0, -1 / 3, 1 / 3, 1.0]]))
    # Ties share their average rank: [1, 1, 0, 2] -> ranks [1.5, 1.5, 0, 3] -> [0, 0, -1, 1].
    got = fn(torch.tensor([[1.0, 1.0, 0.0, 2.0]]))
    assert torch.allclose(got, torch.tensor([[0.0, 0.0, -1.0, 1.0]]))
    # Groups are ranked independently; only the order matters, not the scale.
    rewards = torch.tensor([[3.0, 1.0, 2.0], [0.0, 0.0, 100.0], [5.0, 5.0, 5.0]])
    got = fn(rewards, components=None, weights=None, scale_rewards="group")  # extra kwargs are ignored
    expected = torch.tensor([[1.0, -1.0, 0.0], [-0.5, -0.5, 1.0], [0.0, 0.0, 0.0]])
    assert got.shape == rewards.shape
    assert torch.allclose(got, expected)
    # Centred: every group sums to zero.
    assert torch.allclose(got.sum(dim=1), torch.zeros(3))


# --- module:function rewards ----------------------------------------------------------------------


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """Write a module of reward functions into tmp_path and make it importable."""
    name = "rlgen_test_dotted_rewards"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        def batched(samples, bonus=0.0, **_):
            return [float(s["completion"].strip() == str(s["answer"])) + bonus for s in samples]

        def trl_style(prompts, completions, answer, **kwargs):
            return [float(len(c)) if c.strip() == a else -1.0 for c, a in zip(completions, answer)]

        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        yield name
    finally:
        sys.modules.pop(name, None)


SAMPLES = [
    {"prompt": "1+1=", "completion": "2", "answer": "2"},
    {"prompt": "2+2=", "completion": "5", "answer": "4"},
]


def test_dotted_reward_batched(reward_module):
    rewards = RewardSet([RewardSpec(f"{reward_module}:batched")])
    components, valid = rewards.compute(SAMPLES)
    assert valid.all()
    assert components[:, 0].tolist() == [1.0, 0.0]
    # Options reach the function; 'module:function:weight' parses the weight.
    rewards = RewardSet([RewardSpec(f"{reward_module}:batched", options={"bonus": 0.5})])
    assert rewards.compute(SAMPLES)[0][:, 0].tolist() == [1.5, 0.5]
    spec = RewardSpec.parse(f"{reward_module}:batched:0.25")
    assert (spec.name, spec.weight) == (f"{reward_module}:batched", 0.25)


def test_dotted_reward_trl_style(reward_module):
    rewards = RewardSet([RewardSpec(f"{reward_module}:trl_style")])
    components, _ = rewards.compute(SAMPLES)
    assert components[:, 0].tolist() == [1.0, -1.0]


def test_dotted_reward_errors(reward_module):
    with pytest.raises(RlgenError, match="cannot import module"):
        RewardSet([RewardSpec("rlgen_no_such_module_xyz:fn")])
    with pytest.raises(RlgenError, match="has no attribute"):
        RewardSet([RewardSpec(f"{reward_module}:missing")])
    with pytest.raises(RlgenError, match="not callable"):
        RewardSet([RewardSpec(f"{reward_module}:NOT_CALLABLE")])
    with pytest.raises(RlgenError, match="unknown reward"):
        RewardSet([RewardSpec("no-such-reward")])


# --- CLI ------------------------------------------------------------------------------------------


@needs_example
def test_score_cli_with_plugin_reward():
    lines = [
        {"prompt": "2+40=", "completion": "45", "answer": "42"},
        {"prompt": "3+4=", "completion": "7", "answer": "7"},
        {"prompt": "free text", "completion": "hi"},
    ]
    stdin = "".join(json.dumps(r) + "\n" for r in lines)
    proc = rlgen_process("score", "-r", "digit-overlap", "-r", "exact-match", stdin=stdin, check=True)
    out = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert len(out) == 3
    assert [r["reward_digit-overlap"] for r in out] == [0.5, 1.0, None]
    assert [r["reward_exact-match"] for r in out] == [0.0, 1.0, None]
    assert [r["reward"] for r in out] == [0.5, 2.0, 0.0]
    assert out[0]["completion"] == "45"  # the input fields are kept


@needs_example
@pytest.mark.slow
def test_train_grpo_with_plugin_reward_and_estimator(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    rlgen_process(
        "train", "grpo", "--model", str(tiny_model_dir), "--task", "arithmetic",
        "--reward", "digit-overlap", "--reward", "exact-match", "--steps", "2", "--out", str(out),
        "--set", "rollout.prompts_per_step=4", "--set", "rollout.num_generations=4",
        "--set", "rollout.max_new_tokens=8", "--set", "run.eval_every=0", "--set", "algorithm.advantage=rank", "--quiet",
        cwd=tmp_path, check=True,
    )
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert len(metrics) == 2
    for row in metrics:
        assert "rewards/digit-overlap/mean" in row
        assert "rewards/exact-match/mean" in row
    assert "rank" in (out / "config.toml").read_text()

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.num_hidden_layers == 1
