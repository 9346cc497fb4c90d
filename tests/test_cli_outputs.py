"""Where results go: `rlgen eval`'s table is data (stdout; logs stay on stderr), and `rlgen pairs --json`
gives its summary on stderr when stdout carries the pairs (on stdout with --out FILE)."""
from __future__ import annotations

import json

from cli_helpers import rlgen_ok

SCORED = [{"prompt": "1+1=", "completion": c, "reward": r} for c, r in (("2", 1.0), ("3", 0.0), ("22", 0.5))]


def _scored(tmp_path):
    path = tmp_path / "scored.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in SCORED))
    return path


def test_eval_table_goes_to_stdout(tmp_path):
    result = rlgen_ok("eval", _scored(tmp_path))
    assert "reward.mean" in result.out and "0.5000" in result.out
    assert "reward.mean" not in result.err


def test_pairs_json_summary_beside_pairs_on_stdout(tmp_path):
    result = rlgen_ok("pairs", _scored(tmp_path), "--json")
    pairs = [json.loads(line) for line in result.out.splitlines()]
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("2", "3")]
    assert json.loads(result.err) == {"samples": 3, "groups": 1, "pairs": 1}
    to_file = rlgen_ok("pairs", _scored(tmp_path), "--json", "--out", tmp_path / "pairs.jsonl")
    assert json.loads(to_file.out) == {"samples": 3, "groups": 1, "pairs": 1}
