"""What every extension hook shares: declared capabilities, the typed-contract test, the one options validator.

Each hook kind's contract (input / output dataclasses and a Protocol) lives in the layer of its hook:
rlgen.algorithms.contracts (advantage estimators, policy losses, loss aggregations, preference losses),
rlgen.rewards.contracts (combiners, shapings), rlgen.rollout.contracts (samplers), rlgen.merging.contracts
(mergers). This module holds only what they have in common, so it sits in the core layer.

Capabilities: an item says what it needs with `@declare(needs_reference=True)` (or a `capabilities`
attribute holding a `Capabilities`); callers read them with `capabilities(item)` only. Items written before
that (plain functions with attributes such as `remax.needs_greedy_baseline = True`) are read the same way.

Options: `check_options` is the one check of user-given `**options` (sampler options, combiner and shaping
options, ...) against what an item accepts: its keyword parameters, or a declared options dataclass.
"""
from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass, fields, replace
from types import UnionType
from typing import Annotated, Any, Callable, Literal

from rlgen.config import ANY, Bounds
from rlgen.errors import RlgenError, show_value


@dataclass(frozen=True)
class Capabilities:
    """What a registered item needs from its caller or tells it; every flag is off unless declared."""

    needs_reference: bool = False  # preference loss: reference log-probs; reward shaping: the reference's reward
    needs_greedy_baseline: bool = False  # advantage estimator: the reward of one greedy completion per prompt
    needs_base: bool = False  # merger: the base model's tensor
    is_correctness: bool = False  # reward: says whether an answer is right (its mean is reported as `accuracy`)
    required_fields: tuple[str, ...] = ()  # reward: record fields it reads (checked against the data before training)
    per_token: bool = False  # advantage estimator: may return one advantage per completion token
    needs_guide: bool = False  # sampler: a guide reward to rank or steer samples (--sampler-reward)


_FLAGS = tuple(f.name for f in fields(Capabilities))


def declare(item: Any = None, /, **flags: Any) -> Any:
    """Declare an item's capabilities: `@declare(needs_reference=True)` above a function, or
    `declare(obj, needs_base=True)`. Returns the item itself, so the registry holds the same object."""
    declared = Capabilities(**{k: tuple(v) if k == "required_fields" else v for k, v in flags.items()})

    def attach(target: Any) -> Any:
        target.capabilities = declared
        return target

    return attach if item is None else attach(item)


def capabilities(item: Any, default: Capabilities = Capabilities()) -> Capabilities:
    """The item's capabilities: declared ones as they are; for an item without a declaration, `default` (the
    kind's defaults) overlaid with any old-style attributes it has (`fn.needs_reference = False` ...)."""
    declared = getattr(item, "capabilities", None)
    if isinstance(declared, Capabilities):
        return declared
    found = {}
    for flag in _FLAGS:
        value = getattr(item, flag, None)
        if value is None:
            continue
        found[flag] = tuple(value) if flag == "required_fields" else bool(value)
    return replace(default, **found)


def takes(fn: Callable, input_type: type) -> bool:
    """Whether `fn` implements the typed form of a contract: its first parameter is annotated with the
    contract's input dataclass (`def estimate(batch: AdvantageInput) -> AdvantageOutput`). Old-style items
    (positional tensors and keyword arguments) are called through their kind's adapter instead."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if not parameters:
        return False
    annotation = parameters[0].annotation
    if isinstance(annotation, str):  # `from __future__ import annotations`: compare the written name
        return annotation.split(".")[-1].strip("'\"") == input_type.__name__
    return annotation is input_type


# --- the one options validator ----------------------------------------------------------------------

@dataclass(frozen=True)
class Option:
    name: str
    default: Any = inspect.Parameter.empty
    annotation: Any = None  # a resolved type hint (Annotated / Literal kept), or None when unknown


@dataclass(frozen=True)
class OptionSchema:
    """The options an item accepts; `open_ended`: any other key is accepted too (and not checked)."""

    options: dict[str, Option]
    open_ended: bool = False


def schema_of(item: Any, skip: int | tuple[str, ...] = 0) -> OptionSchema:
    """The options of an item: the fields of a declared options dataclass (an `options` attribute holding a
    dataclass type, or `item` itself being one), else the keyword parameters of the callable after its first
    `skip` parameters (an int) or without the parameters named in `skip` (a tuple). A catch-all `**_` means
    "ignore what I do not use" and accepts nothing more; a catch-all with any other name accepts every key."""
    declared = getattr(item, "options", None)
    if isinstance(declared, type) and dataclasses.is_dataclass(declared):
        item = declared
    if isinstance(item, type) and dataclasses.is_dataclass(item):
        hints = _hints(item)
        return OptionSchema({f.name: Option(f.name, _field_default(f), hints.get(f.name)) for f in fields(item)})
    try:
        parameters = list(inspect.signature(item).parameters.values())
    except (TypeError, ValueError):
        return OptionSchema({}, open_ended=True)  # a builtin or C callable: nothing to read, accept all
    if isinstance(skip, int):
        parameters = parameters[skip:]
    else:
        parameters = [p for p in parameters if p.name not in skip]
    hints = _hints(item)
    named = {p.name: Option(p.name, p.default, hints.get(p.name)) for p in parameters
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    open_ended = any(p.kind is p.VAR_KEYWORD and not p.name.startswith("_") for p in parameters)
    return OptionSchema(named, open_ended)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return inspect.Parameter.empty


def _hints(item: Any) -> dict[str, Any]:
    target = item if isinstance(item, type) or inspect.isroutine(item) else getattr(item, "__call__", item)
    try:
        return typing.get_type_hints(target, include_extras=True)
    except Exception:  # noqa: BLE001 - a plugin's annotations may not resolve: its defaults still guide the check
        return {}


def check_options(kind: str, name: str, item: Any, options: dict, *, skip: int | tuple[str, ...] = 0,
                  reserved: dict[str, str] | None = None, extra: tuple[str, ...] = ()) -> None:
    """Check user-given `options` for the registered `kind` item `name` (a callable or options dataclass, see
    `schema_of`); raise one line naming the item, the bad key and the accepted keys, or the bad value.

    `reserved`: keys the caller supplies itself -> a hint where to give them instead; `extra`: keys the caller
    consumes before the call (shaping's ref_field). Values are checked against the option's annotation or,
    without one, its default: true/false for bool, an integer for int, a number for float; numbers finite;
    `Literal[...]` choices; `Annotated[..., Bounds(...)]` ranges. An item's own `check_options(options)`
    attribute runs last, for rules across options (clip's low <= high)."""
    schema = schema_of(item, skip)
    reserved = reserved or {}
    for key, value in options.items():
        if key in extra:
            continue
        if key in reserved:
            raise RlgenError(f"{kind} '{name}': '{key}' is not an option{reserved[key]}")
        option = schema.options.get(key)
        if option is None:
            if schema.open_ended:
                continue
            known = ", ".join([*(k for k in schema.options if k not in reserved), *extra]) or "none"
            raise RlgenError(f"{kind} '{name}' has no option '{key}' (its options: {known})")
        problem = _value_problem(option, value)
        if problem:
            raise RlgenError(f"option '{key}' of {kind} '{name}' must be {problem}, got {show_value(value)}")
    check = getattr(item, "check_options", None)
    if callable(check):
        check({k: v for k, v in options.items() if k not in extra})


def _value_problem(option: Option, value: Any) -> str:
    """What `value` must be instead ("" when it is acceptable)."""
    base, bounds, choices = _unpack(option.annotation)
    default = option.default
    if base is None and default is not inspect.Parameter.empty and default is not None:
        base = type(default)
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if choices is not None:
        return "" if value in choices else "one of " + ", ".join(str(c) for c in choices)
    if base is bool:
        return "" if isinstance(value, bool) else "true or false"
    if base is int and not (is_number and isinstance(value, int)):
        return "an integer"
    if base is float and not is_number:
        return "a number"
    if is_number and not (bounds or ANY).holds(value):
        integer = base is int or (base is None and isinstance(value, int))
        return (bounds or ANY).describe(integer) if bounds else "a finite number"
    return ""


def _unpack(annotation: Any) -> tuple[type | None, Bounds | None, tuple | None]:
    """(plain type: bool / int / float or None, Bounds or None, Literal choices or None) of a type hint;
    `X | None` counts as X."""
    bounds = None
    if typing.get_origin(annotation) is Annotated:
        found = [m for m in annotation.__metadata__ if isinstance(m, Bounds)]
        bounds = found[0] if found else None
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) is Literal:
        return None, bounds, typing.get_args(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if args and typing.get_origin(annotation) in (typing.Union, UnionType):
        if len(args) == 1:
            return _unpack(args[0])[0], bounds, None
        if set(args) <= {int, float}:
            return float, bounds, None
        return None, bounds, None
    if annotation in (bool, int, float):
        return annotation, bounds, None
    return None, bounds, None

