"""`rlgen __complete`: the values that the shell completions (completions/, scripts/gen_cli_docs.py) cannot
know statically, one per line. Hidden: not in --help, the man pages or the completions themselves.

    rlgen __complete names KIND       names that installed plugins register for registry KIND
                                      (the built-in names are in the scripts' static lists)
    rlgen __complete set-keys ALGO    `section.key=` for every config key of ALGO (`rlgen train ALGO --set`)

Completion must never spray the terminal: any failure (an unknown kind or algorithm, a broken plugin,
a bad word) prints nothing and exits 0, and stderr is silenced while it runs. Only what the answer needs is
imported: `names` loads the entry-point plugins alone (no built-in module, so no torch unless a plugin's
hook imports it); `set-keys` needs the algorithm's config class, which for the built-ins imports torch.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys

import typer

HIDDEN_NAME = "__complete"


def plugin_names(kind: str) -> list[str]:
    """Names that the installed (entry-point) plugins register for `kind`, through rlgen's own hook calls;
    items the registry would reject for their shape are left out."""
    from rlgen import plugins

    hook = next((h for h, k in plugins.KINDS.items() if k == kind), None)
    if hook is None:
        return []
    found: list[str] = []

    def make_kwargs(_info):
        def register(name, item, description=""):
            if isinstance(name, str) and name and plugins.item_problem(kind, item) is None:
                found.append(name)

        return {"register": register}

    plugins.hook_calls(hook, make_kwargs, manager=plugins.third_party_manager())
    return found


def set_keys(algorithm: str) -> list[str]:
    """`key=` for every key of `algorithm`'s config that `--set` takes, as `rlgen config show` lists them
    (rlgen.training.config_docs); an unknown algorithm has none."""
    from rlgen.plugins import registry
    from rlgen.training.config_docs import algorithm_defaults, describe_config

    algorithms = registry("algorithm")
    if algorithm not in algorithms:
        return []
    rows = describe_config(algorithm_defaults(algorithms.get(algorithm)))
    return [f"{row.key}=" for row in rows if row.type != "table" and "[]" not in row.key]


SOURCES = {"names": plugin_names, "set-keys": set_keys}


def candidates(words: list[str]) -> list[str]:
    if len(words) != 2 or words[0] not in SOURCES:
        return []
    seen: dict[str, None] = {}
    for value in SOURCES[words[0]](words[1]):
        if value and "\n" not in value:
            seen.setdefault(value, None)
    return list(seen)


@contextlib.contextmanager
def _silenced():
    """stderr to /dev/null (Python's and the file descriptor's: warnings, native libraries), and anything
    that plugin code prints on stdout kept off the candidates."""
    saved = None
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        saved = None
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)


def complete(ctx: typer.Context) -> None:
    """Completion candidates for the shell scripts (internal)."""
    found: list[str] = []
    try:
        with _silenced():
            found = candidates(list(ctx.args))
    except BaseException:  # noqa: BLE001 - completion prints nothing rather than an error, whatever happened
        found = []
    if found:
        try:
            typer.echo("\n".join(found))
        except (OSError, ValueError):
            pass
    raise typer.Exit(0)


def register(app: typer.Typer) -> None:
    app.command(
        HIDDEN_NAME,
        hidden=True,
        add_help_option=False,
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "allow_interspersed_args": False},
    )(complete)
