#!/usr/bin/env python
"""Time one GRPO training step (rollout + reward + update) for rlgen and, when installed, TRL.

Both sides run in the same process on the same model, the same prompts (rlgen's built-in
`arithmetic` task), the same batch shape (P prompts x G completions, up to T new tokens), one
optimiser step per rollout batch (num_iterations=1), no KL (beta=0), the same exact-match reward,
the same learning rate and temperature, fp32 on the same device (`--device`, default cpu) with the same
number of torch threads. On CUDA every step is timed up to torch.cuda.synchronize(), the sides run in blocks
by default, and each side's peak allocated memory (torch.cuda.max_memory_allocated, reset before each side
and repeat) is printed under the table.

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

import gc
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# Shared with the DPO benchmark (it also sets the offline / tokenizer environment before torch loads).
import bench_common as common  # noqa: E402
from bench_common import fmt, median  # noqa: E402

import torch  # noqa: E402


# --------------------------------------------------------------------------- helpers

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
    sections = {
        "data": {"task": args.task, "split": "train"},
        "rollout": {
            "prompts_per_step": args.prompts_per_step,
            "num_generations": args.num_generations,
            "max_new_tokens": args.max_new_tokens,
            "temperature": 1.0,
        },
        "algorithm": {"beta": 0.0, "num_iterations": 1},
        "optim": {"lr": args.lr, "gradient_accumulation_steps": 1},
        "rewards": [{"name": "exact-match"}],
    }
    trainer = common.build_rlgen("grpo", model_path, out_dir, sections,
                                 steps=args.warmup + args.steps + 1, seed=args.seed, kernels=kernels_mode,
                                 device=args.device)
    trainer.setup()
    return trainer


def rlgen_one_step(trainer, n_completions: int) -> dict:
    trainer.step += 1
    trainer.bench_lengths = []
    started = time.perf_counter()
    metrics = trainer.train_step()
    common.synchronize(trainer.device)
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


class RlgenSide(common.SteppedSide):
    """An rlgen GRPOTrainer set up in a temporary run directory, stepped one train_step at a time."""

    def __init__(self, args, model_path, kernels_mode: str = "auto"):
        super().__init__(args, "rlgen-bench-")
        self.kernels_mode = kernels_mode
        self.n = args.prompts_per_step * args.num_generations
        self.trainer = build_rlgen_trainer(args, model_path, os.path.join(self.tmp.name, "run"), kernels_mode)
        record_lengths(self.trainer)

    def one_step(self) -> dict:
        return rlgen_one_step(self.trainer, self.n)

    def step(self, k: int | None = None) -> None:
        from rlgen import kernels

        kernels.use(self.kernels_mode)  # two rlgen sides may alternate in one process (--kernels compare)
        super().step(k)


def run_rlgen(args, model_path, profile: bool = False) -> dict:
    return common.run_side(RlgenSide(args, model_path, args.kernels), profile)


def run_rlgen_kernel_pair(args, model_path) -> dict:
    """rlgen with its kernels and with the eager reference log-probs, stepped alternately (who goes
    first alternates too) so that both see the same background load."""
    native, eager = RlgenSide(args, model_path, "auto"), RlgenSide(args, model_path, "reference")
    for k in range(args.warmup + args.steps):
        for side in ((native, eager) if k % 2 == 0 else (eager, native)):
            side.step()
    return {"rlgen": native.close(), "rlgen-reference": eager.close()}


# --------------------------------------------------------------------------- TRL

def run_trl(args, model_path, records: list[dict], other_step=None) -> dict:
    """Train TRL for warmup + steps optimiser steps, timing each from on_step_begin to on_step_end;
    `other_step` interleaves the rlgen side (see bench_common.trl_step_timer)."""
    import datasets
    from trl import GRPOConfig, GRPOTrainer

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

    dataset = datasets.Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in records])
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
            **common.trl_common_config(args, total_steps),
        )
        timer = common.trl_step_timer(args.device, other_step)
        trainer = common.new_trl_trainer(TimedGRPOTrainer, model_path, config, reward_funcs=exact_match,
                                  train_dataset=dataset, callbacks=[timer])
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
            **common.trl_settings(trainer, config),
        }
        assert gen.max_new_tokens == T and gen.do_sample and gen.temperature == 1.0, generation
        assert config.generation_batch_size == n and config.steps_per_generation == 1, generation
        trainer.train()
        durations = timer.durations
        rollouts = trainer.rollout_times
        del trainer
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
    p = common.new_parser(__doc__)
    common.add_model_args(p, "prompts")
    p.add_argument("--prompts-per-step", "-P", type=int, default=16, help="prompts per step (default: 16)")
    p.add_argument("--num-generations", "-G", type=int, default=8, help="completions per prompt (default: 8)")
    p.add_argument("--max-new-tokens", "-T", type=int, default=8, help="max completion tokens (default: 8)")
    common.add_step_args(p, "timed steps per side and repeat (default: 10)",
                  "whole measurements, alternating order (default: 2)", "learning rate for both (default: 1e-6)")
    common.add_seed_threads_only(p)
    common.add_device_arg(p)
    common.add_pad_vocab_arg(p)
    p.add_argument("--kernels", choices=("auto", "reference", "compare"), default="auto",
                   help="rlgen's log-prob kernels: auto (native), reference (eager torch), or compare: time rlgen "
                        "with its kernels against rlgen with the reference path, interleaved (no TRL side)")
    common.add_schedule_arg(p, "interleave: alternate rlgen and TRL step by step, so both see the same machine load "
                        "(default); blocks: all steps of one side, then the other")
    common.add_profile_json_args(p, "after timing, cProfile one rlgen step and print the top N functions to stderr")
    args = p.parse_args(argv)
    common.require_positive(p, args, ("prompts_per_step", "num_generations", "max_new_tokens", "steps", "repeats"))
    if args.num_generations < 2:
        p.error("--num-generations must be >= 2")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def print_table(result: dict) -> None:
    c = result["config"]
    m = result["machine"]
    print(f"GRPO step: P={c['prompts_per_step']} prompts x G={c['num_generations']} completions, "
          f"T<={c['max_new_tokens']} new tokens, model {c['model']} ({c['model_params']:,} params), fp32 {c['device']}, "
          f"{m['torch_threads']} torch threads")
    print(common.timing_line(result) + common.load_text(result))
    common.print_header(f"{'':15} {'step s':>8} {'compl/s':>9} {'tok/s':>9} {'tok/step':>9} {'len':>5} "
                        f"{'rollout s':>10} {'update s':>9}")
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
    if common.peak_text(result):
        print(common.peak_text(result))
    for name, per in result.get("per_repeat", {}).items():
        print(f"  {name} per-repeat median compl/s: " + ", ".join(fmt(x) for x in per))


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads, model_path, padded = common.prepare_run(args, "rlgen-bench-vocab-")
    records = common.load_task_records(args.task, "train")
    sides = ["rlgen", "trl"] if args.only == "both" else [args.only]
    if args.kernels == "compare":
        sides = ["rlgen", "rlgen-reference"]
    sides, have_trl = common.check_trl(args, sides)

    n_params = common.count_params(model_path)
    load_before = common.note_load(threads)
    all_steps: dict[str, list] = {s: [] for s in sides}
    per_repeat: dict[str, list] = {s: [] for s in sides}
    extra: dict[str, dict] = {}
    peaks: dict[str, float | None] = {}
    wall = time.perf_counter()
    for r in range(args.repeats):
        torch.set_num_threads(threads)
        head = f"[repeat {r + 1}/{args.repeats}] "
        counts = f"{args.warmup} warm-up + {args.steps} timed steps"
        if args.kernels == "compare":
            print(f"{head}rlgen with kernels and with reference log-probs interleaved: {counts} each ...",
                  file=sys.stderr)
            outs = run_rlgen_kernel_pair(args, model_path)
        else:
            outs = common.run_sides(
                args, sides, r, threads,
                announce=lambda side: f"{head}{side}: {counts} ..." if side else
                f"{head}rlgen and trl interleaved: {counts} each ...",
                new_rlgen=lambda: RlgenSide(args, model_path, args.kernels),
                run_trl=lambda other_step=None: run_trl(args, model_path, records, other_step=other_step),
                run_rlgen=lambda last: run_rlgen(args, model_path, last),
            )
        common.check_threads(threads)
        common.note_peaks(peaks, outs)
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
    result = common.make_result(
        args,
        {
            **common.model_config(args, model_path, n_params),
            "prompts_per_step": args.prompts_per_step,
            "num_generations": args.num_generations,
            "completions_per_step": args.prompts_per_step * args.num_generations,
            "max_new_tokens": args.max_new_tokens,
            **common.timing_config(args, sides),
            "kernels": args.kernels,
            "lr": args.lr,
            "temperature": 1.0,
            "beta": 0.0,
            "num_iterations": 1,
        },
        threads, load_before, wall, have_trl,
        results=results, ratio=ratio, per_repeat=per_repeat, steps=all_steps, peak_mib=peaks,
    )
    if "trl_generation" in extra:
        result["trl_generation"] = extra["trl_generation"]
    print_table(result)
    if "rlgen_profile" in extra:
        print(extra["rlgen_profile"], file=sys.stderr)
        result["rlgen_profile"] = extra["rlgen_profile"]
    common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
