"""Which rollout engine draws the text completions of `rlgen sample` and `rlgen eval` (`--engine`); the trainers
choose theirs with `rollout.engine` (Trainer.text_engine)."""
from __future__ import annotations

from rlgen.errors import RlgenError, show_value
from rlgen.rollout.engine import HFEngine

ENGINE_KINDS = ("hf", "vllm")


def check_engine_kind(option: str, kind) -> str:
    if kind not in ENGINE_KINDS:
        raise RlgenError(f"{option} = {show_value(kind)}: expected one of {', '.join(ENGINE_KINDS)}")
    return kind


def build_text_engine(kind: str, model, tokenizer, *, add_special_tokens: bool = True, prompts=(), max_new_tokens: int = 16,
                      rows: int = 256, seed: int = 0):
    """An engine over a loaded causal LM: `hf` (rlgen's KV-cached loop) or `vllm` (a colocated vLLM engine whose
    context holds the longest of `prompts` plus `max_new_tokens`, running up to `rows` sequences at once)."""
    if kind == "vllm":
        from rlgen.rollout.vllm_engine import VLLMEngine

        texts = sorted(set(prompts))
        longest = max((len(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens).input_ids), default=0) \
            if texts else 0
        # samplers that feed a partial completion back as text (smc) may re-tokenise it into more tokens: a margin
        engine = VLLMEngine(model, tokenizer, max_model_len=longest + 2 * max_new_tokens, max_num_seqs=max(1, rows),
                            seed=seed)
    else:
        engine = HFEngine(model, tokenizer)
    engine.add_special_tokens = add_special_tokens
    return engine
