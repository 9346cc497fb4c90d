"""Fuzzing the input readers (issue 13, item 19): valid JSONL / TOML / YAML files and safetensors headers,
mutated byte by byte, go through the CLI in-process. Every outcome must be exit 0, or exit 2 with exactly one
stderr line `rlgen: error: ...`; never "internal error", never a traceback.

Hypothesis runs derandomized (the same examples on every run, no example database written) and without its
shrinking phase, so that the file stays well under a minute; a failure prints the input that broke a reader.
The fuzzers run in the full tier (CI); the fast tier keeps the check that every seed input passes.
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from cli_helpers import rlgen


# Fragments that tend to break parsers: structure, escapes, bad UTF-8, NUL, non-finite numbers, deep nesting,
# YAML aliases and tags, TOML tables.
TOKENS = [b"{", b"}", b"[", b"]", b'"', b"'", b",", b":", b"=", b"\n", b"\\", b"\\u", b"\xff", b"\xc3", b"\x00",
          b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1", b"0", b"null", b"true", b"[]", b"{}", b"[" * 300,
          b'{"a":' * 80, b"- " * 50, b"&a ", b"*a", b"!!python/object:os.system", b"<<: *a", b"[[models]]",
          b"[run]", b"#", b"\t", b"\r", b"\xef\xbb\xbf", b"    ", b'"prompt"', b'"completion"', b"1.5", b"[1, 2]"]

FUZZ_SETTINGS = settings(
    derandomize=True, database=None, deadline=None, phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def mutations(draw, seed: bytes, max_edits: int = 4) -> bytes:
    """`seed` with 1..max_edits edits: a random byte inserted or replaced, a span deleted or duplicated, or
    one of TOKENS spliced in."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, max_edits))):
        kind = draw(st.sampled_from(["insert", "replace", "delete", "duplicate", "token", "token"]))
        at = draw(st.integers(0, len(data)))
        if kind == "insert":
            data[at:at] = bytes([draw(st.integers(0, 255))])
        elif kind == "replace" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif kind == "duplicate":
            span = bytes(data[at : at + draw(st.integers(1, 32))])
            data[at:at] = span * draw(st.integers(1, 50))
        else:
            data[at:at] = draw(st.sampled_from(TOKENS))
    return bytes(data)


def assert_acceptable(result, data: bytes) -> None:
    code, out, err = result
    detail = f"input={data[:3000]!r}\nexit={code}\nstderr={err[-3000:]!r}"
    assert "Traceback" not in err and "internal error" not in err, detail
    if code == 0:
        return
    assert code == 2, detail
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlgen: error: "), detail


def jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


SAMPLES = jsonl([
    {"prompt": "1+1=", "completion": "2", "answer": "2", "reward": 1.0, "meta": {"tags": ["a", "b"], "n": 3}},
    {"prompt": "1+1=", "completion": "3", "answer": "2", "reward": 0.0},
    {"prompt": "2+2=", "completion": "4", "answer": "4", "reward": 1.0, "reward_exact-match": 1.0},
    {"prompt": "2+2=", "completion": "5", "answer": "4", "reward": -0.5},
])
# `rlgen eval -` summarises rewards without completions here: completions would bring in the embedding model
SCORES = jsonl([{"prompt": "1+1=", "reward": 1.0, "reward_exact-match": 1}, {"prompt": "2+2=", "reward": 0.25},
                {"prompt": "3+3=", "reward": None, "answer": "6"}])


@pytest.mark.slow
@settings(FUZZ_SETTINGS, max_examples=60)
@given(data=mutations(SAMPLES))
def test_fuzz_score_jsonl(tmp_path, data):
    path = tmp_path / "samples.jsonl"
    path.write_bytes(data)
    assert_acceptable(rlgen("score", "-r", "exact-match", "-r", "length:0.1", path), data)


@pytest.mark.slow
@settings(FUZZ_SETTINGS, max_examples=50)
@given(data=mutations(SAMPLES))
def test_fuzz_pairs_stdin(data):
    assert_acceptable(rlgen("pairs", "--mode", "all", stdin=data), data)


@pytest.mark.slow
@settings(FUZZ_SETTINGS, max_examples=50)
@given(data=mutations(SCORES))
def test_fuzz_eval_stdin(data):
    assert_acceptable(rlgen("eval", "-", "--json", stdin=data), data)


TRAIN_TOML = b"""[run]
steps = 3
seed = 1
eval_every = 0

[optim]
lr = 1e-5
max_grad_norm = 1.0
lr_scheduler = "cosine"

[rollout]
num_generations = 2
prompts_per_step = 2
max_new_tokens = 8
temperature = 1.0

[algorithm]
beta = 0.0
loss_type = "dapo"
"""


@pytest.mark.slow
@settings(FUZZ_SETTINGS, max_examples=40)
@given(data=mutations(TRAIN_TOML))
def test_fuzz_train_config_toml(tmp_path, monkeypatch, data):
    """`--data` names a missing file, so a config that passes validation still stops before any model loads
    (exit 2, "file not found"); the fuzzed config decides how it gets there."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.toml").write_bytes(data)
    result = rlgen("train", "grpo", "--model", "tiny-arith", "--config", "run.toml", "--data", "missing.jsonl",
                   "--out", "run")
    assert_acceptable(result, data)
    assert result[0] == 2 and not (tmp_path / "run").exists()


def _tiny_model(path: Path, value: float) -> Path:
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({"model.layers.0.mlp.weight": torch.full((2, 3), value), "model.layers.1.mlp.weight": torch.full((2, 3), value),
               "lm_head.weight": torch.full((3,), value)}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    return path


@pytest.fixture(scope="module")
def merge_models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-merge")
    for name, value in (("base", 0.0), ("a", 1.0), ("b", 3.0)):
        _tiny_model(root / name, value)
    return root


MERGE_YAML = b"""merge_method: ties
base_model: base
models:
  - model: a
    parameters:
      weight: 0.5
      density: [0.2, 0.8]
  - model: b
    parameters: {weight: 0.5, density: 0.5}
parameters:
  lambda: 1.0
  normalize: true
dtype: float32
"""

MERGE_TOML = b"""merge_method = "slerp"
base_model = "a"
dtype = "float32"

[parameters]
t = [0.0, 0.5, 1.0]

[[models]]
model = "a"

[[models]]
model = "b"
"""


def _merge_with_config(models: Path, name: str, data: bytes):
    (models / name).write_bytes(data)
    out = models / "out"
    try:
        return rlgen("merge", "--config", models / name, "--out", out, "--quiet")
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.mark.slow
@settings(FUZZ_SETTINGS, max_examples=50)
@given(data=mutations(MERGE_YAML))
def test_fuzz_merge_yaml(merge_models, monkeypatch, data):
    monkeypatch.chdir(merge_models)  # the config names the models relative to here
    assert_acceptable(_merge_with_config(merge_models, "merge.yml", data), data)


@pytest.mark.slow
@settings(FUZZ_SETTINGS, max_examples=40)
@given(data=mutations(MERGE_TOML))
def test_fuzz_merge_toml(merge_models, monkeypatch, data):
    monkeypatch.chdir(merge_models)
    assert_acceptable(_merge_with_config(merge_models, "merge.toml", data), data)


def _split_safetensors(path: Path) -> tuple[bytes, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return raw[8 : 8 + length], raw[8 + length :]


@st.composite
def safetensors_files(draw, header: bytes, body: bytes) -> bytes:
    """A header mutated as text, behind its true length or a fuzzed one; the tensor bytes as they were or cut."""
    new_header = draw(mutations(header))
    length = draw(st.one_of(st.just(len(new_header)), st.integers(0, 2**64 - 1),
                            st.integers(max(0, len(new_header) - 8), len(new_header) + 8)))
    new_body = draw(st.one_of(st.just(body), st.builds(lambda n: body[:n], st.integers(0, len(body)))))
    return struct.pack("<Q", length) + new_header + new_body


@pytest.fixture(scope="module")
def safetensors_parts(merge_models) -> tuple[bytes, bytes]:
    return _split_safetensors(merge_models / "a" / "model.safetensors")


@pytest.mark.slow
def test_fuzz_safetensors_headers(merge_models, safetensors_parts, monkeypatch):
    monkeypatch.chdir(merge_models)
    header, body = safetensors_parts
    fuzzed = merge_models / "fuzzed"

    @settings(FUZZ_SETTINGS, max_examples=60)
    @given(data=safetensors_files(header, body))
    def check(data):
        if fuzzed.exists():
            shutil.rmtree(fuzzed)
        _tiny_model(fuzzed, 2.0)
        (fuzzed / "model.safetensors").write_bytes(data)
        out = merge_models / "out"
        try:
            result = rlgen("merge", "fuzzed", "b", "--out", out, "--quiet")
        finally:
            shutil.rmtree(out, ignore_errors=True)
        assert_acceptable(result, data)

    check()


def test_unmutated_seeds_pass_every_check(tmp_path, merge_models, monkeypatch):
    """The fuzzers start from inputs that work: mutations then probe every later stage, not one early error."""
    (tmp_path / "samples.jsonl").write_bytes(SAMPLES)
    assert rlgen("score", "-r", "exact-match", tmp_path / "samples.jsonl")[0] == 0
    code, out, _ = rlgen("pairs", "--mode", "all", stdin=SAMPLES)
    assert code == 0 and len(out.splitlines()) == 2
    code, out, _ = rlgen("eval", "-", "--json", stdin=SCORES)
    assert code == 0 and json.loads(out)["reward"]["count"] == 2
    (tmp_path / "run.toml").write_bytes(TRAIN_TOML)
    monkeypatch.chdir(tmp_path)
    code, _, err = rlgen("train", "grpo", "--model", "tiny-arith", "--config", "run.toml", "--data", "missing.jsonl",
                         "--out", "run")
    assert code == 2 and "missing.jsonl" in err  # past the config's checks
    monkeypatch.chdir(merge_models)
    for name, seed in (("merge.yml", MERGE_YAML), ("merge.toml", MERGE_TOML)):
        code, _, err = _merge_with_config(merge_models, name, seed)
        assert code == 0, err
    code, _, err = rlgen("merge", "a", "b", "--out", merge_models / "out", "--quiet")
    shutil.rmtree(merge_models / "out", ignore_errors=True)
    assert code == 0, err
