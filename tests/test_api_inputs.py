"""The Python API checks its arguments as the CLI checks its flags: a bad number, a wrong type or a lone
string where a list belongs is one RlgenError line naming the keyword, raised before any model loads;
records it returns carry no bookkeeping `_line`; old config key names work as keywords."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import rlgen
import rlgen.api._evaluate as evaluate_module
import rlgen.api._sample as sample_module
from rlgen.errors import RlgenError
from rlgen.events import Callback, as_events


class ModelLoaded(AssertionError):
    """Raised by the patched loaders: a range check came too late."""


@pytest.fixture
def no_model_loads(monkeypatch):
    """Every loader the sampling and evaluation flows use raises ModelLoaded (not an RlgenError)."""
    def refuse(*_args, **_kwargs):
        raise ModelLoaded("a model was loaded")

    for module, names in ((sample_module, ("load_policy", "load_diffusion_model")),
                          (evaluate_module, ("load_policy", "load_diffusion_model", "load_reward_model"))):
        for name in names:
            monkeypatch.setattr(module, name, refuse)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --- 1. numeric keywords: range and type, before any model loads --------------------------------------

TEXT = {"model": "tiny-arith", "task": "arithmetic"}
IMAGE = {"model": "tiny-digits", "task": "digits"}


@pytest.mark.parametrize("args, message", [
    ({**TEXT, "n": 0, "limit": 2}, "n = 0: must be an integer >= 1"),
    ({**TEXT, "n": "2"}, "n = '2': must be an integer >= 1"),
    ({**TEXT, "n": True}, "n = True: must be an integer >= 1"),
    ({**TEXT, "n": 2.0}, "n = 2.0: must be an integer >= 1"),
    ({**TEXT, "limit": -1}, "limit = -1: must be an integer >= 1"),
    ({**TEXT, "limit": 0}, "limit = 0: must be an integer >= 1"),
    ({**TEXT, "temperature": float("nan")}, "temperature = nan: must be a finite number >= 0"),
    ({**TEXT, "temperature": "1"}, "temperature = '1': must be a finite number >= 0"),
    ({**TEXT, "top_p": 2.0}, "top_p = 2.0: must be a finite number in (0, 1]"),
    ({**TEXT, "top_p": 0}, "top_p = 0: must be a finite number in (0, 1]"),
    ({**TEXT, "top_k": -1}, "top_k = -1: must be an integer >= 0"),
    ({**TEXT, "max_new_tokens": 0}, "max_new_tokens = 0: must be an integer >= 1"),
    ({**TEXT, "seed": -1}, "seed = -1: must be an integer in [0, 4294967295]"),
    ({**TEXT, "seed": 2**32}, "seed = 4294967296: must be an integer in [0, 4294967295]"),
    ({**IMAGE, "num_steps": 0}, "num_steps = 0: must be an integer >= 1"),
    ({**IMAGE, "guidance_scale": float("inf")}, "guidance_scale = inf: must be a finite number"),
    ({**IMAGE, "eta": -0.5}, "eta = -0.5: must be a finite number >= 0"),
    ({**IMAGE, "batch_size": 0}, "batch_size = 0: must be an integer >= 1"),
])
def test_sample_checks_every_number_before_loading(no_model_loads, args, message):
    with pytest.raises(RlgenError) as raised:
        rlgen.sample(**args)
    assert str(raised.value) == message


@pytest.mark.parametrize("args, message", [
    ({**TEXT, "k": 0}, "k = 0: must be an integer >= 1"),
    ({**TEXT, "limit": -3}, "limit = -3: must be an integer >= 1"),
    ({**TEXT, "limit": 0}, "limit = 0: must be an integer >= 1"),
    ({**TEXT, "temperature": -1}, "temperature = -1: must be a finite number >= 0"),
    ({**TEXT, "max_new_tokens": "8"}, "max_new_tokens = '8': must be an integer >= 1"),
    ({**TEXT, "seed": 1.5}, "seed = 1.5: must be an integer in [0, 4294967295]"),
    ({**IMAGE, "num_steps": -2}, "num_steps = -2: must be an integer >= 1"),
    ({**IMAGE, "guidance_scale": float("nan")}, "guidance_scale = nan: must be a finite number"),
    ({**IMAGE, "eta": -1.0}, "eta = -1.0: must be a finite number >= 0"),
    ({"reward_model": "some-rm", "data": "pairs.jsonl", "limit": 0}, "limit = 0: must be an integer >= 1"),
])
def test_evaluate_checks_every_number_before_loading(no_model_loads, args, message):
    with pytest.raises(RlgenError) as raised:
        rlgen.evaluate(**args)
    assert str(raised.value) == message


def test_the_no_model_loads_guard_catches_a_load(no_model_loads):
    # valid numbers pass the checks and reach the loader, which the guard turns into ModelLoaded
    with pytest.raises(ModelLoaded):
        rlgen.sample("tiny-arith", task="arithmetic", limit=1, n=1, seed=2**32 - 1, top_p=1.0, temperature=0)
    with pytest.raises(ModelLoaded):
        rlgen.evaluate(model="tiny-arith", task="arithmetic", limit=None, k=1, temperature=0.0)


def test_limit_none_means_every_record_and_limit_cuts(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"{i}+1="} for i in range(3)])
    assert len(rlgen.prompt_records(prompts=str(prompts), limit=None)) == 3
    assert [r["prompt"] for r in rlgen.prompt_records(prompts=str(prompts), limit=2)] == ["0+1=", "1+1="]
    with pytest.raises(RlgenError, match=r"^limit = 0: must be an integer >= 1$"):
        rlgen.prompt_records(prompts=str(prompts), limit=0)


# --- 2. wrong input types -------------------------------------------------------------------------------

@pytest.mark.parametrize("call, message", [
    (lambda: rlgen.load_config(None), "algo = None: expected an algorithm name"),
    (lambda: rlgen.train(7), "algo = 7: expected an algorithm name"),
    (lambda: rlgen.load_config("grpo", reward=5), "reward = 5: expected NAME[:WEIGHT] strings"),
    (lambda: rlgen.load_config("grpo", config=3), "config = 3: expected a TOML path or a dict"),
    (lambda: rlgen.load_config("grpo", sets=5), "sets = 5: expected"),
    (lambda: rlgen.score(None, ["exact-match"]), "records = None: expected a list of records"),
    (lambda: rlgen.score([{"prompt": "p", "completion": "c"}], 5), "rewards = 5: expected"),
    (lambda: rlgen.pairs(None), "records = None: expected a list of records"),
    (lambda: rlgen.score(["abc"], ["exact-match"]), "records[0] = 'abc': expected a record"),
    (lambda: rlgen.pairs([{"prompt": "p", "completion": "c", "reward": 1.0}, 3]), "records[1] = 3: expected a record"),
    (lambda: rlgen.evaluate(5), "source = 5: expected a scored JSONL/Parquet path"),
    (lambda: rlgen.evaluate(["abc"]), "source[0] = 'abc': expected a record"),
    (lambda: rlgen.evaluate(model=5, task="arithmetic"), "model = 5: expected a built-in model name"),
    (lambda: rlgen.sample(5, task="arithmetic"), "model = 5: expected a built-in model name"),
    (lambda: rlgen.sample("tiny-arith", prompts=5), "prompts = 5: expected a JSONL/Parquet path"),
    (lambda: rlgen.backbone_for(5), "model = 5: expected a built-in model name"),
    (lambda: rlgen.train("grpo", callbacks=3), "callbacks = 3: expected a callback object with on_"),
    (lambda: rlgen.train("grpo", callbacks=[Callback(), lambda *a: None]), "callbacks[1] = <function"),
])
def test_wrong_types_are_one_line_naming_the_keyword(call, message):
    with pytest.raises(RlgenError) as raised:
        call()
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value), str(raised.value)


def test_a_callback_needs_an_on_method_and_any_one_is_enough():
    class OnlyMetrics:
        def on_metrics(self, step, metrics):
            pass

    only = OnlyMetrics()
    assert as_events(only).callbacks == [only]
    with pytest.raises(RlgenError, match=r"^callbacks = <object object at 0x\w+>: expected a callback object"):
        as_events(object())


def test_one_string_where_a_list_is_expected_is_one_item(tmp_path):
    # split into characters, "optim.lr=-1" would fail as "--set expects KEY=VALUE, got 'o'"
    with pytest.raises(RlgenError, match=r"^optim\.lr = -1\.0: must be"):
        rlgen.train("grpo", sets="optim.lr=-1")
    assert rlgen.load_config("grpo", sets="optim.lr=0.5").optim.lr == 0.5
    # split into characters, the first "run" would be "/"
    with pytest.raises(RlgenError, match=f"^{re.escape(str(tmp_path / 'x'))}: no such run directory"):
        rlgen.evaluate(compare=str(tmp_path / "x"))


# --- 3. no `_line` in what the API returns -----------------------------------------------------------

def test_records_read_from_files_come_back_without_line(tmp_path, tiny_model_dir, one_torch_thread):
    samples = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "1+1=", "answer": "2", "completion": "2"},
                                                 {"prompt": "2+2=", "answer": "4", "completion": "5"}])
    assert rlgen.score(str(samples), ["exact-match"]) == [
        {"prompt": "1+1=", "answer": "2", "completion": "2", "reward_exact-match": 1.0, "reward": 1.0},
        {"prompt": "2+2=", "answer": "4", "completion": "5", "reward_exact-match": 0.0, "reward": 0.0}]
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1="}, {"prompt": "3+4="}])
    drawn = rlgen.sample(str(tiny_model_dir), prompts=str(prompts), n=2, max_new_tokens=2)
    assert [sorted(r) for r in drawn] == [["completion", "prompt", "sample_index"]] * 4
    assert rlgen.prompt_records(prompts=str(prompts)) == [{"prompt": "1+1="}, {"prompt": "3+4="}]


def test_messages_from_files_still_name_the_line(tmp_path):
    samples = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2="}])
    with pytest.raises(RlgenError, match=r"s\.jsonl, line 2: missing field 'completion'"):
        rlgen.score(str(samples), ["exact-match"])


# --- 4. old config key names as keywords ----------------------------------------------------------------

@pytest.mark.parametrize("overrides, expected", [
    ({"sft": {"batch_size": 6}}, 6),
    ({"sft.batch_size": 7}, 7),
])
def test_renamed_keys_work_as_keywords_with_the_warning(capsys, overrides, expected):
    config = rlgen.load_config("sft", **overrides)
    assert config.algorithm.batch_size == expected
    assert "config key 'sft.batch_size' is deprecated, use 'algorithm.batch_size'" in capsys.readouterr().err


def test_an_unknown_section_keyword_is_still_an_error():
    with pytest.raises(RlgenError, match=r"^`rlgen train sft` has no 'nonsense' settings"):
        rlgen.load_config("sft", nonsense={"a": 1})
