"""`rlgen merge`: combine HF model directories of one architecture."""
from __future__ import annotations

import typer

from rlgen.cli import options as opt
from rlgen.errors import RlgenError

HELP = """Merge two or more Hugging Face model directories (same architecture) into one.

Example:

    rlgen merge runs/a/final runs/b/final --method linear --weights 0.5,0.5 --out merged
"""


def merge(
    models: list[str] = typer.Argument(..., help="Model directories or built-in names."),
    method: str = typer.Option("linear", "--method", help="Merge method (see `rlgen plugins`)."),
    weights: opt.OptStr = typer.Option(None, "--weights", help="Comma-separated weights (default: equal)."),
    out: str = typer.Option(..., "--out", "-o", help="Output model directory."),
    quiet: bool = opt.Quiet,
    json_output: bool = opt.Json,
):
    from rlgen.cli.report import Reporter
    from rlgen.merging.merge import merge_models
    from rlgen.plugins import registry

    fn = registry("merger").get(method)
    if weights:
        try:
            values = [float(w) for w in weights.split(",")]
        except ValueError:
            raise RlgenError(f"--weights must be comma-separated numbers, got {weights!r}") from None
    else:
        values = [1.0 / len(models)] * len(models)
    result = merge_models(models, values, fn, out)
    Reporter(quiet=quiet, json_output=json_output).result(result, f"merged {len(models)} models ({result['tensors']} tensors) into {out}")


def register(app: typer.Typer) -> None:
    app.command("merge", help=HELP, no_args_is_help=True)(merge)
