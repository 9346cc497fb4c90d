"""Reading and writing JSONL / Parquet records (JSONL is the pipe format between subcommands)."""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import IO, Iterable, Iterator, Sequence

from rlgen.errors import RlgenError


def _iter_jsonl(handle: IO[str], source: str) -> Iterator[dict]:
    for lineno, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RlgenError(f"{source}, line {lineno}: malformed JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise RlgenError(f"{source}, line {lineno}: expected a JSON object, got {type(record).__name__}")
        record.setdefault("_line", lineno)
        yield record


def read_records(path: str, required: Sequence[str] = ()) -> list[dict]:
    """Records from a JSONL file, a Parquet file, or '-' (stdin). Each keeps its line number in '_line'."""
    if path == "-":
        records = list(_iter_jsonl(sys.stdin, "<stdin>"))
        source = "<stdin>"
    else:
        p = Path(path)
        source = str(p)
        if not p.exists():
            raise RlgenError(f"file not found: {p}")
        if p.is_dir():
            raise RlgenError(f"{p} is a directory, expected a JSONL or Parquet file")
        if p.suffix == ".parquet":
            records = _read_parquet(p)
        else:
            with p.open(encoding="utf-8") as handle:
                records = list(_iter_jsonl(handle, source))
    if not records:
        raise RlgenError(f"{source}: no records (empty dataset)")
    for record in records:
        for field in required:
            if field not in record or record[field] is None:
                where = f"line {record['_line']}" if "_line" in record else "a record"
                raise RlgenError(f"{source}, {where}: missing field '{field}'")
    return records


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover
        raise RlgenError("reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise RlgenError(f"{path}: not a readable Parquet file ({exc})") from None
    rows = table.to_pylist()
    for i, row in enumerate(rows, start=1):
        row.setdefault("_line", i)
    return rows


def clean(record: dict) -> dict:
    """Drop bookkeeping fields before writing a record out."""
    return {k: v for k, v in record.items() if not k.startswith("_")}


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps(record: dict) -> str:
    return json.dumps(clean(record), ensure_ascii=False, default=_json_default)


def write_records(records: Iterable[dict], out: str) -> None:
    """Write JSONL to a path ('-' is stdout). Files are written atomically: no partial output."""
    if out == "-":
        for record in records:
            sys.stdout.write(dumps(record) + "\n")
        sys.stdout.flush()
        return
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(dumps(record) + "\n")
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
