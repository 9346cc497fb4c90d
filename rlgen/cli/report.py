"""Human output on stderr (logs, rich progress), machine output on stdout (--json, JSONL).

`Reporter` is the CLI's subscriber to the API's events (rlgen.events): the commands hand `reporter.events()`
to the API function they call and render its result themselves."""
from __future__ import annotations

import os
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rlgen.events import Callback, Events

# Metrics worth a glance in the progress line, in this order.
HEADLINE = ("reward", "accuracy", "eval/accuracy", "loss", "kl", "entropy")


# Seconds between plain progress lines when stderr is not a terminal (a log file, a pipe, a batch job).
PLAIN_INTERVAL_S = 10.0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"


class PlainProgress:
    """Progress as whole lines for logs: one at the start, then at most one per `interval` seconds (step,
    rate, ETA, headline metrics), and one at the end; written whole, never cut to a terminal width."""

    def __init__(self, stream, description: str, total: int, completed: int, interval: float, clock):
        self.stream, self.description, self.total, self.interval, self.clock = stream, description, total, interval, clock
        self.done = self.first = completed
        self.started = self.last = clock()
        self._write(f"{description}: {completed}/{total}")

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def advance(self, metrics: dict | None) -> None:
        self.done += 1
        now = self.clock()
        if now - self.last < self.interval and self.done < self.total:
            return
        self.last = now
        rate = (now - self.started) / max(self.done - self.first, 1)
        parts = [f"{self.description}: {self.done}/{self.total}", f"{rate:.3g} s/it",
                 f"elapsed {_duration(now - self.started)}"]
        if self.done < self.total:
            parts.append(f"ETA {_duration(rate * (self.total - self.done))}")
        if metrics:
            parts += [f"{k}={metrics[k]:.4g}" for k in HEADLINE if isinstance(metrics.get(k), (int, float))]
        self._write("  ".join(parts))


class Reporter(Callback):
    def __init__(self, quiet: bool = False, json_output: bool = False, stream=None, clock=time.monotonic):
        self.quiet = quiet
        self.json_output = json_output
        self.stream = stream if stream is not None else sys.stderr
        # soft_wrap: a log line is written whole, not folded at 80 columns when stderr is a file
        self.console = Console(file=self.stream, highlight=False, soft_wrap=True)
        self.clock = clock
        self._bars: list = []  # open progress displays, innermost last: (rich Progress, task) or PlainProgress

    def events(self) -> Events:
        return Events([self])

    # --- events ---
    def on_log(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, markup=False)

    def on_progress_start(self, total: int, description: str, completed: int = 0) -> None:
        if self.quiet:
            return
        if not self.console.is_terminal:  # a log file or a pipe: plain lines at a steady interval
            interval = float(os.environ.get("RLGEN_PROGRESS_INTERVAL", PLAIN_INTERVAL_S))
            self._bars.append(PlainProgress(self.stream, description, total, completed, interval, self.clock))
            return
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
        bar = Progress(*columns, console=self.console, transient=False)
        bar.start()
        self._bars.append((bar, bar.add_task(description, total=total, completed=completed, status="")))

    def on_progress(self, metrics: dict | None) -> None:
        if not self._bars:
            return
        if isinstance(self._bars[-1], PlainProgress):
            self._bars[-1].advance(metrics)
            return
        bar, task = self._bars[-1]
        status = ""
        if metrics:
            status = "  ".join(f"{k}={metrics[k]:.3g}" for k in HEADLINE if isinstance(metrics.get(k), (int, float)))
        bar.update(task, advance=1, status=status)

    def on_progress_end(self) -> None:
        if self._bars:
            display = self._bars.pop()
            if not isinstance(display, PlainProgress):
                display[0].stop()

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
