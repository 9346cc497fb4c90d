"""Shared fixtures."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised, very small HF Llama with rlgen's char tokenizer (independent of the
    shipped tiny-arith model, so tests need no trained weights)."""
    out = tmp_path_factory.mktemp("tiny-model") / "model"
    proc = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "tiny-arith" / "init_model.py"), str(out),
         "--hidden", "32", "--layers", "1", "--heads", "2"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "config.json").is_file()
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module's in-process runs (they share 2 cores with subprocesses)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
