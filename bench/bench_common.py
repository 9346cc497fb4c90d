"""What bench/grpo_step.py and bench/dpo_step.py share: the environment they run in, the model and
machine they describe, the rlgen and TRL trainer boilerplate, the step timer, the interleaved or
block schedule of the two sides, and pieces of their tables and JSON records.

Importing this module sets the offline / tokenizer environment before torch loads.
"""
from __future__ import annotations

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


# --------------------------------------------------------------------------- machine, versions, model

def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None


def versions_info(have_trl: bool) -> dict:
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
    return versions


def machine_info(threads: int, load_before, wall: float) -> dict:
    """Where and under what load a benchmark ran (for its JSON record)."""
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": threads,
            "loadavg_before": load_before, "loadavg_after": loadavg(), "wall_s": round(wall, 1)}


def note_load(threads: int) -> list[float] | None:
    """The load average now; a note on stderr when the machine is too busy for `threads` torch threads."""
    load_before = loadavg()
    if load_before and os.cpu_count() and load_before[0] + threads > os.cpu_count() + 0.5:
        hint = "; multi-threaded steps suffer most, try --threads 1" if threads > 1 else ""
        print(f"note: load average {load_before[0]} with {threads} torch thread(s) on {os.cpu_count()} CPUs: the machine "
              f"is busy, so timings will be noisy{hint}", file=sys.stderr)
    return load_before


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def load_task_records(task: str, split: str) -> list[dict]:
    from rlgen.api import task_records

    return task_records(task, split)


def resolve_model(name: str):
    from rlgen.api import RlgenError, resolve_model_path

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
    from rlgen.api import load_model, load_tokenizer

    model = load_model(model_path, "float32")
    model.resize_token_embeddings(vocab, mean_resizing=False)
    model.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(model_path).save_pretrained(out_dir)
    return out_dir


def count_params(model_path) -> int:
    from rlgen.api import load_model

    return sum(p.numel() for p in load_model(model_path, "float32").parameters())


def prepare_run(args, vocab_prefix: str):
    """Warnings off, torch threads set, the model resolved (and its vocabulary padded when asked).

    `args.device` becomes a torch.device (CUDA asked for where there is none: one line, exit 2) and an unset
    `args.schedule` interleave on the CPU, blocks on CUDA.
    Returns (threads, model_path, keep): `keep` holds the padded copy's temporary directory (or None);
    the caller keeps it alive for as long as it uses model_path."""
    warnings.filterwarnings("ignore")
    args.device = resolve_bench_device(args.device)
    if args.schedule is None:  # on a GPU the sides run in blocks, so that each has its own peak memory
        args.schedule = "blocks" if args.device.type == "cuda" else "interleave"
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    model_path = resolve_model(args.model)
    keep = None
    if args.pad_vocab:
        keep = tempfile.TemporaryDirectory(prefix=vocab_prefix)
        model_path = Path(pad_vocabulary(model_path, args.pad_vocab, keep.name))
    return threads, model_path, keep


def trl_available() -> bool:
    try:
        import trl  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


def check_trl(args, sides: list[str]) -> tuple[list[str], bool]:
    """(sides, have_trl): without an importable TRL, --only trl stops and otherwise only rlgen is timed."""
    have_trl = trl_available()
    if "trl" in sides and not have_trl:
        if args.only == "trl":
            sys.exit("error: trl is not importable")
        print("note: trl is not importable; timing rlgen only", file=sys.stderr)
        sides = ["rlgen"]
    return sides, have_trl


# --------------------------------------------------------------------------- command line

def new_parser(doc: str):
    import argparse

    return argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)


def add_device_arg(p) -> None:
    p.add_argument("--device", default="cpu", metavar="auto|cpu|cuda|cuda:N",
                   help="where both sides run (default: cpu; auto = CUDA when available)")


def resolve_bench_device(spec: str) -> torch.device:
    """--device as a torch.device; CUDA asked for where there is none (or not that one): one line, exit 2."""
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    index = spec[len("cuda:"):] if spec.startswith("cuda:") else ("0" if spec == "cuda" else None)
    if index is None or not index.isdigit():
        print(f"error: --device must be auto, cpu, cuda or cuda:N, got {spec!r}", file=sys.stderr)
        sys.exit(2)
    if not torch.cuda.is_available() or int(index) >= torch.cuda.device_count():
        print(f"error: --device {spec}: no such CUDA device here (torch {torch.__version__}, "
              f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} visible)", file=sys.stderr)
        sys.exit(2)
    return torch.device(f"cuda:{index}")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock time covers it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float | None:
    """CUDA's peak allocated memory since the last reset_peak_memory (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def add_model_args(p, gives: str) -> None:
    p.add_argument("--model", default="tiny-arith", help="built-in model name or HF model directory (default: tiny-arith)")
    p.add_argument("--task", default="arithmetic", help=f"rlgen task whose train split gives the {gives} (default: arithmetic)")


def add_step_args(p, steps_help: str, repeats_help: str, lr_help: str) -> None:
    p.add_argument("--steps", type=int, default=10, help=steps_help)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    p.add_argument("--repeats", type=int, default=2, help=repeats_help)
    p.add_argument("--lr", type=float, default=1e-6, help=lr_help)


def add_seed_threads_only(p) -> None:
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads for both (0 = torch's default)")
    p.add_argument("--only", choices=("both", "rlgen", "trl"), default="both")


def add_pad_vocab_arg(p) -> None:
    p.add_argument("--pad-vocab", type=int, default=0, metavar="V",
                   help="grow the model's vocabulary to V rows first (e.g. 32000 or 151936), as with a real tokenizer")


def add_schedule_arg(p, help_: str) -> None:
    p.add_argument("--schedule", choices=("interleave", "blocks"), default=None,
                   help=help_ + " (default: interleave on the CPU; blocks on CUDA, so that each side has its own peak memory)")


def add_profile_json_args(p, profile_help: str) -> None:
    p.add_argument("--profile", type=int, default=0, metavar="N", help=profile_help)
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")


def require_positive(p, args, names) -> None:
    for name in names:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")


# --------------------------------------------------------------------------- rlgen

def build_rlgen(algorithm: str, model_path, out_dir, sections: dict, *, steps: int, seed: int, kernels: str,
                device: torch.device):
    """An rlgen trainer for `algorithm` (not yet set up) on `model_path` in fp32 on `device`, writing to `out_dir`, that
    neither evaluates nor saves and leaves torch's thread count alone; `sections` gives the other config
    sections. Exactly these settings: the model's recommended ones (rlgen_defaults.toml) are left out."""
    from rlgen.api import build_trainer

    config = {
        "model": {"path": str(model_path), "dtype": "float32"},
        **sections,
        "run": {
            "out": str(out_dir),
            "steps": steps,
            "seed": seed,
            "eval_every": 0,
            "save_every": 0,
            "threads": 0,  # leave torch's thread count as this script set it
            "kernels": kernels,
            "device": str(device),
        },
    }
    return build_trainer(algorithm, config, model_defaults=False)


class SteppedSide:
    """An rlgen trainer in a temporary run directory, stepped one train_step at a time: subclasses set
    `self.trainer` and define one_step(), which runs and measures one step. Only the steps after
    `args.warmup` are kept."""

    def __init__(self, args, tmp_prefix: str):
        self.args = args
        self.tmp = tempfile.TemporaryDirectory(prefix=tmp_prefix)
        self.steps: list[dict] = []  # timed steps only
        self.done = 0

    def one_step(self) -> dict:
        raise NotImplementedError

    def step(self, k: int | None = None) -> None:
        result = self.one_step()
        if self.done >= self.args.warmup:
            self.steps.append(result)
        self.done += 1

    def finish(self, profile: bool, **extra) -> dict:
        """{"steps", "profile", **extra}, after an optional cProfile of one more step; frees the trainer."""
        text = profile_step(self.one_step, self.args.profile) if profile and self.args.profile else None
        out = {"steps": self.steps, "profile": text, **extra}
        del self.trainer
        self.tmp.cleanup()
        gc.collect()
        return out

    def close(self, profile: bool = False) -> dict:
        return self.finish(profile)


def run_side(side: SteppedSide, last: bool) -> dict:
    """All warm-up + timed steps of one side in a row; `last` allows its profile."""
    for _ in range(side.args.warmup + side.args.steps):
        side.step()
    return side.close(profile=last)


def profile_step(step, top: int) -> str:
    """cProfile one extra step; the top-`top` functions by internal time and by cumulative time."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    step()
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.strip_dirs().sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return text.getvalue()


# --------------------------------------------------------------------------- TRL

def trl_step_timer(device: torch.device, other_step=None):
    """A TrainerCallback that times each TRL step from on_step_begin to on_step_end (`.durations`), the
    device's queued work included.

    `other_step(k)`, when given, is called between TRL's steps (outside TRL's timed window): before
    TRL's step k for odd k and after it for even k, so that the two sides alternate who goes first."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin = None
            self.durations: list[float] = []

        def on_step_begin(self, args_, state, control, **kw):
            k = len(self.durations)
            if other_step is not None and k % 2 == 1:
                other_step(k)
            synchronize(device)
            self.begin = time.perf_counter()

        def on_step_end(self, args_, state, control, **kw):
            synchronize(device)
            self.durations.append(time.perf_counter() - self.begin)
            k = len(self.durations) - 1
            if other_step is not None and k % 2 == 0:
                other_step(k)

    return StepTimer()


def trl_common_config(args, max_steps: int) -> dict:
    """TRL config arguments both benchmarks share: the learning rate and a constant schedule, the step
    count and seed, fp32 on `args.device` (a CUDA device: TRL's accelerate takes the current one) without
    gradient checkpointing, and no side work in the timed loop."""
    return dict(
        learning_rate=args.lr,  # (TRL's default 1e-6)
        lr_scheduler_type="constant",  # default linear decay; rlgen's default is constant
        max_steps=max_steps,
        seed=args.seed,
        # --- fp32 on the same device as rlgen ---
        use_cpu=args.device.type == "cpu",
        bf16=False,  # TRL defaults bf16=True
        fp16=False,
        gradient_checkpointing=False,  # TRL defaults it to True (recomputes activations: slower)
        # --- no side work during the timed loop ---
        logging_steps=10**9,  # default 10
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,  # (default 0) no worker processes
        dataloader_pin_memory=False,  # rlgen's batches are not pinned either
    )


def new_trl_trainer(trainer_cls, model_path, config, **kwargs):
    """`trainer_cls` on the same fp32 weights and tokenizer rlgen loads, without the callback that prints
    the end-of-training summary to stdout."""
    from transformers.trainer_callback import PrinterCallback

    from rlgen.api import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path, "float32")
    trainer = trainer_cls(model=model, args=config, processing_class=tokenizer, **kwargs)
    trainer.remove_callback(PrinterCallback)
    return trainer


def trl_settings(trainer, config) -> dict:
    return {"gradient_checkpointing": bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
            "optim": str(config.optim)}


# --------------------------------------------------------------------------- schedule

def run_sides(args, sides: list[str], r: int, threads: int, announce, new_rlgen, run_trl, run_rlgen=None) -> dict:
    """One repeat (number r, from 0) of both sides: {side: its run's output}.

    With `--schedule interleave` and two sides, the rlgen side made by new_rlgen() steps between TRL's
    steps (run_trl(other_step=...)); otherwise each side runs all its steps in turn, in alternating order
    from one repeat to the next, rlgen by run_rlgen(last) (default: run_side on new_rlgen()).
    announce(side) gives the progress line for stderr (side None: interleaved). Only the last repeat's
    rlgen side may profile. On CUDA each output has `peak_mib`, the side's peak allocated memory (both
    sides' together when interleaved: `peak_shared`)."""
    total = args.warmup + args.steps
    last = r == args.repeats - 1
    outs = {}
    if args.schedule == "interleave" and len(sides) == 2:
        print(announce(None), file=sys.stderr)
        reset_peak_memory(args.device)
        rl = new_rlgen()
        outs["trl"] = run_trl(other_step=rl.step)
        if rl.done != total:
            raise RuntimeError(f"interleaving ran {rl.done} rlgen steps, expected {total}")
        outs["rlgen"] = rl.close(profile=last)
        peak = peak_memory_mib(args.device)
        for out in outs.values():
            out.update(peak_mib=peak, peak_shared=True)
    else:
        for side in (sides if r % 2 == 0 else list(reversed(sides))):
            print(announce(side), file=sys.stderr)
            torch.set_num_threads(threads)
            gc.collect()
            reset_peak_memory(args.device)
            if side == "rlgen":
                outs["rlgen"] = run_rlgen(last) if run_rlgen else run_side(new_rlgen(), last)
            else:
                outs["trl"] = run_trl()
            outs[side]["peak_mib"] = peak_memory_mib(args.device)
    return outs


def note_peaks(peaks: dict, outs: dict) -> None:
    """The largest `peak_mib` of each side over the repeats so far, into `peaks` (side -> MiB or None)."""
    for side, out in outs.items():
        value = out.get("peak_mib")
        if value is not None:
            peaks[side] = max(value, peaks.get(side) or 0.0)
        else:
            peaks.setdefault(side, None)


def peak_text(result: dict) -> str:
    """The table line on peak memory (CUDA only; empty on the CPU)."""
    peaks = {side: mib for side, mib in result.get("peak_mib", {}).items() if mib is not None}
    if not peaks:
        return ""
    shared = " (both sides together: interleaved)" if result["config"].get("schedule") == "interleave" else ""
    return "peak CUDA memory allocated, MiB" + shared + ": " + ", ".join(f"{side} {mib:.0f}" for side, mib in peaks.items())


def check_threads(threads: int) -> None:
    if torch.get_num_threads() != threads:
        print(f"warning: torch threads changed to {torch.get_num_threads()} during the run", file=sys.stderr)


# --------------------------------------------------------------------------- output

def model_config(args, model_path, n_params: int) -> dict:
    return {
        "model": str(args.model) + (f" (vocabulary padded to {args.pad_vocab})" if args.pad_vocab else ""),
        "model_path": str(model_path),
        "model_params": n_params,
        "task": args.task,
    }


def make_result(args, config: dict, threads: int, load_before, wall: float, have_trl: bool, **rest) -> dict:
    """A benchmark's JSON record: its config (+ dtype and seed), machine and versions, then `rest`."""
    return {
        "config": {**config, "dtype": "float32", "device": str(args.device), "seed": args.seed},
        "machine": machine_info(threads, load_before, wall),
        "versions": versions_info(have_trl),
        **rest,
    }


def timing_config(args, sides: list[str]) -> dict:
    return {
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "schedule": args.schedule if len(sides) == 2 else "single",
    }


def fmt(value, spec=".1f"):
    return "-" if value is None else format(value, spec)


def timing_line(result: dict) -> str:
    """The start of a table's second line: steps, warm-up, repeats and schedule."""
    c = result["config"]
    return f"{c['steps']} timed steps after {c['warmup']} warm-up, x{c['repeats']} repeats ({c['schedule']}); medians. "


def load_text(result: dict) -> str:
    m = result["machine"]
    return f"load average before/after: {m['loadavg_before']} / {m['loadavg_after']}"


def print_header(header: str) -> None:
    print(header)
    print("-" * len(header))


def write_json(path: str | None, result: dict) -> None:
    if path:
        with open(path, "w") as fh:
            json.dump(result, fh, indent=1, default=str)
        print(f"wrote {path}", file=sys.stderr)
