"""Shared fixtures."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# A run says what it is loading when its set-up takes 5 s; on a loaded test machine a tiny model's may, and the
# notice would add a line to outputs the tests compare exactly (tests/test_progress_lines.py sets it itself).
os.environ.setdefault("RLGEN_LOADING_NOTICE_S", "600")


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


HF_RECORDS = [{"prompt": f"{a}+{b}=", "answer": str(a + b)}
              for a, b in [(1, 2), (3, 4), (5, 5), (2, 7), (8, 1), (6, 3), (4, 4), (9, 0)]]


def _save_pretrained(model, tokenizer, out: Path) -> Path:
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict:
    """A random GPT-2 and a random Llama with rlgen's char tokenizer, saved as plain HF directories, and a
    JSONL dataset of 8 sums (`records` holds them as written)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from rlgen.models.char_tokenizer import build_char_tokenizer

    root = tmp_path_factory.mktemp("e2e-hf")
    tokenizer = build_char_tokenizer()
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2, **ids))
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, **ids))
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in HF_RECORDS))
    return {"gpt2": _save_pretrained(gpt2, tokenizer, root / "gpt2"),
            "llama": _save_pretrained(llama, tokenizer, root / "llama"), "data": data, "records": HF_RECORDS}


def pytest_collection_modifyitems(config, items):
    """`cuda` tests need a GPU: skipped (with the reason) where torch sees none."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/gpu-check.sh on a GPU machine)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
