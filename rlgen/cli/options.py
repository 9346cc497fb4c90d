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

OptStr = Optional[str]
OptInt = Optional[int]
StrList = Optional[List[str]]
