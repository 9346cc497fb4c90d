"""A small "user's own instruct model" built offline: a byte-level BPE tokenizer with ChatML special tokens
and a ChatML chat template, and a randomly initialised Qwen2ForCausalLM, saved as a plain HF directory.

Not a test file: tests import `build_chat_model` (tests/ is on sys.path, like cli_helpers)."""
from __future__ import annotations

import random
from pathlib import Path

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
# transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX (GPT-4-like split, single digits)
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
VOCAB_SIZE = 352  # BPE vocabulary (256 byte symbols + merges), special tokens included

# Qwen2-Instruct's ChatML template, without its default system message.
CHAT_TEMPLATE = (  # Jinja's own '\n' escapes, as in Qwen2-Instruct's tokenizer_config.json
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_WORDS = ["the", "answer", "is", "what", "how", "much", "sum", "of", "and", "plus", "minus", "times", "number",
          "please", "compute", "question", "you", "are", "a", "helpful", "assistant", "think", "step", "by",
          "first", "then", "so", "result", "equals", "add", "subtract", "multiply", "two", "three", "four"]


def chat_corpus(lines: int = 400, seed: int = 0) -> list[str]:
    """Short English + arithmetic lines ("What is 12+7? The answer is 19." ...), deterministic."""
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        kind = i % 5
        if kind == 0:
            out.append(f"What is {a}+{b}? The answer is {a + b}.")
        elif kind == 1:
            out.append(f"Compute {a}-{b}. The result is {a - b}.")
        elif kind == 2:
            out.append(f"What is {a % 13}*{b % 13}? The answer is {(a % 13) * (b % 13)}.")
        elif kind == 3:
            out.append(f"You are a helpful assistant. Please add {a} and {b}: {a} plus {b} equals {a + b}.")
        else:
            words = rng.sample(_WORDS, 6)
            out.append(" ".join(words).capitalize() + ".")
    return out


def build_chat_tokenizer(seed: int = 0):
    """A transformers.PreTrainedTokenizerFast: byte-level BPE trained on chat_corpus, ChatML specials,
    eos <|im_end|>, pad <|endoftext|>, no bos, ChatML chat_template."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Qwen2Tokenizer's own pipeline: transformers 5's AutoTokenizer picks Qwen2Tokenizer from config.json's
    # model_type and rebuilds normalizer/pre-tokenizer/decoder, ignoring tokenizer.json's; matching them keeps
    # the saved tokenizer.json and the loaded tokenizer encoding alike.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(chat_corpus(seed=seed), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=ENDOFTEXT,
                                        bos_token=None, clean_up_tokenization_spaces=False)
    tokenizer.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_chat_model(out: Path, seed: int = 0, layers: int = 1, hidden: int = 32, max_positions: int = 512) -> Path:
    """Write a tokenizer (see build_chat_tokenizer) and a random Qwen2ForCausalLM to `out`; returns `out`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(out)
    tokenizer = build_chat_tokenizer(seed=seed)
    eos, pad = tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        tie_word_embeddings=True, eos_token_id=eos, pad_token_id=pad, bos_token_id=None)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    model.generation_config.bos_token_id = None
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out
