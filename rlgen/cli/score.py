"""`rlgen score`: add one field per reward (and the combined, shaped total) to JSONL records."""
from __future__ import annotations

import typer

from rlgen.cli import options as opt

HELP = """Score JSONL samples (fields `prompt`, `completion`, plus e.g. `answer`) with rewards.

Adds `reward_NAME` per reward (raw values) and `reward`: the rewards combined (--combine; default the weighted sum), then shaped (--shape; default none). Input: FILE or '-' (stdin, the default). See `rlgen plugins` for the reward-combiner and reward-shaping names.

Examples:

    rlgen sample --task arithmetic -n 4 | rlgen score -r exact-match -r length:-0.01 > scored.jsonl

    rlgen score samples.jsonl -r exact-match -r length:-0.01 --combine min --shape par:ref_field=answer
"""


def score(
    source: str = typer.Argument("-", help="JSONL/Parquet file, or '-' for stdin."),
    reward: opt.StrList = opt.Reward,
    on_error: str = typer.Option("raise", "--on-error", help="raise | skip: what a failing reward does."),
    combine: str = typer.Option(
        "weighted-sum", "--combine", metavar="SPEC",
        help="How the weighted rewards become one value: NAME[:key=value,...], e.g. weighted-sum, min, mean, "
        "mean-minus-std:k=1.0.",
    ),
    shape: str = typer.Option(
        "", "--shape", metavar="SPEC",
        help="Transform of the combined reward: NAME[:key=value,...], e.g. par:ref_field=answer, clip:low=0,high=1, "
        "ref-normalize (stats from the whole input unless mean=, std= are given). Default: none.",
    ),
    out: str = typer.Option("-", "--out", "-o", help="Output JSONL ('-' = stdout)."),
    device: str = typer.Option("auto", "--device", help="Where rewards that run a model (rm:PATH, digit-classifier ...) run it: auto (CUDA when available), cpu, cuda or cuda:N."),
    quiet: bool = opt.Quiet,
):
    from rlgen.api import score as score_records
    from rlgen.data.records import write_records

    opt.check_device(device)
    write_records(score_records(source, reward, on_error=on_error, combine=combine, shape=shape, device=device), out)


def register(app: typer.Typer) -> None:
    app.command("score", help=HELP)(score)
