"""SIGKILL mid-run, `--resume`, and the result is bit-identical to an uninterrupted run.

Run A goes uninterrupted; run B (same command, started at the same time) is SIGKILLed as soon as one of
its checkpoints has been renamed into place, then continued with `rlgen train grpo --resume B`. Final
weights must be bit-identical and B's metrics.jsonl must hold every step exactly once, equal to A's.

The reward is `length` (not the default exact-match): a random tiny model never gets an arithmetic answer
right, so exact-match would give zero advantages, zero gradients and trivially identical weights.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import cli_env, rlgen_command, rlgen_process

# Training runs in fresh interpreters, killed and resumed: the full tier (CI).
pytestmark = pytest.mark.slow

TIMING_FIELDS = {"step_time", "rollout_time", "completions_per_s", "tokens_per_s"}
# Enough steps after the kill point that the kill lands mid-run (a step takes ~10 ms on CPU here).
STEPS = 20
LORA_STEPS = 12


def train_args(model: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return rlgen_command(
        "train", "grpo", "--model", model, "--task", "arithmetic", "--reward", "length",
        "--steps", steps, "--save-every", 2, "--seed", 7, "--out", out,
        "--set", "rollout.prompts_per_step=4", "--set", "rollout.num_generations=4",
        "--set", "rollout.max_new_tokens=4", "--set", "run.eval_every=0", "--set", "run.threads=1",
        "--set", "optim.lr=1e-3", "--set", "optim.lr_scheduler=cosine",  # the scheduler state must resume too
        *extra, "--quiet",
    )


def start(args, cwd: Path, log: Path) -> subprocess.Popen:
    handle = log.open("w")
    return subprocess.Popen(args, cwd=cwd, env=cli_env(), stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT)


def kill_when_checkpoint_exists(proc: subprocess.Popen, checkpoint: Path, log: Path, timeout: float = 240) -> None:
    """SIGKILL `proc` as soon as `checkpoint` exists (checkpoints are renamed into place when complete)."""
    deadline = time.monotonic() + timeout
    while not checkpoint.is_dir():
        if proc.poll() is not None:
            pytest.fail(f"run exited ({proc.returncode}) before {checkpoint} appeared:\n{log.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{checkpoint} did not appear within {timeout}s")
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def run_a_and_killed_b(tmp_path: Path, model: Path, steps: int, kill_after: int, *extra: str):
    a, b = tmp_path / "A", tmp_path / "B"
    proc_a = start(train_args(model, a, steps, *extra), tmp_path, tmp_path / "a.log")
    proc_b = start(train_args(model, b, steps, *extra), tmp_path, tmp_path / "b.log")
    try:
        kill_when_checkpoint_exists(proc_b, b / "checkpoints" / f"step-{kill_after}", tmp_path / "b.log")
        assert proc_a.wait(timeout=240) == 0, (tmp_path / "a.log").read_text()
    finally:
        for proc in (proc_a, proc_b):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    killed = {
        "returncode": proc_b.returncode,
        "final_existed": (b / "final").exists(),
        "checkpoints": sorted(p.name for p in (b / "checkpoints").iterdir()),
        "metric_lines": len((b / "metrics.jsonl").read_text().splitlines()),
    }
    rlgen_process("train", "grpo", "--resume", b, "--quiet", cwd=tmp_path, check=True)
    return a, b, killed


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(dir_a: Path, dir_b: Path, file: str = "model.safetensors") -> dict:
    wa, wb = load_file(str(dir_a / file)), load_file(str(dir_b / file))
    assert wa.keys() == wb.keys()
    different = [name for name in wa if not torch.equal(wa[name], wb[name])]
    assert not different, f"tensors differ after resume: {different[:5]}"
    return wa


def assert_same_metrics(a: Path, b: Path, steps: int) -> None:
    rows_a, rows_b = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in rows_b] == list(range(1, steps + 1))  # each step exactly once
    assert [r["step"] for r in rows_a] == list(range(1, steps + 1))
    for ra, rb in zip(rows_a, rows_b):
        assert {k: v for k, v in ra.items() if k not in TIMING_FIELDS} == {k: v for k, v in rb.items() if k not in TIMING_FIELDS}


def assert_no_tmp(*runs: Path) -> None:
    for run in runs:
        leftovers = [str(p) for p in run.rglob("*") if ".tmp" in p.name or p.name.endswith(".old")]
        assert not leftovers, leftovers


def assert_was_killed_mid_run(killed: dict, steps: int) -> None:
    assert killed["returncode"] == -signal.SIGKILL
    assert not killed["final_existed"], f"the kill landed after the run finished: make the run longer ({killed})"
    assert killed["checkpoints"], killed


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("resume-full")
    a, b, killed = run_a_and_killed_b(tmp, tiny_model_dir, STEPS, 4)
    return a, b, killed


def test_killed_run_resumes_bit_identically(full_runs, tiny_model_dir):
    a, b, killed = full_runs
    assert_was_killed_mid_run(killed, STEPS)
    weights = assert_same_weights(a / "final", b / "final")
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    assert any(not torch.equal(weights[k], initial[k]) for k in initial), "training did not change the weights"
    assert_same_metrics(a, b, STEPS)
    assert any(r["grad_norm"] > 0 for r in read_metrics(a))
    assert_no_tmp(a, b)


def test_checkpoint_layout(full_runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlgen.training.state import load_state

    a, b, _ = full_runs
    expected = [f"step-{s}" for s in range(2, STEPS, 2)]  # none at the last step: that is final/
    assert sorted(p.name for p in (a / "checkpoints").iterdir()) == sorted(expected)
    assert sorted(p.name for p in (b / "checkpoints").iterdir()) == sorted(expected)
    ckpt = a / "checkpoints" / "step-4"
    for name in ("model", "optimizer.safetensors", "optimizer.json", "rng.safetensors", "rng.json", "trainer_state.json"):
        assert (ckpt / name).exists(), name
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 4
    model = AutoModelForCausalLM.from_pretrained(str(ckpt / "model"))
    AutoTokenizer.from_pretrained(str(ckpt / "model"))
    saved = load_file(str(ckpt / "model" / "model.safetensors"))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    optimizer = load_state(ckpt, "optimizer")
    assert set(optimizer) == {"state", "param_groups"} and optimizer["state"]
    rng = load_state(ckpt, "rng")
    assert {"torch", "generator", "python"} <= set(rng)
    assert_no_tmp(a, b)


def test_lora_killed_run_resumes_bit_identically(tmp_path, tiny_model_dir):
    a, b, killed = run_a_and_killed_b(tmp_path, tiny_model_dir, LORA_STEPS, 2, "--set", "model.lora_r=4")
    assert_was_killed_mid_run(killed, LORA_STEPS)
    assert (b / "checkpoints" / "step-2" / "model" / "adapter_config.json").is_file()  # checkpoints keep the adapter
    assert_same_weights(a / "checkpoints" / "step-4" / "model", b / "checkpoints" / "step-4" / "model",
                        "adapter_model.safetensors")
    weights = assert_same_weights(a / "final", b / "final")  # merged by default
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    assert any(not torch.equal(weights[k], initial[k]) for k in initial), "training did not change the weights"
    assert_same_metrics(a, b, LORA_STEPS)
    assert_no_tmp(a, b)
