"""The example plugin's trainer (`rlgen train example-raft`) is built from rlgen.api's public parts only,
and trains through the CLI like a built-in."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cli_helpers import rlgen

RAFT = Path(__file__).resolve().parent.parent / "plugins" / "rlgen-example" / "rlgen_example" / "raft.py"
TINY = ["--set", "rollout.prompts_per_step=4", "--set", "rollout.num_generations=2", "--set", "rollout.max_new_tokens=6",
        "--set", "run.threads=1", "-q"]


def test_raft_imports_only_the_public_api():
    imported = set()
    for node in ast.walk(ast.parse(RAFT.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "rlgen":
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names if a.name.split(".")[0] == "rlgen")
    assert imported == {"rlgen.api"}


def _weights(directory: Path) -> dict:
    return load_file(str(next(directory.glob("*.safetensors"))))


@pytest.mark.slow
def test_raft_trains_on_the_best_completions_only(tmp_path):
    # min_reward 2 is out of reach of exact-match (0 or 1): nothing is kept, the weights stay the base's
    code, out, err = rlgen("train", "example-raft", "--steps", "2", "--out", str(tmp_path / "none"), "--json",
                           "--set", "algorithm.min_reward=2", *TINY)
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "none" / "metrics.jsonl").read_text().splitlines()]
    assert [r["kept"] for r in rows] == [0, 0] and all("loss" not in r for r in rows)
    code, _, err = rlgen("train", "example-raft", "--steps", "2", "--out", str(tmp_path / "all"), "--json",
                         "--set", "algorithm.min_reward=0", *TINY)
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "all" / "metrics.jsonl").read_text().splitlines()]
    assert [r["kept"] for r in rows] == [4, 4]  # every prompt's best (reward >= 0) is kept
    assert all(r["loss"] > 0 for r in rows)
    unchanged, trained = _weights(tmp_path / "none" / "final"), _weights(tmp_path / "all" / "final")
    assert any(not (unchanged[k] == trained[k]).all() for k in unchanged)
    from rlgen.api import resolve_model_path

    base = _weights(resolve_model_path("tiny-arith"))
    assert all((base[k] == unchanged[k]).all() for k in base)
