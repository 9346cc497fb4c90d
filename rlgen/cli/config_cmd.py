"""`rlgen config show ALGO`: every key of an algorithm's config with its default, type and doc."""
from __future__ import annotations

import json

import typer

from rlgen.cli import options as opt

SHOW_HELP = """Every key of ALGO's config: its default (the config class's, with the algorithm's preset on top),
type and a one-line doc. --toml prints a complete config file (every key, its doc as a comment, unset keys
as `# key = ... (unset)` lines) that `rlgen train ALGO --config FILE` reads; --json one object per key.

A model's recommended settings (its rlgen_defaults.toml), --config, flags and --set apply on top when training.

Example:

    rlgen config show grpo

    rlgen config show dapo --toml > dapo.toml
"""

config_app = typer.Typer(help="Inspect training configs.", no_args_is_help=True)


@config_app.command("show", help=SHOW_HELP, no_args_is_help=True)
def show(
    algorithm: str = typer.Argument(..., help="Algorithm name (see `rlgen plugins`)."),
    toml: bool = typer.Option(False, "--toml", help="Print a complete, commented TOML config."),
    json_output: bool = opt.Json,
):
    from rlgen.plugins import registry
    from rlgen.training.config_docs import (
        algorithm_defaults,
        config_toml,
        describe_config,
        render_table,
    )

    algo = registry("algorithm").get(algorithm)
    config = algorithm_defaults(algo)
    if toml:
        typer.echo(config_toml(config, header=f"rlgen train {algo.name}: the default config ({type(config).__name__})"), nl=False)
    elif json_output:
        typer.echo(json.dumps([row.as_dict() for row in describe_config(config)], indent=1))
    else:
        typer.echo(render_table(describe_config(config)))


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")
