"""Every key of an algorithm's config with its default, type and doc (`rlgen config show ALGO`), and the
whole config as a commented TOML file that loads back to the same config (`--toml`)."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Union, get_args, get_origin

from rlgen.config import (
    deep_merge,
    field_doc,
    from_dict,
    to_dict,
    toml_key,
    toml_value,
    type_name,
)
from rlgen.errors import RlgenError

UNSET = "... (unset)"


@dataclass(frozen=True)
class KeyDoc:
    key: str  # dotted: "algorithm.epsilon"; items of a list of tables: "rewards[].name"
    type: str  # "float", "'group' | 'batch' | 'none'", "float or unset", "list of table"
    default: Any  # the default value as TOML has it (None = unset; a list item's key without one: REQUIRED)
    doc: str

    def as_dict(self) -> dict:
        return {"key": self.key, "type": self.type, "default": self.default, "doc": self.doc}


REQUIRED = "(required)"


def algorithm_defaults(algorithm) -> Any:
    """The default config of a registered algorithm: its config class's defaults with its preset on top."""
    return from_dict(algorithm.config_cls, deep_merge({}, algorithm.defaults))


def describe_type(tp: Any) -> str:
    """A field type in words; an optional field reads "X or unset" (TOML has no null)."""
    if get_origin(tp) in (Union, getattr(__import__("types"), "UnionType", Union)) and type(None) in get_args(tp):
        rest = [a for a in get_args(tp) if a is not type(None)]
        return " or ".join(describe_type(a) for a in rest) + " or unset"
    return type_name(tp)


def _item_class(tp: Any) -> type | None:
    """The dataclass of a `list[SomeDataclass]` field (a list of tables), else None."""
    if get_origin(tp) is list and dataclasses.is_dataclass(get_args(tp)[0]):
        return get_args(tp)[0]
    return None


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return to_dict(field.default_factory())
    return REQUIRED


def describe_config(config: Any, prefix: str = "") -> list[KeyDoc]:
    """One KeyDoc per key of `config` (a config dataclass instance), depth first in declaration order;
    a section itself is a row too (type "table"), so that its doc shows."""
    cls = type(config)
    hints = typing.get_type_hints(cls)
    rows = []
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        tp, value, doc = hints[field.name], getattr(config, field.name), field_doc(cls, field.name)
        if dataclasses.is_dataclass(tp):
            rows.append(KeyDoc(key, "table", None, doc))
            rows += describe_config(value, f"{key}.")
            continue
        rows.append(KeyDoc(key, describe_type(tp), to_dict(value), doc))
        item = _item_class(tp)
        if item is not None:
            item_hints = typing.get_type_hints(item)
            rows += [KeyDoc(f"{key}[].{f.name}", describe_type(item_hints[f.name]), _field_default(f), field_doc(item, f.name))
                     for f in dataclasses.fields(item)]
    return rows


def undocumented(config: Any) -> list[str]:
    """Keys of `config` without a doc (every key must have one)."""
    return [row.key for row in describe_config(config) if not row.doc.strip()]


def show_default(value: Any) -> str:
    if value is None:
        return "unset"
    if value == REQUIRED:
        return REQUIRED
    return toml_value(value)


def render_table(rows: list[KeyDoc]) -> str:
    """Aligned `key  type  default  doc` lines; sections as headers."""
    keys = [r for r in rows if r.type != "table"]
    key_width = max(len(r.key) for r in keys)
    type_width = min(max(len(r.type) for r in keys), 32)
    default_width = min(max(len(show_default(r.default)) for r in keys), 24)
    lines = []
    for row in rows:
        if row.type == "table":
            lines.append(f"[{row.key}]  {row.doc}")
            continue
        lines.append(f"  {row.key:<{key_width}}  {row.type:<{type_width}}  {show_default(row.default):<{default_width}}  {row.doc}")
    return "\n".join(lines)


def config_toml(config: Any, header: str = "") -> str:
    """The whole of `config` as TOML: every key with its doc as a comment above it, unset keys as comment
    lines (`# key = ... (unset)`). It loads back (rlgen.config.from_dict) to the same config."""
    out = [f"# {line}" if line else "#" for line in header.splitlines()]
    _write_table(config, "", out)
    return "\n".join(out).lstrip("\n") + "\n"


def _write_table(config: Any, name: str, out: list[str]) -> None:
    cls = type(config)
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    sections = [f for f in fields if dataclasses.is_dataclass(hints[f.name])]
    arrays = [f for f in fields if _item_class(hints[f.name]) is not None and getattr(config, f.name)]
    scalars = [f for f in fields if f not in sections and f not in arrays]
    for field in scalars:
        value = to_dict(getattr(config, field.name))
        out.append(f"# {field_doc(cls, field.name)} ({describe_type(hints[field.name])})")
        out.append(f"# {toml_key(field.name)} = {UNSET}" if value is None else f"{toml_key(field.name)} = {_inline(value)}")
    for field in sections:
        full = f"{name}.{toml_key(field.name)}" if name else toml_key(field.name)
        out += ["", f"# {field_doc(cls, field.name)}", f"[{full}]"]
        _write_table(getattr(config, field.name), full, out)
    for field in arrays:
        full = f"{name}.{toml_key(field.name)}" if name else toml_key(field.name)
        out += ["", f"# {field_doc(cls, field.name)}"]
        for item in getattr(config, field.name):
            out.append(f"[[{full}]]")
            for key, value in to_dict(item).items():
                out.append(f"# {toml_key(key)} = {UNSET}" if value is None else f"{toml_key(key)} = {_inline(value)}")


def _inline(value: Any) -> str:
    try:
        return toml_value(value)
    except TypeError as exc:  # a None inside a list or inline table: TOML cannot hold it
        raise RlgenError(f"cannot write the config as TOML: {exc}") from None
