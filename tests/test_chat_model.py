"""tests/chat_model.py builds a plain HF instruct-model directory offline: ChatML tokenizer + random Qwen2."""
from __future__ import annotations

from pathlib import Path

import pytest
from chat_model import ENDOFTEXT, IM_END, IM_START, build_chat_model

USER = [{"role": "user", "content": "What is 2+3?"}]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("chat-model") / "model"
    assert build_chat_model(out) == out
    return out


@pytest.fixture(scope="module")
def tokenizer(chat_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(chat_dir), local_files_only=True, trust_remote_code=False)


def test_directory_is_plain_hf(chat_dir):
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (chat_dir / name).is_file(), name
    assert not list(chat_dir.glob("*.py")) and not list(chat_dir.glob("*.bin"))


def test_chat_template_renders_chatml(tokenizer):
    assert tokenizer.chat_template
    text = tokenizer.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    # no default system message is invented, and no generation prompt unless asked
    assert tokenizer.apply_chat_template(USER, tokenize=False) == "<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
    system = [{"role": "system", "content": "You are a helpful assistant."}] + USER
    text = tokenizer.apply_chat_template(system, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")


def test_special_tokens_and_round_trip(chat_dir, tokenizer):
    from tokenizers import Tokenizer

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (ENDOFTEXT, IM_START, IM_END)}
    assert sorted(ids.values()) == [0, 1, 2]
    assert tokenizer.eos_token == IM_END and tokenizer.eos_token_id == ids[IM_END]
    assert tokenizer.pad_token == ENDOFTEXT and tokenizer.pad_token_id == ids[ENDOFTEXT]
    assert tokenizer.bos_token is None
    assert 300 <= len(tokenizer) <= 400

    text = tokenizer.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    encoded = tokenizer(text, add_special_tokens=False).input_ids
    assert encoded[0] == ids[IM_START]
    assert encoded.count(ids[IM_START]) == 2 and encoded.count(ids[IM_END]) == 1  # specials stay single tokens
    assert tokenizer.decode(encoded) == text
    plain = "The answer is 19."
    plain_ids = tokenizer(plain, add_special_tokens=False).input_ids
    assert len(plain_ids) < len(plain)  # BPE merges learnt from the corpus
    assert tokenizer.decode(plain_ids, skip_special_tokens=True) == plain
    assert tokenizer.decode(encoded + plain_ids, skip_special_tokens=True) == "user\nWhat is 2+3?\nassistant\n" + plain
    # what AutoTokenizer rebuilds (Qwen2Tokenizer's pipeline) encodes as the saved tokenizer.json does
    raw = Tokenizer.from_file(str(chat_dir / "tokenizer.json"))
    assert raw.encode(text + plain, add_special_tokens=False).ids == tokenizer(text + plain, add_special_tokens=False).input_ids


def test_rlgen_loaders_and_forward(chat_dir, one_torch_thread):
    import torch

    from rlgen.models.causal_lm import load_model, load_tokenizer

    tokenizer = load_tokenizer(chat_dir)
    model = load_model(chat_dir)
    assert tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids(IM_END)
    assert tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.eos_token_id == tokenizer.eos_token_id and model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.tie_word_embeddings and model.config.vocab_size == len(tokenizer)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    ids = tokenizer.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(ids, add_special_tokens=False).input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_seed_makes_weights_reproducible(chat_dir, tmp_path):
    from safetensors.torch import load_file

    again = load_file(str(build_chat_model(tmp_path / "again") / "model.safetensors"))
    first = load_file(str(chat_dir / "model.safetensors"))
    assert again.keys() == first.keys() and all((again[k] == first[k]).all() for k in first)
    assert (tmp_path / "again" / "tokenizer.json").read_text() == (chat_dir / "tokenizer.json").read_text()
