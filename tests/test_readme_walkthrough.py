"""README "Your own model and data": its commands, run in order in a folder holding a user's own kind of model
(a byte-level BPE tokenizer with a ChatML template, a random Qwen2) and JSONL files, do what the text says."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from chat_model import build_chat_model

README = Path(__file__).resolve().parent.parent / "README.md"


def walkthrough_commands() -> list[str]:
    text = README.read_text()
    block = re.search(r"<!-- walkthrough:[^\n]*-->\n```\n(.*?)```", text, re.S).group(1)
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def _write(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def user(a, b):
    return [{"role": "user", "content": f"What is {a}+{b}?"}]


@pytest.mark.slow
def test_the_walkthrough_runs_as_written(tmp_path):
    build_chat_model(tmp_path / "my-model")
    problems = [(a, b) for a in range(1, 7) for b in range(1, 5)]
    _write(tmp_path / "sft.jsonl", [{"messages": [*user(a, b), {"role": "assistant", "content": str(a + b)}]}
                                    for a, b in problems])
    _write(tmp_path / "prompts.jsonl", [{"prompt": user(a, b), "answer": str(a + b)} for a, b in problems])
    _write(tmp_path / "held.jsonl", [{"prompt": user(a, 9), "answer": str(a + 9)} for a in range(1, 6)])
    _write(tmp_path / "pairs.jsonl", [{"prompt": user(a, b), "chosen": [{"role": "assistant", "content": str(a + b)}],
                                       "rejected": [{"role": "assistant", "content": str(a + b + 1)}]} for a, b in problems])
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1"}
    outputs = []
    commands = walkthrough_commands()
    assert len(commands) == 4
    for command in commands:
        proc = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
        outputs.append(proc)
    grpo = tmp_path / "runs" / "grpo"
    assert "held-out evaluation: " in outputs[1].stderr and "held.jsonl (5 records)" in outputs[1].stderr
    rows = [json.loads(line) for line in (grpo / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/accuracy" in row and "eval/reward_exact-match" in row for row in rows)
    assert list((grpo / "tracking" / "tensorboard").rglob("events.out.tfevents.*"))
    completions = [json.loads(line) for line in (grpo / "completions.jsonl").read_text().splitlines()]
    assert completions and isinstance(completions[0]["prompt"], list)
    assert (tmp_path / "runs" / "dpo" / "final" / "adapter_config.json").is_file()
    assert "accuracy" in outputs[3].stdout and "reward_exact-match" in outputs[3].stdout  # eval's table, on stdout
