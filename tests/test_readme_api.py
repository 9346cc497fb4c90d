"""The README's "Python API" examples run as written, and use only public `rlgen` names: everything a script
needs is in the library, none of it in rlgen/cli."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import rlgen

ROOT = Path(__file__).resolve().parent.parent


def api_examples() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("\n## Python API\n")
    end = readme.index("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", readme[start:end], flags=re.S)


def test_the_section_has_examples_of_every_flow():
    code = "\n".join(api_examples())
    assert len(api_examples()) >= 3
    for call in ("rlgen.train(", "rlgen.sample(", "rlgen.score(", "rlgen.pairs(", "rlgen.evaluate(", "rlgen.merge(",
                 "rlgen.Callback", "on_metrics"):
        assert call in code, call


def test_examples_use_only_public_names():
    tree = ast.parse("\n".join(api_examples()))
    imports = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert all(isinstance(node, ast.Import) and [a.name for a in node.names] == ["rlgen"] for node in imports)
    used = {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "rlgen"}
    assert used and used <= set(rlgen.api.__all__), used - set(rlgen.api.__all__)


@pytest.mark.slow
def test_examples_run(tmp_path):
    """In a fresh directory and process, one after another as the README says; the run never imports the CLI."""
    script = "\n".join(api_examples()) + (
        "\nimport sys\n"
        "loaded = sorted(m for m in sys.modules if m == 'rlgen.cli' or m.startswith('rlgen.cli.'))\n"
        "assert not loaded, loaded\n"
        "print('examples done')\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[-1] == "examples done"
    assert [line.split(":")[0] for line in lines if line.startswith("step ")] == ["step 0", "step 1", "step 2"]
    assert (tmp_path / "runs" / "api-demo" / "final").is_dir() and (tmp_path / "merged").is_dir()
