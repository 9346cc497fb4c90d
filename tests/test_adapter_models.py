"""A saved LoRA adapter directory (model.lora_merge_on_save = false) is a model wherever one is taken: sample,
eval, and train as the starting point (its adapter merged into its base; a new adapter on top with lora_r > 0)."""
from __future__ import annotations

import json

import pytest
import torch

from cli_helpers import rlgen_ok

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter")
    rlgen_ok("train", "sft", "--task", "arithmetic", "--steps", 2, "--set", "algorithm.batch_size=4",
             "--set", "model.lora_r=4", "--set", "model.lora_merge_on_save=false", "--set", "optim.lr=1e-2",
             "--quiet", "--out", root / "lora")
    final = root / "lora" / "final"
    assert (final / "adapter_config.json").is_file() and not (final / "config.json").exists()
    return final


def test_sample_and_eval_take_an_adapter(adapter):
    rows = [json.loads(line) for line in rlgen_ok("sample", "--model", adapter, "--task", "arithmetic", "--limit", 2,
                                                   "--temperature", 0).out.splitlines()]
    assert len(rows) == 2
    result = json.loads(rlgen_ok("eval", "--model", adapter, "--task", "arithmetic", "--limit", 4, "--json").out)
    assert result["num_problems"] == 4


def test_training_starts_from_the_merged_adapter(adapter, tmp_path):
    from rlgen.api import build_trainer
    from rlgen.models.causal_lm import load_model

    merged = load_model(adapter).merge_and_unload().state_dict()
    trainer = build_trainer("grpo", model=str(adapter), out=str(tmp_path / "api"), sets=["run.eval_every=0"])
    trainer.setup()
    start = trainer.model.state_dict()
    assert all(torch.equal(start[name], merged[name]) for name in merged)
    assert all(p.requires_grad for p in trainer.model.parameters())  # full fine-tuning from the merged weights
    rlgen_ok("train", "grpo", "--model", adapter, "--steps", 1, "--quiet", "--out", tmp_path / "full")
    rlgen_ok("train", "sft", "--model", adapter, "--task", "arithmetic", "--steps", 1, "--set", "algorithm.batch_size=4",
             "--set", "model.lora_r=4", "--quiet", "--out", tmp_path / "again")
    assert (tmp_path / "full" / "final" / "config.json").is_file() and (tmp_path / "again" / "final" / "config.json").is_file()


def test_a_lora_run_started_from_an_adapter_resumes(adapter, tmp_path):
    common = ["--task", "arithmetic", "--set", "algorithm.batch_size=4", "--set", "model.lora_r=4", "--quiet"]
    rlgen_ok("train", "sft", "--model", adapter, "--steps", 1, "--save-every", 1, *common, "--out", tmp_path / "run")
    rlgen_ok("train", "sft", "--resume", tmp_path / "run", "--steps", 2, "--quiet")
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
