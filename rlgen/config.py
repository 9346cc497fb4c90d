"""Typed configs: dataclasses loaded from TOML, with `--set a.b=c` overrides, validated by key."""
from __future__ import annotations

import copy
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from rlgen.errors import RlgenError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RlgenError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise RlgenError(f"bad TOML in {path}: {exc}") from None


def parse_value(text: str) -> Any:
    """A `--set` value is read as a TOML value; anything that is not valid TOML is a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(data: dict, assignment: str) -> None:
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise RlgenError(f"--set expects KEY=VALUE, got '{assignment}'")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RlgenError(f"--set {key}: '{part}' is not a section")
    node[parts[-1]] = parse_value(value.strip())


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, getattr(__import__("types"), "UnionType", Union)):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "table"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise RlgenError(f"config key '{key}' must be one of {_type_name(tp)}, got {value!r}")
    if origin is Union or type(tp).__name__ == "UnionType":
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except RlgenError as exc:
                errors.append(exc)
        raise RlgenError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise RlgenError(f"config key '{key}' must be a table, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            raise RlgenError(f"config key '{key}' must be a list, got {value!r}")
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RlgenError(f"config key '{key}' must be a table, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise RlgenError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            known = ", ".join(fields)
            raise RlgenError(f"unknown config key '{full}' (known in this section: {known})")
        if isinstance(value, dict) and dataclasses.is_dataclass(hints[key]):
            # A partly given section keeps this config's own defaults for the keys it leaves out
            # (e.g. GRPO's optimiser defaults differ from OptimConfig's).
            value = deep_merge(_default_section(fields[key]), value)
        kwargs[key] = _convert(value, hints[key], full)
    try:
        obj = cls(**kwargs)
    except TypeError as exc:
        raise RlgenError(f"config section '{prefix or 'top'}': {exc}") from None
    check = getattr(obj, "validate", None)
    if check:
        check()
    return obj


def _default_section(field: dataclasses.Field) -> dict:
    if field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    elif field.default is not dataclasses.MISSING:
        default = field.default
    else:
        return {}
    return {k: v for k, v in to_dict(default).items() if v is not None} if dataclasses.is_dataclass(default) else {}


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def deep_merge(base: dict, extra: dict) -> dict:
    """A new dict: `extra` merged into `base` (nested tables merged key by key). Nothing is shared with
    either input, so callers may mutate the result (as `--set` does) without changing e.g. a preset."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# --- a small TOML writer (the resolved config is saved in the run dir) ---

def _toml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and value != value:
            return "nan"
        if isinstance(value, float) and value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
        # TOML basic strings allow no other control characters: write them as \uXXXX escapes
        escaped = "".join(f"\\u{ord(ch):04X}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch for ch in escaped)
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_scalar(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _toml_scalar(key)


def dumps_toml(data: dict, prefix: str = "") -> str:
    scalars, tables, arrays = [], [], []
    for key, value in data.items():
        if value is None:
            continue  # TOML has no null: an absent key means the default (None)
        if isinstance(value, dict) and value:
            tables.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            arrays.append((key, value))
        else:
            scalars.append(f"{_toml_key(key)} = {_toml_scalar(value)}")
    out = "\n".join(scalars) + ("\n" if scalars else "")
    for key, value in tables:
        name = f"{prefix}.{_toml_key(key)}" if prefix else _toml_key(key)
        out += f"\n[{name}]\n" + dumps_toml(value, name)
    for key, items in arrays:
        name = f"{prefix}.{_toml_key(key)}" if prefix else _toml_key(key)
        for item in items:
            flat = {k: v for k, v in item.items()}
            out += f"\n[[{name}]]\n" + "\n".join(
                f"{_toml_key(k)} = {_toml_scalar(v)}" for k, v in flat.items() if v is not None
            ) + "\n"
    return out
