"""The event protocol between rlgen's flows and whoever watches them (the CLI's rich reporter, a notebook,
an experiment tracker later).

A callback is any object with some of the `Callback` methods; missing ones are simply not called, so a
tracker that only wants metrics defines `on_metrics` alone. Flows (trainers, sampling loops, merges) talk
to an `Events` dispatcher with the small interface they always used: `events.log(message)` and
`with events.progress(total, description, completed) as advance: advance(metrics)`, plus
`events.metrics(step, row)` for every metrics row written and `events.result(payload)` at the end.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

from rlgen.errors import RlgenError, show_value


class Callback:
    """Base class with a no-op for every event; subclass it and override what you need."""

    def on_log(self, message: str) -> None:
        """A human-readable line (what the CLI prints on stderr)."""

    def on_progress_start(self, total: int, description: str, completed: int = 0) -> None:
        """A loop of `total` units begins (`completed` of them already done, e.g. on resume)."""

    def on_progress(self, metrics: dict | None) -> None:
        """One unit done; a training step passes its metrics row, other loops None."""

    def on_progress_end(self) -> None:
        """The loop opened by the last on_progress_start ended (normally or not)."""

    def on_metrics(self, step: int, metrics: dict) -> None:
        """A metrics row as written to metrics.jsonl (`metrics` includes `step`)."""

    def on_result(self, payload: dict) -> None:
        """A flow's outcome (what `--json` prints)."""


class Events:
    """Dispatches every event to each callback in order."""

    def __init__(self, callbacks: Iterable[Any] = ()):
        self.callbacks = list(callbacks)

    def _emit(self, name: str, *args) -> None:
        for callback in self.callbacks:
            method = getattr(callback, name, None)
            if method is not None:
                method(*args)

    def log(self, message: str) -> None:
        self._emit("on_log", message)

    def metrics(self, step: int, metrics: dict) -> None:
        self._emit("on_metrics", step, metrics)

    def result(self, payload: dict) -> None:
        self._emit("on_result", payload)

    @contextmanager
    def progress(self, total: int, description: str, completed: int = 0) -> Iterator[Callable[..., None]]:
        self._emit("on_progress_start", total, description, completed)

        def advance(metrics: dict | None = None) -> None:
            self._emit("on_progress", metrics)

        try:
            yield advance
        finally:
            self._emit("on_progress_end")


def as_events(callbacks: Any = None) -> Events:
    """An Events for what an API caller passed: None, one callback, a list of them, or an Events. A callback
    must have at least one `on_*` method: anything else (a number, a bare function) would be silently ignored
    by the dispatcher, so it is one RlgenError line instead."""
    if isinstance(callbacks, Events):
        return callbacks
    if callbacks is None:
        return Events()
    items = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
    for index, callback in enumerate(items):
        if not any(callable(getattr(callback, name, None)) for name in _EVENT_METHODS):
            where = f"callbacks[{index}]" if isinstance(callbacks, (list, tuple)) else "callbacks"
            raise RlgenError(f"{where} = {show_value(callback)}: expected a callback object with on_* methods "
                             f"({', '.join(_EVENT_METHODS)}), e.g. a rlgen.Callback subclass")
    return Events(items)


_EVENT_METHODS = tuple(name for name in vars(Callback) if name.startswith("on_"))
