"""`rlgen pairs`: scored samples in, preference pairs out (JSONL), for `rlgen train dpo` and friends."""
from __future__ import annotations

import sys

import typer

from rlgen.cli import options as opt

HELP = """Turn scored samples (from `rlgen score`) into preference pairs: prompt, chosen, rejected.

Samples are grouped by prompt. `--mode best-worst` (default) makes one pair per group, its best against
its worst completion; `--mode all` makes every pair whose score gap is above `--margin`. Groups without
a spread give no pair. Each pair carries `chosen_score`, `rejected_score`, `margin` and the prompt
record's other fields (e.g. `answer`).

Example (on-policy preference data):

    rlgen sample --model tiny-arith --task arithmetic --split train -n 8 --limit 500 | rlgen score -r exact-match | rlgen pairs > pairs.jsonl
"""


def pairs(
    source: str = typer.Argument("-", help="Scored JSONL/Parquet file, or '-' for stdin."),
    mode: str = typer.Option("best-worst", "--mode", help="best-worst | all."),
    field: str = typer.Option("reward", "--field", help="The score field to rank by."),
    margin: float = typer.Option(0.0, "--margin", help="Keep pairs whose score gap is above this."),
    group_by: str = typer.Option("prompt", "--group-by", help="The field that defines a group."),
    out: str = typer.Option("-", "--out", "-o", help="Output JSONL ('-' = stdout)."),
    quiet: bool = opt.Quiet,
    json_output: bool = typer.Option(False, "--json", help="A JSON summary (samples, groups, pairs): on stdout with --out FILE, else on stderr (stdout carries the pairs)."),
):
    from rlgen.api import pair_stats
    from rlgen.api import pairs as make_pairs
    from rlgen.cli.report import Reporter
    from rlgen.data.records import read_records, write_records

    reporter = Reporter(quiet=quiet, json_output=False)
    records = read_records(source, messages=True)
    made = make_pairs(records, mode=mode, field=field, margin=margin, group_by=group_by, source=source, out=out)
    write_records(made, out)
    summary = pair_stats(records, made, group_by)
    if json_output and out != "-":
        reporter.emit_json(summary)
    elif json_output:  # stdout carries the pairs: the JSON summary goes to stderr, one line
        from rlgen.data.records import json_text

        sys.stderr.write(json_text(summary) + "\n")
    else:
        reporter.log(f"{summary['pairs']} pairs from {summary['samples']} samples in {summary['groups']} groups")


def register(app: typer.Typer) -> None:
    app.command("pairs", help=HELP)(pairs)
