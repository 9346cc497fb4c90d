"""Input files and output hygiene (issue 13, items 14, 18 and 19):

- bad input files (not UTF-8, binary, deeply nested, duplicate keys, a number / list / null where text
  belongs, bytes columns in Parquet, a closed stdin) are one line `rlgen: error: FILE, line N: ...`, exit 2,
  before any model loads;
- output is standard JSON (NaN / inf -> null), files get the user's umask, `rlgen ... | head` exits 0 quietly;
- what is left for the last-resort handler is still printed as exactly one line.

Most cases run in-process through `rlgen.cli.app.main` (no interpreter start-up per case); the broken pipe and
the closed stdin need a real process.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import cli_env, rlgen, rlgen_command
from rlgen.data.records import json_text, read_records, write_records
from rlgen.errors import RlgenError

GOOD = {"prompt": "1+1=", "completion": "2", "answer": "2"}


def assert_one_line_error(result, *expected: str) -> str:
    code, out, err = result
    detail = f"exit={code}\nstdout={out!r}\nstderr={err!r}"
    assert code == 2, detail
    assert out == "", detail
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlgen: error: "), detail
    assert "Traceback" not in err, detail
    for text in expected:
        assert text in lines[0], f"{text!r} not in the message\n{detail}"
    return lines[0]


def jsonl_bytes(*lines) -> bytes:
    return b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)


# --- item 14: input files ----------------------------------------------------------------------------------

def test_non_utf8_file_names_file_and_line(tmp_path):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(jsonl_bytes(GOOD, '{"prompt": "caf\xe9", "completion": "x"}'.encode("latin-1")))
    assert_one_line_error(rlgen("score", "-r", "exact-match", data),
                          "latin1.jsonl, line 2", "not UTF-8", "0xe9")


def test_non_utf8_stdin_names_line():
    assert_one_line_error(rlgen("eval", "-", "--json", stdin=b"\xff\xfe{}\n"),
                          "<stdin>, line 1", "not UTF-8")


def test_binary_file_is_one_line(tmp_path):
    data = tmp_path / "image.jsonl"
    data.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10")
    assert_one_line_error(rlgen("pairs", data), "image.jsonl, line 1")


@pytest.mark.parametrize("depth", [65, 100_000])  # just over the limit; far past Python's recursion limit
def test_deeply_nested_json_is_one_line(tmp_path, depth):
    data = tmp_path / "deep.jsonl"
    data.write_text(json.dumps(GOOD) + '\n{"prompt": "1+1=", "completion": "2", "y": ' + "[" * depth + "]" * depth + "}\n")
    assert_one_line_error(rlgen("score", "-r", "exact-match", data), "deep.jsonl, line 2", "nested too deeply")


def test_nesting_within_the_limit_is_read(tmp_path):
    data = tmp_path / "nested.jsonl"
    data.write_text(json.dumps({**GOOD, "y": json.loads("[" * 63 + "]" * 63)}) + "\n")
    assert len(read_records(str(data))) == 1


def test_duplicate_json_keys_are_refused(tmp_path):
    data = tmp_path / "dup.jsonl"
    data.write_text(json.dumps(GOOD) + '\n{"prompt": "1+1=", "completion": "2", "prompt": "2+2="}\n')
    assert_one_line_error(rlgen("score", "-r", "exact-match", data),
                          "dup.jsonl, line 2", "duplicate key 'prompt'")


@pytest.mark.parametrize("field,value,expected", [
    ("prompt", 5, "field 'prompt' must be a string or a list of chat messages, got int 5"),
    ("prompt", [{"role": "user"}], "field 'prompt': message 0 (user) has no 'content' string"),
    ("prompt", [], "field 'prompt': must be a string or a non-empty list of messages"),
    ("completion", {"text": "2"}, "field 'completion' must be a string or a list of chat messages, got dict"),
    ("completion", None, "field 'completion' is null"),
    ("completion", 2, "field 'completion' must be a string or a list of chat messages, got int 2"),
])
def test_text_fields_must_be_strings(tmp_path, field, value, expected):
    data = tmp_path / "samples.jsonl"
    data.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, field: value}) + "\n")
    for command in (["score", "-r", "exact-match", data], ["pairs", data], ["eval", data, "--json"]):
        assert_one_line_error(rlgen(*command), "samples.jsonl, line 2", expected)


def test_score_image_must_be_a_path(tmp_path):
    data = tmp_path / "images.jsonl"
    data.write_text(json.dumps({"prompt": "a 3", "image": 3}) + "\n")
    assert_one_line_error(rlgen("score", "-r", "exact-match", data),
                          "images.jsonl, line 1", "field 'image' must be a string")


def test_value_in_message_is_cut(tmp_path):
    data = tmp_path / "big.jsonl"
    data.write_text(json.dumps({"prompt": {"text": "x" * 100_000}, "completion": "c"}) + "\n")
    line = assert_one_line_error(rlgen("score", "-r", "exact-match", data), "big.jsonl, line 1")
    assert len(line) < 400


def test_closed_stdin_in_process(monkeypatch):
    monkeypatch.setattr(sys, "stdin", None)  # what Python gives a program started with fd 0 closed
    assert_one_line_error(rlgen("score", "-r", "exact-match"), "<stdin> is closed")


def test_closed_stdin_in_a_real_process(tmp_path):
    proc = subprocess.run(rlgen_command("pairs"), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=cli_env(), timeout=300,
                          preexec_fn=lambda: os.close(0))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "rlgen: error: <stdin> is closed: give a FILE, or pipe JSONL in"
    assert proc.stdout == ""


def _parquet(path: Path, columns: dict) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


@pytest.mark.parametrize("column,values,expected", [
    ("prompt", [b"1+1="], "column 'prompt' holds bytes"),
    ("extra", [[b"\x00"]], "column 'extra' holds bytes"),  # inside a list column too
])
def test_parquet_bytes_columns_are_refused(tmp_path, column, values, expected):
    data = _parquet(tmp_path / "data.parquet", {"prompt": ["1+1="], "completion": ["2"], column: values})
    assert_one_line_error(rlgen("score", "-r", "exact-match", data), "data.parquet", expected)


def test_parquet_strings_are_read(tmp_path):
    data = _parquet(tmp_path / "ok.parquet", {"prompt": ["1+1="], "completion": ["2"], "n": [[1, 2]]})
    assert read_records(str(data)) == [{"prompt": "1+1=", "completion": "2", "n": [1, 2], "_line": 1}]


@pytest.mark.parametrize("record,expected", [
    ({"prompt": "1+1=", "answer": None}, "line 2: field 'answer' is null"),
    ({"prompt": "1+1=", "answer": 2}, "line 2: field 'answer' must be a string or a list of chat messages, got int 2"),
    ({"prompt": "1+1=", "completion": None, "answer": "2"}, "line 2: field 'completion' is null"),
    ({"prompt": ["1+1="], "completion": "2"}, "line 2: field 'prompt': message 0 is a str, not an object with 'role' and 'content'"),
])
def test_sft_refuses_non_text_targets_before_loading_a_model(tmp_path, monkeypatch, record, expected):
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n" + json.dumps(record) + "\n")
    from rlgen.training.trainer import Trainer

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(Trainer, "_load_model", no_model)
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(rlgen("train", "sft", "--model", "tiny-arith", "--data", data, "--out", "run"),
                          "sft.jsonl", expected)
    assert not (tmp_path / "run").exists()


# --- item 18: output ----------------------------------------------------------------------------------------

def _strict_json(text: str):
    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant} in {text!r}")

    return json.loads(text, parse_constant=refuse)


def test_json_text_writes_non_finite_as_null():
    import numpy as np
    import torch

    value = {"a": math.nan, "b": [1.5, math.inf, (-math.inf, 2)], "c": {"d": np.float32("nan"), "e": np.float64(0.25)},
             "f": torch.tensor(float("inf")), "g": torch.tensor(3)}
    assert json_text(value) == '{"a": null, "b": [1.5, null, [null, 2]], "c": {"d": null, "e": 0.25}, "f": null, "g": 3}'


def test_eval_json_summary_is_standard_json(tmp_path):
    data = tmp_path / "scored.jsonl"
    data.write_text('{"prompt": "x", "reward": Infinity}\n')
    code, out, err = rlgen("eval", data, "--json")
    assert code == 0, err
    assert _strict_json(out)["reward"] == {"count": 1, "mean": None, "std": 0.0, "min": None, "max": None}


def test_eval_json_with_an_infinite_and_a_finite_reward(tmp_path):
    data = tmp_path / "scored.jsonl"
    data.write_text('{"prompt": "x", "reward": -Infinity}\n{"prompt": "y", "reward": 1}\n')
    code, out, err = rlgen("eval", data, "--json")
    assert code == 0, err
    assert _strict_json(out)["reward"] == {"count": 2, "mean": None, "std": None, "min": None, "max": 1}


def test_score_output_is_standard_json(tmp_path):
    data = tmp_path / "samples.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2", "answer": "2", "old": NaN, "deep": [Infinity]}\n')
    code, out, err = rlgen("score", "-r", "exact-match", data)
    assert code == 0, err
    row = _strict_json(out)
    assert (row["old"], row["deep"], row["reward"]) == (None, [None], 1.0)


def test_metrics_lines_are_standard_json(tmp_path):
    import numpy as np

    from rlgen.training.run_dir import RunDir

    run = RunDir(tmp_path)
    run.log_metrics({"step": 1, "loss": np.float32("inf"), "nested": {"kl": math.nan}})
    assert _strict_json(run.metrics_path.read_text()) == {"step": 1, "loss": None, "nested": {"kl": None}}


@pytest.fixture
def umask():
    def set_mask(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    os.umask(old)
    yield set_mask
    os.umask(old)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_written_records_follow_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    write_records([GOOD], str(tmp_path / "out.jsonl"))
    assert (tmp_path / "out.jsonl").stat().st_mode & 0o777 == mode


def test_saved_models_follow_the_umask(tmp_path, umask):
    import torch
    from safetensors.torch import save_file

    from rlgen.models.causal_lm import replace_dir

    umask(0o022)
    tmp = tmp_path / ".final.tmp"
    (tmp / "unet").mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(tmp / "unet" / "model.safetensors"))  # safetensors creates it 0600
    replace_dir(tmp, tmp_path / "final")
    assert (tmp_path / "final" / "unet" / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_checkpoint_state_follows_the_umask(tmp_path, umask):
    import torch

    from rlgen.training.state import save_state

    umask(0o022)
    save_state({"w": torch.ones(2)}, tmp_path, "optimizer")
    assert (tmp_path / "optimizer.safetensors").stat().st_mode & 0o777 == 0o644


@pytest.mark.slow
@pytest.mark.parametrize("command", [["score", "-r", "exact-match", "many.jsonl"], ["plugins"]])
def test_closed_stdout_pipe_exits_0_quietly(tmp_path, command):
    """`rlgen ... | head`: the reader goes away first; rlgen ends with 0 and prints nothing (no "Exception
    ignored ... BrokenPipeError" from the interpreter's shutdown either)."""
    (tmp_path / "many.jsonl").write_text("".join(json.dumps({**GOOD, "i": i}) + "\n" for i in range(3000)))
    proc = subprocess.Popen(rlgen_command(*command), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, cwd=tmp_path, env=cli_env())
    proc.stdout.close()  # before rlgen writes anything: every write meets a broken pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, err
    assert err == ""


def test_head_1_exits_0_quietly(tmp_path):
    (tmp_path / "many.jsonl").write_text("".join(json.dumps({**GOOD, "i": i}) + "\n" for i in range(3000)))
    proc = subprocess.Popen(rlgen_command("score", "-r", "exact-match", "many.jsonl"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=tmp_path,
                            env=cli_env())
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert json.loads(first)["i"] == 0
    assert proc.wait(timeout=300) == 0, err
    assert err == ""


# --- item 19: the last-resort handler keeps the one-line form ---------------------------------------------

def test_internal_error_is_one_line(tmp_path, monkeypatch):
    import rlgen.api._score as score_api
    import rlgen.data.records as records

    def broken(*args, **kwargs):
        raise ValueError("first line\nsecond line\n" + "x" * 5000)

    monkeypatch.setattr(records, "read_records", broken)
    monkeypatch.setattr(score_api, "read_records", broken)  # the name `rlgen score` calls
    code, out, err = rlgen("score", "-r", "exact-match", tmp_path / "x.jsonl")
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("rlgen: internal error: ValueError: first line second line xxx")
    assert lines[0].endswith("(run with --debug for the traceback)") and len(lines[0]) < 1200


def test_multi_line_user_error_is_one_line(tmp_path, monkeypatch):
    import rlgen.api._score as score_api
    import rlgen.data.records as records

    def bad(*args, **kwargs):
        raise RlgenError("bad.toml: something\n  at line 3\n")

    monkeypatch.setattr(records, "read_records", bad)
    monkeypatch.setattr(score_api, "read_records", bad)  # the name `rlgen score` calls
    line = assert_one_line_error(rlgen("score", "-r", "exact-match", tmp_path / "x.jsonl"))
    assert line == "rlgen: error: bad.toml: something at line 3"


def test_recursion_error_is_a_bad_input_line(tmp_path, monkeypatch):
    import rlgen.api._score as score_api
    import rlgen.data.records as records

    def recurse(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(records, "read_records", recurse)
    monkeypatch.setattr(score_api, "read_records", recurse)  # the name `rlgen score` calls
    assert_one_line_error(rlgen("score", "-r", "exact-match", tmp_path / "x.jsonl"), "nested too deeply")


def test_read_records_keeps_bom_files_readable(tmp_path):
    data = tmp_path / "bom.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + jsonl_bytes(GOOD))
    assert read_records(str(data)) == [{**GOOD, "_line": 1}]


def test_read_failure_is_one_line():
    # /proc/self/mem opens but its first read fails (EIO: address 0 is not mapped), for root too
    assert_one_line_error(rlgen("score", "-r", "exact-match", "/proc/self/mem"),
                          "/proc/self/mem", "cannot read")


# --- round 2: data findings (F1 JSONL part, F2, pairs --margin, eval reward types) -------------------------

def test_integer_beyond_conversion_limit_is_one_line(tmp_path):
    data = tmp_path / "big.jsonl"
    data.write_bytes(b'{"prompt":"1+1=","completion":"2","x":' + b"9" * 5000 + b"}\n")
    assert_one_line_error(rlgen("score", "-r", "length", data), "big.jsonl, line 1", "digits")
    assert_one_line_error(rlgen("eval", data), "big.jsonl, line 1", "digits")


@pytest.mark.parametrize("line", [rb'{"prompt":"\ud800","completion":"2"}',
                                  rb'{"prompt":"p","completion":"2","m":[{"\uDC00":1}]}'])
def test_lone_surrogate_is_refused_on_reading(tmp_path, line):
    data = tmp_path / "sur.jsonl"
    data.write_bytes(jsonl_bytes(GOOD, line))
    field = "'prompt'" if b"prompt\":\"\\" in line else "'m'"
    assert_one_line_error(rlgen("score", "-r", "length", data),
                          "sur.jsonl, line 2", field, "lone surrogate")


def test_surrogate_pair_is_ordinary_text(tmp_path):
    data = tmp_path / "pair.jsonl"
    data.write_bytes(b'{"prompt":"\\ud83d\\ude00","completion":"2"}\n')
    assert read_records(str(data))[0]["prompt"] == "\U0001F600"


@pytest.mark.parametrize("margin", ["nan", "inf", "-1"])
def test_pairs_margin_must_be_finite_and_not_negative(tmp_path, margin):
    data = tmp_path / "scored.jsonl"
    data.write_bytes(jsonl_bytes({"prompt": "a", "completion": "x", "reward": 1},
                                 {"prompt": "a", "completion": "y", "reward": 0}))
    assert_one_line_error(rlgen("pairs", "--margin", margin, data), "--margin")


@pytest.mark.parametrize("value", ["1", True, [1]])
def test_eval_reward_field_must_be_a_number_or_null(value):
    stdin = jsonl_bytes({"prompt": "a", "completion": "x", "reward": None},
                        {"prompt": "a", "completion": "y", "reward": value})
    assert_one_line_error(rlgen("eval", "-", stdin=stdin),
                          "<stdin>, line 2", "'reward'", "number or null")


# --- a model with NaN weights, usage errors ---

@pytest.mark.parametrize("temperature", ["1.0", "0"])
def test_sampling_from_a_model_with_nan_weights_is_one_line(tiny_model_dir, tmp_path, temperature):
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "nanm"
    shutil.copytree(tiny_model_dir, model)
    weights = load_file(str(model / "model.safetensors"))
    name = next(k for k in sorted(weights) if k.endswith("mlp.gate_proj.weight"))
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    result = rlgen("sample", "--model", model, "--task", "arithmetic", "--limit", 1, "--temperature", temperature,
                   "--quiet")
    assert_one_line_error(result, "non-finite logits", str(model))


@pytest.mark.parametrize("args, expected", [
    (["sample", "--limit", "abc"], ["'--limit'", "'rlgen sample --help'"]),
    (["sample", "--no-such-option"], ["--no-such-option", "'rlgen sample --help'"]),
    (["sample", "--limit", "9" * 10000], ["'--limit'"]),
    (["no-such-command"], ["no-such-command", "'rlgen --help'"]),
])
def test_usage_errors_are_one_line(args, expected):
    line = assert_one_line_error(rlgen(*args), *expected)
    assert "Usage:" not in line and len(line) < 600


@pytest.mark.parametrize("args", [[], ["train"]])
def test_no_arguments_still_print_the_help(args):
    code, out, err = rlgen(*args)
    assert "Usage:" in out + err and "rlgen: error" not in out + err


def test_show_value_survives_integers_too_long_to_print():
    from rlgen.errors import show_value

    assert show_value(10**5000) == "<an integer of about 5000 digits>"  # repr() itself raises ValueError here
    assert show_value([10**5000]) == "<a value holding an integer too long to print>"
    assert show_value("x" * 500).endswith("... (502 characters)")
