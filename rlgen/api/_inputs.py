"""Checks of what a Python caller passes to the API, so that a bad argument is one RlgenError line naming
the keyword (as the CLI's flag checks name the flag) instead of a Python error from deep inside a flow."""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rlgen.config import ANY, Bounds
from rlgen.errors import RlgenError, show_value


def check_number(name: str, value: Any, bounds: Bounds = ANY, *, integer: bool, optional: bool = False) -> None:
    """`value` must be an int (`integer`) or an int / float, inside `bounds` and finite; None passes only
    when `optional` (e.g. limit=None: every record). A bool is not a number here, though Python says so."""
    if value is None and optional:
        return
    kind = numbers.Integral if integer else numbers.Real
    ok = not isinstance(value, bool) and isinstance(value, kind)
    # Bounds.holds only catches non-finite built-in floats; numpy's float32 NaN is caught here
    if not ok or not math.isfinite(value) or not bounds.holds(value):
        raise RlgenError(f"{name} = {show_value(value)}: must be {bounds.describe(integer)}")


def check_numbers(*checks: tuple) -> None:
    """(keyword, value, Bounds, "int" | "float" | "int?") triples, checked in order; "int?" allows None."""
    for name, value, bounds, kind in checks:
        check_number(name, value, bounds, integer=kind.startswith("int"), optional=kind.endswith("?"))


def string_list(name: str, value: Any, what: str = "strings") -> list[str] | None:
    """A list of strings from a keyword that takes several: one string (or path) is a one-item list, None
    stays None; anything else is one line naming the keyword."""
    if value is None:
        return None
    if isinstance(value, (str, Path)):
        return [str(value)]
    if isinstance(value, (list, tuple)) and all(isinstance(item, (str, Path)) for item in value):
        return [str(item) for item in value]
    raise RlgenError(f"{name} = {show_value(value)}: expected {what} (one string or a list of them)")


def check_records(name: str, records: Iterable) -> list[dict]:
    """A list of records (dicts) from an in-memory sequence; a non-record item is named by its index."""
    if isinstance(records, (str, bytes, dict)) or not isinstance(records, Iterable):
        raise RlgenError(f"{name} = {show_value(records)}: expected a list of records (dicts) or a JSONL/Parquet path")
    out = list(records)
    for index, record in enumerate(out):
        if not isinstance(record, dict):
            raise RlgenError(f"{name}[{index}] = {show_value(record)}: expected a record (a dict of fields)")
    return out


def model_name(name: str, value: Any) -> str | None:
    """A --model-like keyword as a string: a built-in name or a directory (str or Path); None stays None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    raise RlgenError(f"{name} = {show_value(value)}: expected a built-in model name or a model directory")


def without_line_numbers(records: list[dict]) -> list[dict]:
    """Records as the API returns them: without the `_line` that read_records adds for error messages (the
    CLI's JSONL output drops it too)."""
    return [{key: value for key, value in record.items() if key != "_line"} if "_line" in record else record
            for record in records]


def device_for(value: Any, name: str = "device"):
    """The torch.device of a `device` keyword (auto, cpu, cuda, cuda:N), resolved before any model loads:
    anything else, or CUDA where there is none, is one line naming the keyword."""
    from rlgen.devices import resolve_device  # imports torch: `rlgen pairs` must not load it

    return resolve_device(value, name)
