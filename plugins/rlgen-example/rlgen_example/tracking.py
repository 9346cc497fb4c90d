"""An experiment tracker (`--set 'run.report_to=["example-jsonl"]'`)."""
from __future__ import annotations

import json
from pathlib import Path

# --- a tracker ---------------------------------------------------------------------------------------
# Contract: a class called with its directory (OUT/tracking/NAME, inside the run directory: write nothing
# elsewhere) and, when its constructor takes them, `config` (the resolved config, a dict), `run_name` and
# `start_step` (a resumed run continues after this step); then log(step, metrics) with a row's numeric values,
# log_table(step, name, rows) with rows of text and numbers, and close(failed=False) once, at the end of the
# run or when it fails. Rank 0 alone opens trackers. A class attribute `packages` names modules to import
# before the model loads (none here); keep heavy imports inside the methods.


class JsonlTracker:
    """Every logged row and table as JSON lines in OUT/tracking/example-jsonl/log.jsonl."""

    packages = ()

    def __init__(self, directory: Path, config: dict | None = None):
        directory.mkdir(parents=True, exist_ok=True)
        self.handle = (directory / "log.jsonl").open("a", encoding="utf-8")
        self._write({"config": config})

    def _write(self, entry: dict) -> None:
        self.handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self.handle.flush()

    def log(self, step, metrics):
        self._write({"step": step, "metrics": metrics})

    def log_table(self, step, name, rows):
        self._write({"step": step, "table": name, "rows": rows})

    def close(self, failed=False):
        self._write({"closed": "failed" if failed else "finished"})
        self.handle.close()
