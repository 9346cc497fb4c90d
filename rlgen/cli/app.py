"""The `rlgen` command: typer app, subcommand registration and the error contract
(bad input -> one line on stderr, exit status 2, traceback only with --debug)."""
from __future__ import annotations

import errno
import os
import sys

import click
import typer

from rlgen import __version__
from rlgen.errors import RlgenError

app = typer.Typer(
    name="rlgen",
    help="Reward-driven post-training of generative models: sample, score, train, merge, eval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool):
    if value:
        typer.echo(f"rlgen {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors (also accepted after a subcommand)."),
):
    """rlgen: one tool for RL fine-tuning, sampling, scoring, merging and evaluating generative models."""


def _register_commands() -> None:
    from rlgen.cli import evaluate, info, merge, pairs, sample, score, train  # noqa: F401 - they add themselves

    for module in (sample, score, pairs, train, merge, evaluate, info):
        module.register(app)


_register_commands()


def _plugin_commands() -> None:
    from rlgen.plugins import plugin_manager

    plugin_manager().hook.register_commands(app=app)


def _click_exception_types():
    """Click's exception classes, and those of the click copy that newer typer releases bundle."""
    import typer.exceptions

    exits, aborts, usage = [click.exceptions.Exit], [click.exceptions.Abort], [click.ClickException]
    exits.append(typer.exceptions.Exit)
    aborts.append(typer.exceptions.Abort)
    try:
        from typer._click import exceptions as bundled

        usage.append(bundled.ClickException)
    except ImportError:
        pass
    return tuple(exits), tuple(aborts), tuple(usage)


def one_line(text: str, limit: int = 1000) -> str:
    """A message as one stderr line: the error contract promises exactly one, whatever the text holds."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _usage_line(exc) -> str:
    """Click's message of a usage error (bad option value, unknown option ...) as one line, with where to look."""
    ctx = getattr(exc, "ctx", None)
    path = getattr(ctx, "command_path", None) or "rlgen"
    try:
        message = exc.format_message()
    except Exception:  # noqa: BLE001 - a message that cannot be formatted still gets its line
        message = type(exc).__name__
    return f"{one_line(message, limit=300)} (see '{path} --help')"


def _quiet_broken_pipe() -> None:
    """The reader of stdout went away (`rlgen ... | head`): that is a normal end, exit 0 in silence. Point
    stdout at /dev/null so that Python's own flush at shutdown cannot fail (and print) again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (tests capture it)
        pass
    sys.exit(0)


def _caused_by_broken_pipe(exc: BaseException) -> bool:
    context = exc.__context__
    return isinstance(context, BrokenPipeError) or (isinstance(context, OSError) and context.errno == errno.EPIPE)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("RLGEN_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    exit_types, abort_types, usage_types = _click_exception_types()
    try:
        if args and args[0] not in {"sample", "score", "pairs", "train", "merge", "eval", "plugins", "env", "-h", "--help", "--version"}:
            _plugin_commands()
        command = typer.main.get_command(app)
        code = command.main(args=args, prog_name="rlgen", standalone_mode=False)
        if sys.stdout is not None:
            sys.stdout.flush()  # here, where a broken pipe is still ours to handle, not at shutdown
        # typer (without standalone mode) turns Ctrl-C into a returned 130 instead of raising
        if isinstance(code, int) and code != 0:
            if code == 130:
                sys.stderr.write("rlgen: interrupted\n")
            sys.exit(code)
    except exit_types as exc:
        sys.exit(getattr(exc, "exit_code", 0))
    except abort_types:
        sys.stderr.write("rlgen: aborted\n")
        sys.exit(130)
    except usage_types as exc:
        if debug:
            raise
        if type(exc).__name__ == "NoArgsIsHelpError":  # `rlgen`, `rlgen train`: the help, as asked
            exc.show()
            sys.exit(exc.exit_code)
        sys.stderr.write(f"rlgen: error: {_usage_line(exc)}\n")
        sys.exit(2)
    except RlgenError as exc:
        if debug:
            raise
        sys.stderr.write(f"rlgen: error: {one_line(exc)}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write("rlgen: interrupted\n")
        sys.exit(130)
    except BrokenPipeError:
        _quiet_broken_pipe()
    except SystemExit as exc:
        # click and rich answer a broken pipe themselves, with exit status 1: ours is 0, as for any reader
        # that stops early
        if _caused_by_broken_pipe(exc):
            _quiet_broken_pipe()
        raise
    except RecursionError:
        # Only pathological input nests this deep (JSON, YAML, TOML): a bad input, not a crash
        if debug:
            raise
        sys.stderr.write("rlgen: error: input nested too deeply (RecursionError)\n")
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if debug:
            raise
        sys.stderr.write(f"rlgen: internal error: {type(exc).__name__}: {one_line(exc)} (run with --debug for the traceback)\n")
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
