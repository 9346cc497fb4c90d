"""`rlgen pairs`: scored samples in, preference pairs out (JSONL), for `rlgen train dpo` and friends."""
from __future__ import annotations

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
    json_output: bool = opt.Json,
):
    from rlgen.cli.report import Reporter
    from rlgen.data.preferences import make_pairs
    from rlgen.data.records import read_records, write_records

    reporter = Reporter(quiet=quiet, json_output=False)
    records = read_records(source)
    made = make_pairs(records, mode=mode, field=field, margin=margin, group_by=group_by,
                      source="<stdin>" if source == "-" else source)
    groups = len({str(r.get(group_by)) for r in records})
    write_records(_rebase_image_paths(made, records, source, out), out)
    summary = {"samples": len(records), "groups": groups, "pairs": len(made)}
    if json_output and out != "-":
        reporter.emit_json(summary)
    else:
        reporter.log(f"{len(made)} pairs from {len(records)} samples in {groups} groups")


def _rebase_image_paths(made: list[dict], records: list[dict], source: str, out: str) -> list[dict]:
    """Image samples' PNG paths are relative to their JSONL's folder: keep them valid from the pairs file's."""
    import os
    from pathlib import Path

    if not records or "completion" in records[0] or not isinstance(records[0].get("image"), str):
        return made
    src = Path(source).resolve().parent if source != "-" else Path.cwd()
    dst = Path(out).resolve().parent if out != "-" else Path.cwd()
    if src == dst:
        return made

    def rebase(path: str) -> str:
        return path if os.path.isabs(path) else os.path.relpath(src / path, dst)

    return [{**pair, "chosen": rebase(pair["chosen"]), "rejected": rebase(pair["rejected"])} for pair in made]


def register(app: typer.Typer) -> None:
    app.command("pairs", help=HELP)(pairs)
