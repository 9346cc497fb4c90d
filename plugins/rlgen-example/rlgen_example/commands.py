"""A command (`rlgen example-hello --name NAME`).

Contract: the register_commands(app) hook adds typer commands to `app` (`app.command("NAME")(fn)`).
They appear in `rlgen --help` and `rlgen plugins`; a name that a built-in or an earlier plugin holds is
dropped with a warning. Follow rlgen's conventions: data to stdout (JSON), logs to stderr, bad input as
rlgen.errors.RlgenError (one line on stderr, exit status 2).
"""
from __future__ import annotations

import json

import typer


def hello(name: str = typer.Option("world", "--name", help="Who to greet.")):
    """Print a JSON greeting: an example of a plugin command."""
    from rlgen.errors import RlgenError

    from rlgen_example import __version__

    if not name.strip():
        raise RlgenError("--name must not be empty")
    typer.echo(json.dumps({"greeting": f"hello, {name}", "plugin": "rlgen-example", "version": __version__}))
