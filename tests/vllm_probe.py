"""Checks of the vLLM rollout engine, run in a process of their own (tests/test_vllm.py starts it): vLLM sets up
process-wide state (its own torch.distributed group, thread and memory binding) that the rest of the test
session must not inherit. Writes the measured figures as JSON to the path given."""
from __future__ import annotations

import json
import sys
import time


def max_diff(a, b, mask) -> float:
    return float(((a - b).abs() * mask).max())


def main(out_path: str) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from rlgen.models.causal_lm import load_policy
    from rlgen.models.logprobs import completion_logprobs
    from rlgen.rollout.engine import HFEngine, SamplingParams, row_seeds
    from rlgen.rollout.vllm_engine import VLLMEngine
    from rlgen.training.config import ModelConfig

    torch.manual_seed(0)
    threads, set_num_threads = torch.get_num_threads(), torch.set_num_threads
    policy, tokenizer, _ = load_policy(ModelConfig(path="tiny-arith"))
    policy.eval()
    started = time.perf_counter()
    torch.manual_seed(7)
    expected_draw = float(torch.rand(()))
    torch.manual_seed(7)
    engine = VLLMEngine(policy, tokenizer, max_model_len=40, max_num_seqs=64)
    figures: dict = {"startup_s": time.perf_counter() - started, "threads_before": threads,
                     "threads_after": torch.get_num_threads(), "set_num_threads_restored": torch.set_num_threads is set_num_threads,
                     # vLLM's worker seeds the global generators: the engine puts them back as they were
                     "global_rng_kept": float(torch.rand(())) == expected_draw}
    hf = HFEngine(policy, tokenizer)
    prompts = ["12+34=", "5+6=", "5+6=", "100+250=", "7+8=", "41+1="]

    def policy_logprobs(model, rollouts, temperature):
        return completion_logprobs(model, rollouts.prompt_ids, rollouts.prompt_mask, rollouts.completion_ids,
                                   rollouts.completion_mask, temperature, False)[0].detach()

    # greedy: the same tokens and texts as the HF engine
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    ours, theirs = engine.generate(prompts, greedy), hf.generate(prompts, greedy)
    figures["greedy_texts"] = [ours.texts, theirs.texts]
    figures["greedy_ids_equal"] = ours.completion_ids.tolist() == theirs.completion_ids.tolist()
    figures["greedy_masks_equal"] = ours.completion_mask.tolist() == theirs.completion_mask.tolist()

    # sampled tokens' log-probs: the engine's against the policy's, at two temperatures
    generator = torch.Generator().manual_seed(0)
    for temperature in (1.0, 0.7):
        drawn = engine.generate(prompts * 8, SamplingParams(max_new_tokens=8, temperature=temperature), generator)
        mask = drawn.completion_mask.float()
        figures[f"logprob_diff_t{temperature}"] = max_diff(policy_logprobs(policy, drawn, temperature), drawn.logprobs, mask)
        figures[f"tokens_t{temperature}"] = int(mask.sum())
    # per-row seeds: the same seeds give the same completions, whatever the batch around them
    seeds = row_seeds(1234, 0, 12)
    once = engine.generate(prompts * 2, SamplingParams(max_new_tokens=8, temperature=1.0), seeds=seeds)
    again = engine.generate((prompts * 2)[:5], SamplingParams(max_new_tokens=8, temperature=1.0), seeds=seeds[:5])
    figures["seeded_rows_equal"] = once.texts[:5] == again.texts
    figures["distinct_sampled_texts"] = len(set(once.texts))

    # a fixed completion before and after the policy changes: sync, and the engine agrees with the new weights
    fixed_prompts = ["12+34=", "5+6="]
    fixed = [tokenizer("46", add_special_tokens=False).input_ids + [tokenizer.eos_token_id],
             tokenizer("11", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]]
    fixed_rollouts = hf.generate(fixed_prompts, SamplingParams(max_new_tokens=0))
    ids, mask = hf.pad_completions(fixed)
    fixed_rollouts.completion_ids, fixed_rollouts.completion_mask = ids, mask

    def fixed_policy_logprobs(model):
        return policy_logprobs(model, fixed_rollouts, 1.0)

    before_engine = engine.score(fixed_prompts, fixed)
    figures["fixed_diff_before"] = max_diff(before_engine, fixed_policy_logprobs(policy), mask.float())
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    engine.sync_weights(policy)
    figures["stale_after_sync_call"] = engine.stale
    after_engine = engine.score(fixed_prompts, fixed)
    figures["fixed_diff_after"] = max_diff(after_engine, fixed_policy_logprobs(policy), mask.float())
    figures["fixed_moved_by_update"] = max_diff(after_engine, before_engine, mask.float())
    drawn = engine.generate(prompts * 4, SamplingParams(max_new_tokens=8, temperature=1.0), generator)
    figures["logprob_diff_after_sync"] = max_diff(policy_logprobs(policy, drawn, 1.0), drawn.logprobs,
                                                  drawn.completion_mask.float())

    # LoRA: the engine gets W + BA (merged on the fly; the policy's own base weights untouched)
    lora = get_peft_model(policy, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                             task_type="CAUSAL_LM"))
    base_before = {n: p.detach().clone() for n, p in lora.get_base_model().named_parameters() if "base_layer" in n}
    with torch.no_grad():
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.2)
    engine.sync_weights(lora)
    lora_engine = engine.score(fixed_prompts, fixed)
    figures["lora_fixed_diff"] = max_diff(lora_engine, fixed_policy_logprobs(lora), mask.float())
    figures["lora_moved"] = max_diff(lora_engine, after_engine, mask.float())
    figures["lora_base_untouched"] = all(torch.equal(p.detach(), base_before[n])
                                         for n, p in lora.get_base_model().named_parameters() if n in base_before)

    # stop strings: the completion ends with the token that completes the string, the text before it
    stop = engine.generate(["12+34="], SamplingParams(max_new_tokens=8, temperature=0.0, stop=("4",)))
    reference = hf.generate(["12+34="], SamplingParams(max_new_tokens=8, temperature=0.0, stop=("4",)))
    figures["stop"] = {"vllm": [stop.texts, stop.completion_mask.tolist(), stop.truncated.tolist()],
                       "hf": [reference.texts, reference.completion_mask.tolist(), reference.truncated.tolist()]}
    # many long prompts sampled with seeds in one call: more prompt tokens than an engine step takes by default
    # (vLLM would split a prompt across steps and then rewind its seeded CPU generator, which fails)
    long_prompts = [f"{123456789 + i}+{987654321012 + 7 * i}=" for i in range(64)]
    many = engine.generate(long_prompts * 2, SamplingParams(max_new_tokens=4, temperature=1.0), generator)
    figures["long_prompt_rows"] = [int(many.prompt_mask.sum(1).min()), len(many.texts)]
    # truncation at max_new_tokens
    short = engine.generate(prompts, SamplingParams(max_new_tokens=1, temperature=0.0))
    figures["truncated_at_one_token"] = [short.truncated.tolist(),
                                         hf.generate(prompts, SamplingParams(max_new_tokens=1, temperature=0.0)).truncated.tolist()]
    figures["weight_syncs"] = engine.weight_syncs
    engine.close()

    # weights vLLM did not take (names it does not know) are caught at the first push, not sampled from
    import rlgen.rollout.vllm_engine as vllm_engine
    from rlgen.errors import RlgenError

    every_weight = vllm_engine.checkpoint_weights
    vllm_engine.checkpoint_weights = lambda model: ((n, t) for n, t in every_weight(model)
                                                    if n != "model.norm.weight" and ".mlp." not in n)
    fresh, _, _ = load_policy(ModelConfig(path="tiny-arith"))
    partial = VLLMEngine(fresh, tokenizer, max_model_len=40, max_num_seqs=8)
    try:
        partial.generate(prompts, greedy)
        figures["partial_push_error"] = None
    except RlgenError as exc:
        figures["partial_push_error"] = str(exc)
    partial.close()
    vllm_engine.checkpoint_weights = every_weight
    with open(out_path, "w") as handle:
        json.dump(figures, handle, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
