"""Human output on stderr (logs, rich progress), machine output on stdout (--json, JSONL).

`Reporter` is the CLI's subscriber to the API's events (rlgen.events): the commands hand `reporter.events()`
to the API function they call and render its result themselves."""
from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rlgen.events import Callback, Events

# Metrics worth a glance in the progress line, in this order.
HEADLINE = ("reward", "accuracy", "eval/accuracy", "loss", "kl", "entropy")


class Reporter(Callback):
    def __init__(self, quiet: bool = False, json_output: bool = False):
        self.quiet = quiet
        self.json_output = json_output
        self.console = Console(stderr=True, highlight=False)
        self._bars: list[tuple[Progress, object]] = []  # open progress bars, innermost last

    def events(self) -> Events:
        return Events([self])

    # --- events ---
    def on_log(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, markup=False)

    def on_progress_start(self, total: int, description: str, completed: int = 0) -> None:
        if self.quiet:
            return
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
        bar = Progress(*columns, console=self.console, transient=False)
        bar.start()
        self._bars.append((bar, bar.add_task(description, total=total, completed=completed, status="")))

    def on_progress(self, metrics: dict | None) -> None:
        if not self._bars:
            return
        bar, task = self._bars[-1]
        status = ""
        if metrics:
            status = "  ".join(f"{k}={metrics[k]:.3g}" for k in HEADLINE if isinstance(metrics.get(k), (int, float)))
        bar.update(task, advance=1, status=status)

    def on_progress_end(self) -> None:
        if self._bars:
            self._bars.pop()[0].stop()

    # --- rendering ---
    log = on_log

    def progress(self, total: int, description: str, completed: int = 0):
        return self.events().progress(total, description, completed)

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
