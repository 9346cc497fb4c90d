#!/usr/bin/env python
"""Peak memory and time of one GRPO update of a Qwen2-0.5B-shaped causal LM (random weights), per configuration.

The model is a transformers Qwen2ForCausalLM built from a Qwen2Config with random weights (default: the
Qwen2-0.5B shape, hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864, vocabulary 151936, tied
embeddings: 494M parameters), saved once as a Hugging Face directory with rlgen's char tokenizer. Each
configuration runs in its own process (under torchrun for FSDP ranks): `rlgen.build_trainer("grpo", ...)`
on that directory, `trainer.setup()`, then ONE policy update of the GRPO trainer (its `_update`: log-probs,
policy loss, backward, clip, AdamW step, under the run's precision autocast) on a rollout batch built
directly instead of sampled: P prompts x G generations, random prompt ids (shared within a group) of
--prompt-tokens, random completions of exactly T tokens (all counted: the longest batch of that shape),
group-normalised random advantages. Sampling is left out because it is slow on a CPU and its memory is
the engine's, not the update's.

Configurations: precision fp32 vs bf16-mixed x model.gradient_checkpointing off / on; with FSDP
(rlgen/training/fsdp.py and run.distributed = "fsdp" accepted) fp32 under 1 and 2 ranks, each rank
updating on its P / ranks prompts; with token-budget micro-batching (optim.max_tokens_per_micro_batch
accepted) a sweep of the completion length T at a fixed budget (P x G of --sweep-prompts x --generations),
and as the contrast the same lengths without a budget (--sweep-baseline: the lengths, "all" or "none"; a
micro-batch is then the whole batch). A micro-batch never splits a GRPO group (its prompt forward is shared),
so the budget bounds the peak once a group fits in it and the batch holds several; --sweep-split-groups
(algorithm.shared_prefix = false: each row runs its own prompt) lets it split groups, a row at a time. Whatever the config does
not accept yet is skipped with a note.

Measured in each process:

  peak MiB          CUDA: torch.cuda.max_memory_allocated over the update (reset after setup: includes
                    the weights). CPU: the peak RSS over the update minus the RSS after setup (VmHWM reset
                    by /proc/self/clear_refs after gc + malloc_trim; where that is not possible ru_maxrss,
                    which includes the load's own peak): gradients, AdamW states, activations, temporaries
                    (the weights, memory-mapped from safetensors, are read once before, so they are resident).
  params / grads / optim MiB   exact bytes of this rank's tensors (sharded ones: the local shard):
                    parameters, gradients (read just before the optimiser step) and AdamW states after it.
  update s          wall time of the update (CUDA: synchronised before and after).
  micro-batches     the update's micro-batches and the largest one's tokens (rows x (prompt + T)).

    python bench/scale.py                                  # the full 0.5B shape: ~2 GB per process (CPU: minutes)
    python bench/scale.py --preset tiny                    # seconds (the test)
    python bench/scale.py --preset mid --json mid.json     # 0.5B's widths and vocabulary, 2 layers
    python bench/scale.py --device cuda --json scale.json  # on a GPU
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as common  # noqa: E402
from bench_common import fmt  # noqa: E402

import torch  # noqa: E402

PRESETS = {
    "qwen2-0.5b": dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936),
    "mid": dict(hidden=896, layers=2, heads=14, kv_heads=2, intermediate=4864, vocab=151936),
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512),
}
# batch defaults per preset: (prompts, generations, completion tokens, prompt tokens, sweep lengths, token budget)
BATCHES = {
    "qwen2-0.5b": (2, 4, 256, 64, (256, 512, 1024, 2048), 4096),
    "mid": (2, 4, 256, 64, (256, 512, 1024, 2048), 4096),
    "tiny": (2, 2, 16, 8, (16, 32, 64, 128), 64),
}
MIB = 2**20
EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception)\b.*: ")  # a traceback's last line: the cause


# --------------------------------------------------------------------------- the model

def model_shape(args) -> dict:
    shape = dict(PRESETS[args.preset])
    for key in shape:
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    return shape


def make_model_dir(shape: dict, out: Path, seed: int) -> int:
    """A random Qwen2ForCausalLM of `shape` with rlgen's char tokenizer in `out` (reused when its shape
    matches); returns its parameter count."""
    stamp = out / "bench_shape.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("shape") == shape:
        return json.loads(stamp.read_text())["params"]
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rlgen.api import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    config = Qwen2Config(
        vocab_size=max(shape["vocab"], len(tokenizer)),
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        tie_word_embeddings=True,  # as Qwen2-0.5B
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    params = sum(p.numel() for p in model.parameters())
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    stamp.write_text(json.dumps({"shape": shape, "params": params}))
    del model
    gc.collect()
    return params


# --------------------------------------------------------------------------- configurations

def trainer_config(job: dict) -> dict:
    optim = {"lr": 1e-6}
    if job.get("token_budget"):
        optim["max_tokens_per_micro_batch"] = job["token_budget"]
    algorithm = {"shared_prefix": False} if job.get("split_groups") else {}
    run = {"out": job["out"], "steps": 1, "seed": job["seed"], "eval_every": 0, "save_every": 0,
           "threads": job["threads"], "device": job["device"], "precision": job["precision"]}
    if job.get("distributed"):
        run["distributed"] = job["distributed"]
    return {
        "model": {"path": job["model_path"], "dtype": "float32", "gradient_checkpointing": job["gradient_checkpointing"]},
        "data": {"task": "arithmetic"},
        "rollout": {"prompts_per_step": job["prompts"], "num_generations": job["generations"],
                    "max_new_tokens": job["completion_tokens"]},
        "optim": optim,
        "algorithm": algorithm,
        "run": run,
    }


def config_refusal(model_path: str, sections: dict, multi_process: bool = False) -> str | None:
    """None when the GRPO trainer accepts `sections` (merged into a minimal config) and, with
    `multi_process`, runs on several processes; else the one-line reason."""
    from rlgen.api import RlgenError, build_trainer

    base = {"model": {"path": model_path}, "data": {"task": "arithmetic"}, "run": {"out": tempfile.gettempdir()}}
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    try:
        trainer = build_trainer("grpo", base, model_defaults=False)
    except RlgenError as exc:
        return str(exc).splitlines()[0].split(" (known")[0]
    if multi_process and not getattr(trainer, "supports_distributed", False):
        return f"{type(trainer).__name__} does not run multi-process yet (supports_distributed is False)"
    return None


def configurations(args, model_path: str, device: torch.device, notes: list[str]) -> list[dict]:
    base = dict(prompts=args.prompts, generations=args.generations, completion_tokens=args.completion_tokens,
                ranks=1, distributed=None, token_budget=None, gradient_checkpointing=False, precision="fp32")
    jobs = []
    for precision in args.precisions:
        for ckpt in (False, True):
            name = f"{precision}{' ckpt' if ckpt else ''}"
            jobs.append({**base, "name": name, "precision": precision, "gradient_checkpointing": ckpt})
    fsdp_module = Path(__file__).resolve().parent.parent / "rlgen" / "training" / "fsdp.py"
    refused = config_refusal(model_path, {"run": {"distributed": "fsdp"}}, multi_process=True)
    if args.no_fsdp:
        notes.append("FSDP rows skipped (--no-fsdp)")
    elif not fsdp_module.is_file() or refused:
        notes.append(f"FSDP rows skipped: {'rlgen/training/fsdp.py does not exist' if not fsdp_module.is_file() else refused}")
    elif args.prompts % 2:
        notes.append(f"FSDP rows skipped: --prompts {args.prompts} does not split over 2 ranks")
    elif device.type == "cuda" and torch.cuda.device_count() < 2:
        notes.append("FSDP rows skipped: 2 ranks need 2 GPUs (one per rank)")
    else:
        for ranks in (1, 2):  # on CUDA each rank takes the GPU of its LOCAL_RANK
            jobs.append({**base, "name": f"fsdp x{ranks}", "ranks": ranks, "distributed": "fsdp", "device": device.type})
    refused = config_refusal(model_path, {"optim": {"max_tokens_per_micro_batch": args.token_budget}})
    if args.no_sweep:
        notes.append("completion-length sweep skipped (--no-sweep)")
    elif refused:
        notes.append(f"completion-length sweep skipped: optim.max_tokens_per_micro_batch is not accepted ({refused})")
    else:
        sweep = {**base, "prompts": args.sweep_prompts, "split_groups": args.sweep_split_groups}
        for length in args.sweep:
            # --sweep-tokens: as many prompts as give that many tokens at this length, so every length's batch
            # fills the budget (several micro-batches each: the gradient buffers then coexist with every
            # micro-batch after the first at every length, as in real accumulation)
            prompts = (max(1, round(args.sweep_tokens / (args.generations * (args.prompt_tokens + length))))
                       if args.sweep_tokens else sweep["prompts"])
            jobs.append({**sweep, "name": f"budget {args.token_budget} T={length}", "completion_tokens": length,
                         "token_budget": args.token_budget, "prompts": prompts})
        for length in args.sweep_baseline:  # the contrast: the same batches in one micro-batch
            jobs.append({**sweep, "name": f"no budget T={length}", "completion_tokens": length})
    return jobs


# --------------------------------------------------------------------------- worker side

def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return _proc_status_bytes("VmHWM") is not None


def _ru_maxrss_bytes() -> int:
    import resource

    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024  # Linux reports KiB


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """The update's peak: CUDA's max_memory_allocated (absolute), or on CPU the RSS peak above the RSS now."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.device = device
            self.baseline = torch.cuda.memory_allocated(device)
            self.method = "cuda max_memory_allocated"
        else:
            _malloc_trim()
            self.baseline = _proc_status_bytes("VmRSS") or _ru_maxrss_bytes()
            self.hwm = _reset_peak_rss()
            self.method = "RSS: VmHWM above RSS after setup" if self.hwm else "RSS: ru_maxrss above RSS after setup"

    def finish(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            return {"memory_method": self.method, "baseline_bytes": self.baseline, "peak_bytes": peak}
        peak = _proc_status_bytes("VmHWM") if self.hwm else _ru_maxrss_bytes()
        return {"memory_method": self.method, "baseline_bytes": self.baseline, "peak_bytes": peak - self.baseline}


def _local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # a DTensor's shard on this rank
    return local.numel() * local.element_size()


def synthetic_batch(trainer, job: dict, prompts: int):
    """(RolloutBatch, completion mask, advantages) of `prompts` x G random rows on the trainer's device."""
    from rlgen.api import RolloutBatch, Rollouts

    g, t, p_len = job["generations"], job["completion_tokens"], job["prompt_tokens"]
    vocab = trainer.model.config.vocab_size
    gen = torch.Generator().manual_seed(job["seed"] + 1000 * trainer.dist.rank)
    rows = prompts * g
    prompt_ids = torch.randint(0, vocab, (prompts, p_len), generator=gen).repeat_interleave(g, dim=0)
    completion_ids = torch.randint(0, vocab, (rows, t), generator=gen)
    ones = torch.ones(rows, p_len, dtype=torch.long)
    rollouts = Rollouts(prompts=[""] * rows, prompt_ids=prompt_ids, prompt_mask=ones,
                        completion_ids=completion_ids, completion_mask=torch.ones(rows, t, dtype=torch.long),
                        truncated=torch.ones(rows, dtype=torch.bool), texts=[""] * rows)
    rollouts = Rollouts(**{k: v.to(trainer.device) if isinstance(v, torch.Tensor) else v for k, v in vars(rollouts).items()})
    rewards = torch.randn(prompts, g, generator=gen)
    advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).flatten()
    batch = RolloutBatch(records=[{}] * prompts, group_size=g, rollouts=rollouts, samples=[{}] * rows,
                         components=torch.zeros(rows, 1), valid=torch.ones(rows, dtype=torch.bool), total=rewards.flatten())
    return batch, rollouts.completion_mask.float(), advantages.to(trainer.device)


def micro_batch_sizes(trainer, batch) -> list[int]:
    """Rows per micro-batch of the update under the token budget (each group whole when its prompt forward is
    shared, as the GRPO trainer splits them); without a budget the gradient-accumulation split."""
    from rlgen.api import group_units, micro_batches, row_costs

    cfg = trainer.config
    rows = batch.inputs.prompt_ids.shape[0]
    chunks = micro_batches(rows, cfg.optim.max_tokens_per_micro_batch, cfg.optim.gradient_accumulation_steps,
                           row_costs(batch.inputs), group_units(rows, batch.group_size) if cfg.algorithm.shared_prefix else None)
    return [len(chunk) for chunk in chunks]


def worker(job: dict) -> dict:
    from rlgen.api import build_trainer

    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    trainer = build_trainer("grpo", trainer_config(job), model_defaults=False)
    trainer.setup()
    world = trainer.dist.world_size
    prompts = job["prompts"] // world  # each rank updates on its share of the prompts (whole groups)
    batch, mask, advantages = synthetic_batch(trainer, job, prompts)
    grad_bytes = []
    trainer.optimizer.register_step_pre_hook(
        lambda opt, *_: grad_bytes.append(sum(_local_bytes(p.grad) for g in opt.param_groups for p in g["params"]
                                              if p.grad is not None)))
    with torch.no_grad():  # safetensors weights are memory-mapped: page them in, so the CPU baseline holds them
        for tensor in [*trainer.model.parameters(), *trainer.model.buffers()]:
            (tensor.to_local() if hasattr(tensor, "to_local") else tensor).sum()
    setup_s = time.perf_counter() - started
    memory = PeakMemory(trainer.device)
    begin = time.perf_counter()
    with trainer.precision.autocast():
        metrics = trainer._update(batch, mask, advantages)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    update_s = time.perf_counter() - begin
    out = memory.finish()
    out.update(
        name=job["name"], rank=trainer.dist.rank, ranks=world, device=str(trainer.device), setup_s=setup_s, update_s=update_s,
        rows=prompts * job["generations"], tokens=int(mask.sum()), loss=metrics.get("loss"),
        micro_batch_rows=micro_batch_sizes(trainer, batch),
        param_bytes=sum(_local_bytes(p) for p in trainer.model.parameters()),
        grad_bytes=grad_bytes[-1] if grad_bytes else None,
        optim_bytes=sum(_local_bytes(v) for state in trainer.optimizer.state.values() for v in state.values()
                        if isinstance(v, torch.Tensor)),
        param_dtype=str(next(trainer.model.parameters()).dtype),
    )
    out["state_bytes"] = out["param_bytes"] + (out["grad_bytes"] or 0) + out["optim_bytes"]
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_job(job: dict, timeout: float | None) -> dict:
    """One configuration in fresh processes (torchrun for ranks > 1 or FSDP); rank 0's result, with every
    rank's state bytes and peak."""
    with tempfile.TemporaryDirectory(prefix="rlgen-scale-bench-") as tmp:
        job = {**job, "out": os.path.join(tmp, "run")}
        job_path = os.path.join(tmp, "job.json")
        Path(job_path).write_text(json.dumps(job))
        script = [os.path.abspath(__file__), "--worker", job_path, os.path.join(tmp, "result")]
        env = dict(os.environ)
        if job["distributed"]:
            env["OMP_NUM_THREADS"] = str(job["threads"] or 1)
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(job["ranks"]),
                       "--master_port", str(free_port()), *script]
        else:
            command = [sys.executable, *script]
        try:
            proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"name": job["name"], "error": f"timed out after {timeout:.0f} s"}
        results = [json.loads(Path(tmp, f"result.rank{r}.json").read_text()) for r in range(job["ranks"])
                   if Path(tmp, f"result.rank{r}.json").is_file()]
        if proc.returncode != 0 or len(results) != job["ranks"]:
            lines = proc.stdout.strip().splitlines()
            causes = [line.split("]: ", 1)[-1] for line in lines if EXCEPTION_LINE.match(line.split("]: ", 1)[-1])]
            tail = "\n".join(lines[-12:])
            return {"name": job["name"], "error": f"{causes[0] if causes else 'failed'} (exit {proc.returncode})\n{tail}"}
    out = {**results[0], "precision": job["precision"], "gradient_checkpointing": job["gradient_checkpointing"],
           "distributed": job["distributed"], "token_budget": job["token_budget"],
           "prompts": job["prompts"], "generations": job["generations"], "completion_tokens": job["completion_tokens"],
           "prompt_tokens": job["prompt_tokens"]}
    out["per_rank"] = [{k: r[k] for k in ("rank", "peak_bytes", "state_bytes", "param_bytes", "grad_bytes", "optim_bytes")}
                       for r in results]
    out["max_peak_bytes"] = max(r["peak_bytes"] for r in results)
    return out


# --------------------------------------------------------------------------- command line and output

def parse_args(argv=None):
    p = common.new_parser(__doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), default="qwen2-0.5b", help="model shape (default: qwen2-0.5b)")
    for key in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab"):
        p.add_argument(f"--{key.replace('_', '-')}", type=int, help=f"override the preset's {key.replace('_', ' ')}")
    p.add_argument("--prompts", type=int, help="P prompts per update (default: 2)")
    p.add_argument("--generations", type=int, help="G completions per prompt (default: 4; tiny: 2)")
    p.add_argument("--completion-tokens", type=int, help="T tokens per completion (default: 256; tiny: 16)")
    p.add_argument("--prompt-tokens", type=int, help="prompt length in tokens (default: 64; tiny: 8)")
    p.add_argument("--sweep-tokens", type=int, default=0,
                   help="sweep rows: prompts chosen per length to give about this many tokens (0: --sweep-prompts at every length)")
    p.add_argument("--precisions", default="fp32,bf16-mixed", help="comma-separated run.precision values (default: fp32,bf16-mixed)")
    p.add_argument("--sweep", help="completion lengths of the token-budget sweep (default: 256,512,1024,2048; tiny: 16,...,128)")
    p.add_argument("--token-budget", type=int, help="optim.max_tokens_per_micro_batch of the sweep (default: 4096; tiny: 64)")
    p.add_argument("--sweep-prompts", type=int, help="P of the sweep's batches (default: --prompts)")
    p.add_argument("--sweep-split-groups", action="store_true",
                   help="sweep with algorithm.shared_prefix = false, so a micro-batch may split a group (small P)")
    p.add_argument("--sweep-baseline", default="all",
                   help="completion lengths also run WITHOUT a budget: comma-separated, 'all' (the sweep's, default) or 'none'")
    p.add_argument("--no-fsdp", action="store_true", help="leave out the FSDP rows")
    p.add_argument("--no-sweep", action="store_true", help="leave out the completion-length sweep")
    common.add_device_arg(p)
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0 = torch's default; FSDP ranks: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", help="where to write (or reuse) the random model (default: a temporary directory)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per configuration")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args
    prompts, generations, tokens, prompt_tokens, sweep, budget = BATCHES[args.preset]
    args.prompts = args.prompts or prompts
    args.generations = args.generations or generations
    args.completion_tokens = args.completion_tokens or tokens
    args.prompt_tokens = args.prompt_tokens or prompt_tokens
    args.sweep = [int(v) for v in args.sweep.split(",")] if args.sweep else list(sweep)
    args.token_budget = args.token_budget or budget
    args.sweep_prompts = args.sweep_prompts or args.prompts
    baseline = args.sweep_baseline.strip().lower()
    try:
        args.sweep_baseline = (list(args.sweep) if baseline == "all" else [] if baseline in ("none", "")
                               else [int(v) for v in baseline.split(",")])
    except ValueError:
        p.error(f"--sweep-baseline must be comma-separated lengths, 'all' or 'none', not {args.sweep_baseline!r}")
    args.precisions = [v.strip() for v in args.precisions.split(",") if v.strip()]
    if args.generations < 2:
        p.error("--generations must be >= 2")
    for name in ("prompts", "completion_tokens", "prompt_tokens", "token_budget", "sweep_prompts"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def mib(value) -> float | None:
    return None if value is None else value / MIB


def micro_batch_cell(row: dict) -> str:
    sizes = row.get("micro_batch_rows")
    if not sizes:
        return "-"
    per_row = row["tokens"] // max(row["rows"], 1) + row["prompt_tokens"]  # every row is full length here
    return f"{len(sizes)} ({max(sizes)} x {per_row} = {max(sizes) * per_row})"


def print_table(result: dict) -> None:
    m, b = result["model"], result["batch"]
    print(f"One GRPO update, Qwen2-shaped model ({result['preset']}: hidden {m['hidden']}, {m['layers']} layers, "
          f"{m['heads']}/{m['kv_heads']} heads, intermediate {m['intermediate']}, vocabulary {m['vocab']}; "
          f"{m['params'] / 1e6:.1f}M parameters, random weights) on {result['device']}; P x G x T = "
          f"{b['prompts']} x {b['generations']} x {b['completion_tokens']} (prompts of {b['prompt_tokens']} tokens)")
    peak_name = "peak MiB (CUDA allocated)" if result["device"].startswith("cuda") else "peak RSS delta MiB"
    print()
    print(f"| configuration | precision | grad ckpt | ranks | P x G x T | update s | {peak_name} | params MiB/rank "
          "| grads MiB/rank | AdamW MiB/rank | state MiB/rank | micro-batches (largest, tokens) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        if "error" in r:
            print(f"| {r['name']} | error: {r['error'].splitlines()[0]} |")
            continue
        shape = f"{r['prompts']} x {r['generations']} x {r['completion_tokens']}"
        print(f"| {r['name']} | {r['precision']} | {'on' if r['gradient_checkpointing'] else 'off'} | {r['ranks']} | {shape} "
              f"| {fmt(r['update_s'], '.2f')} | {fmt(mib(r['max_peak_bytes']))} | {fmt(mib(r['param_bytes']))} "
              f"| {fmt(mib(r['grad_bytes']))} | {fmt(mib(r['optim_bytes']))} | {fmt(mib(r['state_bytes']))} "
              f"| {micro_batch_cell(r)} |")
    print()
    print(f"peak: {result['rows'][0].get('memory_method', '?') if result['rows'] else '?'}; state = parameters + "
          "gradients + AdamW states, exact bytes of this rank's tensors (largest rank's peak shown)")
    for note in result["notes"]:
        print(f"note: {note}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        job = json.loads(Path(args.worker[0]).read_text())
        out = worker(job)
        Path(f"{args.worker[1]}.rank{out['rank']}.json").write_text(json.dumps(out))
        return out
    device = common.resolve_bench_device(args.device)
    warnings.filterwarnings("ignore")
    shape = model_shape(args)
    keep = None
    if args.model_dir:
        model_dir = Path(args.model_dir)
    else:
        keep = tempfile.TemporaryDirectory(prefix="rlgen-scale-model-")
        model_dir = Path(keep.name)
    started = time.perf_counter()
    print(f"making the {args.preset} model in {model_dir}", file=sys.stderr)
    params = make_model_dir(shape, model_dir, args.seed)
    notes: list[str] = []
    jobs = configurations(args, str(model_dir), device, notes)
    common_job = dict(model_path=str(model_dir), prompt_tokens=args.prompt_tokens, seed=args.seed, threads=args.threads,
                      device=str(device))
    rows = []
    for job in jobs:
        print(f"running {job['name']}", file=sys.stderr)
        rows.append(run_job({**common_job, **job}, args.timeout))
        row = rows[-1]  # progress, so that a long run's finished rows are known before the table
        print(f"  {row['error'].splitlines()[0]}" if "error" in row else
              f"  peak {fmt(mib(row['max_peak_bytes']))} MiB, update {fmt(row['update_s'], '.1f')} s", file=sys.stderr)
    result = {
        "preset": args.preset, "device": str(device),
        "model": {**shape, "params": params},
        "batch": {"prompts": args.prompts, "generations": args.generations, "completion_tokens": args.completion_tokens,
                  "prompt_tokens": args.prompt_tokens, "token_budget": args.token_budget, "sweep": args.sweep,
                  "sweep_prompts": args.sweep_prompts, "sweep_baseline": args.sweep_baseline},
        "rows": rows, "notes": notes + halving_notes(rows) + sweep_notes(rows),
        "machine": common.machine_info(args.threads or torch.get_num_threads(), None, time.perf_counter() - started),
        "versions": common.versions_info(False),
    }
    print_table(result)
    common.write_json(args.json, result)
    if keep is not None:
        keep.cleanup()
    return result


def halving_notes(rows: list[dict]) -> list[str]:
    """The per-rank state of FSDP at 2 ranks against 1 rank (the acceptance: it halves)."""
    fsdp = {r["ranks"]: r for r in rows if r.get("distributed") == "fsdp" and "error" not in r}
    if 1 not in fsdp or 2 not in fsdp:
        return []
    worst = max(rank["state_bytes"] for rank in fsdp[2]["per_rank"])
    return [f"FSDP per-rank state, 2 ranks / 1 rank: {worst / fsdp[1]['state_bytes']:.3f} (largest rank; 0.5 = halved)"]


def sweep_notes(rows: list[dict]) -> list[str]:
    """Peak at the sweep's longest completion over its shortest, with the budget and without."""
    out = []
    for label, budgeted in (("with the budget", True), ("without a budget", False)):
        sweep = sorted((r["completion_tokens"], r["max_peak_bytes"]) for r in rows
                       if "error" not in r and r["name"].startswith("budget " if budgeted else "no budget "))
        if len(sweep) >= 2 and sweep[0][1] > 0:
            out.append(f"peak {label}: T={sweep[-1][0]} / T={sweep[0][0]} = {sweep[-1][1] / sweep[0][1]:.2f}")
    return out


if __name__ == "__main__":
    main()
