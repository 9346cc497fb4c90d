"""The CLI's error contract: bad input -> ONE line `rlgen: error: ...` on stderr naming the problem,
exit status 2, no traceback (unless --debug), and no partial output (no run directory, no output file).

Every case runs `python -m rlgen` as a subprocess. The subprocesses run two at a time from one module
fixture (each pays the torch/transformers import, which dominates); each test waits for its own result.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cli_helpers import rlgen_process

GOOD_RECORDS = [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(4)]


@dataclass
class Case:
    args: list
    expect: list[str]  # substrings the one-line message must contain
    stdin: str | None = None
    no_output: list[str] = field(default_factory=list)  # paths (relative to the case dir) that must not exist


def _train(model, *extra) -> list:
    return ["train", "grpo", "--model", model, "--out", "run", "--steps", "1",
            "--set", "rollout.prompts_per_step=2", "--set", "rollout.num_generations=2",
            "--set", "rollout.max_new_tokens=8", "--set", "run.eval_every=0", *extra]


def build_cases(files: Path, model: str) -> dict[str, Case]:
    f = files
    return {
        "missing-data-file": Case(_train(model, "--data", "nope.jsonl"), ["nope.jsonl", "not found"], no_output=["run"]),
        "model-dir-without-config": Case(
            _train(str(f / "not-a-model"), "--task", "arithmetic"), ["not-a-model", "config.json"], no_output=["run"]),
        "malformed-jsonl-line": Case(_train(model, "--data", f / "bad.jsonl"), ["bad.jsonl", "line 3", "JSON"], no_output=["run"]),
        "record-missing-prompt": Case(
            _train(model, "--data", f / "noprompt.jsonl"), ["noprompt.jsonl", "line 2", "'prompt'"], no_output=["run"]),
        "unknown-algorithm": Case(
            ["train", "no-such-algo", "--model", model, "--out", "run"], ["algorithm", "no-such-algo"], no_output=["run"]),
        "unknown-reward": Case(
            _train(model, "--task", "arithmetic", "--reward", "no-such-reward"), ["reward", "no-such-reward"], no_output=["run"]),
        "unknown-task": Case(_train(model, "--task", "no-such-task"), ["task", "no-such-task"], no_output=["run"]),
        "unknown-model-name": Case(
            _train("no-such-model", "--task", "arithmetic"), ["model", "no-such-model"], no_output=["run"]),
        "bad-toml-file": Case(_train(model, "--config", f / "broken.toml"), ["broken.toml", "TOML"], no_output=["run"]),
        "wrong-type-via-set": Case(
            _train(model, "--task", "arithmetic", "--set", "run.steps=abc"), ["run.steps", "abc"], no_output=["run"]),
        "wrong-type-via-toml": Case(
            ["train", "grpo", "--model", model, "--task", "arithmetic", "--out", "run", "--config", f / "badtype.toml"],
            ["run.steps", "abc"], no_output=["run"]),
        "unknown-config-key": Case(
            _train(model, "--task", "arithmetic", "--set", "run.no_such_key=1"), ["run.no_such_key"], no_output=["run"]),
        "completion-longer-than-context": Case(
            _train(model, "--task", "arithmetic", "--set", "rollout.max_new_tokens=500"),
            ["rollout.max_new_tokens=500", "context"], no_output=["run"]),
        "empty-dataset": Case(_train(model, "--data", f / "empty.jsonl"), ["empty.jsonl", "no records"], no_output=["run"]),
        "score-stdin-malformed-line": Case(
            ["score", "-r", "exact-match", "--out", "scored.jsonl"],
            ["<stdin>", "line 2", "JSON"],
            stdin=json.dumps({"prompt": "1+1=", "completion": "2", "answer": "2"}) + "\n{not json\n",
            no_output=["scored.jsonl"],
        ),
        "eval-missing-path": Case(["eval", "no-such-run", "--json"], ["no-such-run"]),
        "sample-bad-prompts-to-file": Case(
            ["sample", "--model", model, "--prompts", f / "bad.jsonl", "-n", "2", "--max-new-tokens", "2", "--out", "samples.jsonl"],
            ["bad.jsonl", "line 3"], no_output=["samples.jsonl"]),
    }


@pytest.fixture(scope="module")
def error_runs(request, tmp_path_factory, tiny_model_dir):
    files = tmp_path_factory.mktemp("bad-inputs")
    (files / "not-a-model").mkdir()
    (files / "not-a-model" / "weights.bin").write_bytes(b"\0")
    good = "".join(json.dumps(r) + "\n" for r in GOOD_RECORDS)
    (files / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GOOD_RECORDS[:2]) + "this is not json\n" + good)
    (files / "noprompt.jsonl").write_text(json.dumps(GOOD_RECORDS[0]) + "\n" + json.dumps({"answer": "4"}) + "\n")
    (files / "empty.jsonl").write_text("\n\n")
    (files / "broken.toml").write_text("[run\nsteps = 1\n")
    (files / "badtype.toml").write_text('[run]\nsteps = "abc"\n')
    selected = {item.callspec.params["name"] for item in request.session.items
                if item.originalname == "test_bad_input_gives_one_line_error" and hasattr(item, "callspec")}
    cases = {name: case for name, case in build_cases(files, str(tiny_model_dir)).items() if name in selected}
    root = tmp_path_factory.mktemp("error-cases")

    def run_case(name, case):
        cwd = root / name
        cwd.mkdir()
        return case, cwd, rlgen_process(*case.args, cwd=cwd, stdin=case.stdin, timeout=180)

    # All cases start now, two at a time; each test waits only for its own result.
    pool = ThreadPoolExecutor(max_workers=2)
    try:
        yield {name: pool.submit(run_case, name, case) for name, case in cases.items()}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


CASE_NAMES = list(build_cases(Path("x"), "m"))
# Each case pays a fresh interpreter: the fast tier keeps two, the full tier runs them all.
FAST_CASES = {"missing-data-file", "score-stdin-malformed-line"}


@pytest.mark.parametrize("name", [name if name in FAST_CASES else pytest.param(name, marks=pytest.mark.slow)
                                  for name in CASE_NAMES])
def test_bad_input_gives_one_line_error(error_runs, name):
    case, cwd, proc = error_runs[name].result(timeout=300)
    detail = f"args={case.args}\nstdout={proc.stdout!r}\nstderr={proc.stderr!r}"
    assert proc.returncode == 2, detail
    assert "Traceback" not in proc.stderr, detail
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, detail
    assert lines[0].startswith("rlgen: error: "), detail
    for text in case.expect:
        assert text in lines[0], f"{text!r} not in the message\n{detail}"
    assert proc.stdout == "", detail  # no partial output on stdout either
    for rel in case.no_output:
        assert not (cwd / rel).exists(), f"{rel} was created\n{detail}"
    leftovers = [p.name for p in cwd.iterdir()]
    assert leftovers == [], f"files left behind: {leftovers}\n{detail}"


@pytest.mark.slow
def test_debug_shows_the_traceback(tmp_path, tiny_model_dir):
    # the same bad input as 'wrong-type-via-set', with --debug before the subcommand: a traceback
    proc = rlgen_process("--debug", *_train(str(tiny_model_dir), "--task", "arithmetic", "--set", "run.steps=abc"),
                         cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr
    assert "RlgenError" in proc.stderr and "run.steps" in proc.stderr
    assert not (tmp_path / "run").exists()
    # --debug is also accepted after the subcommand
    proc = rlgen_process("train", "no-such-algo", "--out", "run", "--debug", cwd=tmp_path)
    assert "Traceback" in proc.stderr and "no-such-algo" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_usage_error_is_exit_2_without_traceback(tmp_path):
    proc = rlgen_process("train", "grpo", "--no-such-option", "--out", "run", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "--no-such-option" in proc.stderr
    assert not (tmp_path / "run").exists()
