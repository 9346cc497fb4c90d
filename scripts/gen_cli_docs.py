#!/usr/bin/env python3
"""Generate the shell completions (completions/) and man pages (man/) from the `rlgen` CLI.

    python scripts/gen_cli_docs.py            # (re)write the files
    python scripts/gen_cli_docs.py --check    # exit 1 and list the stale files if any differ

The completion scripts are static where they can be: commands, options and the built-in registry entries
(provider "rlgen": algorithms, tasks, rewards, models, samplers, merge methods) are written into them, so
the output does not depend on which third-party plugins are installed. Only where a static list cannot
know the answer do they start rlgen, through the hidden `rlgen __complete` (rlgen/cli/complete.py): the
names that installed plugins register are added to each registry-valued list (`__complete names KIND`,
deduplicated), and the value of `rlgen train ALGO --set` completes ALGO's config keys (`__complete
set-keys ALGO`, ALGO read from the command line). Commands are the built-in
ones plus those of the plugins kept in this repository (DOCUMENTED_PLUGINS: rlgen-example, which the
test install and CI install), each man page naming its package; other installed plugins are left out
unless --all-plugins is given (to generate completions for your own installation into --dir). The output is deterministic:
no dates, no terminal-width-dependent rendering (the click parameters are read directly).
"""
from __future__ import annotations

import argparse
import inspect
import re
import sys
import textwrap
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, get_args, get_origin

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # document this checkout's rlgen, not some other installed copy
    sys.path.insert(0, str(REPO))

import typer  # noqa: E402

import rlgen  # noqa: E402
from rlgen.cli.app import app  # noqa: E402

GENERATOR = "scripts/gen_cli_docs.py"
PROG = "rlgen"
BUILTIN_PROVIDER = "rlgen"
HELP_TEXT = "Show this message and exit."
# `main()` strips --debug wherever it appears, so every subcommand accepts it too.
DEBUG_EVERYWHERE = True
# Plugins whose commands the checked-in files document: the repository's own (plugins/*), so that the
# output is the same wherever the test install ran.
DOCUMENTED_PLUGINS = ("rlgen-example",)


# ---------------------------------------------------------------------------------------------
# What values an option or argument takes (drives completion and the man page metavar)


@dataclass(frozen=True)
class Values:
    registry: str | None = None  # complete built-in names from this registry kind
    words: tuple[str, ...] = ()  # complete these fixed words
    files: bool = False  # complete file (and directory) names
    dirs: bool = False  # complete directory names
    set_keys: bool = False  # complete `section.key=` of the algorithm on the command line (rlgen __complete)

    @property
    def empty(self) -> bool:
        return not (self.registry or self.words or self.files or self.dirs or self.set_keys)


NONE = Values()
FILES = Values(files=True)
DIRS = Values(dirs=True)
MODEL = Values(registry="model", dirs=True)

# long option -> (metavar, values), for every subcommand unless COMMAND_OPTIONS says otherwise
OPTIONS = {
    "--config": ("FILE", FILES),
    "--data": ("FILE", FILES),
    "--prompts": ("FILE", FILES),
    "--plot": ("FILE", FILES),
    "--samples-out": ("FILE", FILES),
    "--resume": ("DIR", DIRS),
    "--model": ("MODEL", MODEL),
    "--ref": ("MODEL", MODEL),
    "--base": ("MODEL", MODEL),
    "--lora": ("DIR", DIRS),
    "--plot-dir": ("DIR", DIRS),
    "--task": ("TASK", Values(registry="task")),
    "--reward": ("REWARD", Values(registry="reward")),
    "--sampler": ("SAMPLER", Values(registry="sampler")),
    "--method": ("METHOD", Values(registry="merger")),
    "--split": ("SPLIT", Values(words=("test", "train"))),
    "--on-error": ("MODE", Values(words=("raise", "skip"))),
    "--set": ("KEY=VALUE", NONE),
    "--weights": ("W1,W2,...", NONE),
}
COMMAND_OPTIONS = {
    ("train", "--set"): ("KEY=VALUE", Values(set_keys=True)),
    ("train", "--out"): ("DIR", DIRS),
    ("merge", "--out"): ("DIR", DIRS),
    ("sample", "--out"): ("FILE", FILES),
    ("score", "--out"): ("FILE", FILES),
}
# (subcommand, parameter name) -> (metavar, values) for positional arguments
ARGUMENTS = {
    ("train", "algorithm"): ("ALGORITHM", Values(registry="algorithm")),
    ("score", "source"): ("FILE", FILES),
    ("merge", "models"): ("MODEL", MODEL),
    ("eval", "source"): ("SOURCE", FILES),
}

# Static text of the rlgen(1) page: the error contract implemented in rlgen/cli/app.py.
EXIT_STATUS = [
    ("0", "Success."),
    ("1", "Internal error (a bug): one line on stderr; run with --debug for the traceback."),
    ("2", "Bad input or usage: one line on stderr."),
    ("130", "Interrupted."),
]
ENVIRONMENT = [("RLGEN_DEBUG", "Set to 1 to show tracebacks on errors, like --debug.")]


# ---------------------------------------------------------------------------------------------
# The command tree, read from the click objects


@dataclass
class Param:
    name: str
    opts: list[str]  # short forms first; empty for arguments
    help: str
    takes_value: bool
    multiple: bool
    required: bool
    default: Any
    metavar: str
    values: Values
    nargs: int = 1

    @property
    def longs(self) -> list[str]:
        return [o for o in self.opts if o.startswith("--")]

    @property
    def key(self) -> str:
        return (self.longs or self.opts)[0] if self.opts else self.name


@dataclass
class Command:
    name: str  # "" for the root
    help: str
    options: list[Param] = field(default_factory=list)
    arguments: list[Param] = field(default_factory=list)
    provider: str = BUILTIN_PROVIDER  # the package that provides the command

    @property
    def prog(self) -> str:
        return f"{PROG} {self.name}" if self.name else PROG

    @property
    def page(self) -> str:
        return f"{PROG}-{self.name}" if self.name else PROG

    def sections(self) -> tuple[list[str], list[str]]:
        """(description paragraphs, example command lines) of the help text."""
        lines = inspect.cleandoc(self.help or "").splitlines()
        examples: list[str] = []
        for i, line in enumerate(lines):
            if re.fullmatch(r"\s*Examples?:\s*", line):
                examples = [ln.strip() for ln in lines[i + 1 :] if ln.strip()]
                lines = lines[:i]
                break
        paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", "\n".join(lines)) if p.strip()]
        return paragraphs, examples

    @property
    def summary(self) -> str:
        """The help text's first line, the one-line summary of the command."""
        lines = inspect.cleandoc(self.help or "").splitlines()
        return " ".join(lines[0].split()).rstrip(".") if lines else ""

    def value_options(self) -> list[str]:
        return sorted(o for p in self.options if p.takes_value for o in p.opts)

    def all_opts(self) -> list[str]:
        return sorted(o for p in self.options for o in p.opts)


def _value_type(param) -> tuple[str, tuple[str, ...]]:
    """('text' | 'integer' | 'float' | 'boolean' | 'choice' | 'path', choices), for click's
    `param.type` and for typer versions that vendor click and resolve types lazily."""
    ptype = getattr(param, "type", None)
    if ptype is not None:
        choices = tuple(str(c) for c in (getattr(ptype, "choices", None) or ()))
        name = "choice" if choices else str(getattr(ptype, "name", "text")).lower()
        return ("path" if name in ("path", "file", "filename") else name), choices
    desc = getattr(param, "type_descriptor", None)
    annotation = getattr(desc, "annotation", str)
    if get_origin(annotation) in (list, tuple) and get_args(annotation):
        annotation = get_args(annotation)[0]
    if desc is not None and getattr(desc, "is_choice", False) and getattr(desc, "choices", None):
        return "choice", tuple(str(getattr(c, "value", c)) for c in desc.choices)
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return "choice", tuple(str(m.value) for m in annotation)
    if annotation is bool:
        return "boolean", ()
    if annotation is int:
        return "integer", ()
    if annotation is float:
        return "float", ()
    if desc is not None and (getattr(desc, "is_path", False) or getattr(desc, "is_file", False)):
        return "path", ()
    return "text", ()


def _guess(name: str, help_text: str, kind: str, choices: tuple[str, ...]) -> tuple[str, Values]:
    """Metavar and values of a parameter the tables above do not know."""
    text = help_text.lower()
    if choices:
        return name.upper(), Values(words=tuple(sorted(choices)))
    if kind == "integer":
        return "N", NONE
    if kind == "float":
        return "X", NONE
    if "directory" in text:
        return "DIR", DIRS
    if kind == "path" or re.search(r"\b(file|jsonl|parquet|toml|png)\b", text):
        return "FILE", FILES
    return name.upper().replace("-", "_"), NONE


def _param(command: str, param) -> Param | None:
    if getattr(param, "hidden", False):
        return None
    help_text = " ".join((getattr(param, "help", None) or "").split())
    kind, choices = _value_type(param)
    is_option = getattr(param, "param_type_name", "") == "option"
    if is_option:
        opts = sorted(list(param.opts) + list(getattr(param, "secondary_opts", []) or []),
                      key=lambda o: (o.startswith("--"), o))
        is_flag = bool(getattr(param, "is_flag", False)) or bool(getattr(param, "count", False))
        long_name = next((o for o in opts if o.startswith("--")), opts[0])
        if is_flag:
            metavar, values = "", NONE
        elif (command, long_name) in COMMAND_OPTIONS:
            metavar, values = COMMAND_OPTIONS[(command, long_name)]
        elif long_name in OPTIONS:
            metavar, values = OPTIONS[long_name]
        else:
            metavar, values = _guess(long_name.lstrip("-"), help_text, kind, choices)
        if getattr(param, "metavar", None):
            metavar = param.metavar
        return Param(param.name, opts, help_text, not is_flag, bool(param.multiple), bool(param.required),
                     param.default, metavar, values)
    if (command, param.name) in ARGUMENTS:
        metavar, values = ARGUMENTS[(command, param.name)]
    else:
        metavar, values = param.name.upper(), _guess(param.name, help_text, kind, choices)[1]
    metavar = getattr(param, "metavar", None) or metavar
    return Param(param.name, [], help_text, True, bool(param.multiple) or param.nargs == -1, bool(param.required),
                 param.default, metavar, values, nargs=param.nargs)


class MissingPlugin(Exception):
    pass


def add_plugin_commands(all_plugins: bool) -> dict[str, str]:
    """Add plugin commands to the app (those of DOCUMENTED_PLUGINS, or every installed plugin's);
    command name -> providing package. A documented plugin that is not installed is an error: the
    output would silently lose its pages."""
    from rlgen import plugins
    from rlgen.cli.app import add_plugin_commands as add

    installed = {info.distribution for info in plugins.plugin_infos() if info.status == "ok"}
    missing = [name for name in DOCUMENTED_PLUGINS if name not in installed]
    if missing and not all_plugins:
        raise MissingPlugin(f"plugin package(s) {', '.join(missing)} not installed: pip install -e "
                            + " -e ".join(f"plugins/{name}" for name in missing))
    commands = add(None if all_plugins else set(DOCUMENTED_PLUGINS))
    return {entry.name: entry.provider for entry in commands}


def read_cli(providers: dict[str, str] | None = None) -> tuple[Command, list[Command]]:
    providers = providers or {}
    root_cmd = typer.main.get_command(app)
    ctx = root_cmd.make_context(PROG, [], resilient_parsing=True)
    help_opts = sorted(ctx.help_option_names, key=lambda o: (o.startswith("--"), o))
    help_param = Param("help", help_opts, HELP_TEXT, False, False, False, False, "", NONE)

    def build(name: str, cmd) -> Command:
        command = Command(name, cmd.help or "")
        for param in cmd.params:
            p = _param(name, param)
            if p is None:
                continue
            (command.options if p.opts else command.arguments).append(p)
        command.options.append(help_param)
        return command

    root = build("", root_cmd)
    debug = next((p for p in root.options if "--debug" in p.opts), None)
    subs = []
    for name in root_cmd.list_commands(ctx):
        sub = root_cmd.get_command(ctx, name)
        if sub is None or getattr(sub, "hidden", False):
            continue
        command = build(name, sub)
        command.provider = providers.get(name, BUILTIN_PROVIDER)
        if DEBUG_EVERYWHERE and debug and not any("--debug" in p.opts for p in command.options):
            command.options.insert(len(command.options) - 1, debug)
        subs.append(command)
    return root, subs


def _sort_key(p: Param) -> tuple[str, str]:
    return (p.key.lstrip("-").lower(), p.key)


def builtin_names() -> dict[str, list[tuple[str, str]]]:
    from rlgen.plugins import registries

    return {
        kind: [(e.name, " ".join(e.description.split())) for e in registry if e.provider == BUILTIN_PROVIDER]
        for kind, registry in sorted(registries().items())
    }


def missing_help(root: Command, subs: list[Command]) -> list[str]:
    return [f"{c.prog} {p.key}" for c in [root, *subs] for p in c.options + c.arguments if not p.help]


# ---------------------------------------------------------------------------------------------
# bash


def _bash_values(values: Values, names: dict, cmd: Command | None = None) -> list[str]:
    lines = []
    words = [n for n, _ in names.get(values.registry, [])] if values.registry else []
    words += list(values.words)
    if values.registry:
        lines.append(f'_rlgen_registry {values.registry} "{" ".join(sorted(words))}"')
    elif words:
        lines.append(f'_rlgen_words "{" ".join(sorted(words))}"')
    if values.set_keys and cmd is not None:
        lines += [f'_rlgen_npos "{" ".join(cmd.value_options())}"', '_rlgen_set_keys "$arg1"']
    if values.files:
        lines.append("_rlgen_files")
    elif values.dirs:
        lines.append("_rlgen_dirs")
    return lines


def gen_bash(root: Command, subs: list[Command], names: dict) -> str:
    out = [
        "# bash completion for rlgen                                  -*- shell-script -*-",
        f"# Generated by {GENERATOR} from the rlgen {rlgen.__version__} CLI; do not edit.",
        "# Use: source this file, or copy it to ~/.local/share/bash-completion/completions/rlgen",
        "",
        "_rlgen_words() {",
        "    local IFS=$' \\t\\n'",
        '    COMPREPLY+=($(compgen -W "$1" -- "$cur"))',
        "}",
        "",
        "# $1: a registry kind, $2: its built-in names; adds the names that installed plugins register",
        "# (rlgen __complete names KIND), each offered once",
        "_rlgen_registry() {",
        "    local IFS=$' \\t\\n' w",
        '    for w in $(compgen -W "$2 $(command rlgen __complete names "$1" 2>/dev/null)" -- "$cur"); do',
        '        [[ " ${COMPREPLY[*]} " == *" $w "* ]] || COMPREPLY+=("$w")',
        "    done",
        "}",
        "",
        "# $1: the algorithm; offers its config keys as KEY= (rlgen __complete set-keys ALGO)",
        "_rlgen_set_keys() {",
        "    [[ -n $1 ]] || return",
        "    local IFS=$'\\n'",
        "    compopt -o nospace 2>/dev/null",
        '    COMPREPLY+=($(compgen -W "$(command rlgen __complete set-keys "$1" 2>/dev/null)" -- "$cur"))',
        "}",
        "",
        "_rlgen_files() {",
        "    local IFS=$'\\n'",
        "    compopt -o filenames 2>/dev/null",
        '    COMPREPLY+=($(compgen -f -- "$cur"))',
        "}",
        "",
        "_rlgen_dirs() {",
        "    local IFS=$'\\n'",
        "    compopt -o filenames 2>/dev/null",
        '    COMPREPLY+=($(compgen -d -- "$cur"))',
        "}",
        "",
        "# npos: how many positional words precede the cursor after the subcommand (at index ci); arg1: the",
        "# first of them. $1: the subcommand's options that take a value. COMP_WORDBREAKS splits WORD=VALUE",
        "# into WORD, =, VALUE: the word after a = continues the one before it.",
        "_rlgen_npos() {",
        "    local i w skip=0 glue=0",
        "    npos=0",
        '    arg1=""',
        "    for ((i = ci + 1; i < COMP_CWORD; i++)); do",
        '        w=${COMP_WORDS[i]}',
        "        if [[ $w == = ]]; then",
        "            glue=1",
        "            skip=0",
        "            continue",
        "        fi",
        "        if ((glue || skip)); then",
        "            glue=0",
        "            skip=0",
        "            continue",
        "        fi",
        "        case $w in",
        '            -*) [[ " $1 " == *" $w "* ]] && skip=1 ;;',
        "            *)",
        '                ((npos)) || arg1=$w',
        "                npos=$((npos + 1))",
        "                ;;",
        "        esac",
        "    done",
        "}",
    ]
    for cmd in subs:
        fn = "_rlgen_" + re.sub(r"\W", "_", cmd.name)
        out += ["", f"{fn}() {{"]
        with_values = [p for p in cmd.options if p.takes_value]
        if with_values:
            out.append("    case $prev in")
            for p in sorted((p for p in with_values if not p.values.empty), key=_sort_key):
                out.append(f"        {'|'.join(p.opts)})")
                out += [f"            {line}" for line in _bash_values(p.values, names, cmd)]
                out.append("            return ;;")
            plain = [o for p in sorted(with_values, key=_sort_key) if p.values.empty for o in p.opts]
            if plain:
                out += [f"        {'|'.join(plain)})", "            return ;;"]
            out.append("    esac")
        out += [
            "    if [[ $cur == -* ]]; then",
            f'        _rlgen_words "{" ".join(cmd.all_opts())}"',
            "        return",
            "    fi",
        ]
        if cmd.arguments:
            out += [f'    _rlgen_npos "{" ".join(cmd.value_options())}"', "    case $npos in"]
            for i, arg in enumerate(cmd.arguments):
                pattern = "*" if arg.nargs == -1 else str(i)
                body = _bash_values(arg.values, names)
                out.append(f"        {pattern})")
                out += [f"            {line}" for line in body] or ["            :"]
                out.append("            ;;")
                if arg.nargs == -1:
                    break
            out.append("    esac")
        out.append("}")
    root_values = root.value_options()
    out += [
        "",
        "_rlgen() {",
        "    local cur prev cmd ci i w npos arg1 skip=0",
        "    COMPREPLY=()",
        '    cur=${COMP_WORDS[COMP_CWORD]}',
        '    prev=${COMP_WORDS[COMP_CWORD-1]}',
        "    # --opt=value: the default COMP_WORDBREAKS splits it into --opt, =, value",
        "    if [[ $cur == = ]]; then",
        '        cur=""',
        "    elif [[ $prev == = ]] && ((COMP_CWORD > 1)); then",
        '        prev=${COMP_WORDS[COMP_CWORD-2]}',
        "    fi",
        '    cmd=""',
        "    ci=0",
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        '        w=${COMP_WORDS[i]}',
        "        if ((skip)); then",
        '            [[ $w == = ]] || skip=0',
        "            continue",
        "        fi",
        "        case $w in",
        "            =) ;;",
        (f'            -*) [[ " {" ".join(root_values)} " == *" $w "* ]] && skip=1 ;;' if root_values
         else "            -*) ;;"),
        "            *)",
        '                cmd=$w',
        "                ci=$i",
        "                break",
        "                ;;",
        "        esac",
        "    done",
        "    case $cmd in",
        '        "")',
        "            if [[ $cur == -* ]]; then",
        f'                _rlgen_words "{" ".join(root.all_opts())}"',
        "            else",
        f'                _rlgen_words "{" ".join(sorted(c.name for c in subs))}"',
        "            fi",
        "            ;;",
    ]
    for cmd in sorted(subs, key=lambda c: c.name):
        out.append(f"        {cmd.name}) _rlgen_{re.sub(chr(92) + 'W', '_', cmd.name)} ;;")
    out += ["    esac", "}", "", "complete -F _rlgen rlgen", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# zsh


def _zq(text: str) -> str:
    """Single-quote for zsh."""
    return "'" + text.replace("'", "'\\''") + "'"


def _zdesc(text: str) -> str:
    """Text inside an _arguments [description]."""
    return text.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]")


def _zsh_action(values: Values, cmd: Command | None = None) -> str:
    if values.set_keys and cmd is not None:
        return f"_rlgen_{re.sub(chr(92) + 'W', '_', cmd.name)}_set_keys"
    if values.registry and (values.files or values.dirs):
        return f"_rlgen_{values.registry}_or_{'file' if values.files else 'directory'}"
    if values.registry:
        return f"_rlgen_{values.registry}"
    if values.files:
        return "_files"
    if values.dirs:
        return "_directories"
    if values.words:
        return "(" + " ".join(values.words) + ")"
    return ""


def _zsh_message(metavar: str) -> str:
    return metavar.lower().replace(":", "").replace("[", "").replace("]", "") or "value"


def _zsh_specs(cmd: Command) -> list[str]:
    specs = []
    for p in sorted(cmd.options, key=_sort_key):
        desc = _zdesc(p.help or p.key)
        exclusive = "" if p.multiple else "(" + " ".join(p.opts) + ")"
        if p.opts == [o for o in p.opts if o in ("-h", "--help")] or "--version" in p.opts:
            exclusive = "(- *)"
        for o in p.opts:
            prefix = "*" if p.multiple else exclusive
            if p.takes_value:
                suffix = "=" if o.startswith("--") else "+"
                action = _zsh_action(p.values, cmd)
                specs.append(_zq(f"{prefix}{o}{suffix}[{desc}]:{_zsh_message(p.metavar)}:{action}"))
            else:
                specs.append(_zq(f"{prefix}{o}[{desc}]"))
    for i, a in enumerate(cmd.arguments, start=1):
        colon = ":" if a.required else "::"
        position = "*" if a.nargs == -1 else str(i)
        specs.append(_zq(f"{position}{colon}{_zsh_message(a.metavar)}:{_zsh_action(a.values)}"))
    return specs


def gen_zsh(root: Command, subs: list[Command], names: dict) -> str:
    out = [
        "#compdef rlgen",
        f"# zsh completion for rlgen. Generated by {GENERATOR} from the rlgen {rlgen.__version__} CLI; do not edit.",
        "# Use: copy this file as _rlgen into a directory of your $fpath (before compinit runs).",
    ]
    used = sorted({v for c in subs for p in c.options + c.arguments for v in [p.values] if v.registry},
                  key=lambda v: (v.registry, v.files, v.dirs))
    out += [
        "",
        "# Append to the caller's items the names that installed plugins register for registry $1 (rlgen",
        "# __complete names KIND) and that items does not hold yet.",
        "_rlgen_plugin_items() {",
        "    local name item",
        '    for name in ${(f)"$(command rlgen __complete names $1 2>/dev/null)"}; do',
        "        item=${name//:/\\\\:}",
        "        (( ${items[(Ie)$item]} )) || [[ -n ${(M)items:#${(b)item}:*} ]] || items+=($item)",
        "    done",
        "}",
    ]
    for registry in sorted({v.registry for v in used}):
        items = [f"{n.replace(':', chr(92) + ':')}:{d}" if d else n.replace(":", "\\:") for n, d in names.get(registry, [])]
        out += ["", f"_rlgen_{registry}() {{", "    local -a items", "    items=("]
        out += [f"        {_zq(item)}" for item in items]
        out += ["    )", f"    _rlgen_plugin_items {registry}", f"    _describe -t {registry} {_zq(registry)} items", "}"]
    set_key_cmds = [c for c in sorted(subs, key=lambda c: c.name) if any(p.values.set_keys for p in c.options)]
    if set_key_cmds:
        out += [
            "",
            "# The config keys (KEY=) of the algorithm on the command line (rlgen __complete set-keys ALGO).",
            "# $1: the subcommand's options that take a value.",
            "_rlgen_set_keys() {",
            "    local algo w i skip=0",
            "    local -a keys",
            "    for ((i = 2; i < CURRENT; i++)); do",
            "        w=$words[i]",
            "        if ((skip)); then",
            "            skip=0",
            "            continue",
            "        fi",
            "        case $w in",
            '            -*) [[ " $1 " == *" $w "* ]] && skip=1 ;;',
            "            *)",
            "                algo=$w",
            "                break",
            "                ;;",
            "        esac",
            "    done",
            "    [[ -n $algo ]] || return 1",
            '    keys=(${(f)"$(command rlgen __complete set-keys $algo 2>/dev/null)"})',
            "    (( $#keys )) || return 1",
            "    compadd -S '' -a keys",
            "}",
        ]
        for c in set_key_cmds:
            out += ["", f"_rlgen_{re.sub(chr(92) + 'W', '_', c.name)}_set_keys() {{",
                    f'    _rlgen_set_keys "{" ".join(c.value_options())}"', "}"]
    for v in used:
        if v.files or v.dirs:
            other = "files:file:_files" if v.files else "directories:directory:_directories"
            out += [
                "",
                f"{_zsh_action(v)}() {{",
                f"    _alternative {_zq(f'{v.registry}:{v.registry}:_rlgen_{v.registry}')} {_zq(other)}",
                "}",
            ]
    out += ["", "_rlgen_commands() {", "    local -a commands", "    commands=("]
    out += [f"        {_zq(c.name + ':' + c.summary)}" for c in sorted(subs, key=lambda c: c.name)]
    out += ["    )", "    _describe -t commands 'rlgen command' commands", "}"]
    for cmd in sorted(subs, key=lambda c: c.name):
        out += ["", f"_rlgen_{re.sub(chr(92) + 'W', '_', cmd.name)}() {{", "    _arguments -s -S \\"]
        out += [f"        {spec} \\" for spec in _zsh_specs(cmd)]
        out[-1] = out[-1][: -len(" \\")]
        out.append("}")
    out += ["", "_rlgen() {", "    local curcontext=$curcontext state line ret=1", "    typeset -A opt_args",
            "    _arguments -C -s \\"]
    out += [f"        {spec} \\" for spec in _zsh_specs(root)]
    out += ["        '1: :_rlgen_commands' \\", "        '*:: :->args' && ret=0", "    case $state in",
            "        args)", '            curcontext="${curcontext%:*:*}:rlgen-$words[1]:"',
            "            case $words[1] in"]
    for cmd in sorted(subs, key=lambda c: c.name):
        out.append(f"                {cmd.name}) _rlgen_{re.sub(chr(92) + 'W', '_', cmd.name)} && ret=0 ;;")
    out += [
        "            esac",
        "            ;;",
        "    esac",
        "    return ret",
        "}",
        "",
        "if [[ $zsh_eval_context[-1] == loadautofunc ]]; then",
        '    _rlgen "$@"',
        "else",
        "    compdef _rlgen rlgen",
        "fi",
        "",
    ]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# fish


def _fq(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _fish_values(values: Values, positional: bool = False, cmd: Command | None = None) -> str:
    """complete(1) flags for an option's or argument's value."""
    subs = []
    if values.set_keys and cmd is not None:
        subs.append(" ".join(["__rlgen_set_keys", *cmd.value_options()]))
    if values.registry:
        subs.append(f"__rlgen_complete_{values.registry}")
    if values.dirs and not values.files:
        subs.append("__fish_complete_directories")
    args = []
    if values.words:
        args.append(" ".join(values.words))
    if subs:
        args.append("(" + "; ".join(subs) + ")")
    if positional:
        flags = "-F" if values.files else "-f"
    else:
        flags = "-r -F" if values.files else "-x"
    if args:
        flags += " -a " + _fq(" ".join(args))
    return flags


def gen_fish(root: Command, subs: list[Command], names: dict) -> str:
    out = [
        f"# fish completion for rlgen. Generated by {GENERATOR} from the rlgen {rlgen.__version__} CLI; do not edit.",
        "# Use: copy this file to ~/.config/fish/completions/rlgen.fish",
        "",
        "function __rlgen_subcommand --description 'Print the rlgen subcommand on the command line'",
        "    for t in (commandline -opc)[2..-1]",
        "        switch $t",
        "            case '-*'",
        "            case '*'",
        "                echo $t",
        "                return 0",
        "        end",
        "    end",
        "    return 1",
        "end",
        "",
        "function __rlgen_using --argument-names name --description 'Is the rlgen subcommand NAME?'",
        "    set -l sub (__rlgen_subcommand)",
        '    test "$sub" = "$name"',
        "end",
        "",
        "function __rlgen_positionals --description 'The positional words after the subcommand, one per line; argv: options taking a value'",
        "    set -l skip 0",
        "    set -l seen 0",
        "    for t in (commandline -opc)[2..-1]",
        "        if test $seen = 0",
        "            string match -q -- '-*' $t; or set seen 1",
        "            continue",
        "        end",
        "        if test $skip = 1",
        "            set skip 0",
        "            continue",
        "        end",
        "        switch $t",
        "            case '--*=*'",
        "            case '-*'",
        "                contains -- $t $argv; and set skip 1",
        "            case '*'",
        "                echo $t",
        "        end",
        "    end",
        "end",
        "",
        "function __rlgen_npos --description 'Count positional words after the subcommand; argv: options taking a value'",
        "    count (__rlgen_positionals $argv)",
        "end",
    ]
    out += [
        "",
        "function __rlgen_plugin_names --argument-names kind --description 'Names installed plugins register for registry KIND; argv[2..]: the names to leave out'",
        "    for name in (command rlgen __complete names $kind 2>/dev/null)",
        "        contains -- $name $argv[2..-1]; or printf '%s\\t%s\\n' $name $kind",
        "    end",
        "end",
    ]
    if any(p.values.set_keys for c in subs for p in c.options):
        out += [
            "",
            "function __rlgen_set_keys --description 'Config keys (KEY=) of the algorithm on the command line; argv: options taking a value'",
            "    set -l words (__rlgen_positionals $argv)",
            "    test (count $words) -gt 0; and command rlgen __complete set-keys $words[1] 2>/dev/null",
            "    return 0",
            "end",
        ]
    used = sorted({p.values.registry for c in subs for p in c.options + c.arguments if p.values.registry})
    for registry in used:
        out += ["", f"function __rlgen_complete_{registry}"]
        for name, desc in names.get(registry, []):
            out.append(f"    printf '%s\\t%s\\n' {_fq(name)} {_fq(desc or registry)}")
        out.append(f"    __rlgen_plugin_names {registry} " + " ".join(_fq(n) for n, _ in names.get(registry, [])))
        out.append("end")
    out += ["", "complete -c rlgen -f", ""]

    def option_lines(cmd: Command, condition: str) -> list[str]:
        lines = []
        for p in sorted(cmd.options, key=_sort_key):
            flags = []
            for o in p.opts:
                if o.startswith("--"):
                    flags.append(f"-l {o[2:]}")
                elif len(o) == 2:
                    flags.append(f"-s {o[1:]}")
                else:
                    flags.append(f"-o {o[1:]}")
            value = f" {_fish_values(p.values, cmd=cmd)}" if p.takes_value else ""
            lines.append(f"complete -c rlgen -n {_fq(condition)} {' '.join(flags)}{value} -d {_fq(p.help or p.key)}")
        return lines

    out += option_lines(root, "not __rlgen_subcommand")
    for cmd in sorted(subs, key=lambda c: c.name):
        out.append(f"complete -c rlgen -n {_fq('not __rlgen_subcommand')} -a {cmd.name} -d {_fq(cmd.summary)}")
    for cmd in sorted(subs, key=lambda c: c.name):
        condition = f"__rlgen_using {cmd.name}"
        out += ["", f"# rlgen {cmd.name}"]
        out += option_lines(cmd, condition)
        value_opts = " ".join(cmd.value_options())
        for i, arg in enumerate(cmd.arguments):
            if arg.values.empty:
                continue
            where = condition if arg.nargs == -1 else f"{condition}; and test (__rlgen_npos {value_opts}) = {i}"
            values = _fish_values(arg.values, positional=True)
            out.append(f"complete -c rlgen -n {_fq(where)} {values} -d {_fq(arg.help or arg.name)}")
            if arg.nargs == -1:
                break
    out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# man pages


def _roff_plain(text: str) -> str:
    return text.replace("\\", "\\e").replace("-", "\\-").replace("'", "\\(aq").replace("`", "\\(ga")


def roff(text: str) -> str:
    """Escape text for roff; `code` spans become bold."""
    parts = text.split("`")
    if len(parts) % 2 == 0:  # unbalanced backquote: no markup
        result = _roff_plain(text)
    else:
        result = "".join(_roff_plain(p) if i % 2 == 0 else f"\\fB{_roff_plain(p)}\\fR" for i, p in enumerate(parts))
    # no line break (which roff would take for a sentence end) after an abbreviation
    return re.sub(r"\b(e\.g|i\.e|etc|vs|cf)\. ", r"\1.\\~", result)


def _line(text: str) -> str:
    """A roff text line: never starts with a control character."""
    return "\\&" + text if text.startswith((".", "'")) else text


def _lines(text: str) -> list[str]:
    """Filled roff text as source lines of at most ~80 columns (the output is refilled anyway)."""
    return [_line(t) for t in textwrap.wrap(text, width=80, break_long_words=False, break_on_hyphens=False)]


def _opt_label(p: Param) -> str:
    label = ", ".join(f"\\fB{_roff_plain(o)}\\fR" for o in p.opts)
    if p.takes_value:
        label += f" \\fI{_roff_plain(p.metavar)}\\fR"
    return label


def _opt_text(p: Param) -> str:
    text = roff(p.help)
    notes = []
    if p.required:
        notes.append("Required.")
    if p.takes_value and not p.required and p.default not in (None, "", (), []):
        default = p.default.value if isinstance(p.default, Enum) else p.default
        if isinstance(default, (list, tuple)):
            default = ",".join(str(d) for d in default)
        shown = _roff_plain(str(default))
        if isinstance(default, str) and not re.fullmatch(r"[\w.]+", default):
            shown = f"\\(aq{shown}\\(aq"
        notes.append(f"Default: {shown}.")
    if p.multiple and p.opts and "repeatable" not in p.help.lower():
        notes.append("May be given more than once.")
    return " ".join(x for x in [text, *notes] if x)


def _arg_usage(a: Param) -> str:
    usage = f"\\fI{_roff_plain(a.metavar)}\\fR" + ("..." if a.nargs == -1 else "")
    return usage if a.required else f"[{usage}]"


def gen_man(cmd: Command, root: Command, subs: list[Command]) -> str:
    paragraphs, examples = cmd.sections()
    title = _roff_plain(cmd.page.upper())
    out = [
        f'.\\" Generated by {GENERATOR} from the rlgen {rlgen.__version__} CLI; do not edit.',
        f'.TH "{title}" "1" "" "rlgen {_roff_plain(rlgen.__version__)}" "rlgen Manual"',
        ".nh",
        ".ad l",
        ".SH NAME",
        _line(f"{_roff_plain(cmd.page)} \\- {roff(cmd.summary)}"),
        ".SH SYNOPSIS",
        _line(f"\\fB{_roff_plain(cmd.prog)}\\fR [\\fIOPTIONS\\fR]"
              + ("".join(" " + _arg_usage(a) for a in cmd.arguments))
              + (" \\fICOMMAND\\fR [\\fIARGS\\fR]..." if not cmd.name else "")),
        ".SH DESCRIPTION",
    ]
    for i, paragraph in enumerate(paragraphs):
        if i:
            out.append(".PP")
        out += _lines(roff(paragraph))
    if cmd.provider != BUILTIN_PROVIDER:
        out.append(".PP")
        out += _lines(roff(f"This command is provided by the plugin package `{cmd.provider}`; it exists only "
                           "while that package is installed."))
    if not cmd.name:
        out.append(".SH COMMANDS")
        for sub in subs:
            origin = "" if sub.provider == BUILTIN_PROVIDER else f" (plugin `{sub.provider}`)"
            out += [".TP", _line(f"\\fB{_roff_plain(sub.page)}\\fR(1)"), *_lines(roff(sub.summary + origin) + ".")]
    if cmd.arguments:
        out.append(".SH ARGUMENTS")
        for a in cmd.arguments:
            out += [".TP", _line(_arg_usage(a))]
            out += _lines(roff(a.help))
    out.append(".SH OPTIONS")
    for p in cmd.options:
        out += [".TP", _line(_opt_label(p))]
        out += _lines(_opt_text(p))
    if not cmd.name:
        out.append(".SH EXIT STATUS")
        for code, text in EXIT_STATUS:
            out += [".TP", f"\\fB{code}\\fR", *_lines(roff(text))]
        out.append(".SH ENVIRONMENT")
        for name, text in ENVIRONMENT:
            out += [".TP", f"\\fB{_roff_plain(name)}\\fR", *_lines(roff(text))]
    if examples:
        out += [".SH EXAMPLES"]
        for i, example in enumerate(examples):
            out += ([] if i == 0 else [".sp"]) + [".RS 4", ".nf", _line(_roff_plain(example)), ".fi", ".RE"]
    out.append(".SH SEE ALSO")
    pages = [c.page for c in [root, *subs] if c.page != cmd.page]
    out += _lines(", ".join(f"\\fB{_roff_plain(p)}\\fR(1)" for p in pages))
    out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------


def render(all_plugins: bool = False) -> dict[str, str]:
    """Relative path -> content of every generated file."""
    root, subs = read_cli(add_plugin_commands(all_plugins))
    names = builtin_names()
    files = {
        "completions/rlgen.bash": gen_bash(root, subs, names),
        "completions/_rlgen": gen_zsh(root, subs, names),
        "completions/rlgen.fish": gen_fish(root, subs, names),
        "man/rlgen.1": gen_man(root, root, subs),
    }
    for sub in subs:
        files[f"man/{sub.page}.1"] = gen_man(sub, root, subs)
    for item in missing_help(root, subs):
        print(f"warning: {item} has no help text", file=sys.stderr)
    return dict(sorted(files.items()))


def orphans(base: Path, files: dict[str, str]) -> list[str]:
    """Generated-looking man pages on disk that the CLI no longer has."""
    found = sorted(p.relative_to(base).as_posix() for p in (base / "man").glob("rlgen-*.1")) if (base / "man").is_dir() else []
    return [f for f in found if f not in files]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the files on disk; exit 1 if any is stale")
    parser.add_argument("--dir", type=Path, default=REPO, help="root holding completions/ and man/ (default: the repo)")
    parser.add_argument("--all-plugins", action="store_true",
                        help="document the commands of every installed plugin, not only the repository's own")
    args = parser.parse_args(argv)
    base: Path = args.dir
    try:
        files = render(args.all_plugins)
    except MissingPlugin as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        stale = []
        for rel, content in files.items():
            path = base / rel
            if not path.is_file() or path.read_bytes() != content.encode("utf-8"):
                stale.append(rel)
        stale += orphans(base, files)
        if stale:
            for rel in stale:
                print(f"stale: {rel}", file=sys.stderr)
            print(f"... run python {GENERATOR}", file=sys.stderr)
            return 1
        print(f"{len(files)} files up to date")
        return 0
    for rel, content in files.items():
        path = base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_bytes() != content.encode("utf-8"):
            path.write_bytes(content.encode("utf-8"))
            print(f"wrote {rel}")
    for rel in orphans(base, files):
        (base / rel).unlink()
        print(f"removed {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
