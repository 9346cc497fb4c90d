"""`rlgen config show ALGO`: every key of an algorithm's config with its default, type and doc."""
from __future__ import annotations

import json

import typer

from rlgen.cli import options as opt

SHOW_HELP = """Every key of ALGO's config with the value `rlgen train ALGO [--model M]` starts from, its type and a
one-line doc. That value is the config class's default, then the model's recommended settings (its
rlgen_defaults.toml; the model is --model, else the config's default model), then the algorithm's preset.
--toml prints a complete config file (every key, its doc as a comment, unset keys as `# key = ... (unset)`
lines): `rlgen train ALGO --config FILE` on it runs exactly these settings. --json: one object per key.
--config, flags and --set apply on top when training.

Example:

    rlgen config show grpo

    rlgen config show dapo --toml > dapo.toml

    rlgen config show flow-grpo --model tiny-digits-flow --json
"""

config_app = typer.Typer(help="Inspect training configs.", no_args_is_help=True)


@config_app.command("show", help=SHOW_HELP, no_args_is_help=True)
def show(
    algorithm: str = typer.Argument(..., help="Algorithm name (see `rlgen plugins`)."),
    model: opt.OptStr = typer.Option(None, "--model", "-m", help="The model whose recommended settings apply (default: the config's model)."),
    toml: bool = typer.Option(False, "--toml", help="Print a complete, commented TOML config."),
    json_output: bool = opt.Json,
):
    from rlgen.api import load_config
    from rlgen.plugins import registry
    from rlgen.training.config_docs import config_toml, describe_config, render_table

    algo = registry("algorithm").get(algorithm)
    config = load_config(algo, model=model)
    if toml:
        typer.echo(config_toml(config, header=f"rlgen train {algo.name}: the default config ({type(config).__name__})"), nl=False)
    elif json_output:
        typer.echo(json.dumps([row.as_dict() for row in describe_config(config)], indent=1))
    else:
        typer.echo(render_table(describe_config(config)))


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")
