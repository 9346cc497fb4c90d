"""Plugins that fail: a plugin that cannot be imported, a hook that raises, and name clashes (items and
commands) are each one warning line, every other part of rlgen keeps working, and `rlgen plugins` /
`rlgen env` show them. The fake plugins are real distributions (a dist-info with an entry point) written
into tmp_path and put on sys.path, so the entry-point machinery is exercised as after `pip install`."""
from __future__ import annotations

import importlib
import json
import sys
import textwrap
from pathlib import Path

import pytest

from cli_helpers import cli_env, rlgen, rlgen_process
from rlgen import plugins

SCORE_INPUT = json.dumps({"prompt": "1+1=", "completion": "2", "answer": "2"}) + "\n"


def write_distribution(root: Path, dist: str, version: str, entry_point: str, module: str, source: str | None) -> None:
    """A minimal installed distribution: METADATA and entry_points.txt in a dist-info, plus its module
    (none when `source` is None: the entry point then names a module that does not exist)."""
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[rlgen]\n{entry_point} = {module}\n")
    if source is not None:
        (root / f"{module}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def site(tmp_path):
    """A directory of fake distributions on sys.path; afterwards the plugins are forgotten, their modules
    unloaded and the CLI's plugin commands rebuilt from the real installation."""
    root = tmp_path / "site"
    root.mkdir()
    sys.path.insert(0, str(root))
    before = set(sys.modules)
    plugins.reset()
    try:
        yield root
    finally:
        sys.path.remove(str(root))
        for name in set(sys.modules) - before:
            if name.startswith("rlgen_fixture_"):
                del sys.modules[name]
        importlib.invalidate_caches()
        plugins.reset()
        from rlgen.cli.app import add_plugin_commands

        add_plugin_commands()  # drops the fake plugins' commands from the shared typer app
        plugins.reset()


def install(site: Path, *args) -> None:
    write_distribution(site, *args)
    importlib.invalidate_caches()


def warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("rlgen: warning:")]


# --- a plugin that cannot be imported ------------------------------------------------------------------

MISSING = ("rlgen: warning: plugin 'broken' (distribution 'rlgen-broken-fixture 1.2') failed to load: "
           "ModuleNotFoundError: No module named 'rlgen_fixture_missing'")


def test_broken_plugin_is_one_warning_and_the_rest_works(site):
    install(site, "rlgen-broken-fixture", "1.2", "broken", "rlgen_fixture_missing", None)

    code, out, err = rlgen("score", "-r", "exact-match", stdin=SCORE_INPUT)
    assert code == 0, err
    assert err.splitlines() == [MISSING]
    assert json.loads(out)["reward"] == 1.0
    assert plugins.registry("reward").entry("digit-overlap").provider == "rlgen-example"  # other plugins load

    code, out, err = rlgen("plugins", "--json")
    assert code == 0, err
    broken = next(p for p in json.loads(out)["plugin"] if p["name"] == "broken")
    assert broken == {"name": "broken", "provider": "rlgen-broken-fixture", "version": "1.2", "status": "broken",
                      "description": MISSING.split("failed to load: ")[1],
                      "error": "ModuleNotFoundError: No module named 'rlgen_fixture_missing'"}

    code, out, err = rlgen("env", "--json")
    assert code == 0, err
    listed = {p["name"]: p for p in json.loads(out)["plugins"]}
    assert listed["broken"]["status"] == "broken" and "rlgen_fixture_missing" in listed["broken"]["error"]
    assert listed["example"] == {"name": "example", "distribution": "rlgen-example", "version": "0.2.0",
                                 "status": "ok", "error": None}


def test_broken_plugin_in_a_real_process(site):
    """What a user sees: `rlgen --help` (which loads plugin commands) and a built-in command each print
    the one warning line and succeed."""
    install(site, "rlgen-broken-fixture", "1.2", "broken", "rlgen_fixture_missing", None)
    env = cli_env(PYTHONPATH=str(site))
    proc = rlgen_process("--help", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [MISSING]
    assert "example-hello" in proc.stdout
    proc = rlgen_process("score", "-r", "exact-match", stdin=SCORE_INPUT, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [MISSING]
    proc = rlgen_process("env", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "plugins.broken: rlgen-broken-fixture 1.2 (broken: ModuleNotFoundError: No module named " \
           "'rlgen_fixture_missing')" in proc.stdout.splitlines()
    assert "plugins.example: rlgen-example 0.2.0" in proc.stdout.splitlines()


def test_plugin_whose_hook_raises_contributes_nothing(site):
    install(site, "rlgen-raiser-fixture", "0.1", "raiser", "rlgen_fixture_raiser", """
        from rlgen.hookspecs import hookimpl

        @hookimpl
        def register_rewards(register):
            register("fixture-first", lambda samples, **_: [1.0] * len(samples))
            raise ValueError("boom")

        @hookimpl
        def register_metrics(register):
            register("fixture-metric", lambda samples, **_: {"n": float(len(samples))})
    """)
    registries = plugins.registries()
    assert "fixture-first" not in registries["reward"]  # registered before the raise: dropped too
    assert "fixture-metric" not in registries["metric"]  # another hook of the broken plugin: dropped
    assert "exact-match" in registries["reward"]
    (raiser,) = [p for p in plugins.plugin_infos() if p.name == "raiser"]
    assert raiser.status == "broken" and raiser.error == "hook register_rewards raised ValueError: boom"
    code, out, err = rlgen("score", "-r", "exact-match", stdin=SCORE_INPUT)
    assert code == 0 and json.loads(out)["reward"] == 1.0


# --- name clashes ------------------------------------------------------------------------------------

FIRST = """
    from rlgen.hookspecs import hookimpl

    @hookimpl
    def register_rewards(register):
        register("exact-match", lambda samples, **_: [0.0] * len(samples))
        register("fixture-shared", lambda samples, **_: [0.25] * len(samples))

    @hookimpl
    def register_commands(app):
        @app.command("train")
        def train():
            print("not the built-in train")

        @app.command("fixture-cmd")
        def first():
            print("from the first plugin")
"""
SECOND = """
    from rlgen.hookspecs import hookimpl

    @hookimpl
    def register_rewards(register):
        register("fixture-shared", lambda samples, **_: [0.75] * len(samples))

    @hookimpl
    def register_tasks(register):
        register("arithmetic", object())

    @hookimpl
    def register_commands(app):
        @app.command("fixture-cmd")
        def second():
            print("from the second plugin")
"""


def test_every_clash_is_reported_once_and_the_first_keeps_the_name(site):
    # Installed in the "wrong" order: which plugin comes first follows the distribution names, not sys.path.
    install(site, "rlgen-second-fixture", "1.0", "second", "rlgen_fixture_second", SECOND)
    install(site, "rlgen-first-fixture", "1.0", "first", "rlgen_fixture_first", FIRST)

    code, out, err = rlgen("plugins", "--json")
    assert code == 0, err

    def clash(kind, name, kept, dropped):
        return (f"rlgen: warning: {kind} '{name}' is registered twice: by package '{kept}' (kept) and by "
                f"package '{dropped}' (dropped)")

    assert sorted(warnings(err)) == sorted([
        clash("reward", "exact-match", "rlgen", "rlgen-first-fixture"),
        clash("reward", "fixture-shared", "rlgen-first-fixture", "rlgen-second-fixture"),
        clash("task", "arithmetic", "rlgen", "rlgen-second-fixture"),
        clash("command", "train", "rlgen", "rlgen-first-fixture"),
        clash("command", "fixture-cmd", "rlgen-first-fixture", "rlgen-second-fixture"),
    ])
    assert len(err.splitlines()) == 5
    listing = json.loads(out)
    shared = [e for e in listing["reward"] if e["name"] == "fixture-shared"]
    assert [(e["provider"], e["status"]) for e in shared] == [("rlgen-first-fixture", "ok"), ("rlgen-second-fixture", "dropped")]
    assert shared[1]["kept_by"] == "rlgen-first-fixture"
    trains = [e for e in listing["command"] if e["name"] == "train"]
    assert [(e["provider"], e["status"]) for e in trains] == [("rlgen", "ok"), ("rlgen-first-fixture", "dropped")]

    # A clashed name is not an error: it is the item that kept it.
    rewards = plugins.registry("reward")
    samples = [{"prompt": "1+1=", "completion": "2", "answer": "2"}]
    assert rewards.get("exact-match")(samples) == [1.0]
    assert rewards.get("fixture-shared")(samples) == [0.25]
    code, out, err = rlgen("fixture-cmd")
    assert (code, out) == (0, "from the first plugin\n")
    code, out, err = rlgen("score", "-r", "fixture-shared", stdin=SCORE_INPUT)
    assert code == 0 and json.loads(out)["reward"] == 0.25
    code, out, _ = rlgen("train", "--help")
    assert code == 0 and "not the built-in" not in out and "ALGO" in out.upper()
