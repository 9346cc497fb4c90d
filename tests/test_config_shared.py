"""Configs from shared sections (issue 14, item 7): one base train config, `algorithm` as every trainer's
section, one name per concept (old names upgraded with one warning line, old run dirs resume), closed
choices typed, registry names checked at load time, and every key documented."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from cli_helpers import rlgen as run_rlgen

import rlgen
from rlgen.algorithms.diffusion.policy_gradient import DiffusionPGConfig
from rlgen.algorithms.diffusion.reward_backprop import RewardBackpropConfig
from rlgen.algorithms.grpo import GRPOConfig
from rlgen.algorithms.sft import SFTConfig
from rlgen.config import (
    RENAMED_KEYS,
    deep_merge,
    dumps_toml,
    field_type,
    from_dict,
    loads_toml,
    to_dict,
    upgrade_keys,
)
from rlgen.errors import RlgenError
from rlgen.models.causal_lm import ModelConfig
from rlgen.plugins import registry
from rlgen.training.config import DataConfig, OptimConfig, RunConfig, TrainConfig

BUILTIN = [e.name for e in registry("algorithm") if e.provider == "rlgen"]
WARNING = re.compile(r"^rlgen: warning: config key '(?P<old>[^']+)'(?: \(in (?P<source>.+)\))? is deprecated, use '(?P<new>[^']+)'$")


def load(name: str, data: dict):
    algorithm = registry("algorithm").get(name)
    return from_dict(algorithm.config_cls, deep_merge(algorithm.defaults, data))


def warnings_of(err: str) -> list[tuple[str, str]]:
    """(old, new) of each deprecation line; any other stderr line fails the test."""
    found = []
    for line in err.splitlines():
        match = WARNING.match(line)
        assert match, f"unexpected stderr line: {line!r}"
        found.append((match["old"], match["new"]))
    return found


# --- one base config --------------------------------------------------------------------------------------

def test_every_builtin_config_builds_on_the_shared_sections():
    assert "sft" in BUILTIN and "ddpo" in BUILTIN and len(BUILTIN) >= 20
    for name in BUILTIN:
        cls = registry("algorithm").get(name).config_cls
        config = cls()
        assert issubclass(cls, TrainConfig), name
        assert type(config.optim) is OptimConfig and type(config.run) is RunConfig, name
        assert isinstance(config.model, ModelConfig), name
        assert [f.name for f in dataclasses.fields(cls)][:4] == ["model", "data", "optim", "run"], name
        assert "algorithm" in {f.name for f in dataclasses.fields(cls)}, f"{name}: every trainer's own section is [algorithm]"


def test_each_algorithm_keeps_its_own_defaults():
    assert GRPOConfig().optim.lr == 1e-6 and GRPOConfig().run.out == "runs/grpo"  # TRL's GRPO default
    assert SFTConfig().optim.lr == 2e-5 and SFTConfig().run.steps == 200  # TRL's SFT default
    assert DiffusionPGConfig().optim.lr == 3e-4 and DiffusionPGConfig().optim.weight_decay == 1e-4
    assert OptimConfig().lr == 1e-5
    assert load("online-dpo", {}).rollout.num_generations == 4 and GRPOConfig().rollout.num_generations == 8
    assert RewardBackpropConfig().rollout.num_generations == 4 and DiffusionPGConfig().rollout.num_generations == 8
    assert RewardBackpropConfig().sampling.eta == 0.0 and DiffusionPGConfig().sampling.eta == 1.0
    # a partly given section keeps the algorithm's own defaults for the keys it leaves out
    assert load("grpo", {"optim": {"weight_decay": 0.1}}).optim.lr == 1e-6
    assert isinstance(DataConfig(), DataConfig) and DiffusionPGConfig().data.task == "digits"


def test_one_name_per_concept_across_text_and_images():
    """The group size and the PPO clip are spelled alike in every trainer that has them."""
    for name in BUILTIN:
        cls = registry("algorithm").get(name).config_cls
        for old in ("rollout.images_per_prompt", "eval.images_per_prompt", "algorithm.clip_range",
                    "algorithm.images_per_prompt", "algorithm.prompts_per_step"):
            assert field_type(cls, old) is None, f"{name} still has {old}"
        assert field_type(cls, "sft") is None
    for name in ("grpo", "online-dpo", "ddpo", "flow-grpo", "reward-backprop"):
        cls = registry("algorithm").get(name).config_cls
        assert field_type(cls, "rollout.num_generations") is int and field_type(cls, "rollout.prompts_per_step") is int
    for name in ("grpo", "ddpo"):
        assert field_type(registry("algorithm").get(name).config_cls, "algorithm.epsilon") is float


# --- renamed keys -----------------------------------------------------------------------------------------

RENAMES = [
    # (algorithm, old-style dict, the same with the new names, attribute path, expected value)
    ("sft", {"sft": {"batch_size": 4, "max_new_tokens": 9}}, {"algorithm": {"batch_size": 4, "max_new_tokens": 9}},
     "algorithm.batch_size", 4),
    ("ddpo", {"rollout": {"images_per_prompt": 3}}, {"rollout": {"num_generations": 3}}, "rollout.num_generations", 3),
    ("flow-grpo", {"eval": {"images_per_prompt": 2}}, {"eval": {"num_generations": 2}}, "eval.num_generations", 2),
    ("ddpo", {"algorithm": {"clip_range": 0.3}}, {"algorithm": {"epsilon": 0.3}}, "algorithm.epsilon", 0.3),
    ("reward-backprop", {"algorithm": {"prompts_per_step": 3, "images_per_prompt": 2, "backprop_steps": 2}},
     {"rollout": {"prompts_per_step": 3, "num_generations": 2}, "algorithm": {"backprop_steps": 2}},
     "rollout.prompts_per_step", 3),
]


@pytest.mark.parametrize("name, old, new, path, value", RENAMES)
def test_an_old_name_gives_the_same_config_and_one_warning_per_key(name, old, new, path, value, capsys):
    upgraded = load(name, old)
    err = capsys.readouterr().err
    assert upgraded == load(name, new)
    target = upgraded
    for part in path.split("."):
        target = getattr(target, part)
    assert target == value
    expected = [(f"{section}.{key}", RENAMED_KEYS.get(f"{section}.{key}") or f"{RENAMED_KEYS[section]}.{key}")
                for section, keys in old.items() for key in keys
                if f"{section}.{key}" in RENAMED_KEYS or section in RENAMED_KEYS]
    assert sorted(warnings_of(err)) == sorted(expected)
    assert capsys.readouterr().err == ""  # the new names: no warning
    load(name, new)
    assert capsys.readouterr().err == ""


def test_the_rename_table_maps_old_names_to_keys_that_exist():
    classes = [registry("algorithm").get(n).config_cls for n in BUILTIN]
    for old, new in RENAMED_KEYS.items():
        assert any(field_type(cls, new) is not None for cls in classes), new
        assert all(field_type(cls, old) is None for cls in classes), old


def test_an_old_and_a_new_name_with_different_values_is_one_error():
    with pytest.raises(RlgenError, match=r"^config keys 'algorithm\.clip_range' \(deprecated\) and 'algorithm\.epsilon' "
                                         r"have different values: give only 'algorithm\.epsilon'$"):
        load("ddpo", {"algorithm": {"clip_range": 0.3, "epsilon": 0.2}})
    assert load("ddpo", {"algorithm": {"clip_range": 0.3, "epsilon": 0.3}}).algorithm.epsilon == 0.3


def test_a_section_of_another_trainer_is_not_renamed():
    # GRPO has no SFT keys: [sft] stays an unknown section rather than becoming unknown algorithm keys
    with pytest.raises(RlgenError, match=r"unknown config key 'sft'"):
        load("grpo", {"sft": {"batch_size": 4}})
    # SFT's [sft] with a typo is reported under its new name
    with pytest.raises(RlgenError, match=r"unknown config key 'algorithm\.batch_sise'"):
        load("sft", {"sft": {"batch_size": 4, "batch_sise": 5}})


def test_old_names_from_every_source_of_load_config(tmp_path, capsys):
    """A TOML file, --set, and a model's rlgen_defaults.toml; each warning names its source, and each
    source keeps its precedence (tiny-arith recommends algorithm.batch_size = 64 for sft)."""
    assert rlgen.load_config("sft").algorithm.batch_size == 64
    capsys.readouterr()
    assert rlgen.load_config("sft", sets=["sft.batch_size=4"]).algorithm.batch_size == 4
    assert warnings_of(capsys.readouterr().err) == [("sft.batch_size", "algorithm.batch_size")]
    toml = tmp_path / "old.toml"
    toml.write_text("[sft]\nbatch_size = 5\ncompletion_only_loss = false\n")
    config = rlgen.load_config("sft", toml)
    assert (config.algorithm.batch_size, config.algorithm.completion_only_loss) == (5, False)
    err = capsys.readouterr().err
    assert sorted(warnings_of(err)) == [("sft.batch_size", "algorithm.batch_size"),
                                        ("sft.completion_only_loss", "algorithm.completion_only_loss")]
    assert f"(in {toml})" in err
    # --set with the new name wins over the same file's old name
    assert rlgen.load_config("sft", toml, sets=["algorithm.batch_size=6"]).algorithm.batch_size == 6
    capsys.readouterr()


def test_old_names_in_a_models_recommended_settings(tmp_path, capsys):
    model = tmp_path / "model"
    builtin = Path(rlgen.__file__).parent / "builtin_models" / "tiny-arith"
    model.mkdir()
    for item in builtin.iterdir():
        (model / item.name).write_bytes(item.read_bytes())
    (model / "rlgen_defaults.toml").write_text("[sft.sft]\nbatch_size = 7\n")
    assert rlgen.load_config("sft", model=str(model)).algorithm.batch_size == 7
    err = capsys.readouterr().err
    assert warnings_of(err) == [("sft.batch_size", "algorithm.batch_size")]
    assert "rlgen_defaults.toml [sft]" in err


def test_an_image_run_dir_with_old_names_loads_for_resume(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    text = dumps_toml(to_dict(load("ddpo", {"rollout": {"num_generations": 3}, "algorithm": {"epsilon": 0.01},
                                            "eval": {"num_generations": 2}})))
    old = (text.replace("num_generations = 3", "images_per_prompt = 3").replace("epsilon = 0.01", "clip_range = 0.01")
           .replace("num_generations = 2", "images_per_prompt = 2"))
    assert old != text
    (run / "config.toml").write_text(old)
    config = rlgen.load_config("ddpo", resume=run)
    assert (config.rollout.num_generations, config.algorithm.epsilon, config.eval.num_generations) == (3, 0.01, 2)
    assert len(warnings_of(capsys.readouterr().err)) == 3


def test_a_text_run_dir_with_old_names_resumes(tmp_path):
    run = tmp_path / "run"
    common = ["--set", "run.threads=1", "--set", "run.eval_every=0", "--set", "data.eval_samples=0", "--quiet"]
    code, _, err = run_rlgen("train", "sft", "--out", run, "--steps", 2, "--save-every", 1,
                             "--set", "algorithm.batch_size=4", *common)
    assert code == 0, err
    saved = (run / "config.toml").read_text()
    assert "\n[algorithm]\nbatch_size = 4\n" in saved
    (run / "config.toml").write_text(saved.replace("\n[algorithm]\n", "\n[sft]\n"))  # as rlgen wrote it before
    code, _, err = run_rlgen("train", "sft", "--resume", run, "--steps", 3, "--quiet")
    assert code == 0, err
    assert warnings_of(err) == [(f"sft.{key}", f"algorithm.{key}") for key in
                                ("batch_size", "completion_only_loss", "completion_field", "max_new_tokens")]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert "\n[algorithm]\nbatch_size = 4\n" in (run / "config.toml").read_text()  # rewritten with the new names


# --- closed choices and registry names ----------------------------------------------------------------------

def test_closed_choices_are_literal_types_matching_the_code():
    from rlgen import kernels
    from rlgen.algorithms.grpo import GRPOAlgoConfig
    from rlgen.algorithms.losses import KL_ESTIMATORS
    from rlgen.algorithms.reward_modeling import RewardAlgoConfig
    from rlgen.models.reward_model import HEADS

    assert field_type(RunConfig, "kernels").__args__ == tuple(kernels.MODES)
    assert field_type(RewardAlgoConfig, "head").__args__ == tuple(HEADS)
    assert set(field_type(GRPOAlgoConfig, "kl_estimator").__args__) == set(KL_ESTIMATORS)
    with pytest.raises(RlgenError, match=r"^config key 'optim\.lr_scheduler' must be one of 'constant' \| 'linear' \| "
                                         r"'cosine', got 'cosin'$"):
        load("sft", {"optim": {"lr_scheduler": "cosin"}})
    with pytest.raises(RlgenError, match=r"^config key 'algorithm\.scale_rewards' must be one of 'group' \| 'batch' \| 'none'"):
        load("ddpo", {"algorithm": {"scale_rewards": "global"}})
    with pytest.raises(RlgenError, match=r"^config key 'rewards_on_error' must be one of 'raise' \| 'skip'"):
        load("grpo", {"rewards_on_error": "ignore"})


UNKNOWN_NAMES = [
    ("grpo", {"algorithm": {"advantage": "grp"}}, "algorithm.advantage", "advantage-estimator 'grp'", "rloo"),
    ("dapo", {"algorithm": {"loss_type": "dapoo"}}, "algorithm.loss_type", "policy-loss 'dapoo'", "dr_grpo"),
    ("dpo", {"algorithm": {"loss_type": "sigmod"}}, "algorithm.loss_type", "preference-loss 'sigmod'", "sigmoid"),
    ("online-dpo", {"algorithm": {"loss_type": "hing"}}, "algorithm.loss_type", "preference-loss 'hing'", "hinge"),
    ("grpo", {"rewards": [{"name": "exact-match"}, {"name": "lenght"}]}, r"rewards\[1\]\.name", "reward 'lenght'", "length"),
    ("grpo", {"reward_combine": "minimum"}, "reward_combine", "reward-combiner 'minimum'", "weighted-sum"),
    ("grpo", {"reward_shaping": "centre"}, "reward_shaping", "reward-shaping 'centre'", "center"),
    ("grpo", {"data": {"task": "arithmetics"}}, r"data\.task", "task 'arithmetics'", "arithmetic"),
    ("kto", {"data": {"task": "arith"}}, r"data\.task", "task 'arith'", "arithmetic"),
    ("flow-grpo", {"algorithm": {"advantage": "rlo"}}, "algorithm.advantage", "advantage-estimator 'rlo'", "grpo"),
    ("ddpo", {"rewards": [{"name": "digit-clasifier"}]}, r"rewards\[0\]\.name", "reward 'digit-clasifier'", "digit-classifier"),
    ("diffusion-sft", {"data": {"eval_task": "digit"}}, r"data\.eval_task", "task 'digit'", "digits"),
    ("diffusion-dpo", {"data": {"task": "digit"}}, r"data\.task", "task 'digit'", "digits"),
]


@pytest.mark.parametrize("name, data, key, what, known", UNKNOWN_NAMES)
def test_unknown_registry_names_fail_at_load_with_one_line(name, data, key, what, known):
    with pytest.raises(RlgenError) as info:
        load(name, data)
    message = str(info.value)
    assert "\n" not in message
    assert re.match(rf"^config key '{key}': unknown {re.escape(what)} \(known: .*\b{re.escape(known)}\b.*\)$", message), message


def test_names_that_are_not_registry_names_are_accepted():
    assert load("ddpo", {}).algorithm.advantage == "per-prompt"  # DDPO's stat tracker
    assert load("grpo", {"rewards": [{"name": "my.module:fn"}, {"name": "rm:/some/dir"}]}).rewards[1].name == "rm:/some/dir"
    assert load("grpo", {"data": {"task": "nope", "path": "x.jsonl"}}).data.path == "x.jsonl"  # task ignored with a path
    assert load("grpo", {"reward_combine": "mean-minus-std:k=0.5", "reward_shaping": "clip:low=0,high=1"}).reward_shaping


# --- every key documented: `rlgen config show` ---------------------------------------------------------------

def _keys(value, prefix=""):
    """Every dotted key of a config, walked independently of config_docs."""
    keys = []
    for field in dataclasses.fields(value):
        item = getattr(value, field.name)
        if dataclasses.is_dataclass(item):
            keys += _keys(item, f"{prefix}{field.name}.")
        else:
            keys.append(f"{prefix}{field.name}")
    return keys


@pytest.mark.parametrize("name", BUILTIN)
def test_config_show_covers_every_key_with_a_doc(name):
    from rlgen.training.config_docs import (
        algorithm_defaults,
        describe_config,
        undocumented,
    )

    config = algorithm_defaults(registry("algorithm").get(name))
    rows = describe_config(config)
    assert set(_keys(config)) <= {r.key for r in rows}
    assert undocumented(config) == []
    assert all("\n" not in r.doc for r in rows)


@pytest.mark.parametrize("name", BUILTIN)
def test_config_show_toml_is_complete_and_loads_back(name):
    from rlgen.training.config_docs import algorithm_defaults, config_toml

    algorithm = registry("algorithm").get(name)
    config = algorithm_defaults(algorithm)
    text = config_toml(config)
    assert from_dict(algorithm.config_cls, loads_toml(text)) == config
    written = set(re.findall(r"^(?:# )?([a-z_0-9]+) = |^\[\[([a-z_0-9]+)\]\]$", text, flags=re.M))
    written = {key for pair in written for key in pair if key}
    assert {key.rsplit(".", 1)[-1] for key in _keys(config)} <= written


def test_config_show_hand_checked_values():
    from rlgen.training.config_docs import (
        algorithm_defaults,
        config_toml,
        describe_config,
    )

    dapo = algorithm_defaults(registry("algorithm").get("dapo"))
    rows = {r.key: r for r in describe_config(dapo)}
    assert (rows["algorithm.epsilon_high"].default, rows["algorithm.epsilon_high"].type) == (0.28, "float or unset")  # the preset
    assert (rows["algorithm.delta"].default, rows["optim.lr"].default) == (None, 1e-6)
    assert rows["algorithm.scale_rewards"].type == "'group' | 'batch' | 'none'"
    assert rows["rewards[].name"].default == "(required)" and rows["rewards[].weight"].default == 1.0
    text = config_toml(dapo)
    assert "\nepsilon_high = 0.28\n" in text and "\n# delta = ... (unset)\n" in text
    assert "# upper clip (DAPO clip-higher 0.28; CISPO's epsilon_max 5.0); unset = epsilon (float or unset)\n" in text
    assert '\n[[rewards]]\nname = "exact-match"\nweight = 1.0\noptions = {}\n' in text


def _config_cli(*args):
    import typer
    from typer.testing import CliRunner

    from rlgen.cli import config_cmd

    app = typer.Typer()

    @app.callback()
    def root():
        pass

    config_cmd.register(app)
    return CliRunner().invoke(app, ["config", *args])


def test_config_show_command():
    table = _config_cli("show", "grpo")
    assert table.exit_code == 0, table.output
    line = next(line for line in table.output.splitlines() if line.strip().startswith("algorithm.epsilon "))
    assert line.split()[:3] == ["algorithm.epsilon", "float", "0.2"] and "PPO clip" in line
    as_json = _config_cli("show", "flow-grpo", "--json")
    rows = {row["key"]: row for row in json.loads(as_json.output)}
    assert rows["rollout.num_generations"] == {"key": "rollout.num_generations", "type": "int", "default": 8,
                                               "doc": "samples per prompt: the group size (TRL's num_generations)"}
    assert rows["model.path"]["default"] == "tiny-digits-flow"  # the preset
    toml = _config_cli("show", "sft", "--toml")
    # the values `rlgen train sft` starts from: the class defaults with tiny-arith's recommended settings on top
    from rlgen.api import load_config

    assert from_dict(SFTConfig, loads_toml(toml.output)) == load_config("sft")
    assert toml.output.startswith("# rlgen train sft: the default config (SFTConfig)\n")
    unknown = _config_cli("show", "grpoo")
    assert unknown.exit_code != 0 and "unknown algorithm 'grpoo'" in str(unknown.exception)


# --- the run dir's config.toml, and one TOML reader ---------------------------------------------------------

def test_run_dir_config_lists_every_key_and_loads_back():
    config = load("grpo", {})
    text = dumps_toml(to_dict(config))
    assert "\n# epsilon_high = ... (unset)\n# delta = ... (unset)\n" in text and "\n# path = ... (unset)\n" in text
    assert from_dict(GRPOConfig, loads_toml(text)) == config
    written = set(re.findall(r"^(?:# )?([a-z_0-9]+) = |^\[\[([a-z_0-9]+)\]\]$", text, flags=re.M))
    written = {key for pair in written for key in pair if key}
    assert {key.rsplit(".", 1)[-1] for key in _keys(config)} <= written


def test_upgrade_keys_leaves_the_input_alone():
    data = {"sft": {"batch_size": 4}}
    assert upgrade_keys(SFTConfig, data) == {"algorithm": {"batch_size": 4}}
    assert data == {"sft": {"batch_size": 4}}


def test_all_toml_reading_goes_through_rlgen_config():
    root = Path(rlgen.__file__).parent
    offenders = [str(path.relative_to(root)) for path in root.rglob("*.py") if path != root / "config.py"
                 and re.search(r"^\s*(import tomllib|import tomli|from tomllib|from tomli)\b", path.read_text(), flags=re.M)]
    assert offenders == []
