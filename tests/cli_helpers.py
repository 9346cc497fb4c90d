"""Helpers shared by the CLI tests: run `rlgen` in this process and capture what it prints."""
from __future__ import annotations

import contextlib
import io

import pytest

from rlgen.cli.app import main


def rlgen(*args) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `rlgen ARGS` run in this process."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def merge_error(capsys, args) -> str:
    """The one error line of a `rlgen merge ARGS` that must fail with exit status 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", *map(str, args), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("rlgen: error: "), err
    return err
