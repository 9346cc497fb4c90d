"""Value checks (issue 13, items 15 and 17): every config value and every numeric option of sample / eval is
range-checked before any model loads (one line naming the key or flag, exit 2), and a prompt plus
max_new_tokens beyond the model's context is one line in sample, eval and SFT, as it is in GRPO."""
from __future__ import annotations

import dataclasses
import json
import typing

import pytest

from cli_helpers import rlgen
from rlgen.cli.train import build_config
from rlgen.config import Bounds, check_value, read_toml
from rlgen.errors import RlgenError
from rlgen.plugins import registry


def build(name: str, sets=(), flags=None, config_file=None):
    return build_config(registry("algorithm").get(name), config_file, list(sets), flags or {}, None)




def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("rlgen: error: "), err
    assert "Traceback" not in err
    return lines[0]


# --- item 15: config values, whichever way they arrive ------------------------------------------------

@pytest.mark.parametrize("name, assignment, message", [
    ("grpo", "optim.lr=nan", "optim.lr = nan: must be a finite number > 0"),
    ("grpo", "optim.lr=0", "optim.lr = 0.0: must be a finite number > 0"),
    ("grpo", "optim.lr=-1e-5", "optim.lr = -1e-05: must be a finite number > 0"),
    ("grpo", "optim.lr=1e400", "optim.lr = inf: must be a finite number > 0"),  # TOML reads 1e400 as inf
    ("sft", "optim.max_grad_norm=inf", "optim.max_grad_norm = inf: must be a finite number >= 0"),
    ("sft", "optim.max_grad_norm=-1", "optim.max_grad_norm = -1.0: must be a finite number >= 0"),
    ("sft", "optim.adam_beta2=1.0", "optim.adam_beta2 = 1.0: must be a finite number in [0, 1)"),
    ("sft", "optim.weight_decay=nan", "optim.weight_decay = nan: must be a finite number >= 0"),
    ("sft", "optim.warmup_steps=-1", "optim.warmup_steps = -1: must be an integer >= 0"),
    ("grpo", "rollout.temperature=nan", "rollout.temperature = nan: must be a finite number >= 0"),
    ("grpo", "rollout.top_p=0", "rollout.top_p = 0.0: must be a finite number in (0, 1]"),
    ("grpo", "rollout.top_p=1.5", "rollout.top_p = 1.5: must be a finite number in (0, 1]"),
    ("grpo", "rollout.top_k=-1", "rollout.top_k = -1: must be an integer >= 0"),
    ("grpo", "algorithm.beta=-0.1", "algorithm.beta = -0.1: must be a finite number >= 0"),
    ("grpo", "algorithm.epsilon=nan", "algorithm.epsilon = nan: must be a finite number >= 0"),
    ("grpo", "run.eval_every=-1", "run.eval_every = -1: must be an integer >= 0"),
    ("grpo", "run.save_every=-5", "run.save_every = -5: must be an integer >= 0"),
    ("grpo", "run.keep_checkpoints=-1", "run.keep_checkpoints = -1: must be an integer >= 0"),
    ("grpo", "run.threads=-2", "run.threads = -2: must be an integer in [0, 1024]"),
    ("grpo", "run.threads=1000000", "run.threads = 1000000: must be an integer in [0, 1024]"),  # torch crashes later
    ("grpo", "run.seed=-1", "run.seed = -1: must be an integer in [0, 4294967295]"),
    ("grpo", "run.seed=99999999999999999999", "run.seed = 99999999999999999999: must be an integer in [0, 4294967295]"),
    ("grpo", "data.eval_samples=-3", "data.eval_samples = -3: must be an integer >= 0"),
    ("grpo", "rewards=[{name='exact-match', weight=nan}]", "rewards[0].weight = nan: must be a finite number"),
    ("sft", "algorithm.max_new_tokens=0", "algorithm.max_new_tokens = 0: must be an integer >= 1"),
    ("sft", "model.lora_dropout=1.0", "model.lora_dropout = 1.0: must be a finite number in [0, 1)"),
    ("dpo", "algorithm.beta=nan", "algorithm.beta = nan: must be a finite number >= 0"),  # `beta <= 0` let NaN by
    ("dpo", "algorithm.max_new_tokens=-1", "algorithm.max_new_tokens = -1: must be an integer >= 1"),
    ("kto", "algorithm.desirable_weight=nan", "algorithm.desirable_weight = nan: must be a finite number >= 0"),
    ("rm", "algorithm.center_rewards_coefficient=-1", "algorithm.center_rewards_coefficient = -1.0: must be a finite number >= 0"),
    ("ddpo", "sampling.eta=nan", "sampling.eta = nan: must be a finite number >= 0"),
    ("ddpo", "sampling.num_steps=0", "sampling.num_steps = 0: must be an integer >= 1"),
    ("ddpo", "eval.seed=-4", "eval.seed = -4: must be an integer in [0, 4294967295]"),
    ("flow-grpo", "sampling.noise_level=-0.5", "sampling.noise_level = -0.5: must be a finite number >= 0"),
    ("diffusion-dpo", "algorithm.beta=0", "algorithm.beta = 0.0: must be a finite number > 0"),
    ("diffusion-sft", "data.label_noise=2", "data.label_noise = 2.0: must be a finite number in [0, 1]"),
    ("reward-backprop", "algorithm.reward_target=inf", "algorithm.reward_target = inf: must be a finite number"),
])
def test_set_value_out_of_range_names_the_key(name, assignment, message):
    with pytest.raises(RlgenError) as info:
        build(name, [assignment])
    assert str(info.value) == message


def test_flags_and_toml_go_through_the_same_check(tmp_path):
    with pytest.raises(RlgenError, match=r"^run\.save_every = -1: must be an integer >= 0$"):
        build("grpo", flags={"run.save_every": -1})  # --save-every -1
    with pytest.raises(RlgenError, match=r"^run\.seed = -7: must be an integer"):
        build("grpo", flags={"run.seed": -7})  # --seed -7
    toml = tmp_path / "run.toml"
    toml.write_text("[optim]\nlr = nan\n")
    with pytest.raises(RlgenError, match=r"^optim\.lr = nan: must be a finite number > 0$"):
        build("sft", config_file=toml)


def test_a_models_recommended_settings_are_checked_too(tmp_path):
    import shutil

    from rlgen.models.causal_lm import resolve_model_path

    model = tmp_path / "model"
    shutil.copytree(resolve_model_path("tiny-arith"), model)
    (model / "rlgen_defaults.toml").write_text("[grpo.optim]\nlr = -0.5\n")
    with pytest.raises(RlgenError, match=r"rlgen_defaults.toml \[grpo\]: optim\.lr = -0\.5: must be a finite number > 0"):
        build("grpo", flags={"model.path": str(model)})


def test_an_integer_too_large_for_a_float_is_an_error_not_a_crash():
    with pytest.raises(RlgenError, match=r"^optim\.lr = 9{20}.*must be a finite number"):
        build("grpo", ["optim.lr=" + "9" * 400])


def test_error_messages_cut_long_user_values():
    with pytest.raises(RlgenError) as info:
        build("grpo", ["optim.lr=" + "9" * 400])
    assert len(str(info.value)) < 300
    with pytest.raises(RlgenError) as info:
        build("grpo", ["run.steps=" + "x" * 5000])
    assert len(str(info.value)) < 300 and "5002 characters" in str(info.value)


def test_toml_with_over_long_integers_or_deep_nesting_is_one_error(tmp_path):
    huge = tmp_path / "huge.toml"
    huge.write_text("[run]\nseed = " + "9" * 5000 + "\n")
    with pytest.raises(RlgenError, match="bad TOML in .*huge.toml"):
        read_toml(huge)
    deep = tmp_path / "deep.toml"
    deep.write_text("v = " + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(RlgenError, match="bad TOML in .*deep.toml: .*nested too deeply"):
        read_toml(deep)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"lr = 1\n\xff\xfe\n")
    with pytest.raises(RlgenError, match="bad TOML in .*binary.toml: not UTF-8"):
        read_toml(binary)


def _float_fields(config_cls) -> list[str]:
    """`section.key` of every float (or optional float) field one level down in an algorithm's config."""
    keys = []
    for section in dataclasses.fields(config_cls):
        section_type = typing.get_type_hints(config_cls)[section.name]
        if not dataclasses.is_dataclass(section_type):
            continue
        for key, tp in typing.get_type_hints(section_type).items():
            if tp is float or (float in typing.get_args(tp) and str not in typing.get_args(tp)):
                keys.append(f"{section.name}.{key}")
    return keys


@pytest.mark.parametrize("name", ["sft", "grpo", "dpo", "kto", "online-dpo", "rm", "ddpo", "flow-grpo",
                                  "reward-backprop", "diffusion-dpo", "diffusion-sft"])
def test_every_float_of_every_algorithm_rejects_nan_and_inf_and_defaults_pass(name):
    build(name)  # the defaults (and the default model's recommended settings) are all in range
    keys = _float_fields(registry("algorithm").get(name).config_cls)
    assert "optim.lr" in keys
    for key in keys:
        for bad in ("nan", "inf", "-inf"):
            with pytest.raises(RlgenError, match=rf"^{key.replace('.', '[.]')} = {bad}: must be a finite number"):
                build(name, [f"{key}={bad}"])


def test_bounds_describe_and_hold():
    assert Bounds(0, 1, low_open=True).describe(False) == "a finite number in (0, 1]"
    assert Bounds(1).describe(True) == "an integer >= 1"
    assert Bounds(0, 0.5, high_open=True).holds(0.0) and not Bounds(0, 0.5, high_open=True).holds(0.5)
    check_value("x", None, Bounds(1))  # unset optional values pass
    check_value("x", "text", Bounds(1))  # type errors are the converter's business
    with pytest.raises(RlgenError, match=r"^x\[1\] = nan: must be a finite number$"):
        check_value("x", [1.0, float("nan")])


# --- item 15: numeric options of sample and eval, checked before any model loads ---------------------

SAMPLE = ["sample", "--model", "tiny-arith", "--task", "arithmetic"]
EVAL = ["eval", "--model", "tiny-arith", "--task", "arithmetic"]
IMAGE_SAMPLE = ["sample", "--model", "tiny-digits", "--task", "digits"]
IMAGE_EVAL = ["eval", "--model", "tiny-digits", "--task", "digits"]


@pytest.fixture
def no_model_loads(monkeypatch):
    """Loading any model fails the test: the checks must come first."""
    import rlgen.api._evaluate
    import rlgen.api._sample
    import rlgen.diffusion.pipeline
    import rlgen.models.causal_lm

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    # the defining modules, and the names `rlgen sample` and `rlgen eval` call (bound when they are imported)
    for module in (rlgen.models.causal_lm, rlgen.api._sample, rlgen.api._evaluate):
        monkeypatch.setattr(module, "load_policy", refuse)
    for module in (rlgen.diffusion.pipeline, rlgen.api._sample, rlgen.api._evaluate):
        monkeypatch.setattr(module, "load_diffusion_model", refuse)


@pytest.mark.parametrize("args, message", [
    ([*SAMPLE, "-n", "0"], "-n = 0: must be an integer >= 1"),
    ([*SAMPLE, "--limit", "-1"], "--limit = -1: must be an integer >= 1"),  # silently dropped the last prompt
    ([*SAMPLE, "--limit", "0"], "--limit = 0: must be an integer >= 1"),  # silently meant "all"
    ([*SAMPLE, "--max-new-tokens", "-1"], "--max-new-tokens = -1: must be an integer >= 1"),
    ([*SAMPLE, "--max-new-tokens", "0"], "--max-new-tokens = 0: must be an integer >= 1"),
    ([*SAMPLE, "--temperature", "nan"], "--temperature = nan: must be a finite number >= 0"),
    ([*SAMPLE, "--temperature", "-1"], "--temperature = -1.0: must be a finite number >= 0"),
    ([*SAMPLE, "--top-p", "0"], "--top-p = 0.0: must be a finite number in (0, 1]"),
    ([*SAMPLE, "--top-p", "1.5"], "--top-p = 1.5: must be a finite number in (0, 1]"),
    ([*SAMPLE, "--top-k", "-3"], "--top-k = -3: must be an integer >= 0"),
    ([*SAMPLE, "--seed", "-1"], "--seed = -1: must be an integer in [0, 4294967295]"),
    ([*IMAGE_SAMPLE, "--num-steps", "0"], "--num-steps = 0: must be an integer >= 1"),
    ([*IMAGE_SAMPLE, "--eta", "nan"], "--eta = nan: must be a finite number >= 0"),
    ([*IMAGE_SAMPLE, "--guidance-scale", "inf"], "--guidance-scale = inf: must be a finite number"),
    ([*IMAGE_SAMPLE, "--batch-size", "0"], "--batch-size = 0: must be an integer >= 1"),
    ([*EVAL, "-k", "0"], "-k = 0: must be an integer >= 1"),
    ([*EVAL, "-k", "-2"], "-k = -2: must be an integer >= 1"),
    ([*EVAL, "--limit", "-5"], "--limit = -5: must be an integer >= 1"),
    ([*EVAL, "--max-new-tokens", "-1"], "--max-new-tokens = -1: must be an integer >= 1"),
    ([*EVAL, "--temperature", "inf"], "--temperature = inf: must be a finite number >= 0"),
    ([*EVAL, "--seed", str(2**40)], f"--seed = {2**40}: must be an integer in [0, 4294967295]"),
    ([*IMAGE_EVAL, "--num-steps", "0"], "--num-steps = 0: must be an integer >= 1"),
    ([*IMAGE_EVAL, "--eta", "-1"], "--eta = -1.0: must be a finite number >= 0"),
])
def test_bad_sample_and_eval_options_fail_before_any_model_loads(args, message, tmp_path, no_model_loads):
    out = tmp_path / "out.jsonl"
    extra = ["--out", out] if args[0] == "sample" else ["--samples-out", out]
    code, stdout, err = rlgen(*args, *extra)
    assert code == 2, err
    assert one_error_line(err) == f"rlgen: error: {message}"
    assert stdout == "" and not out.exists()


# --- item 17: context overflow is one line in sample, eval and SFT --------------------------------------
# tiny-arith declares 64 positions; its arithmetic prompts ("123+456=") are 9 tokens with BOS.

def test_sample_beyond_the_context_is_one_line(tmp_path):
    out = tmp_path / "samples.jsonl"
    code, stdout, err = rlgen(*SAMPLE, "--limit", "3", "--max-new-tokens", "100", "--out", out)
    assert code == 2
    line = one_error_line(err)
    assert "--max-new-tokens=100" in line and "context of 64 positions" in line and "9 tokens" in line
    assert not out.exists() and stdout == ""


def test_eval_beyond_the_context_is_one_line_and_the_boundary_fits():
    code, stdout, err = rlgen(*EVAL, "--limit", "2", "--max-new-tokens", "56", "--json", "--quiet")
    assert code == 2 and stdout == ""
    line = one_error_line(err)
    assert "--max-new-tokens=56" in line and "context of 64 positions" in line
    code, stdout, err = rlgen(*EVAL, "--limit", "2", "--max-new-tokens", "55", "--json", "--quiet")  # 9 + 55 = 64
    assert code == 0, err
    assert json.loads(stdout)["num_problems"] == 2


def test_sft_whose_evaluation_would_overflow_is_one_line(tmp_path):
    run = tmp_path / "run"
    code, _, err = rlgen("train", "sft", "--out", run, "--steps", "1", "--set", "run.eval_every=1",
                         "--set", "algorithm.max_new_tokens=100", "--set", "data.eval_samples=4", "--set", "algorithm.batch_size=2",
                         "--set", "run.threads=1")
    assert code == 2
    line = one_error_line(err)
    assert "algorithm.max_new_tokens=100" in line and "context of 64 positions" in line
    assert not run.exists()


def test_sft_examples_longer_than_the_context_are_one_line(tmp_path):
    data = tmp_path / "sft.jsonl"
    rows = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2=", "completion": "4" * 80}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    code, _, err = rlgen("train", "sft", "--data", data, "--out", run, "--steps", "1", "--set", "algorithm.batch_size=2",
                         "--set", "run.threads=1")
    assert code == 2
    line = one_error_line(err)
    assert "sft.jsonl, line 2" in line and "context of 64" in line
    assert not run.exists()


def test_the_engine_refuses_to_generate_past_the_context():
    """The backstop under every caller (e.g. a GRPO held-out split longer than its training prompts)."""
    import torch

    from rlgen.models.causal_lm import ModelConfig, load_policy
    from rlgen.rollout.engine import HFEngine, SamplingParams, check_context, context_limit

    policy, tokenizer, _ = load_policy(ModelConfig(path="tiny-arith"))
    assert context_limit(policy) == 64
    engine = HFEngine(policy.eval(), tokenizer)
    prompts = ["12+34=", "1" * 40 + "="]  # 7 and 42 tokens with BOS
    with pytest.raises(RlgenError, match="a prompt of 42 tokens plus max_new_tokens=23 exceeds the model's context of 64"):
        engine.generate(prompts, SamplingParams(max_new_tokens=23, temperature=0.0))
    rollouts = engine.generate(prompts, SamplingParams(max_new_tokens=22, temperature=0.0), torch.Generator().manual_seed(0))
    assert len(rollouts.texts) == 2
    with pytest.raises(RlgenError, match=r"up to 42 tokens plus --opt=23 .* \(lower --opt\)"):
        check_context(policy, tokenizer, prompts, 23, "--opt")
    check_context(policy, tokenizer, prompts, 22, "--opt")


def test_context_limit_reads_learned_position_configs():
    from types import SimpleNamespace

    from rlgen.rollout.engine import context_limit

    assert context_limit(SimpleNamespace(config=SimpleNamespace(n_positions=32))) == 32
    assert context_limit(SimpleNamespace(config=SimpleNamespace())) is None
    assert context_limit(object()) is None
