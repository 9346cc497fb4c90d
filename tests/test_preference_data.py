"""Preference data: pair validation (one-line CLI errors naming file and line, before any run directory
exists), margins from scores, unpaired (KTO) records, and scored samples -> pairs (`make_pairs`,
`rlgen pairs`) with exact expected output."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cli_helpers import rlgen_process

from rlgen.data.preferences import check_pair, make_pairs, read_pairs, read_unpaired
from rlgen.errors import RlgenError

GOOD = {"prompt": "1+1=", "chosen": "2", "rejected": "3"}


def jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


# --- bad pair files through `rlgen train dpo`: exit 2, one stderr line naming file and line -------------

BAD_FILES = {
    "missing-field": ([GOOD, {"prompt": "2+2=", "chosen": "4"}], ["line 2", "missing field 'rejected'"]),
    "empty-chosen": ([GOOD, GOOD, {"prompt": "2+2=", "chosen": "  ", "rejected": "5"}], ["line 3", "'chosen'", "empty"]),
    "non-string": ([{"prompt": "2+2=", "chosen": "4", "rejected": 5}, GOOD], ["line 1", "'rejected'", "must be a string"]),
    "malformed-json": ([GOOD, '{"prompt": "2+2=", "chosen": "4", ', GOOD], ["line 2", "malformed JSON"]),
    "identical-without-tie": ([GOOD, {"prompt": "2+2=", "chosen": "4", "rejected": "4"}], ["line 2", "identical", "tie"]),
}


@pytest.fixture(scope="module")
def bad_pair_runs(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-pairs")
    # only the cases this session runs (`-m "not slow"` deselects most): each one is a fresh interpreter
    selected = {item.callspec.params["name"] for item in request.session.items
                if item.originalname == "test_bad_pair_file_gives_one_line_error" and hasattr(item, "callspec")}

    def run(name):
        lines, _ = BAD_FILES[name]
        cwd = root / name
        cwd.mkdir()
        data = jsonl(root / f"{name}.jsonl", lines)
        proc = rlgen_process("train", "dpo", "--model", "tiny-arith", "--data", data, "--out", "run", "--steps", 1,
                             cwd=cwd)
        return data, cwd, proc

    pool = ThreadPoolExecutor(max_workers=2)
    try:
        yield {name: pool.submit(run, name) for name in BAD_FILES if name in selected}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("name", [name if name == "missing-field" else pytest.param(name, marks=pytest.mark.slow)
                                  for name in BAD_FILES])
def test_bad_pair_file_gives_one_line_error(bad_pair_runs, name):
    data, cwd, proc = bad_pair_runs[name].result(timeout=300)
    detail = f"stdout={proc.stdout!r}\nstderr={proc.stderr!r}"
    assert proc.returncode == 2, detail
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, detail
    assert lines[0].startswith("rlgen: error: "), detail
    assert f"{data.name}, line " in lines[0], detail  # the file, then the line
    for text in BAD_FILES[name][1]:
        assert text in lines[0], f"{text!r} missing\n{detail}"
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not (cwd / "run").exists(), "run directory created for bad data"
    assert list(cwd.iterdir()) == []


# --- read_pairs / check_pair in-process --------------------------------------------------------------

def test_margin_from_scores_and_explicit_margin_wins(tmp_path):
    path = jsonl(tmp_path / "p.jsonl", [
        {**GOOD, "chosen_score": 0.75, "rejected_score": 0.25},
        {**GOOD, "chosen_score": 3, "rejected_score": 1, "margin": 0.5},  # an explicit margin is kept
        {**GOOD, "chosen_score": 1.0},  # only one score: no margin
        {"prompt": "", "chosen": "x", "rejected": "x", "tie": True},  # a tie may repeat itself; empty prompt allowed
    ])
    pairs = read_pairs(str(path))
    assert [p.get("margin") for p in pairs] == [0.5, 0.5, None, None]
    assert pairs[0]["margin"] == 0.75 - 0.25
    assert [p["_line"] for p in pairs] == [1, 2, 3, 4]
    assert pairs[3]["tie"] is True


@pytest.mark.parametrize("record,message", [
    ({**GOOD, "margin": "big"}, "'margin' must be a finite number"),
    ({**GOOD, "chosen_score": float("nan"), "rejected_score": 0.0}, "'chosen_score' must be a finite number"),
    ({**GOOD, "margin": True}, "'margin' must be a finite number"),
    ({**GOOD, "tie": "yes"}, "'tie' must be true or false"),
    ({"chosen": "2", "rejected": "3"}, "missing field 'prompt'"),
    ({**GOOD, "prompt": None}, "missing field 'prompt'"),
    ({**GOOD, "chosen": ["2"]}, "'chosen': message 0 is a str, not an object"),
])
def test_check_pair_rejects(record, message):
    with pytest.raises(RlgenError, match=message) as info:
        check_pair("f.jsonl", {**record, "_line": 7})
    assert str(info.value).startswith("f.jsonl, line 7: ")


# --- read_unpaired (KTO) -------------------------------------------------------------------------------

def test_read_unpaired_splits_pair_files(tmp_path):
    path = jsonl(tmp_path / "pairs.jsonl", [{**GOOD, "answer": "2"}, {"prompt": "2+2=", "chosen": "4", "rejected": "22"}])
    examples = read_unpaired(str(path))
    assert [(e["prompt"], e["completion"], e["label"], e["_line"]) for e in examples] == [
        ("1+1=", "2", True, 1), ("1+1=", "3", False, 1), ("2+2=", "4", True, 2), ("2+2=", "22", False, 2)]
    assert examples[0]["answer"] == "2" and "chosen" not in examples[0] and "rejected" not in examples[1]


def test_read_unpaired_label_records(tmp_path):
    path = jsonl(tmp_path / "u.jsonl", [{"prompt": "1+1=", "completion": "2", "label": True},
                                        {"prompt": "1+1=", "completion": "7", "label": False}])
    examples = read_unpaired(str(path))
    assert [(e["completion"], e["label"]) for e in examples] == [("2", True), ("7", False)]


@pytest.mark.parametrize("record,message", [
    ({"prompt": "1+1=", "completion": "2", "label": 1}, "line 2: field 'label' must be true or false, got 1"),
    ({"prompt": "1+1=", "completion": "2", "label": "true"}, "line 2: field 'label' must be true or false"),
    ({"prompt": "1+1=", "completion": "2"}, "line 2: field 'label' must be true or false, got None"),
    ({"prompt": "1+1=", "completion": "", "label": True}, "line 2: field 'completion' is empty"),
    ({"prompt": "1+1=", "chosen": "2", "rejected": "2"}, "line 2: 'chosen' and 'rejected' are identical"),
])
def test_read_unpaired_rejects(tmp_path, record, message):
    path = jsonl(tmp_path / "u.jsonl", [{"prompt": "0+0=", "completion": "0", "label": True}, record])
    with pytest.raises(RlgenError, match=message) as info:
        read_unpaired(str(path))
    assert str(path) in str(info.value)


# --- make_pairs ------------------------------------------------------------------------------------------

def sample(prompt, answer, completion, reward, index):
    return {"prompt": prompt, "answer": answer, "completion": completion, "reward": reward,
            "reward_exact-match": reward, "sample_index": index, "completion_tokens": len(completion)}


SAMPLES = [
    sample("1+1=", "2", "2", 1.0, 0),
    sample("1+1=", "2", "3", 0.0, 1),
    sample("1+1=", "2", "2 ", 0.5, 2),
    sample("1+1=", "2", "3", 0.9, 3),  # a duplicate completion: counted once, with its first score (0.0)
    sample("2+2=", "4", "4", 1.0, 0),
    sample("2+2=", "4", "5", 1.0, 1),  # no spread: no pair
    sample("3+3=", "6", "6", float("nan"), 0),  # no score: left out
    sample("3+3=", "6", "7", 0.0, 1),
    sample("3+3=", "6", "66", 0.2, 2),
    sample("3+3=", "6", "666", 0.2, 3),  # ties with "66": the earlier sample wins
    sample("4+4=", "8", "8", None, 0),  # a group with one scored sample: no pair
    sample("4+4=", "8", "9", 0.0, 1),
]


def pair(prompt, answer, chosen, rejected, cs, rs):
    return {"prompt": prompt, "answer": answer, "chosen": chosen, "rejected": rejected, "chosen_score": cs,
            "rejected_score": rs, "margin": cs - rs}


def test_make_pairs_best_worst():
    assert make_pairs(SAMPLES) == [pair("1+1=", "2", "2", "3", 1.0, 0.0), pair("3+3=", "6", "66", "7", 0.2, 0.0)]


def test_make_pairs_all():
    assert make_pairs(SAMPLES, mode="all") == [
        pair("1+1=", "2", "2", "2 ", 1.0, 0.5),
        pair("1+1=", "2", "2", "3", 1.0, 0.0),
        pair("1+1=", "2", "2 ", "3", 0.5, 0.0),
        pair("3+3=", "6", "66", "7", 0.2, 0.0),
        pair("3+3=", "6", "666", "7", 0.2, 0.0),
    ]


def test_make_pairs_margin_is_strict():
    assert make_pairs(SAMPLES, margin=0.3) == [pair("1+1=", "2", "2", "3", 1.0, 0.0)]
    assert make_pairs(SAMPLES, mode="all", margin=0.5) == [pair("1+1=", "2", "2", "3", 1.0, 0.0)]
    assert make_pairs(SAMPLES, margin=1.0) == []


def test_make_pairs_other_field_and_group():
    records = [{"id": 1, "prompt": "a", "completion": "x", "score": 2}, {"id": 1, "prompt": "b", "completion": "y", "score": 5},
               {"id": 2, "prompt": "c", "completion": "z", "score": 1}]
    assert make_pairs(records, field="score", group_by="id") == [
        {"id": 1, "prompt": "b", "chosen": "y", "rejected": "x", "chosen_score": 5.0, "rejected_score": 2.0, "margin": 3.0}]


@pytest.mark.parametrize("records,message", [
    ([{"prompt": "a", "completion": "x"}], "missing score field 'reward'"),
    ([{"prompt": "a", "reward": 1.0}], "missing field 'completion'"),
    ([{"completion": "x", "reward": 1.0}], "missing field 'prompt'"),
    ([{"prompt": "a", "completion": "x", "reward": "1"}], "must be a number"),
])
def test_make_pairs_rejects(records, message):
    with pytest.raises(RlgenError, match=message):
        make_pairs(records)
    with pytest.raises(RlgenError, match="unknown pairing mode"):
        make_pairs(SAMPLES, mode="best")


def test_pairs_cli_from_stdin(tmp_path):
    lines = [json.dumps(s) for s in SAMPLES]  # the NaN score is written as NaN, the None as null
    assert "NaN" in lines[6] and "null" in lines[10]
    proc = rlgen_process("pairs", "--mode", "all", "--margin", "0.4", stdin="\n".join(lines) + "\n", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert out == [
        pair("1+1=", "2", "2", "2 ", 1.0, 0.5),
        pair("1+1=", "2", "2", "3", 1.0, 0.0),
        pair("1+1=", "2", "2 ", "3", 0.5, 0.0),
    ]
    assert "3 pairs from 12 samples in 4 groups" in proc.stderr
