#!/usr/bin/env python
"""Time one DPO training step (pairs/s) for rlgen and, when installed, TRL.

Both sides run in the same process on the same model, the same kind of preference pairs (made
deterministically from rlgen's built-in `arithmetic` task: the prompt, the correct sum as `chosen`, a
wrong sum as `rejected`), the same batch (B pairs = 2B sequences per optimiser step), the sigmoid DPO
loss with the same beta, AdamW with the same learning rate, gradient clipping at 1.0, fp32 on the same
device (`--device`, default cpu), no gradient checkpointing, the same number of torch threads, and a
frozen copy of the initial model as the reference. On CUDA every step is timed up to
torch.cuda.synchronize(), the sides run in blocks by default, and each side's peak allocated memory
(torch.cuda.max_memory_allocated, reset before each side, configuration and repeat) is printed.

Two configurations are timed, side by side:

  ref-each-step    the reference log-probs are computed inside every step on both sides. (rlgen caches
                   each pair's reference log-probs the first time it sees the pair, so the data set is
                   made large enough that no pair repeats within the warm-up + timed steps: every step
                   sees B new pairs. The script checks that rlgen ran the reference on all 2B rows.)
  precomputed-ref  precompute_ref_log_probs=True on both sides: all reference log-probs before step 1;
                   the precompute is not in the step time (it is reported separately).

Each side runs `--warmup` untimed steps, then `--steps` timed steps; medians are reported. By default
the two sides are interleaved step by step (one rlgen step between two TRL steps, alternating which goes
first) so that both see the same background load; `--schedule blocks` runs one side, then the other.
`--repeats R` repeats the whole measurement R times with fresh models and trainers.

Before timing, both sides compute the loss, the sequence log-probs and the gradient of one identical
batch from the same initial model; the script prints them and stops if they disagree (`--no-check`
skips this).

    python bench/dpo_step.py                              # tiny-arith, B=32 pairs, both configurations
    python bench/dpo_step.py --pad-vocab 32000 --json dpo.json
    python bench/dpo_step.py --completion-len 40          # longer chosen / rejected texts
    python bench/dpo_step.py --only rlgen --profile 25    # cProfile one more rlgen step, top 25

pairs/s = B / step seconds (median over the timed steps). The ratio is rlgen / TRL (> 1: rlgen faster).
"""
from __future__ import annotations

import gc
import json
import math
import os
import sys
import tempfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's reference precompute draws a progress bar otherwise

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# Shared with the GRPO benchmark (it also sets the offline / tokenizer environment before torch loads).
import bench_common as common  # noqa: E402
from bench_common import fmt, median  # noqa: E402

import torch  # noqa: E402

CONFIGS = {
    "ref-each-step": False,  # name -> precompute_ref_log_probs
    "precomputed-ref": True,
}


# --------------------------------------------------------------------------- preference pairs

def wrong_sum(prompt: str, answer: str) -> str:
    """A plausible wrong answer to 'a+b=': the sum without carries, or the sum + 10 when there is no carry."""
    try:
        a, b = prompt.rstrip("=").split("+")
        width = max(len(a), len(b))
        no_carry = "".join(str((int(x) + int(y)) % 10) for x, y in zip(a.zfill(width), b.zfill(width))).lstrip("0") or "0"
    except ValueError:  # not an 'a+b=' prompt: fall back to the +10 answer
        no_carry = answer
    return no_carry if no_carry != answer else str(int(answer) + 10)


def stretch(text: str, length: int) -> str:
    """`text` repeated (space-separated) and cut to `length` characters, never ending in a space;
    unchanged when length <= len(text)."""
    if length <= len(text):
        return text
    out = " ".join([text] * (length // (len(text) + 1) + 1))[:length]
    return out[:-1] + text[0] if out.endswith(" ") else out


def make_pairs(records: list[dict], n: int, completion_len: int = 0, prompt_len: int = 0) -> list[dict]:
    """n distinct prompt / chosen / rejected pairs from the first n arithmetic records."""
    if n > len(records):
        raise SystemExit(f"error: {n} pairs needed but the task has {len(records)} records; use fewer --steps or a smaller -B")
    pairs = []
    for r in records[:n]:
        answer = str(r["answer"])
        chosen, rejected = answer, wrong_sum(r["prompt"], answer)
        if completion_len:
            chosen, rejected = stretch(chosen, completion_len), stretch(rejected, completion_len)
        prompt = r["prompt"]
        if prompt_len > len(prompt):  # a fixed preamble in front, as a chat template or instructions would put
            prompt = stretch("add:", prompt_len - len(prompt) - 1) + " " + prompt
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def write_jsonl(pairs: list[dict], path: str) -> str:
    with open(path, "w") as fh:
        for p in pairs:
            fh.write(json.dumps(p) + "\n")
    return path


def pairs_needed(args) -> int:
    """Enough pairs that no pair repeats within warm-up + timed (+ profiled) steps on either side."""
    return max(args.pairs or 0, (args.warmup + args.steps + 2) * args.batch_size)


# --------------------------------------------------------------------------- rlgen

def build_rlgen_trainer(args, model_path, pairs_path: str, out_dir: str, precompute: bool, batch_size: int):
    sections = {
        "data": {"path": pairs_path},
        "algorithm": {
            "loss_type": "sigmoid",
            "beta": args.beta,
            "batch_size": batch_size,  # pairs per optimiser step
            "precompute_ref_log_probs": precompute,
            "shared_prefix": not args.no_shared_prefix,
        },
        "optim": {"lr": args.lr, "gradient_accumulation_steps": 1, "max_grad_norm": 1.0, "lr_scheduler": "constant"},
    }
    return common.build_rlgen("dpo", model_path, out_dir, sections,
                              steps=args.warmup + args.steps + 2, seed=args.seed, kernels=args.kernels,
                              device=args.device)


class RlgenSide(common.SteppedSide):
    """An rlgen PreferenceTrainer set up in a temporary run directory, stepped one train_step at a time.

    Two instance-level wrappers only observe (no change to the work): `frozen_logps` counts the rows the
    reference model scores and times them (during setup: the precompute), `encode` times tokenisation."""

    def __init__(self, args, model_path, pairs_path: str, precompute: bool):
        super().__init__(args, "rlgen-dpo-bench-")
        self.trainer = build_rlgen_trainer(args, model_path, pairs_path, os.path.join(self.tmp.name, "run"), precompute,
                                           args.batch_size)
        self.ref_rows = 0
        self.ref_s = 0.0
        self.encode_s = 0.0
        frozen, encode = self.trainer.frozen_logps, self.trainer.encode

        def counted_frozen(inputs):
            started = time.perf_counter()
            out = frozen(inputs)
            self.ref_s += time.perf_counter() - started
            self.ref_rows += int(inputs[0].shape[0])
            return out

        def timed_encode(pairs):
            started = time.perf_counter()
            out = encode(pairs)
            self.encode_s += time.perf_counter() - started
            return out

        self.trainer.frozen_logps, self.trainer.encode = counted_frozen, timed_encode
        started = time.perf_counter()
        self.trainer.setup()
        self.setup_s = time.perf_counter() - started
        self.precompute_s = self.ref_s if precompute else None  # reference forwards during setup
        self.precompute_rows = self.ref_rows

    def one_step(self) -> dict:
        from rlgen import kernels

        kernels.use(self.args.kernels)
        self.ref_rows, self.ref_s, self.encode_s = 0, 0.0, 0.0
        self.trainer.step += 1
        started = time.perf_counter()
        metrics = self.trainer.train_step()
        common.synchronize(self.trainer.device)
        seconds = time.perf_counter() - started
        return {"seconds": seconds, "pairs": int(metrics["pairs"]), "loss": metrics["loss"], "ref_rows": self.ref_rows,
                "ref_s": self.ref_s, "data_s": self.encode_s}

    def close(self, profile: bool = False) -> dict:
        return self.finish(profile, precompute_s=self.precompute_s, precompute_rows=self.precompute_rows,
                           setup_s=self.setup_s)


# --------------------------------------------------------------------------- TRL

_builds = [0]  # TRL caches precomputed reference log-probs by data set fingerprint: keep each build's apart


def trl_dataset(pairs: list[dict]):
    import datasets

    datasets.disable_progress_bars()
    _builds[0] += 1
    # `bench_build` only changes the fingerprint (TRL drops the column before batching), so that each build
    # really precomputes instead of reading the previous build's cache file.
    return datasets.Dataset.from_list([{**p, "bench_build": _builds[0]} for p in pairs])


def build_trl_trainer(args, model_path, pairs: list[dict], precompute: bool, batch_size: int, max_steps: int,
                      output_dir: str, callbacks=()):
    from trl import DPOConfig, DPOTrainer

    class TimedDPOTrainer(DPOTrainer):
        """Adds timers around the reference precompute and the batch fetch; no change to the work done."""

        precompute_s: float | None = None
        fetch_s: list[float]
        losses: list[torch.Tensor]

        def _precompute_ref_logps(self, dataset, name, batch_size_):
            started = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size_)
            self.precompute_s = (self.precompute_s or 0.0) + time.perf_counter() - started
            return out

        def get_batch_samples(self, *a, **kw):  # the dataloader fetch + collation, before on_step_begin
            started = time.perf_counter()
            out = super().get_batch_samples(*a, **kw)
            self.fetch_s.append(time.perf_counter() - started)
            return out

        def training_step(self, *a, **kw):
            loss = super().training_step(*a, **kw)
            self.losses.append(loss)  # detached; read after training
            return loss

    config = DPOConfig(
        output_dir=output_dir,
        # --- equal work: B pairs = one optimiser step ---
        per_device_train_batch_size=batch_size,  # TRL counts the batch in pairs, like rlgen's algorithm.batch_size
        gradient_accumulation_steps=1,  # (default 1)
        loss_type=["sigmoid"],  # (default)
        beta=args.beta,  # (default 0.1)
        precompute_ref_log_probs=precompute,  # default False
        precompute_ref_batch_size=max(64, batch_size),  # default: the train batch size; rlgen precomputes in max(64, B)
        max_grad_norm=1.0,  # (default 1.0), as rlgen
        **common.trl_common_config(args, max_steps),
    )
    trainer = common.new_trl_trainer(
        TimedDPOTrainer, model_path, config,
        ref_model=None,  # TRL loads a frozen copy of the model from its path (or, with precompute, uses none)
        train_dataset=trl_dataset(pairs),
        callbacks=list(callbacks),
    )
    trainer.fetch_s, trainer.losses = [], []
    settings = {
        **common.trl_settings(trainer, config),
        "bf16": config.bf16,
        "reference_model": "frozen copy" if trainer.ref_model is not None else "none (precomputed)",
        "loss_type": list(config.loss_type),
        "max_length": config.max_length,
    }
    assert not settings["gradient_checkpointing"] and not config.bf16, settings
    return trainer, settings


def run_trl(args, model_path, pairs: list[dict], precompute: bool, other_step=None) -> dict:
    """Train TRL for warmup + steps optimiser steps, timing each from on_step_begin to on_step_end
    (forward, reference forward unless precomputed, loss, backward, clipping, optimiser step, zero_grad);
    `other_step` interleaves the rlgen side (see bench_common.trl_step_timer)."""
    total = args.warmup + args.steps
    timer = common.trl_step_timer(args.device, other_step)
    with tempfile.TemporaryDirectory(prefix="trl-dpo-bench-") as tmp:
        started = time.perf_counter()
        trainer, settings = build_trl_trainer(args, model_path, pairs, precompute, args.batch_size, total, tmp, [timer])
        setup_s = time.perf_counter() - started
        trainer.train()
        durations, fetch, losses, precompute_s = timer.durations, trainer.fetch_s, trainer.losses, trainer.precompute_s
        del trainer
    gc.collect()
    if len(durations) != total or len(losses) != total:
        raise RuntimeError(f"TRL ran {len(durations)} steps ({len(losses)} training_step calls), expected {total}")
    steps = [{"seconds": durations[k], "pairs": args.batch_size, "loss": float(losses[k]),
              "ref_rows": 0 if precompute else 2 * args.batch_size,
              "data_s": fetch[k] if k < len(fetch) else None} for k in range(args.warmup, total)]
    return {"steps": steps, "settings": settings, "precompute_s": precompute_s, "setup_s": setup_s}


# --------------------------------------------------------------------------- same-work check

def check_same_work(args, model_path, pairs: list[dict]) -> dict:
    """One identical batch (the first B pairs) through both sides from the same initial model: loss,
    mean chosen / rejected sequence log-probs, gradient norm (before clipping) and the relative
    difference of the full gradient vectors. rlgen runs its real train_step (its optimiser step is
    intercepted only to copy the gradients first); TRL runs compute_loss + backward on the batch from
    its own collator."""
    B = args.batch_size
    batch_pairs = pairs[:B]
    with tempfile.TemporaryDirectory(prefix="dpo-bench-check-") as tmp:
        path = write_jsonl(batch_pairs, os.path.join(tmp, "pairs.jsonl"))
        # rlgen: a data set of exactly these B pairs, so its first batch is all of them (in its own order;
        # the loss is a mean over pairs, the gradient a sum, so order does not matter)
        trainer = build_rlgen_trainer(args, model_path, path, os.path.join(tmp, "run"), False, B)
        trainer.setup()
        grads: dict[str, torch.Tensor] = {}
        step = trainer.optimizer_step

        def capture():
            for name, p in trainer.model.named_parameters():
                if p.grad is not None:
                    grads[name] = p.grad.detach().clone()
            return step()

        trainer.optimizer_step = capture
        trainer.step = 1
        m = trainer.train_step()
        rl = {"loss": m["loss"], "logps/chosen": m["logps/chosen"], "logps/rejected": m["logps/rejected"],
              "grad_norm": m["grad_norm"]}
        del trainer
        out = {"pairs": B, "rlgen": rl}
        if args.only != "rlgen" and common.trl_available():
            trainer, _ = build_trl_trainer(args, model_path, batch_pairs, False, B, 1, os.path.join(tmp, "trl"))
            model = trainer.model
            model.train()
            batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(B)]))
            loss = trainer.compute_loss(model, batch)
            loss.backward()
            named = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
            metrics = trainer._metrics["train"]
            trl = {"loss": float(loss), "logps/chosen": metrics["logps/chosen"][-1],
                   "logps/rejected": metrics["logps/rejected"][-1],
                   "grad_norm": float(torch.nn.utils.get_total_norm(list(named.values())))}
            compared = sorted(set(named) & set(grads))
            diff = math.sqrt(sum(float((named[n] - grads[n]).pow(2).sum()) for n in compared))
            norm = math.sqrt(sum(float(named[n].pow(2).sum()) for n in compared))
            out.update(trl=trl, grad_rel_diff=diff / max(norm, 1e-30), params_compared=len(compared),
                       params_missing=sorted(set(named) ^ set(grads)))
            del trainer, model
        gc.collect()
    return out


def check_ok(check: dict, tol: float) -> list[str]:
    """Problems found by the same-work check (empty: both sides did the same computation)."""
    if "trl" not in check:
        return []
    problems = []
    rl, trl = check["rlgen"], check["trl"]
    for key in ("loss", "logps/chosen", "logps/rejected", "grad_norm"):
        a, b = rl[key], trl[key]
        if abs(a - b) > tol * max(1.0, abs(b)):
            problems.append(f"{key}: rlgen {a:.6g} vs TRL {b:.6g}")
    if check["grad_rel_diff"] > tol:
        problems.append(f"gradients differ: |g_rlgen - g_trl| / |g_trl| = {check['grad_rel_diff']:.2e}")
    if check["params_missing"]:
        problems.append(f"parameters with a gradient on one side only: {check['params_missing'][:5]}")
    return problems


def print_check(check: dict) -> None:
    rl = check["rlgen"]
    line = (f"same-work check, one batch of {check['pairs']} pairs from the initial model: "
            f"rlgen loss {rl['loss']:.6f} logps/chosen {rl['logps/chosen']:.4f} logps/rejected {rl['logps/rejected']:.4f} "
            f"grad norm {rl['grad_norm']:.6g}")
    if "trl" in check:
        t = check["trl"]
        line += (f"\n                 TRL   loss {t['loss']:.6f} logps/chosen {t['logps/chosen']:.4f} "
                 f"logps/rejected {t['logps/rejected']:.4f} grad norm {t['grad_norm']:.6g}; "
                 f"gradient relative difference {check['grad_rel_diff']:.1e} over {check['params_compared']} tensors")
    print(line)


# --------------------------------------------------------------------------- main

def summarize(steps: list[dict], batch: int) -> dict:
    return {
        "timed_steps": len(steps),
        "step_s": median([s["seconds"] for s in steps]),
        "pairs_per_s": median([s["pairs"] / s["seconds"] for s in steps]),
        "min_step_s": min(s["seconds"] for s in steps) if steps else None,
        "max_step_s": max(s["seconds"] for s in steps) if steps else None,
        "data_s": median([s.get("data_s") for s in steps]),
        "ref_rows_per_step": median([s.get("ref_rows") for s in steps]),
        "ref_rows_min": min((s.get("ref_rows") or 0) for s in steps) if steps else None,
        "mean_loss": sum(s["loss"] for s in steps) / len(steps) if steps else None,
        "batch_pairs": batch,
    }


def parse_args(argv=None):
    p = common.new_parser(__doc__)
    common.add_model_args(p, "pairs")
    p.add_argument("--batch-size", "-B", type=int, default=32, help="pairs per optimiser step (default: 32)")
    p.add_argument("--completion-len", type=int, default=0, metavar="L",
                   help="stretch chosen and rejected to L characters by repeating the answer (default: 0 = the "
                        "bare answer, 1-4 characters; the tiny-arith tokenizer gives one token per character)")
    p.add_argument("--prompt-len", type=int, default=0, metavar="P",
                   help="lengthen each prompt to P characters with a fixed preamble in front (default: 0 = the bare "
                        "'042+917=' prompt, 8 characters)")
    p.add_argument("--pairs", type=int, default=0,
                   help="pairs in the data set (default and minimum: (warmup + steps + 2) x B, so none repeats)")
    common.add_step_args(p, "timed steps per side, configuration and repeat (default: 10)",
                         "whole measurements (default: 2)", "learning rate for both (default: 1e-6, TRL's DPO default)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta for both (default: 0.1)")
    common.add_seed_threads_only(p)
    common.add_device_arg(p)
    p.add_argument("--config", choices=("both", *CONFIGS), default="both",
                   help="which reference configuration(s) to time (default: both)")
    common.add_pad_vocab_arg(p)
    p.add_argument("--kernels", choices=("auto", "reference"), default="auto",
                   help="rlgen's log-prob kernels: auto (native) or reference (eager torch)")
    p.add_argument("--no-shared-prefix", action="store_true",
                   help="rlgen runs each pair's prompt twice (once with chosen, once with rejected), as TRL does")
    common.add_schedule_arg(p, "interleave: alternate rlgen and TRL step by step (default); blocks: one side, "
                               "then the other")
    p.add_argument("--no-check", action="store_true", help="skip the same-work check of loss and gradient")
    p.add_argument("--check-tol", type=float, default=1e-3, help="relative tolerance of that check (default: 1e-3)")
    common.add_profile_json_args(p, "after timing, cProfile one more rlgen step per configuration; top N functions "
                                    "to stderr")
    args = p.parse_args(argv)
    common.require_positive(p, args, ("batch_size", "steps", "repeats"))
    if args.warmup < 0 or args.completion_len < 0 or args.pairs < 0 or args.prompt_len < 0:
        p.error("--warmup, --completion-len, --prompt-len and --pairs must be >= 0")
    if args.beta <= 0:
        p.error("--beta must be > 0")
    return args


def print_table(result: dict) -> None:
    c, m = result["config"], result["machine"]
    print(f"DPO step: B={c['batch_size']} pairs ({2 * c['batch_size']} sequences), sigmoid loss, beta={c['beta']}, "
          f"model {c['model']} ({c['model_params']:,} params), {c['tokens_per_pair']} tokens per pair "
          f"(prompt {c['prompt_tokens']} + chosen {c['chosen_tokens']:.1f} + rejected {c['rejected_tokens']:.1f}, "
          f"mean), fp32 {c['device']}, {m['torch_threads']} torch threads")
    print(common.timing_line(result) + f"{c['pairs']} pairs in the data set. " + common.load_text(result))
    common.print_header(f"{'configuration':16} {'rlgen pairs/s':>13} {'TRL pairs/s':>11} {'rlgen/TRL':>9}   "
                 f"{'rlgen step s':>12} {'TRL step s':>10} {'ref rows/step':>13} {'precompute s':>13}")
    for name, res in result["results"].items():
        rl, trl = res.get("rlgen"), res.get("trl")
        ratio = res.get("ratio")
        rows = f"{fmt(rl and rl['ref_rows_min'], '.0f')}/{fmt(trl and trl['ref_rows_per_step'], '.0f')}"
        pre = res.get("precompute_s") or {}
        pre_text = f"{fmt(pre.get('rlgen'), '.2f')}/{fmt(pre.get('trl'), '.2f')}" if name == "precomputed-ref" else "-"
        print(f"{name:16} {fmt(rl and rl['pairs_per_s']):>13} {fmt(trl and trl['pairs_per_s']):>11} "
              f"{(f'x{ratio:.2f}' if ratio else '-'):>9}   {fmt(rl and rl['step_s'], '.3f'):>12} "
              f"{fmt(trl and trl['step_s'], '.3f'):>10} {rows:>13} {pre_text:>13}")
    for name, res in result["results"].items():
        text = common.peak_text({"config": c, "peak_mib": res.get("peak_mib", {})})
        if text:
            print(f"{name}: {text}")
    print("rlgen/TRL = rlgen pairs/s / TRL pairs/s (> 1: rlgen faster). ref rows/step: reference-model rows scored in "
          "each timed step (rlgen min / TRL); precompute s: rlgen / TRL, not in the step time.")
    for name, res in result["results"].items():
        for side in ("rlgen", "trl"):
            per = res.get("per_repeat", {}).get(side)
            if per:
                data = res[side]["data_s"]
                note = (f"; tokenising inside its step {fmt(data, '.4f')} s" if side == "rlgen"
                        else f"; batch fetch + collation outside its step {fmt(data, '.4f')} s")
                print(f"  {name} {side} per-repeat median pairs/s: " + ", ".join(fmt(x) for x in per)
                      + f"; step min/max {fmt(res[side]['min_step_s'], '.3f')}/{fmt(res[side]['max_step_s'], '.3f')} s"
                      + note)


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads, model_path, padded = common.prepare_run(args, "rlgen-dpo-bench-vocab-")
    sides, have_trl = common.check_trl(args, ["rlgen", "trl"] if args.only == "both" else [args.only])
    configs = list(CONFIGS) if args.config == "both" else [args.config]

    n_pairs = pairs_needed(args)
    pairs = make_pairs(common.load_task_records(args.task, "train"), n_pairs, args.completion_len, args.prompt_len)
    data_dir = tempfile.TemporaryDirectory(prefix="rlgen-dpo-bench-data-")
    pairs_path = write_jsonl(pairs, os.path.join(data_dir.name, "pairs.jsonl"))

    from rlgen.api import load_tokenizer

    n_params = common.count_params(model_path)
    tok = load_tokenizer(model_path)
    prompt_tokens = len(tok(pairs[0]["prompt"]).input_ids)  # all arithmetic prompts have the same length
    chosen_tokens = sum(len(tok(p["chosen"], add_special_tokens=False).input_ids) + 1 for p in pairs) / len(pairs)
    rejected_tokens = sum(len(tok(p["rejected"], add_special_tokens=False).input_ids) + 1 for p in pairs) / len(pairs)

    check = None
    if not args.no_check:
        torch.set_num_threads(threads)
        check = check_same_work(args, model_path, pairs)
        print_check(check)
        problems = check_ok(check, args.check_tol)
        if problems:
            print("error: rlgen and TRL do not compute the same thing on the same batch:\n  " + "\n  ".join(problems)
                  + "\n(--no-check times them anyway)", file=sys.stderr)
            sys.exit(2)
        if "trl" not in check and "trl" in sides:
            print("note: the same-work check ran rlgen only", file=sys.stderr)

    load_before = common.note_load(threads)

    all_steps = {name: {s: [] for s in sides} for name in configs}
    per_repeat = {name: {s: [] for s in sides} for name in configs}
    precompute = {name: {s: [] for s in sides} for name in configs}
    extra: dict = {"profiles": {}}
    peaks: dict[str, dict] = {name: {} for name in configs}
    wall = time.perf_counter()
    for r in range(args.repeats):
        for name in (configs if r % 2 == 0 else list(reversed(configs))):
            pre = CONFIGS[name]
            torch.set_num_threads(threads)
            head = f"[repeat {r + 1}/{args.repeats}] {name}: "
            counts = f"{args.warmup} warm-up + {args.steps} timed steps"
            outs = common.run_sides(
                args, sides, r, threads,
                announce=lambda side: f"{head}{side}, {counts} ..." if side else
                f"{head}rlgen and trl interleaved, {counts} each ...",
                new_rlgen=lambda: RlgenSide(args, model_path, pairs_path, pre),
                run_trl=lambda other_step=None: run_trl(args, model_path, pairs, pre, other_step=other_step),
            )
            common.check_threads(threads)
            common.note_peaks(peaks[name], outs)
            for side in sides:
                out = outs[side]
                if out.get("profile"):
                    extra["profiles"][name] = out["profile"]
                if side == "trl":
                    extra.setdefault("trl_settings", {})[name] = out["settings"]
                all_steps[name][side].extend(out["steps"])
                per_repeat[name][side].append(median([s["pairs"] / s["seconds"] for s in out["steps"]]))
                precompute[name][side].append(out.get("precompute_s"))
    wall = time.perf_counter() - wall

    results = {}
    for name in configs:
        res = {side: summarize(all_steps[name][side], args.batch_size) for side in sides}
        if "rlgen" in res and "trl" in res:
            res["ratio"] = res["rlgen"]["pairs_per_s"] / res["trl"]["pairs_per_s"]
        res["per_repeat"] = per_repeat[name]
        res["peak_mib"] = peaks[name]
        res["precompute_s"] = {side: median(precompute[name][side]) for side in sides}
        res["precompute_s_per_repeat"] = precompute[name]
        results[name] = res
        if CONFIGS[name] is False and "rlgen" in res and res["rlgen"]["ref_rows_min"] != 2 * args.batch_size:
            print(f"warning: {name}: an rlgen step scored only {res['rlgen']['ref_rows_min']} reference rows (expected "
                  f"{2 * args.batch_size}): its reference cache served some pairs", file=sys.stderr)

    result = common.make_result(
        args,
        {
            **common.model_config(args, model_path, n_params),
            "batch_size": args.batch_size,
            "completion_len": args.completion_len,
            "prompt_len": args.prompt_len,
            "pairs": n_pairs,
            "prompt_tokens": prompt_tokens,
            "chosen_tokens": chosen_tokens,
            "rejected_tokens": rejected_tokens,
            "tokens_per_pair": round(prompt_tokens + chosen_tokens + rejected_tokens, 1),
            **common.timing_config(args, sides),
            "configurations": configs,
            "kernels": args.kernels,
            "shared_prefix": not args.no_shared_prefix,
            "lr": args.lr,
            "beta": args.beta,
            "loss_type": "sigmoid",
        },
        threads, load_before, wall, have_trl,
        check=check, results=results, steps=all_steps,
    )
    if "trl_settings" in extra:
        result["trl_settings"] = extra["trl_settings"]
    print_table(result)
    for name, text in extra["profiles"].items():
        print(f"--- rlgen profile, {name} ---\n{text}", file=sys.stderr)
        result.setdefault("rlgen_profile", {})[name] = text
    common.write_json(args.json, result)
    data_dir.cleanup()
    return result


if __name__ == "__main__":
    main()
