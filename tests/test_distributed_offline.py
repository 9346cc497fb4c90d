"""The offline trainers (sft, dpo, kto, rm) on two gloo processes (torchrun) train like one process on the
same global batch: per-step metrics and final weights match a 1-process run, uneven shards included (odd
batch sizes), rank 0 alone writes the run directory, DPO's reference cache is filled for every rank's pairs,
and a 2-process run killed after a checkpoint resumes on one or two processes to the uninterrupted result."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import rlgen_ok

from rlgen.models.causal_lm import resolve_model_path
from rlgen.training.state import load_state

SUMS = [(407, 779), (488, 790), (535, 648), (12, 34), (250, 250), (901, 87), (66, 77), (123, 456),
        (310, 205), (999, 1), (45, 45), (700, 88), (38, 61), (204, 613), (5, 9), (840, 160)]
PAIRS = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 10 * (k % 3 + 1))}
         for k, (a, b) in enumerate(SUMS)]
# lr 1e-3 moves the weights by ~1e-3 in three steps, far beyond the tolerance. adam_eps = 1e-3 keeps Adam from
# turning rounding noise into lr-sized steps: with the default 1e-8 a gradient entry at the noise level (a
# different sum order over ranks) moves its weight by up to +-lr on either run, and the runs differ by ~1e-5.
COMMON = ["--model", "tiny-arith", "--set", "optim.lr=1e-3", "--set", "optim.adam_eps=1e-3", "--set", "run.threads=1",
          "--set", "run.eval_every=0", "--quiet"]
# Metrics are written to 6 decimals: a rounding step on top of the float tolerance.
RTOL, ATOL, WEIGHT_ATOL = 1e-4, 1e-6 + 5e-7, 1e-5
# Each test starts torchrun (three torch imports) at least once: 20-40 s each on 2 busy cores, ~4 min in all.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
            "-m", "rlgen", *map(str, args)]


def torchrun_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*args, cwd: Path) -> None:
    proc = subprocess.run(torchrun_command(*args), capture_output=True, text=True, env=torchrun_env(), cwd=cwd, timeout=300)
    assert proc.returncode == 0, f"torchrun rlgen {' '.join(map(str, args))} -> {proc.returncode}\n{proc.stderr[-3000:]}"


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def run_files(run: Path) -> list[str]:
    """Every file the run wrote, relative to its directory (its lock file aside)."""
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and "lock" not in p.name)


def assert_same_run(single: Path, multi: Path, weights_of=None, loose: dict[str, float] | None = None,
                    rtol: float = RTOL, atol: float = ATOL) -> dict[str, float]:
    """The per-step metrics and final weights (`weights_of(run)`, default the LM's) of two runs agree ->
    the largest differences seen (`loose`: metrics with their own relative tolerance; their largest relative
    difference is reported apart)."""
    weights_of = weights_of or final_weights
    loose = loose or {}
    ours, theirs = rows_of(single), rows_of(multi)
    assert [r["step"] for r in theirs] == [r["step"] for r in ours]
    metric_diff = loose_diff = 0.0
    for a, b in zip(ours, theirs):
        assert set(b) == set(a), (a, b)
        for key, value in a.items():
            if key.endswith(("_time", "_per_s")) or value is None:  # wall-clock figures
                continue
            assert b[key] == pytest.approx(value, rel=loose.get(key, rtol), abs=atol), (a["step"], key)
            if key in loose:
                loose_diff = max(loose_diff, abs(b[key] - value) / max(abs(value), 1e-12))
            else:
                metric_diff = max(metric_diff, abs(b[key] - value))
    weights, other = weights_of(single), weights_of(multi)
    assert set(other) == set(weights)
    weight_diff = 0.0
    for name, tensor in weights.items():
        torch.testing.assert_close(other[name], tensor, atol=WEIGHT_ATOL, rtol=0)
        weight_diff = max(weight_diff, float((other[name] - tensor).abs().max()))
    return {"metric": metric_diff, "weight": weight_diff, "loose_rel": loose_diff}


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dist-data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return path


# Odd global batches for dpo and kto: shards of 3 and 2 pairs, 4 and 3 examples.
CASES = {
    "sft": ["--task", "arithmetic", "--set", "algorithm.batch_size=8", "--set", "optim.gradient_accumulation_steps=2",
            "--set", "data.eval_samples=0"],
    # one micro-batch: step 1's policy and reference scores come from the same computation on each rank, so
    # that their exact ties (rewards/accuracies counts ties as wrong) hold on both runs
    "dpo": ["--data", "{pairs}", "--set", "algorithm.batch_size=5", "--set", "algorithm.rpo_alpha=0.5",
            "--save-every", "2"],
    "kto": ["--data", "{pairs}", "--set", "algorithm.batch_size=7"],
    "rm": ["--data", "{pairs}", "--set", "algorithm.batch_size=6", "--set", "optim.gradient_accumulation_steps=2"],
}


@pytest.mark.parametrize("algorithm", sorted(CASES))
def test_two_processes_train_like_one(tmp_path, pair_file, algorithm):
    args = ["train", algorithm, *(str(a).replace("{pairs}", str(pair_file)) for a in CASES[algorithm]), "--steps", 3, *COMMON]
    rlgen_ok(*args, "--out", tmp_path / "single", cwd=tmp_path)
    torchrun(*args, "--out", tmp_path / "multi", cwd=tmp_path)
    diffs = assert_same_run(tmp_path / "single", tmp_path / "multi")
    base = load_file(str(resolve_model_path("tiny-arith") / "model.safetensors"))
    trained = final_weights(tmp_path / "single")
    assert max(float((trained[k] - base[k]).abs().max()) for k in base if k in trained) > 10 * WEIGHT_ATOL
    print(f"{algorithm}: max |metric diff| {diffs['metric']:.2e}, max |weight diff| {diffs['weight']:.2e}")
    # rank 0 alone wrote the run directory: the same files as the 1-process run's, one metrics line per step
    assert run_files(tmp_path / "multi") == run_files(tmp_path / "single")
    assert [r["step"] for r in rows_of(tmp_path / "multi")] == [1, 2, 3]
    if algorithm == "dpo":
        # the reference cache rank 0 checkpoints holds the pairs of both ranks' shards, as one process's does
        caches = [load_state(tmp_path / run / "checkpoints" / "step-2", "extra")["ref_cache"] for run in ("single", "multi")]
        assert int((~torch.isnan(caches[0][:, 0])).sum()) == 10  # two batches of 5 distinct pairs (one epoch of 16)
        torch.testing.assert_close(caches[1], caches[0], atol=1e-6, rtol=RTOL, equal_nan=True)


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            pass  # a process that ended while we looked
    return out


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_after_checkpoint(args: list, run: Path, cwd: Path) -> bool:
    """Start a 2-process run and, once the step-2 checkpoint is committed, SIGKILL one rank: torchrun then
    stops the other and fails the job (torchrun starts each rank in a session of its own, so killing
    torchrun's group would leave the ranks running) -> whether the run was still going (it normally is:
    steps 3-4 and final/ remain)."""
    proc = subprocess.Popen(torchrun_command(*args, "--out", run), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=torchrun_env(), cwd=cwd, start_new_session=True)
    deadline = time.monotonic() + 300
    ranks: list[int] = []
    try:
        while not (run / "checkpoints" / "step-2").is_dir():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no step-2 checkpoint"
            time.sleep(0.002)
        ranks = _children(proc.pid)
        still_running = proc.poll() is None and len(ranks) == 2
        os.kill(max(ranks), signal.SIGKILL)  # one rank (the later-started one)
        assert proc.wait(timeout=120) != 0, "torchrun did not fail the job"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        for pid in ranks:  # every rank is gone before the test reads the run directory
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
            while _alive(pid):
                time.sleep(0.01)
    return still_running and not (run / "final").exists()


@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_killed_two_process_run_resumes_on_one_or_two_processes(tmp_path, distributed):
    """ddp writes full checkpoints (rank 0's HF model and AdamW states); fsdp sharded ones (each rank its rows:
    run.checkpoint_format = auto), which one process reads whole and two read by rows."""
    args = ["train", "sft", "--task", "arithmetic", "--set", "algorithm.batch_size=6", "--set", "data.eval_samples=0",
            "--steps", 4, "--save-every", 2, "--set", f"run.distributed={distributed}", *COMMON]
    rlgen_ok(*args, "--out", tmp_path / "uninterrupted", cwd=tmp_path)
    killed = tmp_path / "killed"
    interrupted = kill_after_checkpoint(args, killed, tmp_path)
    print(f"killed before the end: {interrupted}")
    checkpoint = killed / "checkpoints" / "step-2"
    if distributed == "fsdp":
        assert sorted(p.name for p in (checkpoint / "shards").iterdir()) == [
            "rank-00000-of-00002.safetensors", "rank-00001-of-00002.safetensors", "shards.json"]
        assert not (checkpoint / "model").exists()  # nothing gathered
        halves = [load_file(str(checkpoint / "shards" / f"rank-0000{r}-of-00002.safetensors")) for r in (0, 1)]
        embed = "model.model.embed_tokens.weight"
        assert halves[0][embed].shape[0] + halves[1][embed].shape[0] == load_file(str(
            resolve_model_path("tiny-arith") / "model.safetensors"))["model.embed_tokens.weight"].shape[0]
    else:
        assert (checkpoint / "model" / "model.safetensors").is_file() and not (checkpoint / "shards").exists()
    on_one, on_two = tmp_path / "resumed-1", tmp_path / "resumed-2"
    shutil.copytree(killed, on_one)
    shutil.copytree(killed, on_two)
    rlgen_ok("train", "sft", "--resume", on_one, "--quiet", cwd=tmp_path)
    torchrun("train", "sft", "--resume", on_two, "--quiet", cwd=tmp_path)
    for resumed in (on_one, on_two):
        diffs = assert_same_run(tmp_path / "uninterrupted", resumed)
        print(f"{resumed.name}: max |metric diff| {diffs['metric']:.2e}, max |weight diff| {diffs['weight']:.2e}")
