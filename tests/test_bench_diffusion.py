"""bench/diffusion_step.py: its saved-tensor meter, and a smoke run of reward backprop with and without
gradient checkpointing on a random-init tiny-digits pipeline."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def load_bench():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("diffusion_step_under_test", BENCH / "diffusion_step.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_saved_tensor_meter_counts_live_storages_once_and_skips_parameters():
    bench = load_bench()
    weight = torch.nn.Parameter(torch.randn(64, 64))
    x = torch.randn(64, 64, requires_grad=True)
    meter = bench.SavedTensorMeter({weight.untyped_storage().data_ptr()})
    with meter.hooks():
        h = x * 2.0  # saves nothing (scalar factor)
        s = h.sin()  # saves h: 16 KiB
        y = s @ weight  # saves s and the weight (a parameter: counted apart)
        z = y.exp()  # saves its result: 16 KiB
        loss = (z * s).sum()  # saves z and s again: no new storage
        assert meter.current == 3 * 64 * 64 * 4  # h, s, z; s and z counted once each
        loss.backward()
    assert meter.peak == 3 * 64 * 64 * 4
    del h, s, y, z, loss
    assert meter.current == 0  # backward released the graph
    assert meter.param_refs >= 1 and meter.param_bytes == 64 * 64 * 4


@pytest.fixture(scope="module")
def init_pipelines(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench-diffusion-init")
    subprocess.run([sys.executable, str(ROOT / "recipes/tiny-digits/make_init.py"), str(out)], check=True,
                   capture_output=True)
    return out


@pytest.mark.slow
def test_reward_backprop_smoke_checkpointing_saves_less(init_pipelines, tmp_path):
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "diffusion_step.py"), "--model", str(init_pipelines / "tiny-digits"),
         "--only", "reward-backprop", "--backprop-k", "all", "--num-steps", "3", "--prompts", "1",
         "--images-per-prompt", "2", "--steps", "1", "--warmup", "0", "--repeats", "1", "--json", str(out_json)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| algorithm | T | images/step | sec/step (median) | images/s | saved-for-backward MiB" in proc.stdout

    result = json.loads(out_json.read_text())
    assert {"config", "machine", "versions", "results", "checkpointing"} <= set(result)
    assert result["config"]["num_steps"] == 3 and result["machine"]["torch_threads_workers"] == 1
    rows = {r["name"]: r for r in result["results"]}
    assert set(rows) == {"reward-backprop K=all", "reward-backprop K=all no-ckpt"}
    for name, r in rows.items():
        assert "error" not in r, r
        for key in ("step_s", "images_per_s", "saved_bytes", "peak_tensor_bytes", "peak_rss_delta_bytes",
                    "step_peak_rss_delta_bytes", "rss_after_setup_bytes", "images_per_step", "steps", "settings"):
            assert r.get(key) is not None, (name, key)
        assert r["step_s"] > 0 and r["images_per_step"] == 2 and len(r["steps"]) == 1
        assert r["images_per_s"] == pytest.approx(2 / r["step_s"])
        assert r["settings"]["backprop_steps"] == 3 and r["settings"]["num_steps"] == 3
        assert r["settings"]["gradient_checkpointing"] is (not name.endswith("no-ckpt"))
        assert r["saved_left_after_step"] == 0  # every saved tensor released by backward

    on, off = rows["reward-backprop K=all"], rows["reward-backprop K=all no-ckpt"]
    # Without checkpointing the graph keeps every step's activations; with it only the checkpoints' inputs
    # and what follows the last step (decode, reward), so strictly less (about T = 3 times less, or more).
    assert on["saved_bytes"] < off["saved_bytes"]
    assert off["saved_bytes"] > 2 * on["saved_bytes"]

    (row,) = result["checkpointing"]
    assert row["K"] == 3 and row["K_label"] == "all"
    assert row["saved_bytes"] == {"on": on["saved_bytes"], "off": off["saved_bytes"]}
    assert row["ratio_off_on"]["saved_bytes"] == pytest.approx(off["saved_bytes"] / on["saved_bytes"])
