"""The `rlgen` command: typer app, subcommand registration and the error contract
(bad input -> one line on stderr, exit status 2, traceback only with --debug)."""
from __future__ import annotations

import errno
import os
import sys

import click
import typer

from rlgen import __version__
from rlgen.cli.launch import Invocation
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
    from rlgen.cli import complete, config_cmd, evaluate, info, merge, pairs, sample, score, serve, train

    for module in (sample, score, pairs, train, merge, evaluate, serve, config_cmd, info, complete):
        module.register(app)


_register_commands()


_plugin_entries: list = []  # what add_plugin_commands put into `app`, taken out again before the next call


def _describe(text) -> str:
    text = text if isinstance(text, str) else ""
    return next((line.strip() for line in text.strip().splitlines() if line.strip()), "")


def _collected(collector: typer.Typer) -> list[tuple[str | None, object, str, str]]:
    """(name, entry, "command" | "group", summary) of what one plugin added to its own typer app."""
    found = []
    for info in collector.registered_commands:
        if info.hidden:  # e.g. `__complete`, the shell completions' helper: not a command users look for
            continue
        callback = info.callback
        name = info.name or (typer.main.get_command_name(callback.__name__) if callback is not None else None)
        found.append((name, info, "command", _describe(info.help) or _describe(getattr(callback, "__doc__", None))))
    for info in collector.registered_groups:
        group = info.typer_instance.info if info.typer_instance is not None else None
        name = info.name if isinstance(info.name, str) else getattr(group, "name", None)
        summary = _describe(info.help) or _describe(getattr(group, "help", None))
        found.append((name if isinstance(name, str) else None, info, "group", summary))
    return found


def add_plugin_commands(distributions: set[str] | None = None):
    """Add the subcommands of entry-point plugins (the `register_commands(app)` hook) to `app`, and return
    every command (built-in and plugin) as a Registry of kind "command".

    Each plugin gets a typer app of its own, so that what it adds is attributed to it: a name that a
    built-in or an earlier plugin holds is a clash (one warning line naming both packages; the later
    command is dropped), a hook that raises marks the plugin broken (one warning line), and every other
    command keeps working. `distributions` limits the plugins to those packages (scripts/gen_cli_docs.py).
    Only the plugin modules are imported, no built-in plugin (torch ...): `rlgen --help` stays quick."""
    from rlgen import plugins
    from rlgen.registry import Registry

    for entry in _plugin_entries:  # a previous call in this process (tests run main() many times)
        for listing in (app.registered_commands, app.registered_groups):
            if entry in listing:
                listing.remove(entry)
    _plugin_entries.clear()
    commands: Registry = Registry(plugins.COMMAND_KIND)
    for name, entry, _, summary in _collected(app):
        commands.add(name, entry, plugins.BUILTIN_PROVIDER, summary)
    collectors: dict[int, typer.Typer] = {}

    def make_kwargs(plugin):
        collector = typer.Typer()
        collectors[id(plugin)] = collector
        return {"app": collector}

    clashes = []
    for plugin, _ in plugins.hook_calls("register_commands", make_kwargs, manager=plugins.third_party_manager()):
        if distributions is not None and plugin.distribution not in distributions:
            continue
        for name, entry, how, summary in _collected(collectors[id(plugin)]):
            if not name:
                plugins.warn(f"{plugin.label()} added a command without a name; it is ignored")
                continue
            if name in commands:
                clashes.append(plugins.Clash(plugins.COMMAND_KIND, name, commands.entry(name).provider, plugin.provider))
                continue
            commands.add(name, entry, plugin.provider, summary)
            (app.registered_commands if how == "command" else app.registered_groups).append(entry)
            _plugin_entries.append(entry)
    plugins.record_commands(commands, clashes)
    return commands


BUILTIN_COMMANDS = tuple(name for name, *_ in _collected(app))  # commands and command groups


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


def _end_process_group() -> None:
    """A torchrun worker's clean exit: the process group of its run is destroyed (NCCL warns otherwise).
    Only after a command succeeded: on a failure torchrun ends the other ranks."""
    dist = sys.modules.get("torch.distributed")
    if dist is None:
        return
    from rlgen.distributed import launched_by_torchrun

    if not launched_by_torchrun():  # a group of a library's own (vLLM's in-process engine) is its to end
        return
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("RLGEN_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    Invocation.args, Invocation.debug = list(args), debug
    exit_types, abort_types, usage_types = _click_exception_types()
    try:
        # A built-in command starts without importing plugins for commands (it imports those it needs, e.g.
        # for rewards, later); the help, `rlgen plugins` and anything else (a plugin command) need them.
        if not args or (args[0] not in BUILTIN_COMMANDS and args[0] != "--version") or args[0] == "plugins":
            add_plugin_commands()
        command = typer.main.get_command(app)
        code = command.main(args=args, prog_name="rlgen", standalone_mode=False)
        _end_process_group()
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
