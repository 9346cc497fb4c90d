"""Typed configs: dataclasses loaded from TOML, with `--set a.b=c` overrides, validated by key."""
from __future__ import annotations

import copy
import dataclasses
import math
import sys
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from rlgen.errors import RlgenError, show_value

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RlgenError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise RlgenError(f"bad TOML in {path}: not UTF-8 text (byte {exc.start})") from None
    except RecursionError:
        raise RlgenError(f"bad TOML in {path}: arrays or tables nested too deeply") from None
    except ValueError as exc:  # TOMLDecodeError, or an integer too long to convert
        raise RlgenError(f"bad TOML in {path}: {exc}") from None


def parse_value(text: str) -> Any:
    """A `--set` value is read as a TOML value; anything that is not valid TOML is a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (ValueError, RecursionError):  # TOMLDecodeError, an over-long integer, deep nesting
        return text


def apply_override(data: dict, assignment: str) -> None:
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise RlgenError(f"--set expects KEY=VALUE, got {show_value(assignment)}")
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
        raise RlgenError(f"config key '{key}' must be one of {_type_name(tp)}, got {show_value(value)}")
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
        raise RlgenError(f"config key '{key}' must be {_type_name(tp)}, got {show_value(value)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise RlgenError(f"config key '{key}' must be a table, got {show_value(value)}")
        return from_dict(tp, value, prefix=key)
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            raise RlgenError(f"config key '{key}' must be a list, got {show_value(value)}")
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RlgenError(f"config key '{key}' must be a table, got {show_value(value)}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an integer beyond any float: reported as out of range, not a crash
                raise RlgenError(f"{key} = {show_value(value)}: must be a finite number") from None
    elif tp is str:
        if isinstance(value, str):
            return value
    raise RlgenError(f"config key '{key}' must be {_type_name(tp)}, got {show_value(value)}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            known = ", ".join(fields)
            raise RlgenError(f"unknown config key {show_value(full)} (known in this section: {known})")
        if isinstance(value, dict) and dataclasses.is_dataclass(hints[key]):
            # A partly given section keeps this config's own defaults for the keys it leaves out
            # (e.g. GRPO's optimiser defaults differ from OptimConfig's).
            value = deep_merge(_default_section(fields[key]), value)
        kwargs[key] = _convert(value, hints[key], full)
    try:
        obj = cls(**kwargs)
    except TypeError as exc:
        raise RlgenError(f"config section '{prefix or 'top'}': {exc}") from None
    for key, value in kwargs.items():  # ranges before the section's own validate(): one message per bad key
        check_value(f"{prefix}.{key}" if prefix else key, value, bounds_of(cls, fields[key]))
    check = getattr(obj, "validate", None)
    if check:
        check()
    return obj


# --- value ranges: every config (TOML, flags, --set, a model's rlgen_defaults.toml) goes through them ---

@dataclasses.dataclass(frozen=True)
class Bounds:
    """The allowed range of a numeric value (None: unbounded on that side). Floats must be finite
    whatever the bounds: a NaN learning rate or temperature never reaches a model."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: `low` itself is excluded
    high_open: bool = False

    def holds(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def describe(self, integer: bool) -> str:
        kind = "an integer" if integer else "a finite number"
        low, high = _number_text(self.low), _number_text(self.high)
        if self.low is not None and self.high is not None:
            return f"{kind} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {low}"
        if self.high is not None:
            return f"{kind} {'<' if self.high_open else '<='} {high}"
        return kind


def _number_text(value: float | None) -> str:
    return str(int(value)) if value is not None and float(value).is_integer() else f"{value:g}" if value is not None else ""


ANY = Bounds()
COUNT = Bounds(1)  # sizes and numbers of steps: at least one
NON_NEGATIVE = Bounds(0)  # counts where 0 means "off" / "none" / "all", coefficients where 0 means "unused"
POSITIVE = Bounds(0, low_open=True)
PROBABILITY = Bounds(0, 1)
DROPOUT = Bounds(0, 1, high_open=True)
SEED = Bounds(0, 2**32 - 1)  # the range every RNG rlgen seeds accepts (derived seeds stay below 2**64)

# Ranges by field name, shared by every config class (built-in or a plugin's) that uses the name; a
# `ClassName.field` entry overrides the name's range for one class. Fields not listed are only required
# to be finite (floats). Cross-field rules (e.g. num_generations >= 2 for GRPO) stay in each validate().
FIELD_BOUNDS: dict[str, Bounds] = {
    # optimiser
    "lr": POSITIVE, "weight_decay": NON_NEGATIVE, "adam_beta1": DROPOUT, "adam_beta2": DROPOUT,
    "adam_eps": NON_NEGATIVE, "max_grad_norm": NON_NEGATIVE, "warmup_steps": NON_NEGATIVE,
    "gradient_accumulation_steps": COUNT,
    # run
    "steps": COUNT, "seed": SEED, "save_every": NON_NEGATIVE, "keep_checkpoints": NON_NEGATIVE,
    "eval_every": NON_NEGATIVE, "threads": Bounds(0, 1024),  # torch takes 10**6 threads, then crashes
    # data
    "eval_samples": NON_NEGATIVE, "label_noise": PROBABILITY,
    # sampling (temperature 0 = greedy where a sampler allows it; training rollouts require > 0 themselves)
    "max_new_tokens": COUNT, "temperature": NON_NEGATIVE, "top_p": Bounds(0, 1, low_open=True), "top_k": NON_NEGATIVE,
    "num_steps": COUNT, "eta": NON_NEGATIVE, "noise_level": NON_NEGATIVE,
    # batch shapes
    "batch_size": COUNT, "prompts_per_step": COUNT, "num_generations": COUNT, "images_per_prompt": COUNT,
    "train_batch_size": COUNT, "num_iterations": COUNT, "num_inner_epochs": COUNT, "updates_per_step": COUNT,
    "backprop_steps": COUNT, "stat_buffer_size": COUNT, "stat_min_count": NON_NEGATIVE,
    "max_resample_rounds": NON_NEGATIVE, "ref_update_every": NON_NEGATIVE,
    # objectives
    "beta": NON_NEGATIVE, "epsilon": NON_NEGATIVE, "epsilon_high": NON_NEGATIVE, "delta": Bounds(1, low_open=True),
    "overlong_buffer": Bounds(-1), "overlong_penalty": NON_NEGATIVE, "label_smoothing": Bounds(0, 0.5, high_open=True),
    "rpo_alpha": NON_NEGATIVE, "desirable_weight": NON_NEGATIVE, "undesirable_weight": NON_NEGATIVE,
    "center_rewards_coefficient": NON_NEGATIVE, "clip_range": POSITIVE, "adv_clip_max": POSITIVE,
    "timestep_fraction": Bounds(0, 1, low_open=True), "cond_dropout": DROPOUT,
    "DiffusionDPOAlgoConfig.beta": POSITIVE,  # beta 0 makes the Diffusion-DPO loss a constant
    # LoRA
    "lora_r": NON_NEGATIVE, "lora_alpha": POSITIVE, "lora_dropout": DROPOUT,
}


def bounds_of(cls: type, field: dataclasses.Field) -> Bounds:
    """A field's range: `metadata={"bounds": Bounds(...)}` on the field, else the shared table."""
    if "bounds" in field.metadata:
        return field.metadata["bounds"]
    for klass in getattr(cls, "__mro__", (cls,)):
        if f"{klass.__name__}.{field.name}" in FIELD_BOUNDS:
            return FIELD_BOUNDS[f"{klass.__name__}.{field.name}"]
    return FIELD_BOUNDS.get(field.name, ANY)


def check_value(name: str, value: Any, bounds: Bounds = ANY) -> None:
    """Raise `NAME = VALUE: must be ...` unless `value` (a number; lists are checked item by item) is in
    `bounds`. Non-numbers (strings, None for "unset", booleans) are the type check's business."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            check_value(f"{name}[{i}]", item, ANY)
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not bounds.holds(value):
        raise RlgenError(f"{name} = {show_value(value)}: must be {bounds.describe(isinstance(value, int))}")


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
    raise TypeError(f"cannot write {show_value(value)} as TOML")


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
