"""`rlgen score`: add one field per reward (and the weighted total) to JSONL records."""
from __future__ import annotations

import typer

from rlgen.cli import options as opt
from rlgen.errors import RlgenError

HELP = """Score JSONL samples (fields `prompt`, `completion`, plus e.g. `answer`) with rewards.

Adds `reward_NAME` per reward and `reward` (the weighted sum). Input: FILE or '-' (stdin, the default).

Example:

    rlgen sample --task arithmetic -n 4 | rlgen score -r exact-match -r length:-0.01 > scored.jsonl
"""


def score(
    source: str = typer.Argument("-", help="JSONL/Parquet file, or '-' for stdin."),
    reward: opt.StrList = opt.Reward,
    on_error: str = typer.Option("raise", "--on-error", help="raise | skip: what a failing reward does."),
    out: str = typer.Option("-", "--out", "-o", help="Output JSONL ('-' = stdout)."),
    quiet: bool = opt.Quiet,
):
    from rlgen.data.records import read_records, write_records
    from rlgen.rewards.base import RewardSet, RewardSpec

    if not reward:
        raise RlgenError("no reward given (use --reward NAME)")
    rewards = RewardSet([RewardSpec.parse(r) for r in reward], on_error)
    records = read_records(source, required=("prompt", "completion"))
    components, valid = rewards.compute(records)
    totals = rewards.total(components)
    out_records = []
    for i, record in enumerate(records):
        scored = dict(record)
        for k, name in enumerate(rewards.names):
            value = float(components[i, k])
            scored[f"reward_{name}"] = None if value != value else value
        scored["reward"] = float(totals[i]) if bool(valid[i]) else None
        out_records.append(scored)
    write_records(out_records, out)


def register(app: typer.Typer) -> None:
    app.command("score", help=HELP)(score)
