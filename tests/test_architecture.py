"""The layering of docs/architecture.md holds: import-linter's contracts (pyproject.toml [tool.importlinter])
are kept, and a deliberate upward import or cycle breaks them (so the check itself can fail)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    return subprocess.run([exe, "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_import_contracts_are_kept():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "2 kept, 0 broken" in result.stdout


COPY = "rlgen_under_test"  # a renamed copy: the installed (editable) rlgen would shadow a copy named rlgen


def renamed(text: str) -> str:
    return text.replace('"rlgen"', f'"{COPY}"').replace("rlgen.", f"{COPY}.")


@pytest.mark.parametrize("module, line, broken", [
    ("models/locate.py", "from rlgen.training import trainer", "rlgen_under_test.models is not allowed to import rlgen_under_test.training"),
    ("evaluation/plot.py", "from rlgen.evaluation import compare", "No import cycles"),
])
def test_a_violation_breaks_the_contracts(tmp_path, module, line, broken):
    """A copy of the package with one upward import (or one cycle) added fails the check."""
    shutil.copytree(ROOT / "rlgen", tmp_path / COPY, ignore=shutil.ignore_patterns("__pycache__", "*.so", "builtin_models"))
    for path in (tmp_path / COPY).rglob("*.py"):
        path.write_text(renamed(path.read_text()))
    config = (ROOT / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(renamed(config[config.index("[tool.importlinter]"):]))
    target = tmp_path / COPY / module
    target.write_text(target.read_text() + f"\n\ndef _violation():\n    {renamed(line)}  # noqa: F401\n")
    result = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, '.'); from importlinter.cli import lint_imports_command; "
                             "sys.argv = ['lint-imports', '--no-cache']; lint_imports_command()"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0, result.stdout[-2000:]
    assert broken in result.stdout
