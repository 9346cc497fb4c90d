"""Typed configs: dataclasses loaded from TOML, with `--set a.b=c` overrides, validated by key.

Every TOML text rlgen reads goes through `loads_toml` / `read_toml` (tomllib, or tomli on Python 3.10).
Config fields carry a one-line doc (`setting(default, doc)`, read by `field_doc`), which `rlgen config
show` prints; renamed keys are listed once in `RENAMED_KEYS` and upgraded with a warning by `upgrade_keys`.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
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


class TomlError(RlgenError):
    """Text that is not TOML rlgen reads. `kind`: syntax | too_long (an integer past Python's 4300-digit
    limit) | too_deep; `reason`: the detail without the source, for callers that word their own message."""

    def __init__(self, source: str, kind: str, reason: str):
        super().__init__(f"bad TOML in {source}: {reason}")
        self.kind = kind
        self.reason = reason


def loads_toml(text: str, source: str = "<string>") -> dict:
    """Parse TOML text; every failure is a TomlError naming `source`."""
    try:
        return tomllib.loads(text)
    except RecursionError:
        raise TomlError(source, "too_deep", "arrays or tables nested too deeply") from None
    except tomllib.TOMLDecodeError as exc:
        raise TomlError(source, "syntax", str(exc)) from None
    except ValueError as exc:  # an integer too long to convert
        raise TomlError(source, "too_long", str(exc)) from None


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RlgenError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RlgenError(f"bad TOML in {path}: not UTF-8 text (byte {exc.start})") from None
    return loads_toml(text, str(path))


def parse_value(text: str) -> Any:
    """A `--set` value is read as a TOML value; anything that is not valid TOML is a plain string."""
    try:
        return loads_toml(f"v = {text}")["v"]
    except TomlError:  # bad syntax, an over-long integer, deep nesting
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


def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, getattr(__import__("types"), "UnionType", Union)):
        return " or ".join(type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list of {type_name(get_args(tp)[0])}"
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
        raise RlgenError(f"config key '{key}' must be one of {type_name(tp)}, got {show_value(value)}")
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
        raise RlgenError(f"config key '{key}' must be {type_name(tp)}, got {show_value(value)}")
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
    raise RlgenError(f"config key '{key}' must be {type_name(tp)}, got {show_value(value)}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    if not prefix:
        data = upgrade_keys(cls, data)
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


# --- field docs: every config key has a one-line doc, which `rlgen config show` prints ---

def setting(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Any = None, bounds: Bounds | None = None):
    """A config field with its doc: `lr: float = setting(1e-5, "learning rate")`; `factory` for mutable
    defaults; `bounds` overrides the shared FIELD_BOUNDS range for this field."""
    metadata: dict[str, Any] = {"doc": doc}
    if bounds is not None:
        metadata["bounds"] = bounds
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def section(cls: type, doc: str, **defaults: Any):
    """A config section field: a `cls` table, with this config's own defaults for some of its keys."""
    return dataclasses.field(default_factory=functools.partial(cls, **defaults) if defaults else cls, metadata={"doc": doc})


# Docs of fields declared in modules whose dataclasses carry no doc metadata ("ClassName.field"); a
# subclass inherits its bases' docs, so a field re-declared only for a new default needs none.
FIELD_DOCS: dict[str, str] = {
    "ModelConfig.path": "a built-in model name or a local Hugging Face / diffusers directory",
    "ModelConfig.dtype": "weights' dtype while training",
    "ModelConfig.lora_r": "LoRA rank; 0 = full fine-tuning, > 0 trains a peft LoRA adapter",
    "ModelConfig.lora_alpha": "LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)",
    "ModelConfig.lora_dropout": "dropout on the LoRA adapter's input",
    "ModelConfig.lora_target_modules": "module names (or 'all-linear') that get LoRA adapters",
    "ModelConfig.lora_merge_on_save": "final/ holds merged weights; false keeps the adapter beside the base",
    "ModelConfig.gradient_checkpointing": "recompute activations in the backward pass: less memory for ~30% more compute",
    "DiffusionModelConfig.path": "a built-in image model name or a local diffusers pipeline directory",
    "DiffusionModelConfig.dtype": "the denoiser's dtype while training",
    "DiffusionModelConfig.lora_r": "LoRA rank on the denoiser; 0 = full fine-tuning of the denoiser",
    "DiffusionModelConfig.lora_target_modules": "denoiser module names that get LoRA adapters",
    "RewardSpec.name": "a registered reward, module:function, or rm:PATH (a trained reward model)",
    "RewardSpec.weight": "the reward's weight in the combined reward",
    "RewardSpec.options": "keyword options passed to the reward function",
}


def field_doc(cls: type, name: str) -> str:
    """The doc of field `name` of config class `cls` (its own, a base class's, or FIELD_DOCS'); "" if none."""
    for klass in getattr(cls, "__mro__", (cls,)):
        found = getattr(klass, "__dataclass_fields__", {}).get(name)
        if found is not None and found.metadata.get("doc"):
            return found.metadata["doc"]
        if f"{klass.__name__}.{name}" in FIELD_DOCS:
            return FIELD_DOCS[f"{klass.__name__}.{name}"]
    return ""


# --- renamed keys: old name -> new name, the one table. One concept has one name across text and image
# trainers (TRL's names); a whole section may be renamed ("sft" -> "algorithm"). Old names keep working
# everywhere a config comes from, with one warning line each, so old configs and run dirs still load. ---

RENAMED_KEYS: dict[str, str] = {
    "sft": "algorithm",  # SFT's section, named like every other trainer's
    "rollout.images_per_prompt": "rollout.num_generations",  # the image trainers' group size
    "eval.images_per_prompt": "eval.num_generations",  # images per held-out prompt
    "algorithm.clip_range": "algorithm.epsilon",  # the PPO clip of the image policy-gradient trainers
    "algorithm.prompts_per_step": "rollout.prompts_per_step",  # reward-backprop's batch shape, in [rollout]
    "algorithm.images_per_prompt": "rollout.num_generations",
}


def field_type(cls: type, dotted: str) -> Any:
    """The type of key `dotted` ("section.key") in config class `cls`, or None when it is not a key."""
    tp: Any = cls
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp) or part not in {f.name for f in dataclasses.fields(tp)}:
            return None
        tp = typing.get_type_hints(tp)[part]
    return tp


def _lookup(data: dict, dotted: str) -> tuple[dict | None, str]:
    """The table holding `dotted`'s last part (None when a table on the way is missing) and that part."""
    *parents, last = dotted.split(".")
    node: Any = data
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    return (node if isinstance(node, dict) else None), last


def _renamed_pairs(cls: type, old: str, new: str, value: Any) -> list[tuple[str, str]] | None:
    """The (old key, new key) pairs that renaming `old` (a key or a whole section) to `new` gives in `cls`;
    None when the rename does not apply to it (the old name is still a key there, or the new one is not)."""
    if field_type(cls, old) is not None:
        return None
    if dataclasses.is_dataclass(field_type(cls, new)) and isinstance(value, dict):
        # a section: renamed when it is this config's (one of its keys is known under the new name), so
        # that a stray key in it is then reported under the new name
        pairs = [(f"{old}.{key}", f"{new}.{key}") for key in value]
        return pairs if any(field_type(cls, n) is not None for _, n in pairs) else None
    return [(old, new)] if field_type(cls, new) is not None else None


def _tables_on_the_way(data: dict, dotted: str) -> bool:
    node: Any = data
    for part in dotted.split(".")[:-1]:
        node = node.get(part, {})
        if not isinstance(node, dict):
            return False
    return True


def upgrade_keys(cls: type, data: dict, source: str = "") -> dict:
    """`data` (one source's config dict for config class `cls`) with RENAMED_KEYS' old names moved to the
    new ones: one warning line per old name; an old and a new name given different values is an error.
    Keys that are no config key of `cls` under either name are left for from_dict to report."""
    out = copy.deepcopy(data)
    where = f" (in {source})" if source else ""
    for old, new in RENAMED_KEYS.items():
        holder, last = _lookup(out, old)
        if holder is None or last not in holder:
            continue
        pairs = _renamed_pairs(cls, old, new, holder[last])
        if pairs is None or not all(_tables_on_the_way(out, n) for _, n in pairs):
            continue  # left for from_dict to report (an unknown key, or a value where a table belongs)
        value = holder.pop(last)
        for old_key, new_key in pairs:
            moved = value[old_key.rsplit(".", 1)[1]] if old_key != old else value
            target, key = _lookup(out, new_key)
            if target is None:  # create the new key's tables on the way
                target = out
                for part in new_key.split(".")[:-1]:
                    target = target.setdefault(part, {})
            if key in target and target[key] != moved:
                raise RlgenError(f"config keys '{old_key}' (deprecated) and '{new_key}'{where} have different values: "
                                 f"give only '{new_key}'")
            target[key] = moved
            _warn(f"config key '{old_key}'{where} is deprecated, use '{new_key}'")
    return out


def _warn(message: str) -> None:
    """One stderr line, as rlgen's other warnings."""
    sys.stderr.write(f"rlgen: warning: {message}\n")
    sys.stderr.flush()


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
    "batch_size": COUNT, "prompts_per_step": COUNT, "num_generations": COUNT,
    "train_batch_size": COUNT, "num_iterations": COUNT, "num_inner_epochs": COUNT, "updates_per_step": COUNT,
    "backprop_steps": COUNT, "stat_buffer_size": COUNT, "stat_min_count": NON_NEGATIVE,
    "max_resample_rounds": NON_NEGATIVE, "ref_update_every": NON_NEGATIVE,
    # objectives
    "beta": NON_NEGATIVE, "epsilon": NON_NEGATIVE, "epsilon_high": NON_NEGATIVE, "delta": Bounds(1, low_open=True),
    "overlong_buffer": Bounds(-1), "overlong_penalty": NON_NEGATIVE, "label_smoothing": Bounds(0, 0.5, high_open=True),
    "rpo_alpha": NON_NEGATIVE, "desirable_weight": NON_NEGATIVE, "undesirable_weight": NON_NEGATIVE,
    "center_rewards_coefficient": NON_NEGATIVE, "adv_clip_max": POSITIVE,
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

def toml_value(value: Any) -> str:
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
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {show_value(value)} as TOML")


def toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else toml_value(key)


def dumps_toml(data: dict, prefix: str = "") -> str:
    scalars, tables, arrays = [], [], []
    for key, value in data.items():
        if value is None:  # TOML has no null: listed as a comment, so that every key shows
            scalars.append(f"# {toml_key(key)} = ... (unset)")
            continue
        if isinstance(value, dict) and value:
            tables.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            arrays.append((key, value))
        else:
            scalars.append(f"{toml_key(key)} = {toml_value(value)}")
    out = "\n".join(scalars) + ("\n" if scalars else "")
    for key, value in tables:
        name = f"{prefix}.{toml_key(key)}" if prefix else toml_key(key)
        out += f"\n[{name}]\n" + dumps_toml(value, name)
    for key, items in arrays:
        name = f"{prefix}.{toml_key(key)}" if prefix else toml_key(key)
        for item in items:
            flat = {k: v for k, v in item.items()}
            out += f"\n[[{name}]]\n" + "\n".join(
                f"{toml_key(k)} = {toml_value(v)}" if v is not None else f"# {toml_key(k)} = ... (unset)"
                for k, v in flat.items()
            ) + "\n"
    return out
