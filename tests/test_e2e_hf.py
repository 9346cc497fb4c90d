"""End to end on plain local Hugging Face checkpoints built here (random GPT-2 and Llama with rlgen's
char tokenizer, saved with save_pretrained): GRPO with --data JSONL and --reward exact-match, LoRA (merged
and adapter-only), sample | score | eval as a shell pipeline, SFT, and merge -- and transformers / peft
load every output back.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import cli_env, rlgen_command, rlgen_process

GRPO_SETS = ["--set", "rollout.max_new_tokens=8", "--set", "rollout.prompts_per_step=2", "--set", "rollout.num_generations=2", "--set", "run.eval_every=0",
             "--set", "run.threads=1"]
METRIC_KEYS = {"reward", "entropy", "clip_ratio/low_mean", "frac_reward_zero_std", "completion_length", "step_time",
               "tokens_per_s"}

# Every test runs rlgen in fresh interpreters (training, a shell pipeline): the full tier, CI.
pytestmark = pytest.mark.slow


def run_cli_many(*commands, cwd: Path) -> list[subprocess.CompletedProcess]:
    """Independent rlgen runs side by side (each is mostly single-threaded startup)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda args: rlgen_process(*args, cwd=cwd, check=True), commands))


def load_back(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    assert tokenizer.eos_token_id == model.config.eos_token_id
    with torch.no_grad():  # the loaded model runs
        logits = model(**tokenizer(["1+2="], return_tensors="pt")).logits
    assert torch.isfinite(logits).all()
    return model


def check_grpo_run(proc: subprocess.CompletedProcess, run: Path, data: Path, steps: int, kl: bool) -> None:
    summary = json.loads(proc.stdout)
    assert Path(summary["final_model"]) == run / "final"
    assert summary["last_step"]["step"] == steps
    config = tomllib.loads((run / "config.toml").read_text())
    assert config["data"]["path"] == str(data)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for row in rows:
        assert METRIC_KEYS <= set(row), METRIC_KEYS - set(row)
        assert ("kl" in row) == kl
        if kl:
            assert row["kl"] is not None and row["kl"] >= 0
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]


def test_grpo_on_local_gpt2_with_jsonl_and_exact_match(tmp_path, hf_dirs):
    run = tmp_path / "run"
    proc = rlgen_process("train", "grpo", "--model", hf_dirs["gpt2"], "--data", hf_dirs["data"], "--reward",
                         "exact-match", "--steps", 2, "--out", run, *GRPO_SETS, "--quiet", "--json", cwd=tmp_path,
                         check=True)
    check_grpo_run(proc, run, hf_dirs["data"], 2, kl=False)
    model = load_back(run / "final")
    assert type(model).__name__ == "GPT2LMHeadModel"


def test_grpo_on_local_llama_with_kl(tmp_path, hf_dirs):
    run = tmp_path / "run"
    proc = rlgen_process("train", "grpo", "--model", hf_dirs["llama"], "--data", hf_dirs["data"], "--reward",
                         "exact-match", "--steps", 2, "--out", run, *GRPO_SETS, "--set", "algorithm.beta=0.04", "--quiet",
                         "--json", cwd=tmp_path, check=True)
    check_grpo_run(proc, run, hf_dirs["data"], 2, kl=True)
    assert tomllib.loads((run / "config.toml").read_text())["algorithm"]["beta"] == 0.04
    model = load_back(run / "final")
    assert type(model).__name__ == "LlamaForCausalLM"


def test_grpo_lora_merged_and_adapter(tmp_path, hf_dirs):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    base = hf_dirs["gpt2"]
    # a small length bonus besides exact-match gives the adapter a gradient, so the merged weights change
    common = ["train", "grpo", "--model", base, "--data", hf_dirs["data"], "-r", "exact-match", "-r", "length:0.1",
              "--steps", 2, *GRPO_SETS, "--set", "model.lora_r=4", "--set", "optim.lr=1e-2", "--quiet", "--json"]
    merged_run, adapter_run = tmp_path / "merged", tmp_path / "adapter"
    procs = run_cli_many([*common, "--out", merged_run],
                         [*common, "--out", adapter_run, "--set", "model.lora_merge_on_save=false"], cwd=tmp_path)
    check_grpo_run(procs[0], merged_run, hf_dirs["data"], 2, kl=False)
    check_grpo_run(procs[1], adapter_run, hf_dirs["data"], 2, kl=False)

    # merged (the default): a plain transformers directory, no adapter files, weights changed by training
    merged_dir = merged_run / "final"
    assert not (merged_dir / "adapter_config.json").exists()
    merged = load_back(merged_dir)
    assert not any("lora" in name for name in merged.state_dict())
    initial = load_file(str(base / "model.safetensors"))
    final = load_file(str(merged_dir / "model.safetensors"))
    assert final.keys() == initial.keys()
    assert any(not torch.equal(final[k], initial[k]) for k in initial)

    # lora_merge_on_save=false: an adapter directory that peft loads on top of the base
    adapter_dir = adapter_run / "final"
    assert (adapter_dir / "adapter_config.json").is_file() and (adapter_dir / "adapter_model.safetensors").is_file()
    assert not (adapter_dir / "model.safetensors").exists()
    auto = AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir))
    assert isinstance(auto, PeftModel)
    explicit = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter_dir))
    # same seed and config: base + adapter equals the other run's merged weights
    unmerged = explicit.merge_and_unload().state_dict()
    for name, tensor in merged.state_dict().items():
        torch.testing.assert_close(unmerged[name], tensor, rtol=1e-5, atol=1e-6)
    assert isinstance(auto.merge_and_unload(), type(merged))


def test_sample_score_eval_shell_pipeline(tmp_path, hf_dirs):
    """`rlgen sample ... | rlgen score -r exact-match | rlgen eval - --json`; tee keeps what sample printed."""
    def cmd(*args):
        return " ".join(shlex.quote(a) for a in rlgen_command(*args))

    samples = tmp_path / "samples.jsonl"
    pipeline = "set -o pipefail; " + " | ".join([
        cmd("sample", "--model", hf_dirs["gpt2"], "--prompts", hf_dirs["data"], "-n", 2, "--max-new-tokens", 4, "--quiet"),
        f"tee {shlex.quote(str(samples))}",
        cmd("score", "-r", "exact-match"),
        cmd("eval", "-", "--json"),
    ])
    proc = subprocess.run(pipeline, shell=True, executable="/bin/bash", capture_output=True, text=True, cwd=tmp_path,
                          env=cli_env(), timeout=240)
    assert proc.returncode == 0, proc.stderr

    # what `rlgen sample` wrote to stdout: 16 JSON lines (8 prompts x 2) with completion and sample_index
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == 16
    for row in rows:
        assert {"prompt", "answer", "completion", "sample_index"} <= set(row)
        assert isinstance(row["completion"], str)
        assert not any(key.startswith("_") for key in row)
    assert sorted(r["sample_index"] for r in rows) == sorted([0, 1] * 8)
    assert sorted(r["prompt"] for r in rows) == sorted(r["prompt"] for r in hf_dirs["records"] for _ in range(2))

    result = json.loads(proc.stdout)
    assert result["num_samples"] == 16
    assert result["reward_exact-match"]["count"] == 16
    assert 0.0 <= result["reward_exact-match"]["mean"] <= 1.0
    assert "accuracy" in result


def test_sft_then_merge(tmp_path, hf_dirs):
    base = hf_dirs["gpt2"]
    sft_run = tmp_path / "sft"
    rlgen_process("train", "sft", "--model", base, "--data", hf_dirs["data"], "--steps", 2, "--out", sft_run,
                  "--set", "run.threads=1", "--quiet", cwd=tmp_path, check=True)
    rows = [json.loads(line) for line in (sft_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    load_back(sft_run / "final")

    merged = tmp_path / "merged"
    rlgen_process("merge", base, sft_run / "final", "--weights", "0.5,0.5", "--out", merged, "--quiet", cwd=tmp_path,
                  check=True)
    a = load_file(str(base / "model.safetensors"))
    b = load_file(str(sft_run / "final" / "model.safetensors"))
    m = load_file(str(merged / "model.safetensors"))
    assert m.keys() == a.keys()
    name = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(a[name], b[name])  # SFT changed it, so the average is a real check
    torch.testing.assert_close(m[name], 0.5 * a[name] + 0.5 * b[name])
    for key in m:
        torch.testing.assert_close(m[key], 0.5 * a[key] + 0.5 * b[key])
    model = load_back(merged)
    torch.testing.assert_close(model.state_dict()[name], m[name])
