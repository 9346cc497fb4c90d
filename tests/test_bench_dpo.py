"""bench/dpo_step.py: the preference pairs it times both libraries on (no training here)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load_bench():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("dpo_step_under_test", BENCH / "dpo_step.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


RECORDS = [{"prompt": "407+779=", "answer": "1186"}, {"prompt": "123+456=", "answer": "579"},
           {"prompt": "5+5=", "answer": "10"}]


def test_pairs_prefer_the_correct_sum():
    bench = load_bench()
    pairs = bench.make_pairs(RECORDS, 3)
    assert [p["prompt"] for p in pairs] == [r["prompt"] for r in RECORDS]
    assert [p["chosen"] for p in pairs] == ["1186", "579", "10"]
    assert pairs[0]["rejected"] == "176"  # the sum without carries
    assert pairs[1]["rejected"] == "589"  # no carry to drop: sum + 10
    assert pairs[2]["rejected"] == "0"  # the carry dropped
    assert all(p["chosen"] != p["rejected"] for p in pairs)


def test_completion_len_stretches_both_answers():
    bench = load_bench()
    for length in (5, 12, 13, 40):
        for p in bench.make_pairs(RECORDS, 3, length):
            for text in (p["chosen"], p["rejected"]):
                assert len(text) == length and not text.endswith(" ")
            assert p["chosen"] != p["rejected"]


def test_enough_pairs_that_none_repeats():
    bench = load_bench()
    args = bench.parse_args(["--steps", "3", "--warmup", "1", "-B", "4"])
    assert bench.pairs_needed(args) == (3 + 1 + 2) * 4
