#!/usr/bin/env python
"""Time and peak memory of one log-prob forward + backward (rlgen.models.logprobs.completion_logprobs, the
trainers' pass) on a ragged batch, padded vs padding-free (`model.padding_free`), side by side.

The batch: `--rows` sequences whose lengths (prompt + completion) are spread evenly over
[--min-len, --max-len] and shuffled; a quarter of each is its prompt (left-padded), the rest its completion
(right-padded), every completion token scored. The model: a random Qwen2 (`--model qwen2`, default: hidden
512, 4 layers, 8 heads, 2 KV heads, vocabulary 8192) or the built-in tiny-arith (`--model tiny-arith`),
fp32, attention `--attn` (sdpa by default). The backward pass is that of the masked log-prob mean.

Timing: one worker process runs every mode once untimed, then `--repeats` rounds of one timed pass per
mode (interleaved, so that a shared machine's changing load weighs on all modes alike; medians reported).
Memory: a fresh worker per mode, after one untimed pass: the peak RSS above the RSS before the pass
(/proc/self/clear_refs + VmHWM, with MALLOC_MMAP_THRESHOLD_=65536 so that glibc returns freed blocks of
64 KiB or more at once and cannot hide a peak; not set for timing, where it would fault in every large
allocation's pages); on CUDA torch.cuda.max_memory_allocated above the allocation before the pass. The workers also return the sum
of the masked log-probs, which must agree (a wrong pass cannot pass as a fast one).

    python bench/padding_free.py                        # qwen2, 16 rows of 16..256 tokens, 5 repeats
    python bench/padding_free.py --model tiny-arith --threads 2
    python bench/padding_free.py --device cuda --attn flash_attention_2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def make_batch(rows: int, min_len: int, max_len: int, vocab: int, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    lengths = torch.linspace(min_len, max_len, rows).round().long()
    lengths = lengths[torch.randperm(rows, generator=gen)].tolist()
    prompts = [max(1, n // 4) for n in lengths]
    completions = [n - p for n, p in zip(lengths, prompts)]
    p_width, c_width = max(prompts), max(completions)
    prompt_ids = torch.zeros((rows, p_width), dtype=torch.long)
    prompt_mask = torch.zeros_like(prompt_ids)
    completion_ids = torch.zeros((rows, c_width), dtype=torch.long)
    completion_mask = torch.zeros_like(completion_ids)
    for row, (p, c) in enumerate(zip(prompts, completions)):
        prompt_ids[row, p_width - p:] = torch.randint(3, vocab, (p,), generator=gen)
        prompt_mask[row, p_width - p:] = 1
        completion_ids[row, :c] = torch.randint(3, vocab, (c,), generator=gen)
        completion_mask[row, :c] = 1
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def build_model(name: str, attn: str, max_len: int):
    import torch

    torch.manual_seed(0)
    if name == "tiny-arith":
        from transformers import AutoModelForCausalLM

        from rlgen.api import resolve_model_path

        return AutoModelForCausalLM.from_pretrained(str(resolve_model_path("tiny-arith")), attn_implementation=attn)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=max(512, max_len),
                         tie_word_embeddings=True)
    config._attn_implementation = attn
    return Qwen2ForCausalLM(config)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def worker(args) -> dict:
    """--measure memory: one mode's peak; --measure time: every mode, interleaved round by round (the
    machine's load then weighs on all modes alike)."""
    import torch

    from rlgen.api import sequence_logps  # the trainers' log-prob pass

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(args.model, args.attn, args.max_len).to(device).train()
    batch = [t.to(device) for t in make_batch(args.rows, args.min_len, args.max_len, model.config.vocab_size, args.seed)]
    mask = batch[3].float()

    def step(mode: str) -> float:
        model.padding_free = mode != "padded"
        model.zero_grad(set_to_none=True)
        logp = sequence_logps(model, batch, 1.0, False)[2]
        ((logp * mask).sum() / mask.sum()).backward()
        model.zero_grad(set_to_none=True)
        return float((logp.detach() * mask).sum())

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    modes = args.modes.split(",")
    out = {"real_tokens": int(batch[1].sum() + batch[3].sum()), "padded_tokens": int(batch[0].numel() + batch[2].numel()),
           "fingerprints": {mode: step(mode) for mode in modes}}  # also the warm-up
    sync()
    if args.measure == "time":
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        for _ in range(args.repeats):
            for mode in modes:
                sync()
                start = time.perf_counter()
                step(mode)
                sync()
                times[mode].append(time.perf_counter() - start)
        return {**out, "times_s": {mode: sorted(t) for mode, t in times.items()}}
    (mode,) = modes
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step(mode)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset the peak RSS
        base = _rss_kib("VmRSS")
        step(mode)
        peak = (_rss_kib("VmHWM") - base) / 1024
    return {**out, "peak_mib": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["qwen2", "tiny-arith"], default="qwen2")
    p.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, flash_attention_2, ...)")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--min-len", type=int, default=16)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--modes", help=argparse.SUPPRESS)
    p.add_argument("--measure", choices=["time", "memory"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    modes = ["padded", "packed"]

    def run_worker(measure: str, worker_modes: list[str]) -> dict:
        # the allocator setting that makes peaks visible slows every large allocation: memory runs only
        env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": "65536"} if measure == "memory" else {})}
        command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--worker", "--measure", measure,
                   "--modes", ",".join(worker_modes)]
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(f"{measure} worker ({', '.join(worker_modes)}) failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    timing = run_worker("time", modes)
    results = {}
    for mode in modes:
        times = timing["times_s"][mode]
        results[mode] = {"median_s": times[len(times) // 2], "times_s": times,
                         "peak_mib": run_worker("memory", [mode])["peak_mib"], "fingerprint": timing["fingerprints"][mode],
                         "real_tokens": timing["real_tokens"], "padded_tokens": timing["padded_tokens"]}
    pad = results["padded"]
    agree = all(abs(pad["fingerprint"] - r["fingerprint"]) <= 1e-4 * max(1.0, abs(pad["fingerprint"]))
                for r in results.values())
    print(f"{args.model} ({args.attn}, {args.device}), {args.rows} rows of {args.min_len}..{args.max_len} tokens: "
          f"{pad['real_tokens']} real tokens, {pad['padded_tokens']} padded; medians of {args.repeats}")
    print(f"{'':14} {'fwd+bwd s':>10} {'peak MiB':>9} {'time ratio':>10} {'mem ratio':>9}")
    for mode in modes:
        r = results[mode]
        print(f"{mode:14} {r['median_s']:10.4f} {r['peak_mib']:9.1f} {r['median_s'] / pad['median_s']:10.2f} "
              f"{r['peak_mib'] / max(pad['peak_mib'], 1e-9):9.2f}")
    print(f"log-prob sums agree: {agree}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)
    if not agree:
        sys.exit(1)


if __name__ == "__main__":
    main()
