"""Human output on stderr (logs, rich progress), machine output on stdout (--json, JSONL)."""
from __future__ import annotations

import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# Metrics worth a glance in the progress line, in this order.
HEADLINE = ("reward", "accuracy", "eval/accuracy", "loss", "kl", "entropy")


class Reporter:
    def __init__(self, quiet: bool = False, json_output: bool = False):
        self.quiet = quiet
        self.json_output = json_output
        self.console = Console(stderr=True, highlight=False)

    def log(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, markup=False)

    def result(self, payload: dict, message: str) -> None:
        """A command's outcome: JSON on stdout with --json, else one line on stderr."""
        if self.json_output:
            self.emit_json(payload)
        else:
            self.log(message)

    def emit_json(self, payload) -> None:
        from rlgen.data.records import json_text

        sys.stdout.write(json_text(payload) + "\n")  # standard JSON: NaN / inf become null
        sys.stdout.flush()

    @contextmanager
    def progress(self, total: int, description: str, completed: int = 0):
        if self.quiet:
            yield lambda metrics=None: None
            return
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
        with Progress(*columns, console=self.console, transient=False) as progress:
            task = progress.add_task(description, total=total, completed=completed, status="")

            def advance(metrics: dict | None = None) -> None:
                status = ""
                if metrics:
                    status = "  ".join(f"{k}={metrics[k]:.3g}" for k in HEADLINE if isinstance(metrics.get(k), (int, float)))
                progress.update(task, advance=1, status=status)

            yield advance
