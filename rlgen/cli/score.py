"""`rlgen score`: add one field per reward (and the combined, shaped total) to JSONL records."""
from __future__ import annotations

import typer

from rlgen.cli import options as opt
from rlgen.errors import RlgenError

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
    quiet: bool = opt.Quiet,
):
    from rlgen.data.records import read_records, write_records
    from rlgen.rewards.base import RewardSet, RewardSpec

    if not reward:
        raise RlgenError("no reward given (use --reward NAME)")
    rewards = RewardSet([RewardSpec.parse(r) for r in reward], on_error, combine=combine, shaping=shape)
    records = read_records(source, required=("prompt",))
    components, valid, totals = rewards.score(_with_resolved_images(records, source))
    out_records = []
    for i, record in enumerate(records):
        scored = dict(record)
        for k, name in enumerate(rewards.names):
            value = float(components[i, k])
            scored[f"reward_{name}"] = None if value != value else value
        scored["reward"] = float(totals[i]) if bool(valid[i]) else None
        out_records.append(scored)
    write_records(out_records, out)


def _with_resolved_images(records: list[dict], source: str) -> list[dict]:
    """Each record needs a `completion` (text) or an `image` (PNG path, relative to the input file's folder;
    to the current one for stdin); the rewards see absolute image paths, the output keeps the given ones."""
    from pathlib import Path

    from rlgen.data.records import check_text

    name = "<stdin>" if source == "-" else source
    base = Path(source).resolve().parent if source != "-" else Path.cwd()
    out = []
    for number, record in enumerate(records, start=1):
        if "completion" not in record and "image" not in record:
            line = record.get("_line", number)
            raise RlgenError(f"{name}, line {line}: missing field 'completion' (or 'image' for image samples)")
        if "completion" not in record:
            check_text(name, record, "image")  # a path, not a number or a list
        if isinstance(record.get("image"), str):
            record = {**record, "image": str(base / record["image"])}
        out.append(record)
    return out


def register(app: typer.Typer) -> None:
    app.command("score", help=HELP)(score)
