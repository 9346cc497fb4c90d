"""Typed configs: TOML loading, `--set` parsing, errors naming the key, TOML round trip, presets."""
import re
import sys

import pytest

from rlgen.algorithms.grpo import GRPOConfig
from rlgen.cli.train import build_config
from rlgen.config import apply_override, deep_merge, dumps_toml, from_dict, parse_value, read_toml, to_dict
from rlgen.errors import RlgenError
from rlgen.plugins import registry
from rlgen.rewards.base import RewardSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def algo(name="grpo"):
    return registry("algorithm").get(name)


def build(sets=(), name="grpo", config_file=None, flags=None):
    return build_config(algo(name), config_file, list(sets), flags or {}, None)


# --- --set values ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("3", 3),
    ("-2", -2),
    ("1_000", 1000),
    ("0.25", 0.25),
    ("2e-4", 2e-4),
    ("true", True),
    ("false", False),
    ('"quoted"', "quoted"),
    ("'single'", "single"),
    ('"true"', "true"),  # quoted: a string, not a bool
    ("[1, 2, 3]", [1, 2, 3]),
    ('["a", "b"]', ["a", "b"]),
    ("{ name = 'x', weight = 0.5 }", {"name": "x", "weight": 0.5}),
    # not valid TOML -> the plain string
    ("gpt2", "gpt2"),
    ("runs/demo", "runs/demo"),
    ("data.jsonl", "data.jsonl"),
    ("hello world", "hello world"),
    ("[a, b]", "[a, b]"),
])
def test_parse_value(text, expected):
    value = parse_value(text)
    assert value == expected
    assert type(value) is type(expected)


def test_apply_override_nested_and_errors():
    data = {"run": {"steps": 1}}
    apply_override(data, "run.steps=5")
    apply_override(data, "algorithm.epsilon_high = 0.28")  # spaces around '=' are stripped
    apply_override(data, "model.path=org/model=v2")  # only the first '=' splits
    assert data == {"run": {"steps": 5}, "algorithm": {"epsilon_high": 0.28}, "model": {"path": "org/model=v2"}}
    with pytest.raises(RlgenError, match="KEY=VALUE"):
        apply_override(data, "run.steps")
    with pytest.raises(RlgenError, match="KEY=VALUE"):
        apply_override(data, "=3")
    with pytest.raises(RlgenError, match="'run' is not a section"):
        apply_override({"run": 5}, "run.steps=3")


# --- from_dict: conversion and errors naming the key --------------------------------------------------

def test_set_values_reach_the_config():
    cfg = build([
        "run.steps=7",
        "optim.lr=1",  # an int for a float field becomes 1.0
        "algorithm.epsilon_high=0.28",
        "algorithm.dynamic_sampling=true",
        "model.path=gpt2",
        "run.out=runs/x",
        'model.lora_target_modules=["q_proj", "v_proj"]',
    ])
    assert cfg.run.steps == 7 and type(cfg.run.steps) is int
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float
    assert cfg.algorithm.epsilon_high == 0.28
    assert cfg.algorithm.dynamic_sampling is True
    assert cfg.model.path == "gpt2"
    assert cfg.run.out == "runs/x"
    assert cfg.model.lora_target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("assignment, key", [
    ("algorithm.bogus=1", "algorithm.bogus"),
    ("bogus=1", "bogus"),
    ("run.stepz=3", "run.stepz"),
    ("rewards=[{name = 'exact-match', bogus = 1}]", "rewards[0].bogus"),
])
def test_unknown_key_names_the_full_dotted_key(assignment, key):
    with pytest.raises(RlgenError, match=re.escape(f"unknown config key '{key}'")):
        build([assignment])


@pytest.mark.parametrize("assignment, message", [
    ("run.steps=abc", "config key 'run.steps' must be int, got 'abc'"),
    ("run.steps=1.5", "config key 'run.steps' must be int, got 1.5"),
    ("run.steps=true", "config key 'run.steps' must be int, got True"),
    ("optim.lr=fast", "config key 'optim.lr' must be float, got 'fast'"),
    ("algorithm.dynamic_sampling=1", "config key 'algorithm.dynamic_sampling' must be bool, got 1"),
    ("model.path=3", "config key 'model.path' must be str, got 3"),
    ("algorithm.epsilon_high=none", "config key 'algorithm.epsilon_high' must be float or NoneType, got 'none'"),
    ("model.lora_target_modules=[q_proj]", "config key 'model.lora_target_modules' must be a list"),
    ("model.lora_target_modules=[1]", r"config key 'model.lora_target_modules\[0\]' must be str, got 1"),
    ("run=3", "config key 'run' must be a table, got 3"),
    ("rewards=[{weight = 2.0}]", "rewards\\[0\\]"),  # missing the required name
])
def test_wrong_type_names_the_key(assignment, message):
    with pytest.raises(RlgenError, match=message):
        build([assignment])


def test_validation_errors_name_the_key():
    with pytest.raises(RlgenError, match="rollout.num_generations"):
        build(["rollout.num_generations=1"])
    with pytest.raises(RlgenError, match="algorithm.scale_rewards"):
        build(["algorithm.scale_rewards=token"])


def test_optional_fields_accept_values_and_default_to_none():
    cfg = build()
    assert cfg.algorithm.epsilon_high is None and cfg.algorithm.delta is None and cfg.data.path is None
    assert build(["algorithm.delta=2"]).algorithm.delta == 2.0


# --- TOML files --------------------------------------------------------------------------------------

def test_read_toml_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[run]\nsteps = 3\nout = "runs/t"\n\n[[rewards]]\nname = "format"\nweight = 0.2\n')
    assert read_toml(path) == {"run": {"steps": 3, "out": "runs/t"}, "rewards": [{"name": "format", "weight": 0.2}]}
    cfg = build(config_file=str(path))
    assert cfg.run.steps == 3 and cfg.run.out == "runs/t"
    assert cfg.rewards == [RewardSpec("format", 0.2)]


def test_bad_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[run\nsteps = = 3\n")
    with pytest.raises(RlgenError, match=r"bad TOML in .*broken\.toml"):
        read_toml(path)
    with pytest.raises(RlgenError, match=r"broken\.toml"):
        build(config_file=str(path))


def test_missing_toml_names_the_file(tmp_path):
    with pytest.raises(RlgenError, match=r"config file not found: .*nope\.toml"):
        read_toml(tmp_path / "nope.toml")


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[algorithm]\nloss = 'dapo'\n")
    with pytest.raises(RlgenError, match="unknown config key 'algorithm.loss'"):
        build(config_file=str(path))


# --- round trip --------------------------------------------------------------------------------------

def test_dumps_toml_round_trips_grpo_config():
    cfg = from_dict(GRPOConfig, {})
    cfg.rewards = [
        RewardSpec("exact-match"),
        RewardSpec("format", 0.2, {"pattern": r"\d+ \"q\"\t"}),
        RewardSpec("pkg.mod:fn", -0.01),
    ]
    cfg.algorithm.epsilon_high = 0.28
    cfg.algorithm.delta = None
    cfg.run.out = "runs/round trip"
    cfg.optim.lr = 1e-5
    text = dumps_toml(to_dict(cfg))
    loaded = tomllib.loads(text)
    # None is not written: the key is absent and comes back as the default
    assert "delta" not in loaded["algorithm"] and "path" not in loaded["data"]
    assert loaded["algorithm"]["epsilon_high"] == 0.28
    assert "[[rewards]]" in text and len(loaded["rewards"]) == 3
    back = from_dict(GRPOConfig, loaded)
    assert back == cfg
    assert back.algorithm.delta is None and back.data.path is None
    assert back.rewards[1].options == {"pattern": r"\d+ \"q\"\t"}
    assert back.rewards[2] == RewardSpec("pkg.mod:fn", -0.01)


def test_dumps_toml_escapes_control_characters():
    # TOML basic strings may not hold raw control characters (other than tab); they must be escaped
    data = {"a": "x\ry\x00z\x7f \\ \"q\" \n\t é", "b": ["\r"], "c": {"d": "\x1b[0m"}}
    assert tomllib.loads(dumps_toml(data)) == data


def test_dumps_toml_preset_config_round_trips():
    cfg = build(name="dapo")
    assert from_dict(GRPOConfig, tomllib.loads(dumps_toml(to_dict(cfg)))) == cfg


# --- presets and precedence --------------------------------------------------------------------------

def test_preset_defaults_applied():
    cfg = build(name="dapo")
    # the dapo preset: {'loss_type': 'dapo', 'epsilon': 0.2, 'epsilon_high': 0.28, 'dynamic_sampling': True,
    #                   'overlong_buffer': -1 (a quarter of max_new_tokens), 'mask_truncated_completions': True}
    a = cfg.algorithm
    assert (a.loss_type, a.epsilon, a.epsilon_high, a.dynamic_sampling, a.overlong_buffer,
            a.mask_truncated_completions) == ("dapo", 0.2, 0.28, True, -1, True)
    # the plain grpo algorithm has no preset: epsilon_high stays None
    assert build().algorithm.epsilon_high is None
    assert build(name="dr-grpo").algorithm.scale_rewards == "none"
    assert build(name="cispo").algorithm.epsilon_high == 5.0


def test_user_set_overrides_preset_and_does_not_leak():
    dapo = algo("dapo")
    before = {k: dict(v) for k, v in dapo.defaults.items()}
    cfg = build(["algorithm.epsilon_high=0.3", "algorithm.dynamic_sampling=false"], name="dapo")
    assert cfg.algorithm.epsilon_high == 0.3
    assert cfg.algorithm.dynamic_sampling is False
    assert cfg.algorithm.overlong_buffer == -1  # the rest of the preset still applies
    # the registered preset itself is unchanged, so the next build sees the preset again
    assert dapo.defaults == before
    assert build(name="dapo").algorithm.epsilon_high == 0.28


def test_precedence_preset_file_flags_set(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[algorithm]\nepsilon_high = 0.25\n\n[run]\nsteps = 10\nseed = 1\nout = 'runs/file'\n")
    flags = {"run.steps": 20, "run.seed": None, "model.path": "tiny"}
    cfg = build(["run.steps=30"], name="dapo", config_file=str(path), flags=flags)
    assert cfg.algorithm.epsilon_high == 0.25  # file over preset
    assert cfg.algorithm.overlong_buffer == -1  # preset kept where the file is silent
    assert cfg.run.seed == 1  # a None flag is "not given"
    assert cfg.run.steps == 30  # --set over flag over file
    assert cfg.run.out == "runs/file"
    assert cfg.model.path == "tiny"
    assert algo("dapo").defaults["algorithm"]["epsilon_high"] == 0.28


def test_flag_for_unknown_section():
    with pytest.raises(RlgenError, match="no 'bogus' settings"):
        build(flags={"bogus.key": 1})


def test_rewards_flag_replaces_the_list():
    cfg = build(flags={"rewards": [{"name": "format", "weight": 0.2, "options": {}}]})
    assert cfg.rewards == [RewardSpec("format", 0.2)]


def test_deep_merge_copies():
    base = {"a": {"x": 1, "y": [1]}, "b": 2}
    extra = {"a": {"y": [2]}, "c": {"z": 3}}
    out = deep_merge(base, extra)
    assert out == {"a": {"x": 1, "y": [2]}, "b": 2, "c": {"z": 3}}
    out["a"]["x"] = 99
    out["c"]["z"] = 99
    assert base == {"a": {"x": 1, "y": [1]}, "b": 2} and extra == {"a": {"y": [2]}, "c": {"z": 3}}


# --- RewardSpec.parse --------------------------------------------------------------------------------

@pytest.mark.parametrize("text, name, weight", [
    ("exact-match", "exact-match", 1.0),
    ("format:0.2", "format", 0.2),
    ("length:-0.01", "length", -0.01),
    ("countdown:2", "countdown", 2.0),
    ("pkg.mod:fn", "pkg.mod:fn", 1.0),
    ("pkg.mod:fn:0.5", "pkg.mod:fn", 0.5),
])
def test_reward_spec_parse(text, name, weight):
    spec = RewardSpec.parse(text)
    assert spec.name == name
    assert spec.weight == weight
    assert spec.options == {}


def test_model_recommended_settings_sit_below_everything_explicit(tmp_path):
    """A model directory's rlgen_defaults.toml fills in what the user did not set, for its family only."""
    from rlgen.models.char_tokenizer import build_char_tokenizer

    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "rlgen_defaults.toml").write_text(
        "[grpo.optim]\nlr = 0.5\n[grpo.rollout]\nmax_new_tokens = 7\n[sft.optim]\nlr = 0.25\n"
    )
    grpo = registry("algorithm").get("grpo")
    cfg = build_config(grpo, None, [], {"model.path": str(model_dir)}, None)
    assert (cfg.optim.lr, cfg.rollout.max_new_tokens) == (0.5, 7)
    cfg = build_config(grpo, None, ["optim.lr=0.125"], {"model.path": str(model_dir)}, None)
    assert (cfg.optim.lr, cfg.rollout.max_new_tokens) == (0.125, 7)
    dapo = registry("algorithm").get("dapo")  # a preset of the grpo family gets them too
    assert build_config(dapo, None, [], {"model.path": str(model_dir)}, None).optim.lr == 0.5
    sft = registry("algorithm").get("sft")
    assert build_config(sft, None, [], {"model.path": str(model_dir)}, None).optim.lr == 0.25
    # a plain directory without recommendations keeps the algorithm's own defaults (TRL's GRPO lr)
    (model_dir / "rlgen_defaults.toml").unlink()
    assert build_config(grpo, None, [], {"model.path": str(model_dir)}, None).optim.lr == 1e-6
    del build_char_tokenizer


def test_bad_model_recommendations_name_the_file(tmp_path):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "rlgen_defaults.toml").write_text("[grpo.optim]\nlrr = 1\n")
    with pytest.raises(RlgenError, match=r"rlgen_defaults.toml \[grpo\]: unknown config key 'optim.lrr'"):
        build_config(registry("algorithm").get("grpo"), None, [], {"model.path": str(model_dir)}, None)
