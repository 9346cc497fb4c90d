"""bench/scale.py at --preset tiny: one GRPO update per configuration in its own process, every configuration in
the table and the JSON with positive figures, bf16-mixed's state never above fp32's (fp32 master weights and
AdamW states), and FSDP's per-rank state halved at 2 ranks once FSDP exists."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_scale(*args):
    return subprocess.run([sys.executable, str(BENCH / "scale.py"), *args], capture_output=True, text=True, timeout=900)


@pytest.mark.slow  # four (up to eight) processes that each load torch, rlgen and the model: ~1 min here
def test_tiny_preset_measures_every_configuration(tmp_path):
    out = tmp_path / "scale.json"
    proc = run_scale("--preset", "tiny", "--threads", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["name"]: r for r in result["rows"]}
    expected = ["fp32", "fp32 ckpt", "bf16-mixed", "bf16-mixed ckpt"]
    for name in expected:
        assert name in rows, sorted(rows)
        row = rows[name]
        assert "error" not in row, row.get("error")
        assert f"| {name} |" in proc.stdout
        for key in ("update_s", "max_peak_bytes", "param_bytes", "grad_bytes", "optim_bytes", "state_bytes"):
            assert row[key] > 0, (name, key, row[key])
        assert row["tokens"] == result["batch"]["prompts"] * result["batch"]["generations"] * result["batch"]["completion_tokens"]
        # AdamW keeps two fp32 moments per fp32 parameter; the gradients match the parameters
        assert row["optim_bytes"] >= 2 * row["param_bytes"] and row["grad_bytes"] == row["param_bytes"]
    assert rows["bf16-mixed"]["state_bytes"] <= rows["fp32"]["state_bytes"]
    assert rows["fp32 ckpt"]["gradient_checkpointing"] and not rows["fp32"]["gradient_checkpointing"]
    fsdp = {r["ranks"]: r for r in result["rows"] if r.get("distributed") == "fsdp"}
    if fsdp:  # only once rlgen/training/fsdp.py and run.distributed = "fsdp" exist
        assert "error" not in fsdp[1] and "error" not in fsdp[2]
        halved = max(rank["state_bytes"] for rank in fsdp[2]["per_rank"]) / fsdp[1]["state_bytes"]
        assert 0.45 <= halved <= 0.6, halved
    else:
        assert any("FSDP rows skipped" in note for note in result["notes"])
    sweep = [r for r in result["rows"] if r.get("token_budget")]
    assert sweep or any("sweep skipped" in note for note in result["notes"])
    if sweep:
        # budget 64 tokens, groups of 2 rows x (8 + T) tokens kept whole: two groups (>= 2 x 2 x 24 = 96 tokens)
        # never fit together, so every length runs one group per micro-batch; without a budget, one micro-batch
        baseline = {r["completion_tokens"]: r for r in result["rows"] if r["name"].startswith("no budget ")}
        assert sorted(baseline) == sorted(r["completion_tokens"] for r in sweep) == result["batch"]["sweep"]
        for row in sweep:
            assert "error" not in row and row["micro_batch_rows"] == [2, 2], (row["name"], row.get("micro_batch_rows"))
            assert f"| 2 (2 x {8 + row['completion_tokens']} = {2 * (8 + row['completion_tokens'])}) |" in proc.stdout
        for row in baseline.values():
            assert "error" not in row and row["token_budget"] is None and row["micro_batch_rows"] == [4]
            assert row["max_peak_bytes"] > 0


@pytest.mark.slow  # three processes
def test_split_groups_sweep_puts_one_long_row_per_micro_batch(tmp_path):
    out = tmp_path / "scale.json"
    proc = run_scale("--preset", "tiny", "--threads", "1", "--no-fsdp", "--precisions", "", "--sweep-prompts", "1",
                     "--sweep-split-groups", "--token-budget", "136", "--sweep", "16,128", "--sweep-baseline", "128",
                     "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert sorted(rows) == ["budget 136 T=128", "budget 136 T=16", "no budget T=128"]
    # rows of 8 + T tokens: at T=16 both (48) fit in 136; at T=128 one (136) does, two (272) do not
    assert rows["budget 136 T=16"]["micro_batch_rows"] == [2]
    assert rows["budget 136 T=128"]["micro_batch_rows"] == [1, 1]
    assert rows["no budget T=128"]["micro_batch_rows"] == [2]
    assert all(r["prompts"] == 1 and r["generations"] == 2 for r in rows.values())


def test_sweep_baseline_rejects_a_bad_value():
    proc = run_scale("--preset", "tiny", "--sweep-baseline", "longest")
    assert proc.returncode == 2 and "--sweep-baseline" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_a_gpu_is_one_line_and_exit_2():
    proc = run_scale("--preset", "tiny", "--device", "cuda")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "--device cuda" in proc.stderr


def load_bench_common():
    sys.path.insert(0, str(BENCH))
    try:
        import bench_common
    finally:
        sys.path.remove(str(BENCH))
    return bench_common


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_bench_device_resolution_without_a_gpu(capsys):
    common = load_bench_common()
    assert common.resolve_bench_device("cpu") == torch.device("cpu")
    assert common.resolve_bench_device("auto") == torch.device("cpu")
    for spec in ("cuda", "cuda:1", "gpu"):
        with pytest.raises(SystemExit) as exc:
            common.resolve_bench_device(spec)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and spec in err


@pytest.mark.slow  # one process per benchmark, each importing torch (and transformers)
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
@pytest.mark.parametrize("script, extra", [("logprob.py", []), ("grpo_step.py", []), ("dpo_step.py", []),
                                           ("diffusion_step.py", []), ("merge.py", ["--work", "WORK"])])
def test_every_benchmark_refuses_cuda_without_a_gpu_in_one_line(script, extra, tmp_path):
    extra = [str(tmp_path) if a == "WORK" else a for a in extra]
    proc = subprocess.run([sys.executable, str(BENCH / script), *extra, "--device", "cuda"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("note:")]
    assert len(lines) == 1 and "--device cuda" in lines[0], proc.stderr
    assert proc.stdout == ""
