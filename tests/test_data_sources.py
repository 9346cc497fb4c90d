"""Data sources beside JSONL and Parquet: CSV files and `datasets` directories (save_to_disk: state.json and
Arrow stream files, read with pyarrow, nothing imported from `datasets`, nothing unpickled)."""
from __future__ import annotations

import json

import pyarrow as pa
import pytest

from cli_helpers import rlgen, rlgen_ok

from rlgen.data.records import read_records
from rlgen.errors import RlgenError

ROWS = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+3=", "answer": "5"}, {"prompt": "4+4=", "answer": "8"}]


def save_to_disk(directory, rows, files=2):
    """The layout `datasets.Dataset.save_to_disk` writes: Arrow stream shards named in state.json."""
    directory.mkdir()
    names = []
    for k in range(files):
        part = rows[k::files]
        name = f"data-{k:05d}-of-{files:05d}.arrow"
        table = pa.Table.from_pylist(part)
        with pa.OSFile(str(directory / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        names.append(name)
    (directory / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names],
                                                      "_fingerprint": "0", "_split": "train"}))
    (directory / "dataset_info.json").write_text("{}")
    return directory


def test_csv_rows_with_their_line_numbers(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('prompt,answer\n1+1=,2\n"a, quoted\nprompt",5\n4+4=,8\n')
    records = read_records(str(path), required=("prompt",))
    assert [r["prompt"] for r in records] == ["1+1=", "a, quoted\nprompt", "4+4="]
    assert [r["_line"] for r in records] == [2, 3, 5]  # a record's first line (a quoted newline spans two)
    assert all(isinstance(r["answer"], str) for r in records)
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,answer\n1+1=\n")
    with pytest.raises(RlgenError, match=r"bad.csv, line 2: 2 columns expected"):
        read_records(str(bad))


def test_a_datasets_directory_reads_like_its_rows(tmp_path):
    directory = save_to_disk(tmp_path / "ds", ROWS)
    records = read_records(str(directory), required=("prompt", "answer"))
    assert sorted(r["prompt"] for r in records) == sorted(r["prompt"] for r in ROWS)
    assert [r["_line"] for r in records] == [1, 2, 3]


def test_datasets_directories_that_cannot_be_read_are_one_line(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(RlgenError, match="expected a JSONL, Parquet or CSV file or a `datasets` directory"):
        read_records(str(plain))
    splits = tmp_path / "dict"
    splits.mkdir()
    (splits / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(RlgenError, match=r"splits train, test of a DatasetDict: give one, e\.g\. .*dict/train"):
        read_records(str(splits))
    outside = save_to_disk(tmp_path / "outside", ROWS, files=1)
    (outside / "state.json").write_text(json.dumps({"_data_files": [{"filename": "../elsewhere.arrow"}]}))
    with pytest.raises(RlgenError, match="not an Arrow file in"):
        read_records(str(outside))
    broken = save_to_disk(tmp_path / "broken", ROWS, files=1)
    (broken / "data-00000-of-00001.arrow").write_bytes(b"not arrow")
    with pytest.raises(RlgenError, match="not a readable Arrow stream"):
        read_records(str(broken))


def test_training_and_scoring_read_them(tmp_path):
    directory = save_to_disk(tmp_path / "ds", [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(8)])
    rlgen_ok("train", "sft", "--data", directory, "--steps", 1, "--set", "algorithm.batch_size=4",
             "--quiet", "--out", tmp_path / "run")
    csv_file = tmp_path / "samples.csv"
    csv_file.write_text("prompt,completion,answer\n1+1=,2,2\n1+1=,3,2\n")
    scored = [json.loads(line) for line in rlgen_ok("score", "-r", "exact-match", csv_file).out.splitlines()]
    assert [row["reward_exact-match"] for row in scored] == [1.0, 0.0]


def test_column_mapping_and_prompt_truncation(tmp_path):
    data = tmp_path / "qa.csv"
    data.write_text("question,solution\n" + "".join(f"Please compute {a}+{a}=,{2 * a}\n" for a in range(8)))
    from rlgen.api import build_trainer

    sets = ["data.prompt_field=question", "data.answer_field=solution", "data.max_prompt_length=4", "run.eval_every=0",
            "rollout.prompts_per_step=2", "rollout.num_generations=2", 'rewards=[{name="exact-match"}]']
    trainer = build_trainer("grpo", model="tiny-arith", data=str(data), out=str(tmp_path / "api"), sets=sets)
    trainer.setup()
    record = trainer.records[0]
    assert record["prompt"] == "Please compute 0+0=" and record["answer"] == "0" and "question" not in record
    assert trainer.prompt_text(record) == "0+0="  # the last 4 tokens (characters for tiny-arith) kept
    assert trainer.truncation_report(trainer.records) == ("data.max_prompt_length = 4: 8 of 8 training prompts "
                                                          "truncated (left)")
    trainer.config.data.prompt_truncation = "right"
    trainer._truncated.clear()
    assert trainer.prompt_text(record) == "Plea"
    run = rlgen_ok("train", "grpo", "--data", data, "--reward", "exact-match", "--steps", 1, "--out", tmp_path / "run",
                   *[a for s in sets[:4] for a in ("--set", s)], "--set", "rollout.prompts_per_step=2",
                   "--set", "rollout.num_generations=2")
    assert "data.max_prompt_length = 4: 8 of 8 training prompts truncated (left)" in run.err
    missing = rlgen("train", "grpo", "--data", data, "--set", "data.prompt_field=query", "--out", tmp_path / "x")
    assert missing.code == 2 and "missing field 'query' (the data's prompt column)" in missing.err
