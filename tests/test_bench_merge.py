"""bench/merge.py end to end at --tiny size without mergekit: the generated checkpoints (streamed, sharded,
cached, loadable by transformers, fine-tunes = base + noise), the timed `rlgen merge` runs and the report."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"

# Checkpoints written, merged and timed end to end: the full tier (CI).
pytestmark = pytest.mark.slow


def load_bench():
    spec = importlib.util.spec_from_file_location("merge_bench_under_test", BENCH / "merge.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_models_are_streamed_sharded_cached_and_loadable(tmp_path):
    from transformers import AutoModelForCausalLM

    from rlgen.merging.safetensors_io import Checkpoint

    bench = load_bench()
    spec = bench.SIZES["tiny"]
    dirs = bench.make_models(tmp_path, spec, noise=0.002, shard_size=40_000)
    assert sorted(dirs) == ["base", "ft1", "ft2", "ft3"]
    assert (dirs["base"] / "model.safetensors.index.json").is_file()  # sharded
    stamp = (dirs["ft2"] / "bench_spec.json").stat().st_mtime_ns
    assert bench.make_models(tmp_path, spec, noise=0.002, shard_size=40_000) == dirs
    assert (dirs["ft2"] / "bench_spec.json").stat().st_mtime_ns == stamp  # reused, not remade

    model = AutoModelForCausalLM.from_pretrained(str(dirs["ft1"]))
    assert model.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == sum(bench._numel(s) for _, s in bench.llama_tensors(spec))
    base, tuned = Checkpoint(dirs["base"]), Checkpoint(dirs["ft3"])
    delta = tuned.tensor("model.layers.1.mlp.up_proj.weight").float() - base.tensor("model.layers.1.mlp.up_proj.weight").float()
    assert 0.001 < float(delta.std()) < 0.004  # noise 0.002 (plus bf16 rounding)
    base.close()
    tuned.close()


def test_bench_runs_end_to_end_without_mergekit(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(BENCH / "merge.py"), "--work", str(tmp_path / "work"), "--tiny",
                           "--repeats", "1", "--mergekit", "none", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"ties", "dare-ties"}
    for row in result["results"].values():
        assert row["rlgen"]["wall_s"] > 0 and 50 < row["rlgen"]["peak_rss_mb"] < 2000
        assert "mergekit" not in row
    assert result["model"]["bytes_on_disk"] > 0 and result["threads"]["rlgen"]
    assert result["ties_rlgen_vs_mergekit"] is None
    assert "ties" in proc.stdout and "dare-ties" in proc.stdout and "rlgen s" in proc.stdout
    assert not (tmp_path / "work" / "out").exists()  # merged outputs are removed
