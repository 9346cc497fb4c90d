"""Reading and writing JSONL / Parquet records (JSONL is the pipe format between subcommands).

Reading checks what every consumer relies on, so that a bad file is one error line naming the file, the
line and the field, before any model loads: UTF-8 text, one JSON object per line, no duplicate keys, no
absurd nesting, and strings where text belongs (`prompt`, `completion`). Writing gives standard JSON only
(non-finite numbers become null) and files with the ordinary permissions of the user's umask.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import IO, Iterable, Iterator, Sequence

from rlgen.errors import RlgenError, show_value

# Fields that hold text wherever they appear; anything else (a number, a chat-message list, null) is refused.
TEXT_FIELDS = ("prompt", "completion")
# Deeper JSON is refused on reading: no record needs it, and recursive code downstream (writing the record
# back out, say) would otherwise fail far from the input.
MAX_NESTING = 64


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _object_without_duplicates(pairs: list[tuple[str, object]]) -> dict:
    """json's object_pairs_hook: the last of two equal keys would silently win, which hides mistakes."""
    record: dict = {}
    for key, value in pairs:
        if key in record:
            raise _DuplicateKey(key)
        record[key] = value
    return record


def parse_json(text: str, where: str) -> object:
    """One JSON document; every way it can be bad is an RlgenError starting with `where`."""
    try:
        value = json.loads(text, object_pairs_hook=_object_without_duplicates)
    except json.JSONDecodeError as exc:
        raise RlgenError(f"{where}: malformed JSON ({exc.msg})") from None
    except _DuplicateKey as exc:
        raise RlgenError(f"{where}: duplicate key {show_value(exc.key)} in a JSON object") from None
    except ValueError as exc:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        if "digits" in str(exc) and hasattr(sys, "get_int_max_str_digits"):
            raise RlgenError(f"{where}: an integer with more than {sys.get_int_max_str_digits()} digits") from None
        raise RlgenError(f"{where}: unreadable JSON value ({' '.join(str(exc).split())[:200]})") from None
    except RecursionError:
        value = None
        depth = MAX_NESTING + 1
    else:
        depth = _nesting(value)
    if depth > MAX_NESTING:
        raise RlgenError(f"{where}: JSON nested too deeply (more than {MAX_NESTING} levels)")
    return value


def _nesting(value: object) -> int:
    """How many arrays / objects deep `value` goes (iteratively: no recursion limit to hit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if depth <= MAX_NESTING:
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _decode(line: bytes | str, where: str) -> str:
    if isinstance(line, str):
        return line
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RlgenError(f"{where}: not UTF-8 text (byte 0x{line[exc.start]:02x} at column {exc.start + 1})") from None


def _iter_jsonl(handle: IO[bytes] | IO[str], source: str) -> Iterator[dict]:
    try:
        for lineno, raw in enumerate(handle, start=1):
            where = f"{source}, line {lineno}"
            line = _decode(raw, where)
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a UTF-8 byte-order mark, as some editors write
            if not line.strip():
                continue
            record = parse_json(line, where)
            if not isinstance(record, dict):
                raise RlgenError(f"{where}: expected a JSON object, got {_json_type(record)}")
            if _SURROGATE_ESCAPE.search(line):
                _check_unicode(record, where)
            record.setdefault("_line", lineno)
            yield record
    except OSError as exc:
        raise RlgenError(f"{source}: cannot read ({exc.strerror or exc})") from None


# A JSON escape in the UTF-16 surrogate range: only these can put a lone surrogate into a decoded string
# (UTF-8 decoding refuses them); a valid pair decodes to one character and passes `_check_unicode`.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_unicode(record: dict, where: str) -> None:
    """Refuse strings holding a lone surrogate (`"\\ud800"`): they are not text, and encoding them later
    (writing output, tokenizing) fails far from the input."""
    for key, value in record.items():
        stack = [key, value]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                stack.extend(node.keys())
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
            elif isinstance(node, str):
                try:
                    node.encode("utf-8")
                except UnicodeEncodeError:
                    raise RlgenError(f"{where}: field {show_value(key)} "
                                     "is not valid Unicode text (a lone surrogate)") from None


def _json_type(value: object) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _stdin_records() -> list[dict]:
    if sys.stdin is None or sys.stdin.closed:
        raise RlgenError("<stdin> is closed: give a FILE, or pipe JSONL in")
    # bytes when there are any, so that bad UTF-8 is reported with its line like any other problem
    return list(_iter_jsonl(getattr(sys.stdin, "buffer", sys.stdin), "<stdin>"))


def read_records(path: str, required: Sequence[str] = (), messages: bool = False,
                 fields: dict[str, str] | None = None) -> list[dict]:
    """Records from a JSONL file, a Parquet file, a CSV file, a `datasets` directory (`save_to_disk`: Arrow
    files), or '-' (stdin). Each keeps its line number (its row number for Parquet and Arrow) in '_line'.
    `messages`: the caller takes chat message lists (rlgen.data.chat) in the text fields too. `fields`: {field:
    column} renames (`data.prompt_field = "question"` reads the `question` column as `prompt`)."""
    if path == "-":
        records = _stdin_records()
        source = "<stdin>"
    else:
        p = Path(path)
        source = str(p)
        if not p.exists():
            raise RlgenError(f"file not found: {p}")
        if p.is_dir():
            records = _read_arrow_dataset(p)
        elif p.suffix == ".parquet":
            records = _read_parquet(p)
        elif p.suffix == ".csv":
            records = _read_csv(p)
        else:
            try:
                handle = p.open("rb")
            except OSError as exc:
                raise RlgenError(f"{p}: cannot read ({exc.strerror or exc})") from None
            with handle:
                records = list(_iter_jsonl(handle, source))
    if not records:
        raise RlgenError(f"{source}: no records (empty dataset)")
    if fields:
        records = [_renamed(record, fields, source) for record in records]
    for record in records:
        for field in required:
            if field not in record or record[field] is None:
                raise RlgenError(f"{_where(source, record)}: missing field '{field}'")
        for field in TEXT_FIELDS:
            if field in record:
                (check_text_or_messages if messages else check_text)(source, record, field)
    return records


def _where(source: str, record: dict) -> str:
    return f"{source}, line {record['_line']}" if "_line" in record else f"{source}, a record"


def check_text(source: str, record: dict, field: str) -> str:
    """The string in `record[field]`; a missing field, null, a number or a list is one error line."""
    value = record.get(field)
    if isinstance(value, str):
        return value
    where = _where(source, record)
    if value is None:
        raise RlgenError(f"{where}: missing field '{field}'" if field not in record else f"{where}: field '{field}' is null")
    if isinstance(value, list):
        raise RlgenError(f"{where}: field '{field}' must be a string, got list "
                         "(chat message lists are not supported yet: give the text as one string)")
    raise RlgenError(f"{where}: field '{field}' must be a string, got {type(value).__name__} {show_value(value)}")


def _renamed(record: dict, fields: dict[str, str], source: str) -> dict:
    """The record with each `column` read as its `field` (the column's own name dropped)."""
    out = dict(record)
    for field, column in fields.items():
        if column not in record:
            if field == "prompt":  # an answer may be missing (a reward that needs it is then not applicable)
                raise RlgenError(f"{_where(source, record)}: missing field '{column}' (the data's prompt column)")
            continue
        out[field] = out.pop(column)
    return out


def check_text_or_messages(source: str, record: dict, field: str):
    """The string or chat message list in `record[field]`; anything else is one error line."""
    from rlgen.data.chat import message_problem

    value = record.get(field)
    if isinstance(value, list):
        problem = message_problem(value)
        if problem:
            raise RlgenError(f"{_where(source, record)}: field '{field}': {problem}")
        return value
    if isinstance(value, str):
        return value
    where = _where(source, record)
    if value is None:
        raise RlgenError(f"{where}: missing field '{field}'" if field not in record else f"{where}: field '{field}' is null")
    raise RlgenError(f"{where}: field '{field}' must be a string or a list of chat messages, got "
                     f"{type(value).__name__} {show_value(value)}")


def _read_csv(path: Path) -> list[dict]:
    """A CSV file with a header row: every value a string (empty cells are empty strings); `_line` is the
    row's line in the file (the header is line 1)."""
    import csv

    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or len(set(reader.fieldnames)) != len(reader.fieldnames):
                raise RlgenError(f"{path}, line 1: a CSV header of distinct column names is needed")
            rows = []
            while True:
                first_line = reader.line_num + 1  # a quoted cell may span lines: a record is named by its first
                try:
                    row = next(reader)
                except StopIteration:
                    break
                if None in row or any(value is None for value in row.values()):
                    raise RlgenError(f"{path}, line {first_line}: {len(reader.fieldnames)} columns expected")
                rows.append({**row, "_line": first_line})
    except UnicodeDecodeError as exc:
        raise RlgenError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise RlgenError(f"{path}: not a readable CSV file ({_one_line(exc)})") from None
    return rows


def _read_arrow_dataset(path: Path) -> list[dict]:
    """A Hugging Face `datasets` directory written by `save_to_disk` (state.json naming Arrow stream files),
    read with pyarrow: no `datasets` import, no code, nothing unpickled. A DatasetDict directory names its
    splits in dataset_dict.json: one of them is given as DIR/SPLIT."""
    if (path / "dataset_dict.json").is_file():
        try:
            splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            splits = []
        raise RlgenError(f"{path} holds the splits {', '.join(map(str, splits)) or '?'} of a DatasetDict: give one, "
                         f"e.g. {path / str(splits[0] if splits else 'train')}")
    state_file = path / "state.json"
    if not state_file.is_file():
        raise RlgenError(f"{path} is a directory, expected a JSONL, Parquet or CSV file or a `datasets` directory "
                         "(save_to_disk: state.json and Arrow files)")
    try:
        state = json.loads(state_file.read_text())
        names = [entry["filename"] for entry in state["_data_files"]]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise RlgenError(f"{state_file}: not a `datasets` state file (no _data_files)") from None
    import pyarrow as pa

    rows: list[dict] = []
    for name in names:
        file = path / str(name)
        if Path(str(name)).name != name or not file.is_file() or file.is_symlink():
            raise RlgenError(f"{state_file}: _data_files names {show_value(name)}, not an Arrow file in {path}")
        try:
            with pa.OSFile(str(file), "rb") as source:
                table = pa.ipc.open_stream(source).read_all()
        except (pa.ArrowInvalid, OSError) as exc:
            raise RlgenError(f"{file}: not a readable Arrow stream ({_one_line(exc)})") from None
        rows.extend(_table_rows(table, file))
    for i, row in enumerate(rows, start=1):
        row.setdefault("_line", i)
    return rows


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover
        raise RlgenError("reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise RlgenError(f"{path}: not a readable Parquet file ({_one_line(exc)})") from None
    rows = _table_rows(table, path)
    for i, row in enumerate(rows, start=1):
        row.setdefault("_line", i)
    return rows


def _table_rows(table, source: Path) -> list[dict]:
    """An Arrow table's rows as records; a column JSON cannot carry is one error line."""
    for column in table.schema:
        problem = _non_json_type(column.type)
        if problem:
            raise RlgenError(f"{source}: column {show_value(column.name)} holds {problem}, which JSONL records "
                             "cannot carry (store text as strings)")
    return table.to_pylist()


def _non_json_type(arrow_type) -> str | None:
    """What in a Parquet column type has no JSON equivalent (bytes, timestamps, decimals ...), or None."""
    import pyarrow.types as t

    if t.is_dictionary(arrow_type):
        return _non_json_type(arrow_type.value_type)
    if t.is_list(arrow_type) or t.is_large_list(arrow_type) or t.is_fixed_size_list(arrow_type):
        return _non_json_type(arrow_type.value_type)
    if t.is_struct(arrow_type):
        for i in range(arrow_type.num_fields):
            problem = _non_json_type(arrow_type.field(i).type)
            if problem:
                return problem
        return None
    if t.is_binary(arrow_type) or t.is_large_binary(arrow_type) or t.is_fixed_size_binary(arrow_type):
        return "bytes (binary)"
    if (t.is_null(arrow_type) or t.is_boolean(arrow_type) or t.is_integer(arrow_type) or t.is_floating(arrow_type)
            or t.is_string(arrow_type) or t.is_large_string(arrow_type)):
        return None
    return f"values of type {arrow_type}"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


def clean(record: dict) -> dict:
    """Drop bookkeeping fields before writing a record out."""
    return {k: v for k, v in record.items() if not k.startswith("_")}


def finite_or_null(value):
    """`value` with every non-finite float (NaN, +-inf, anywhere inside) replaced by None: standard JSON
    has no such numbers, and Python's `NaN` / `Infinity` extension breaks other readers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def _json_default(value):
    # numpy / torch scalars and the like: their Python value (then made finite); anything else by name
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return finite_or_null(item())
        except (TypeError, ValueError):
            pass
    if isinstance(value, (set, frozenset)):
        return finite_or_null(sorted(value, key=str))
    return str(value)


def json_text(value, **kwargs) -> str:
    """Standard JSON for any output (records, metrics, summaries, --json): non-finite numbers as null."""
    return json.dumps(finite_or_null(value), allow_nan=False, default=_json_default, **kwargs)


def dumps(record: dict) -> str:
    return json_text(clean(record), ensure_ascii=False)


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def use_umask_mode(path: str | Path, directory: bool = False) -> None:
    """Give a file created private (mkstemp, safetensors: 0600) the mode an ordinary open() would have."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def use_umask_modes(directory: str | Path) -> None:
    """Every file under `directory` with the mode the umask gives: safetensors (and so save_pretrained)
    creates its files 0600, which would make saved models private to their owner."""
    mode = 0o666 & ~current_umask()
    for path in Path(directory).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


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
        use_umask_mode(tmp)  # mkstemp's 0600 would make the output private
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
