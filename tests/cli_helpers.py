"""The one way tests run the `rlgen` command: `rlgen(...)` in this process (fast: torch and transformers are
imported once per test session) and `rlgen_process(...)` as a real `python -m rlgen` subprocess, for what
only a process shows (exit at interpreter shutdown, signals, a fresh import of plugins, file descriptors)."""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

from rlgen.cli.app import main


class CliResult(NamedTuple):
    code: int
    out: str
    err: str


def _exit_status(exc: SystemExit, err: io.StringIO) -> int:
    """The status a real process would exit with: `sys.exit("text")` prints the text and exits 1."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    err.write(f"{exc.code}\n")
    return 1


def rlgen(*args, stdin: str | bytes | None = None, cwd: Path | str | None = None) -> CliResult:
    """(exit status, stdout, stderr) of `rlgen ARGS` run in this process; `stdin` replaces standard input
    (bytes are decoded as UTF-8 by the reader, as they would be from a pipe), `cwd` the working directory."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    saved_stdin, saved_cwd = sys.stdin, os.getcwd()
    if stdin is not None:
        data = stdin if isinstance(stdin, bytes) else stdin.encode()
        sys.stdin = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in args])
            except SystemExit as exc:
                code = _exit_status(exc, err)
    finally:
        sys.stdin = saved_stdin
        os.chdir(saved_cwd)
    return CliResult(code, out.getvalue(), err.getvalue())


def rlgen_ok(*args, **kwargs) -> CliResult:
    """`rlgen(...)` that must exit 0; the failure message shows the command and what it printed."""
    result = rlgen(*args, **kwargs)
    assert result.code == 0, f"rlgen {' '.join(map(str, args))} -> {result.code}\nstdout={result.out}\nstderr={result.err}"
    return result


def merge_error(*args) -> str:
    """The one error line of a `rlgen merge ARGS --quiet` that must fail with exit status 2."""
    code, out, err = rlgen("merge", *args, "--quiet")
    err = err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("rlgen: error: "), err
    return err


def cli_env(**overrides: str) -> dict:
    """The environment of a CLI subprocess: offline (tests never touch the network), no inherited --debug."""
    env = {k: v for k, v in os.environ.items() if k != "RLGEN_DEBUG"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(overrides)
    return env


def rlgen_command(*args) -> list[str]:
    """The argv of `rlgen ARGS` as a subprocess of this interpreter (for Popen or a shell pipeline)."""
    return [sys.executable, "-m", "rlgen", *map(str, args)]


def rlgen_process(*args, cwd: Path | str | None = None, stdin: str | None = None, timeout: float = 300,
                  env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """`python -m rlgen ARGS` as a subprocess (text mode, output captured; stdin is `stdin`, or empty: never the
    terminal of the test run). With `check`, a non-zero exit fails the test with the command and its output."""
    proc = subprocess.run(rlgen_command(*args), input="" if stdin is None else stdin, capture_output=True, text=True,
                          cwd=cwd, env=cli_env() if env is None else env, timeout=timeout)
    if check:
        assert proc.returncode == 0, (f"rlgen {' '.join(map(str, args))} -> {proc.returncode}\n"
                                      f"stdout={proc.stdout}\nstderr={proc.stderr}")
    return proc
