#!/usr/bin/env python
"""Time one GRPO training step (rollout + reward + update) for rlgen and, when installed, TRL.

Both sides run in the same process on the same model, the same prompts (rlgen's built-in
`arithmetic` task), the same batch shape (P prompts x G completions, up to T new tokens), one
optimiser step per rollout batch (num_iterations=1), no KL (beta=0), the same exact-match reward,
the same learning rate and temperature, fp32 on CPU with the same number of torch threads.

Each side runs `--warmup` untimed steps, then `--steps` timed steps; medians are reported because
machines are noisy. By default the two sides are interleaved step by step (one rlgen step between
two TRL steps, alternating which goes first) so that both see the same background load; with
`--schedule blocks` one side runs all its steps, then the other. `--repeats R` repeats the whole
measurement R times with fresh models and trainers; medians are over all timed steps.

    python bench/grpo_step.py                           # built-in tiny-arith model, P=16 G=8 T=8
    python bench/grpo_step.py --model /tmp/base1000 --json bench.json
    python bench/grpo_step.py --only rlgen --profile 25  # cProfile one more rlgen step, top 25

Throughput per step: completions/s = P*G / step seconds; tokens/s = completion tokens / step
seconds, where a completion's tokens run up to and including its stop token (both libraries count
them the same way). The ratio column is rlgen / TRL (> 1: rlgen is faster).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402


# --------------------------------------------------------------------------- helpers

def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def load_task_records(task: str, split: str) -> list[dict]:
    from rlgen.plugins import registry

    return registry("task").get(task).split(split)


def resolve_model(name: str):
    from rlgen.errors import RlgenError
    from rlgen.models.causal_lm import resolve_model_path

    try:
        return resolve_model_path(name)
    except RlgenError as exc:
        sys.exit(
            f"error: {exc}\n"
            "hint: pass --model DIR with a Hugging Face causal-LM directory, e.g. one made by\n"
            "      python recipes/tiny-arith/init_model.py /tmp/benchmodel"
        )


def pad_vocabulary(model_path, vocab: int, out_dir: str):
    """A copy of the model whose embedding and lm_head have `vocab` rows (the extra ids are never produced
    by the tokenizer, and decode to nothing): the log-prob cost of a real tokenizer's vocabulary on the
    same small network. New rows are drawn like fresh weights (std = initializer_range)."""
    from rlgen.models.causal_lm import load_model, load_tokenizer

    model = load_model(model_path, "float32")
    model.resize_token_embeddings(vocab, mean_resizing=False)
    model.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(model_path).save_pretrained(out_dir)
    return out_dir


def exact_match_trl(prompts, completions, answer, **_):
    """TRL-style reward: 1.0 when the stripped completion equals the stripped answer.
    (rlgen's built-in `exact-match` reward computes the same thing.)"""
    return [float(str(c).strip() == str(a).strip()) for c, a in zip(completions, answer)]


def summarize(steps: list[dict]) -> dict:
    """Medians over the timed steps of one side."""
    return {
        "timed_steps": len(steps),
        "step_s": median([s["seconds"] for s in steps]),
        "completions_per_s": median([s["completions"] / s["seconds"] for s in steps]),
        "tokens_per_s": median([s["tokens"] / s["seconds"] for s in steps]),
        "completions_per_step": median([s["completions"] for s in steps]),
        "tokens_per_step": median([s["tokens"] for s in steps]),
        "mean_completion_length": (sum(s["tokens"] for s in steps) / max(1, sum(s["completions"] for s in steps))),
        "max_completion_length": max((s.get("max_length") or 0) for s in steps) if steps else None,
        "rollout_s": median([s.get("rollout_s") for s in steps]),
        "update_s": median([s["seconds"] - s["rollout_s"] if s.get("rollout_s") is not None else None for s in steps]),
        "min_step_s": min(s["seconds"] for s in steps) if steps else None,
        "max_step_s": max(s["seconds"] for s in steps) if steps else None,
    }


# --------------------------------------------------------------------------- rlgen

def build_rlgen_trainer(args, model_path, out_dir, kernels_mode: str = "auto"):
    from rlgen.algorithms.grpo import GRPOConfig, GRPOTrainer
    from rlgen.cli.report import Reporter
    from rlgen.config import from_dict
    from rlgen.training.run_dir import RunDir

    cfg = from_dict(
        GRPOConfig,
        {
            "model": {"path": str(model_path), "dtype": "float32"},
            "data": {"task": args.task, "split": "train"},
            "rollout": {
                "prompts_per_step": args.prompts_per_step,
                "num_generations": args.num_generations,
                "max_new_tokens": args.max_new_tokens,
                "temperature": 1.0,
            },
            "algorithm": {"beta": 0.0, "num_iterations": 1},
            "optim": {"lr": args.lr, "gradient_accumulation_steps": 1},
            "run": {
                "out": str(out_dir),
                "steps": args.warmup + args.steps + 1,
                "seed": args.seed,
                "eval_every": 0,
                "save_every": 0,
                "threads": 0,  # leave torch's thread count as this script set it
                "kernels": kernels_mode,
            },
            "rewards": [{"name": "exact-match"}],
        },
    )
    trainer = GRPOTrainer(cfg, RunDir(out_dir), Reporter(quiet=True))
    trainer.setup()
    return trainer


def rlgen_one_step(trainer, n_completions: int) -> dict:
    trainer.step += 1
    trainer.bench_lengths = []
    started = time.perf_counter()
    metrics = trainer.train_step()
    seconds = time.perf_counter() - started
    lengths = [n for batch in trainer.bench_lengths for n in batch]
    if len(lengths) != n_completions:
        raise RuntimeError(f"rlgen generated {len(lengths)} completions in a step, expected {n_completions}")
    return {
        "seconds": seconds,
        "completions": len(lengths),
        "tokens": sum(lengths),  # tokens up to and including the stop token
        "max_length": max(lengths),
        "rollout_s": metrics.get("rollout_time"),  # rollout + reward scoring
        "reward": metrics.get("reward"),
    }


def record_lengths(trainer) -> None:
    """Wrap the engine's generate to note each completion's length (a .tolist() per call; no other change)."""
    generate = trainer.engine.generate

    def counted(*a, **kw):
        rollouts = generate(*a, **kw)
        trainer.bench_lengths.append(rollouts.completion_mask.sum(1).tolist())
        return rollouts

    trainer.engine.generate = counted
    trainer.bench_lengths = []


class RlgenSide:
    """An rlgen GRPOTrainer set up in a temporary run directory, stepped one train_step at a time."""

    def __init__(self, args, model_path, kernels_mode: str = "auto"):
        self.args = args
        self.kernels_mode = kernels_mode
        self.n = args.prompts_per_step * args.num_generations
        self.tmp = tempfile.TemporaryDirectory(prefix="rlgen-bench-")
        self.trainer = build_rlgen_trainer(args, model_path, os.path.join(self.tmp.name, "run"), kernels_mode)
        record_lengths(self.trainer)
        self.steps: list[dict] = []  # timed steps only
        self.done = 0

    def step(self, k: int | None = None) -> None:
        from rlgen import kernels

        kernels.use(self.kernels_mode)  # two rlgen sides may alternate in one process (--kernels compare)
        result = rlgen_one_step(self.trainer, self.n)
        if self.done >= self.args.warmup:
            self.steps.append(result)
        self.done += 1

    def close(self, profile: bool = False) -> dict:
        profile = profile_rlgen_step(self.trainer, self.n, self.args.profile) if profile and self.args.profile else None
        del self.trainer
        self.tmp.cleanup()
        gc.collect()
        return {"steps": self.steps, "profile": profile}


def run_rlgen(args, model_path, profile: bool = False) -> dict:
    side = RlgenSide(args, model_path, args.kernels)
    for _ in range(args.warmup + args.steps):
        side.step()
    return side.close(profile)


def run_rlgen_kernel_pair(args, model_path) -> dict:
    """rlgen with its kernels and with the eager reference log-probs, stepped alternately (who goes
    first alternates too) so that both see the same background load."""
    native, eager = RlgenSide(args, model_path, "auto"), RlgenSide(args, model_path, "reference")
    for k in range(args.warmup + args.steps):
        for side in ((native, eager) if k % 2 == 0 else (eager, native)):
            side.step()
    return {"rlgen": native.close(), "rlgen-reference": eager.close()}


def profile_rlgen_step(trainer, n: int, top: int) -> str:
    """cProfile one extra rlgen step; returns the top-`top` table by internal time and by cumulative time."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    rlgen_one_step(trainer, n)
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.strip_dirs().sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return text.getvalue()


# --------------------------------------------------------------------------- TRL

def trl_available() -> bool:
    try:
        import trl  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


def run_trl(args, model_path, records: list[dict], other_step=None) -> dict:
    """Train TRL for warmup + steps optimiser steps, timing each from on_step_begin to on_step_end.

    `other_step(k)`, when given, is called between TRL's steps (outside TRL's timed window): before
    TRL's step k for odd k and after it for even k, so that the two sides alternate who goes first."""
    import datasets
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlgen.models.causal_lm import load_model, load_tokenizer

    datasets.disable_progress_bars()
    P, G, T = args.prompts_per_step, args.num_generations, args.max_new_tokens
    n = P * G
    token_log: list[list[int]] = []  # completion lengths seen by the reward function, one list per call

    def exact_match(prompts, completions, answer, completion_ids=None, **kw):
        token_log.append([len(ids) for ids in completion_ids])
        return exact_match_trl(prompts, completions, answer)

    exact_match.__name__ = "exact_match"

    class TimedGRPOTrainer(GRPOTrainer):
        """Only adds a timer around rollout + reward scoring (no change to the work done)."""

        rollout_times: list[float] = []

        def _generate_and_score_completions(self, inputs):
            started = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            self.rollout_times.append(time.perf_counter() - started)
            return out

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin = None
            self.durations: list[float] = []

        def on_step_begin(self, args_, state, control, **kw):
            k = len(self.durations)
            if other_step is not None and k % 2 == 1:
                other_step(k)
            self.begin = time.perf_counter()

        def on_step_end(self, args_, state, control, **kw):
            self.durations.append(time.perf_counter() - self.begin)
            k = len(self.durations) - 1
            if other_step is not None and k % 2 == 0:
                other_step(k)

    dataset = datasets.Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in records])
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path, "float32")  # the same fp32 weights rlgen loads
    total_steps = args.warmup + args.steps
    with tempfile.TemporaryDirectory(prefix="trl-bench-") as tmp:
        config = GRPOConfig(
            output_dir=tmp,
            # --- equal work: one rollout batch of P prompts x G completions = one optimiser step ---
            per_device_train_batch_size=n,  # TRL counts the batch in completions, not prompts
            num_generations=G,
            gradient_accumulation_steps=1,  # (default 1) -> steps_per_generation=1, generation_batch_size=P*G
            num_iterations=1,  # (default 1) one update per batch: no old-log-prob forward pass
            beta=0.0,  # (default 0.0) no KL, no reference model
            max_completion_length=T,  # default 512
            temperature=1.0,  # (default 1.0)
            learning_rate=args.lr,  # default 1e-6
            lr_scheduler_type="constant",  # default linear decay; rlgen's default is constant
            max_steps=total_steps,
            seed=args.seed,
            # --- fp32 on CPU, like rlgen ---
            use_cpu=True,
            bf16=False,  # TRL defaults bf16=True
            fp16=False,
            gradient_checkpointing=False,  # TRL defaults it to True (recomputes activations: slower)
            # --- no side work during the timed loop ---
            logging_steps=10**9,  # default 10
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,  # (default 0) no worker processes
            dataloader_pin_memory=False,  # nothing to pin on CPU
        )
        timer = StepTimer()
        trainer = TimedGRPOTrainer(
            model=model,
            reward_funcs=exact_match,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[timer],
        )
        trainer.remove_callback(PrinterCallback)  # it prints the end-of-training summary to stdout
        trainer.rollout_times = []
        gen = trainer.generation_config
        generation = {
            "max_new_tokens": gen.max_new_tokens,
            "do_sample": gen.do_sample,
            "temperature": gen.temperature,
            "top_p": gen.top_p,
            "top_k": gen.top_k,
            "eos_token_id": gen.eos_token_id,
            "pad_token_id": gen.pad_token_id,
            "generation_batch_size": config.generation_batch_size,
            "steps_per_generation": config.steps_per_generation,
            "gradient_checkpointing": bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
            "optim": str(config.optim),
        }
        assert gen.max_new_tokens == T and gen.do_sample and gen.temperature == 1.0, generation
        assert config.generation_batch_size == n and config.steps_per_generation == 1, generation
        trainer.train()
        durations = timer.durations
        rollouts = trainer.rollout_times
        del trainer, model
    gc.collect()
    if len(durations) != total_steps or len(token_log) != total_steps:
        raise RuntimeError(f"TRL ran {len(durations)} steps and {len(token_log)} reward calls, expected {total_steps}")
    steps = []
    for k in range(args.warmup, total_steps):
        lengths = token_log[k]
        if len(lengths) != n:
            raise RuntimeError(f"TRL scored {len(lengths)} completions in step {k + 1}, expected {n}")
        steps.append({
            "seconds": durations[k],
            "completions": len(lengths),
            "tokens": sum(lengths),
            "max_length": max(lengths),
            "rollout_s": rollouts[k] if k < len(rollouts) else None,
        })
    return {"steps": steps, "generation": generation}


# --------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-arith", help="built-in model name or HF model directory (default: tiny-arith)")
    p.add_argument("--task", default="arithmetic", help="rlgen task whose train split gives the prompts (default: arithmetic)")
    p.add_argument("--prompts-per-step", "-P", type=int, default=16, help="prompts per step (default: 16)")
    p.add_argument("--num-generations", "-G", type=int, default=8, help="completions per prompt (default: 8)")
    p.add_argument("--max-new-tokens", "-T", type=int, default=8, help="max completion tokens (default: 8)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per side and repeat (default: 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    p.add_argument("--repeats", type=int, default=2, help="whole measurements, alternating order (default: 2)")
    p.add_argument("--lr", type=float, default=1e-6, help="learning rate for both (default: 1e-6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads for both (0 = torch's default)")
    p.add_argument("--only", choices=("both", "rlgen", "trl"), default="both")
    p.add_argument("--pad-vocab", type=int, default=0, metavar="V",
                   help="grow the model's vocabulary to V rows first (e.g. 32000 or 151936), as with a real tokenizer")
    p.add_argument("--kernels", choices=("auto", "reference", "compare"), default="auto",
                   help="rlgen's log-prob kernels: auto (native), reference (eager torch), or compare: time rlgen "
                        "with its kernels against rlgen with the reference path, interleaved (no TRL side)")
    p.add_argument("--schedule", choices=("interleave", "blocks"), default="interleave",
                   help="interleave: alternate rlgen and TRL step by step, so both see the same machine load "
                        "(default); blocks: all steps of one side, then the other")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, cProfile one rlgen step and print the top N functions to stderr")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    for name in ("prompts_per_step", "num_generations", "max_new_tokens", "steps", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.num_generations < 2:
        p.error("--num-generations must be >= 2")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def fmt(value, spec=".1f"):
    return "-" if value is None else format(value, spec)


def print_table(result: dict) -> None:
    c = result["config"]
    m = result["machine"]
    print(f"GRPO step: P={c['prompts_per_step']} prompts x G={c['num_generations']} completions, "
          f"T<={c['max_new_tokens']} new tokens, model {c['model']} ({c['model_params']:,} params), fp32 CPU, "
          f"{m['torch_threads']} torch threads")
    print(f"{c['steps']} timed steps after {c['warmup']} warm-up, x{c['repeats']} repeats ({c['schedule']}); medians. "
          f"load average before/after: {m['loadavg_before']} / {m['loadavg_after']}")
    header = f"{'':15} {'step s':>8} {'compl/s':>9} {'tok/s':>9} {'tok/step':>9} {'len':>5} {'rollout s':>10} {'update s':>9}"
    print(header)
    print("-" * len(header))
    for name, s in result["results"].items():
        print(f"{name:15} {fmt(s['step_s'], '.3f'):>8} {fmt(s['completions_per_s']):>9} {fmt(s['tokens_per_s']):>9} "
              f"{fmt(s['tokens_per_step'], '.0f'):>9} {fmt(s['mean_completion_length'], '.2f'):>5} "
              f"{fmt(s['rollout_s'], '.3f'):>10} {fmt(s['update_s'], '.3f'):>9}")
    ratio = result.get("ratio")
    if ratio and ratio.get("versus") == "rlgen-reference":
        print(f"kernels / reference: step time x{ratio['step_s']:.2f} faster, update x{ratio['update_s']:.2f} faster, "
              f"completions/s x{ratio['completions_per_s']:.2f}  (> 1: the kernels are faster)")
    elif ratio:
        print(f"rlgen/TRL throughput ratio: completions/s x{ratio['completions_per_s']:.2f}, "
              f"tokens/s x{ratio['tokens_per_s']:.2f}  (> 1: rlgen faster)")
    for name, per in result.get("per_repeat", {}).items():
        print(f"  {name} per-repeat median compl/s: " + ", ".join(fmt(x) for x in per))


def main(argv=None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    model_path = resolve_model(args.model)
    if args.pad_vocab:
        padded = tempfile.TemporaryDirectory(prefix="rlgen-bench-vocab-")
        model_path = Path(pad_vocabulary(model_path, args.pad_vocab, padded.name))
    records = load_task_records(args.task, "train")
    sides = ["rlgen", "trl"] if args.only == "both" else [args.only]
    if args.kernels == "compare":
        sides = ["rlgen", "rlgen-reference"]
    have_trl = trl_available()
    if "trl" in sides and not have_trl:
        if args.only == "trl":
            sys.exit("error: trl is not importable")
        print("note: trl is not importable; timing rlgen only", file=sys.stderr)
        sides = ["rlgen"]

    from rlgen.models.causal_lm import load_model

    n_params = sum(p.numel() for p in load_model(model_path, "float32").parameters())
    load_before = loadavg()
    if load_before and os.cpu_count() and load_before[0] + threads > os.cpu_count() + 0.5:
        hint = "; multi-threaded steps suffer most, try --threads 1" if threads > 1 else ""
        print(f"note: load average {load_before[0]} with {threads} torch thread(s) on {os.cpu_count()} CPUs: the machine "
              f"is busy, so timings will be noisy{hint}", file=sys.stderr)
    all_steps: dict[str, list] = {s: [] for s in sides}
    per_repeat: dict[str, list] = {s: [] for s in sides}
    extra: dict[str, dict] = {}
    wall = time.perf_counter()
    for r in range(args.repeats):
        torch.set_num_threads(threads)
        last = r == args.repeats - 1  # the optional profile is taken once, after the last repeat's timed steps
        outs = {}
        if args.kernels == "compare":
            print(f"[repeat {r + 1}/{args.repeats}] rlgen with kernels and with reference log-probs interleaved: "
                  f"{args.warmup} warm-up + {args.steps} timed steps each ...", file=sys.stderr)
            outs = run_rlgen_kernel_pair(args, model_path)
        elif args.schedule == "interleave" and len(sides) == 2:
            print(f"[repeat {r + 1}/{args.repeats}] rlgen and trl interleaved: {args.warmup} warm-up + {args.steps} "
                  "timed steps each ...", file=sys.stderr)
            rl = RlgenSide(args, model_path)
            outs["trl"] = run_trl(args, model_path, records, other_step=rl.step)
            if rl.done != args.warmup + args.steps:
                raise RuntimeError(f"interleaving ran {rl.done} rlgen steps, expected {args.warmup + args.steps}")
            outs["rlgen"] = rl.close(profile=last)
        else:
            order = sides if r % 2 == 0 else list(reversed(sides))
            for side in order:
                print(f"[repeat {r + 1}/{args.repeats}] {side}: {args.warmup} warm-up + {args.steps} timed steps ...",
                      file=sys.stderr)
                torch.set_num_threads(threads)
                outs[side] = run_rlgen(args, model_path, last) if side == "rlgen" else run_trl(args, model_path, records)
        if torch.get_num_threads() != threads:
            print(f"warning: torch threads changed to {torch.get_num_threads()} during the run", file=sys.stderr)
        for side in sides:
            out = outs[side]
            if side == "rlgen" and out.get("profile"):
                extra["rlgen_profile"] = out["profile"]
            if side == "trl" and "generation" in out:
                extra["trl_generation"] = out["generation"]
            all_steps[side].extend(out["steps"])
            per_repeat[side].append(median([s["completions"] / s["seconds"] for s in out["steps"]]))
    wall = time.perf_counter() - wall
    results = {side: summarize(steps) for side, steps in all_steps.items()}
    ratio = None
    if "rlgen-reference" in results:  # kernels vs the eager reference, same trainer otherwise
        ratio = {k: results["rlgen"][k] / results["rlgen-reference"][k] for k in ("completions_per_s", "tokens_per_s")}
        ratio["step_s"] = results["rlgen-reference"]["step_s"] / results["rlgen"]["step_s"]
        ratio["update_s"] = results["rlgen-reference"]["update_s"] / results["rlgen"]["update_s"]
        ratio["versus"] = "rlgen-reference"
    elif "rlgen" in results and "trl" in results:
        ratio = {k: results["rlgen"][k] / results["trl"][k] for k in ("completions_per_s", "tokens_per_s")}
        ratio["step_s"] = results["trl"]["step_s"] / results["rlgen"]["step_s"]
        ratio["versus"] = "trl"
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import rlgen

        versions["rlgen"] = getattr(rlgen, "__version__", "?")
    except Exception:  # noqa: BLE001
        pass
    if have_trl:
        import trl

        versions["trl"] = trl.__version__
    result = {
        "config": {
            "model": str(args.model) + (f" (vocabulary padded to {args.pad_vocab})" if args.pad_vocab else ""),
            "model_path": str(model_path),
            "model_params": n_params,
            "task": args.task,
            "prompts_per_step": args.prompts_per_step,
            "num_generations": args.num_generations,
            "completions_per_step": args.prompts_per_step * args.num_generations,
            "max_new_tokens": args.max_new_tokens,
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "schedule": args.schedule if len(sides) == 2 else "single",
            "kernels": args.kernels,
            "lr": args.lr,
            "temperature": 1.0,
            "beta": 0.0,
            "num_iterations": 1,
            "dtype": "float32",
            "seed": args.seed,
        },
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": threads,
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
            "wall_s": round(wall, 1),
        },
        "versions": versions,
        "results": results,
        "ratio": ratio,
        "per_repeat": per_repeat,
        "steps": all_steps,
    }
    if "trl_generation" in extra:
        result["trl_generation"] = extra["trl_generation"]
    print_table(result)
    if "rlgen_profile" in extra:
        print(extra["rlgen_profile"], file=sys.stderr)
        result["rlgen_profile"] = extra["rlgen_profile"]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1, default=str)
        print(f"wrote {args.json}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
