"""Held-out evaluation data (rlgen.training.trainer.held_out_split): `data.eval_path`, else a seeded fraction of
a data file that is never trained on, else the task's held-out split; and evaluation with the run's own rewards."""
from __future__ import annotations

import json

import pytest

from cli_helpers import rlgen_ok

from rlgen.errors import RlgenError
from rlgen.training.config import DataConfig
from rlgen.training.trainer import held_out_split

RECORDS = [{"prompt": f"{a}+{a}=", "answer": str(2 * a), "_line": a + 1} for a in range(40)]


def test_a_seeded_fraction_of_the_file_is_held_out_and_never_trained_on():
    data = DataConfig(path="train.jsonl", eval_fraction=0.1, eval_samples=200)
    train, held, what = held_out_split(data, RECORDS, seed=3, evaluating=True)
    assert len(held) == 4 and len(train) == 36
    assert not {r["_line"] for r in held} & {r["_line"] for r in train}  # disjoint
    assert sorted(r["_line"] for r in held + train) == [r["_line"] for r in RECORDS]  # nothing lost
    assert [r["_line"] for r in train] == sorted(r["_line"] for r in train)  # training order kept
    assert held_out_split(data, RECORDS, seed=3, evaluating=True)[1] == held  # seeded
    assert held_out_split(data, RECORDS, seed=4, evaluating=True)[1] != held
    assert "4 of 4 records held out of train.jsonl" in what and "never trained on" in what
    assert held_out_split(data, RECORDS, seed=3, evaluating=False) == (RECORDS, None, "")  # no evaluation: all trained
    assert held_out_split(DataConfig(path="t.jsonl", eval_fraction=0.0), RECORDS, 3, True)[:2] == (RECORDS, None)
    capped = held_out_split(DataConfig(path="t.jsonl", eval_fraction=0.5, eval_samples=5), RECORDS, 3, True)
    assert len(capped[0]) == 20 and len(capped[1]) == 5  # held out: 20, evaluated: the first 5 of them
    with pytest.raises(RlgenError, match="leaves none to train on"):
        held_out_split(DataConfig(path="t.jsonl", eval_fraction=0.99), RECORDS[:1], 3, True)


def test_eval_path_and_task_splits(tmp_path):
    held_file = tmp_path / "held.jsonl"
    held_file.write_text("".join(json.dumps({"prompt": f"{a}*2=", "answer": str(2 * a)}) + "\n" for a in range(3)))
    train, held, what = held_out_split(DataConfig(path="t.jsonl", eval_path=str(held_file)), RECORDS, 0, True)
    assert train == RECORDS and [r["prompt"] for r in held] == ["0*2=", "1*2=", "2*2="]
    assert what == f"{held_file} (3 records)"
    train, held, what = held_out_split(DataConfig(task="arithmetic", eval_samples=7), RECORDS, 0, True)
    assert train == RECORDS and len(held) == 7 and "task arithmetic, split test" in what


def test_grpo_on_a_file_evaluates_its_held_out_part_with_the_run_rewards(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                            for a in range(10) for b in range(2)))
    from rlgen.api import build_trainer

    trainer = build_trainer("grpo", model="tiny-arith", data=str(data), out=str(tmp_path / "api"),
                            sets=["run.eval_every=1", "data.eval_fraction=0.25", 'rewards=[{name="exact-match"}, {name="length", weight=-0.01}]'])
    trainer.prepare_data()
    assert len(trainer.records) == 15 and len(trainer.eval_records) == 5
    assert not {r["prompt"] for r in trainer.records} & {r["prompt"] for r in trainer.eval_records}
    run = rlgen_ok("train", "grpo", "--data", data, "--reward", "exact-match", "--reward", "length:-0.01", "--steps", 1,
                   "--set", "run.eval_every=1", "--set", "rollout.prompts_per_step=2", "--set", "rollout.num_generations=2",
                   "--out", tmp_path / "run")
    assert "held-out evaluation: 2 of 2 records held out of" in run.err
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [row for row in rows if "eval/reward" in row][-1]
    assert last["eval/reward"] == pytest.approx(last["eval/reward_exact-match"] - 0.01 * last["eval/reward_length"], abs=1e-5)
    assert last["eval/accuracy"] == last["eval/reward_exact-match"]


def test_a_resumed_run_keeps_its_split(tmp_path):
    from cli_helpers import rlgen

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                            for a in range(10) for b in range(2)))
    common = ["--set", "rollout.prompts_per_step=2", "--set", "rollout.num_generations=2", "--quiet"]
    rlgen_ok("train", "grpo", "--data", data, "--steps", 1, "--save-every", 1, *common, "--out", tmp_path / "run")
    changed = rlgen("train", "grpo", "--resume", tmp_path / "run", "--set", "data.eval_fraction=0.3")
    assert changed.code == 2 and changed.out == ""
    assert changed.err.strip() == ("rlgen: error: --resume: data.eval_fraction cannot change (0.1 -> 0.3): it decides "
                                   "which records the run trains on and which it holds out")
    evaluating = rlgen("train", "grpo", "--resume", tmp_path / "run", "--set", "run.eval_every=0")
    assert evaluating.code == 2 and "run.eval_every (on or off) cannot change" in evaluating.err
    rlgen_ok("train", "grpo", "--resume", tmp_path / "run", "--steps", 2, "--quiet")  # other overrides are fine


def test_image_trainers_refuse_text_model_data_keys(tmp_path):
    from cli_helpers import rlgen

    refused = rlgen("train", "ddpo", "--set", "data.chat_template=always", "--out", tmp_path / "x")
    assert refused.code == 2 and refused.out == "" and len(refused.err.strip().splitlines()) == 1
    assert "config key 'data.chat_template' = 'always': image trainers do not use it" in refused.err
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": [{"role": "user", "content": "a 3"}]}) + "\n")
    listed = rlgen("train", "ddpo", "--data", prompts, "--set", "run.eval_every=0", "--out", tmp_path / "y")
    assert listed.code == 2 and "field 'prompt' must be a string" in listed.err
