"""Dynamic shell completions: the hidden `rlgen __complete` command (rlgen/cli/complete.py) and the generated
completions/rlgen.bash calling it for plugin names and `rlgen train ALGO --set` keys."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import cli_env, rlgen, rlgen_ok, rlgen_process

REPO = Path(__file__).resolve().parent.parent
BASH_SCRIPT = REPO / "completions" / "rlgen.bash"
ENTRY_POINT = Path(sys.executable).parent / "rlgen"


def candidates(*args) -> list[str]:
    result = rlgen("__complete", *args)
    assert (result.code, result.err) == (0, ""), result
    return result.out.splitlines()


def test_names_include_the_example_plugins_items():
    assert "digit-overlap" in candidates("names", "reward")
    assert {"example-grpo", "example-raft"} <= set(candidates("names", "algorithm"))
    assert "example-doubling" in candidates("names", "task")
    assert "example-mean" in candidates("names", "merger")
    names = candidates("names", "sampler")
    assert "example-cooled" in names and len(names) == len(set(names))


def test_set_keys_are_the_keys_of_config_show():
    keys = candidates("set-keys", "grpo")
    assert "rollout.num_generations=" in keys
    assert "optim.lr=" in keys
    assert all(key.endswith("=") and "[]" not in key for key in keys)
    shown = rlgen_ok("config", "show", "grpo", "--json").out
    expected = [row["key"] + "=" for row in json.loads(shown) if row["type"] != "table" and "[]" not in row["key"]]
    assert keys == expected
    assert "rollout.num_generations=" in candidates("set-keys", "example-grpo")  # a plugin's algorithm


@pytest.mark.parametrize("args", [
    ("set-keys", "no-such-algorithm"),
    ("names", "no-such-kind"),
    (),
    ("names",),
    ("bogus", "x"),
    ("names", "reward", "extra"),
    ("set-keys", "--help"),
    ("--help",),
])
def test_bad_or_unknown_input_prints_nothing(args):
    assert candidates(*args) == []


def test_hidden_from_help_and_man_pages():
    assert "__complete" not in rlgen_ok("--help").out
    for page in (REPO / "man").glob("*.1"):
        assert "__complete" not in page.read_text(), page
    assert not (REPO / "man" / "rlgen-__complete.1").exists()


def test_names_do_not_import_torch():
    code = ("import sys\nfrom rlgen.cli.app import main\ntry:\n    main(['__complete', 'names', 'task'])\n"
            "except SystemExit as exc:\n    assert exc.code in (0, None), exc.code\n"
            "print('torch imported' if 'torch' in sys.modules else 'no torch', file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "example-doubling" in proc.stdout.splitlines()
    assert proc.stderr.strip() == "no torch"


def test_real_process_prints_nothing_for_an_unknown_algorithm():
    proc = rlgen_process("__complete", "set-keys", "no-such-algorithm")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def bash_complete(*words: str) -> list[str]:
    """COMPREPLY of the generated bash completion for the command line `words` (the cursor on the last one),
    split at COMP_WORDBREAKS' `=` as bash does; `rlgen` on PATH is this environment's entry point."""
    if shutil.which("bash") is None or not ENTRY_POINT.exists():
        pytest.skip("needs bash and the rlgen entry point of this environment")
    script = (f"source {BASH_SCRIPT}\nCOMP_WORDS=({' '.join(_quote(w) for w in words)})\n"
              f"COMP_CWORD={len(words) - 1}\n_rlgen\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n")
    env = cli_env(PATH=f"{ENTRY_POINT.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], capture_output=True, text=True,
                          env=env, timeout=120, cwd=REPO)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return [line for line in proc.stdout.splitlines() if line]


def _quote(word: str) -> str:
    return "'" + word.replace("'", "'\\''") + "'"


def test_bash_completes_set_keys_of_the_algorithm():
    assert bash_complete("rlgen", "train", "grpo", "--set", "rollout.num_gen") == ["rollout.num_generations="]
    # --set=KEY, an earlier --set KEY=VALUE and options before the algorithm
    assert "optim.lr=" in bash_complete("rlgen", "train", "--steps", "3", "grpo", "--set", "optim.lr", "=", "1",
                                        "--set", "=", "optim.")
    assert bash_complete("rlgen", "train", "--set", "optim.") == []  # no algorithm yet: nothing


def test_bash_adds_plugin_names_to_the_static_lists():
    tasks = bash_complete("rlgen", "train", "grpo", "--task", "")
    assert {"arithmetic", "example-doubling"} <= set(tasks)
    assert len(tasks) == len(set(tasks))
    assert sorted(bash_complete("rlgen", "train", "example-")) == ["example-grpo", "example-raft"]
    assert "digit-overlap" in bash_complete("rlgen", "score", "--reward", "digit-")
