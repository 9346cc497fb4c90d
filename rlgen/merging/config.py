"""What to merge: MergeConfig, read from command-line flags, a TOML file or mergekit's YAML.

File schema (mergekit's, in YAML or TOML):

    merge_method: ties                 # mergekit's underscores are accepted: dare_ties -> dare-ties
    base_model: path/to/base
    models:
      - model: path/to/a               # a directory, a built-in name, or DIR+ADAPTER (peft LoRA folded in)
        parameters: {weight: 0.5, density: 0.5}
      - model: path/to/b
        parameters: {weight: 0.5, density: [0.2, 0.8]}
    parameters: {lambda: 1.0, normalize: true}
    dtype: bfloat16                    # output dtype (`out_dtype` wins when both are given)
    seed: 0                            # rlgen: the DARE hash seed
    max_shard_size: 2GB                # rlgen: output shard size

A per-model parameter is looked up in the model's `parameters`, then in the top-level `parameters` (so
`parameters: {density: 0.5}` applies to every model), then the method's default. A value is one of

- a scalar (number or boolean);
- a gradient, a list of numbers interpolated over the layers: a tensor of layer i of n (names like
  `model.layers.7.mlp...`, `h.7.`, `blocks.7.`; n = the largest layer index + 1) takes the value at
  t = i / (n - 1) (t = 1 when n = 1), i.e. list[k] + f * (list[k+1] - list[k]) with k + f = t * (len - 1).
  As in mergekit 0.1.5, tensors outside the numbered layers, before them (the embeddings) or after them
  (final norm, lm_head), take t = 0, the first entry (mergekit up to 0.1.1 gave those after the layers t = 1,
  the last entry); in a model without such numbered layers (a UNet) every tensor takes t = 0;
- a filter list, `[{filter: self_attn, value: 0.3}, {value: 0.5}]`: the first entry whose `filter` is a
  substring of the tensor name (or that has no filter, or filter "*") gives the value (itself a scalar or
  a gradient); when none matches the parameter counts as not given for that tensor.

Every problem is one RlgenError line naming the file (or the flag) and the key.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from rlgen.config import TomlError, loads_toml
from rlgen.errors import RlgenError, show_value
from rlgen.extension import capabilities
from rlgen.merging.methods import REQUIRED
from rlgen.merging.safetensors_io import parse_size
from rlgen.plugins import registry

DEFAULT_MAX_SHARD_SIZE = 2 * 10**9
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float": "float32", "float16": "float16",
               "fp16": "float16", "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}
IGNORED_PARAMETERS = {"int8_mask"}  # mergekit's memory knob: no effect on the result
FILE_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "seed", "max_shard_size",
             "tokenizer_source"}
UNSUPPORTED_KEYS = {
    "slices": "`slices` (layer ranges / frankenmerges) is not supported: list whole models under `models:`",
    "modules": "`modules` is not supported: list whole models under `models:`",
    "tokenizer": "`tokenizer` is not supported: the tokenizer is copied from the base model",
    "chat_template": "`chat_template` is not supported: the chat template is copied from the base model",
}
COMMAND_LINE = "command line"
LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


@dataclass(frozen=True)
class ModelEntry:
    model: str
    parameters: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MergeConfig:
    method: str
    models: list[ModelEntry]
    base: str | None = None
    parameters: dict = field(default_factory=dict)
    dtype: str | None = None
    seed: int = 0
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
    source: str = COMMAND_LINE  # where it was read from, for error messages


def method_name(name: str) -> str:
    return str(name).strip().lower().replace("_", "-")


def _where(config_source: str, key: str) -> str:
    if config_source != COMMAND_LINE:
        return f"{config_source}: key '{key}'"
    flags = {"merge_method": "--method", "base_model": "--base", "models": "MODEL arguments", "dtype": "--dtype"}
    if key in flags:
        return flags[key]
    match = re.fullmatch(r"(?:models\[\d+\]\.)?parameters\.(\w+)(.*)", key)
    if match:
        flag = {"weight": "--weights", "density": "--density"}.get(match.group(1), f"--param {match.group(1)}")
        return f"{flag}{match.group(2)}"
    return key


def _fail(source: str, key: str, message: str):
    key = str(key)
    if len(key) > 200:  # a key is user text too
        key = f"{key[:200]}... ({len(key)} characters)"
    raise RlgenError(f"{_where(source, key)}: {message}")


# --------------------------------------------------------------------------- reading

MAX_YAML_NODES = 100_000  # nodes of the document with every alias expanded (a merge config has hundreds)
MAX_NESTING = 64  # lists / mappings inside one another


def _bounded_yaml_loader():
    """A yaml.SafeLoader that refuses documents nested deeper than MAX_NESTING or whose aliases expand to
    more than MAX_YAML_NODES nodes ("billion laughs": a 1 KB file of nested aliases is billions of nodes
    once anything walks or prints it), counted on the composed node graph before anything is built."""
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent, index):
            self.depth += 1
            try:
                if self.depth > MAX_NESTING:
                    raise yaml.YAMLError(f"nested more than {MAX_NESTING} levels deep")
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

        def construct_document(self, node):
            _expanded_size(node)
            return super().construct_document(node)

        def construct_yaml_int(self, node):
            try:
                value = super().construct_yaml_int(node)
            except ValueError:  # more than 4300 decimal digits
                value = None
            if value is None or _too_long(value):
                raise yaml.YAMLError(f"line {node.start_mark.line + 1}: {TOO_LONG}")
            return value

        def construct_mapping(self, node, deep=False):
            # a key given twice is an error, not "the last one wins" (`<<` merge keys may still be overridden)
            if isinstance(node, yaml.MappingNode):
                seen = set()
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=deep)
                    try:
                        duplicate = key in seen
                        seen.add(key)
                    except TypeError:  # an unhashable key: reported by the base class
                        continue
                    if duplicate:
                        raise yaml.YAMLError(f"line {key_node.start_mark.line + 1}: duplicate key {show_value(key)}")
            return super().construct_mapping(node, deep=deep)

    BoundedLoader.add_constructor("tag:yaml.org,2002:int", BoundedLoader.construct_yaml_int)
    return BoundedLoader


# Integers past this many bits have more than ~4200 decimal digits: Python refuses to print them (and to
# read decimal ones), so a config holding one is refused when read, like bad syntax.
MAX_INT_BITS = 14_000
TOO_LONG = "an integer too long to read (more than 4000 digits)"


def _too_long(value) -> bool:
    return isinstance(value, int) and value.bit_length() > MAX_INT_BITS


def _long_int(data) -> bool:
    """Whether a parsed TOML value holds an integer too long to print (TOML's hex / octal / binary
    integers are read whatever their length)."""
    if isinstance(data, dict):
        return any(_long_int(v) for v in data.values())
    if isinstance(data, list):
        return any(_long_int(v) for v in data)
    return _too_long(data)


def _expanded_size(root) -> int:
    """Nodes of the document under `root` with every alias expanded (each shared node counted once per
    use, memoized), refused past MAX_YAML_NODES or when an alias refers to its own ancestor."""
    import yaml

    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise yaml.YAMLError("an alias refers to a node that contains it (recursive alias)")
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        open_nodes.discard(key)
        if total > MAX_YAML_NODES:
            raise yaml.YAMLError(f"expands to more than {MAX_YAML_NODES} nodes (aliases / anchors used as "
                                 "a \"billion laughs\" bomb?)")
        sizes[key] = total
        return total

    return size(root)


def _read_yaml(path: str, text: str):
    import yaml

    try:
        return yaml.load(text, Loader=_bounded_yaml_loader())  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RlgenError(f"{path}: bad YAML ({first[:200]})") from None
    except RecursionError:
        raise RlgenError(f"{path}: bad YAML (nested too deeply)") from None


def load_config(path: str) -> MergeConfig:
    """A TOML (`.toml`) or YAML (`.yml`, `.yaml`) merge file in mergekit's schema."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RlgenError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise RlgenError(f"cannot read merge config {path}: {exc.strerror or exc}") from None
    if file.suffix.lower() in (".yml", ".yaml"):
        data = _read_yaml(path, text)
    elif file.suffix.lower() == ".toml":
        try:
            data = loads_toml(text, str(path))
        except TomlError as exc:
            reason = {"too_long": TOO_LONG, "too_deep": "nested too deeply"}.get(exc.kind, exc.reason)
            raise RlgenError(f"{path}: bad TOML ({reason})") from None
        if _long_int(data):
            raise RlgenError(f"{path}: bad TOML ({TOO_LONG})")
    else:
        raise RlgenError(f"{path}: a merge config must be .toml, .yml or .yaml")
    if not isinstance(data, dict):
        raise RlgenError(f"{path}: expected a mapping with merge_method, models, ... at the top")
    return from_dict(data, str(path))


def from_dict(data: dict, source: str) -> MergeConfig:
    for key in data:
        if key in UNSUPPORTED_KEYS:
            _fail(source, key, UNSUPPORTED_KEYS[key])
        if key not in FILE_KEYS:
            _fail(source, key, f"unknown key (known: {', '.join(sorted(FILE_KEYS))})")
    if data.get("tokenizer_source") not in (None, "base"):
        _fail(source, "tokenizer_source", "only `base` is supported (the tokenizer is copied from the base model)")
    if "merge_method" not in data:
        _fail(source, "merge_method", "missing (e.g. merge_method: ties)")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        _fail(source, "models", "must be a non-empty list of {model: PATH, parameters: {...}}")
    entries = []
    for i, item in enumerate(models):
        if isinstance(item, str):
            item = {"model": item}
        if not isinstance(item, dict) or "model" not in item:
            _fail(source, f"models[{i}]", "must be a mapping with a `model` key")
        extra = set(item) - {"model", "parameters"}
        if extra:
            _fail(source, f"models[{i}].{sorted(extra)[0]}", "unknown key (known: model, parameters)")
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            _fail(source, f"models[{i}].parameters", "must be a mapping")
        entries.append(ModelEntry(_model_ref(source, f"models[{i}].model", item["model"]), dict(params)))
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        _fail(source, "parameters", "must be a mapping")
    base = data.get("base_model")
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        _fail(source, "seed", f"must be an integer, got {show_value(seed)}")
    try:
        shard = parse_size(data.get("max_shard_size", DEFAULT_MAX_SHARD_SIZE))
    except RlgenError as exc:
        _fail(source, "max_shard_size", str(exc))
    dtype = data.get("out_dtype", data.get("dtype"))
    return MergeConfig(method=method_name(data["merge_method"]), models=entries,
                       base=None if base is None else _model_ref(source, "base_model", base), parameters=dict(params),
                       dtype=check_dtype(source, "out_dtype" if "out_dtype" in data else "dtype", dtype), seed=seed,
                       max_shard_size=shard, source=source)


def _model_ref(source: str, key: str, value) -> str:
    if not isinstance(value, str) or not value.strip():
        _fail(source, key, f"must be a model path or name, got {show_value(value)}")
    return value


def check_dtype(source: str, key: str, value) -> str | None:
    if value is None:
        return None
    if str(value).lower() not in DTYPE_NAMES:
        _fail(source, key, f"must be one of float32, float16, bfloat16, got {show_value(value)}")
    return DTYPE_NAMES[str(value).lower()]


def parse_value(text: str, flag: str = "--param"):
    """A --param value as TOML (0.5, true, [0, 0.5, 1], [{filter="mlp", value=0.3}, {value=0.5}]); `flag`
    names it in errors."""
    try:
        value = loads_toml(f"v = {text}")["v"]
    except TomlError as exc:
        if exc.kind == "too_deep":
            raise RlgenError(f"{flag}: nested too deeply, got {show_value(text)}") from None
        if exc.kind == "syntax":
            return text  # a bare word: reported by validation if the parameter wants a number
        value = None  # a decimal integer of more than 4300 digits
    if value is None or _long_int(value):
        raise RlgenError(f"{flag}: {TOO_LONG}, got {show_value(text)}")
    return value


def from_flags(models: list[str], *, method: str, base: str | None = None, weights: list[float] | None = None,
               densities: list[float] | None = None, params: dict | None = None, dtype: str | None = None,
               seed: int = 0, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> MergeConfig:
    """The command-line form: per-model weights / densities (one value = every model), global params."""
    name = method_name(method)
    merger = registry("merger").get(name) if name in registry("merger") else None
    listed = [m for m in models if not (merger is not None and capabilities(merger).needs_base and m == base)]
    count = len(listed) or 1
    per_model: list[dict] = [{} for _ in models]
    for flag, values in (("--weights", weights), ("--density", densities)):
        if values is None:
            continue
        if len(values) not in (1, count):
            raise RlgenError(f"{flag}: got {len(values)} values for {count} models (give one, or one per model)")
        it = iter(values * count if len(values) == 1 else values)
        key = "weight" if flag == "--weights" else "density"
        for params_, model in zip(per_model, models):
            if model in listed:
                params_[key] = next(it)
    if weights is None and merger is not None and "weight" in merger.model_params:
        for params_, model in zip(per_model, models):
            if model in listed:
                params_["weight"] = 1.0 / count  # equal weights summing to 1
    return MergeConfig(method=name, models=[ModelEntry(m, p) for m, p in zip(models, per_model)], base=base,
                       parameters=dict(params or {}), dtype=check_dtype(COMMAND_LINE, "dtype", dtype), seed=seed,
                       max_shard_size=max_shard_size)


# --------------------------------------------------------------------------- checking

def merged_models(config: MergeConfig, method) -> list[ModelEntry]:
    """The models whose tensors go to the method: the base is left out of the list when the method takes
    it separately (mergekit lists it among the models, without parameters)."""
    if capabilities(method).needs_base:
        return [m for m in config.models if m.model != config.base]
    return list(config.models)


def validate(config: MergeConfig):
    """The config's MergeMethod, after checking the method, the model count and every parameter name
    and value shape (filter lists are resolved per tensor at merge time)."""
    source = config.source
    mergers = registry("merger")
    if config.method not in mergers:
        _fail(source, "merge_method", f"unknown merge method {show_value(config.method)} (known: {', '.join(mergers.names())})")
    method = mergers.get(config.method)
    if capabilities(method).needs_base and not config.base:
        _fail(source, "base_model", f"merge method '{config.method}' needs a base model")
    models = merged_models(config, method)
    count, low, high = len(models), method.min_models, method.max_models
    if count < low or (high is not None and count > high):
        extra = 1 if capabilities(method).needs_base else 0
        wanted = f"exactly {low + extra}" if high == low else f"at least {low + extra}" if high is None \
            else f"{low + extra} to {high + extra}"
        including = " including the base model" if capabilities(method).needs_base else ""
        _fail(source, "models", f"merge method '{config.method}' needs {wanted} models{including}, got {count + extra}")
    model_names = set(method.model_params)
    known = model_names | set(method.global_params) | IGNORED_PARAMETERS
    for key, value in config.parameters.items():
        _check_param(source, f"parameters.{key}", key, known, value, config.method)
    for i, entry in enumerate(config.models):
        if capabilities(method).needs_base and entry.model == config.base:
            continue  # the base's own parameters are not used (as in mergekit)
        for key, value in entry.parameters.items():
            _check_param(source, f"models[{i}].parameters.{key}", key, model_names | IGNORED_PARAMETERS, value,
                         config.method)
        for name, default in method.model_params.items():
            given = _lookup(entry.parameters, name) is not None or _lookup(config.parameters, name) is not None
            if default is REQUIRED and not given:
                _fail(source, f"models[{i}].parameters.{name}", f"missing: merge method '{config.method}' needs "
                      f"`{name}` for every model (here or in the top-level parameters)")
    for name, default in method.global_params.items():
        if default is REQUIRED and _lookup(config.parameters, name) is None:
            _fail(source, f"parameters.{name}", f"missing: merge method '{config.method}' needs `{name}`")
    return method


def _lookup(params: dict, name: str):
    """params[name], accepting mergekit's underscores for our hyphens."""
    for key, value in params.items():
        if key.replace("_", "-") == name.replace("_", "-"):
            return value
    return None


# Parameters with a range (mergekit's meaning): (low, high, low included). Any other number must be finite.
PARAMETER_RANGES = {"density": (0.0, 1.0, False), "t": (0.0, 1.0, True), "gamma": (0.0, 1.0, True)}
# Parameters that take a word rather than a number: name -> the accepted words.
CHOICE_PARAMETERS = {"rescale-norm": ("l1", "l2", "linf")}


def _check_param(source, key, name, known, value, method):
    if not isinstance(name, str) or name.replace("_", "-") not in {k.replace("_", "-") for k in known}:
        listed = ", ".join(sorted(known - IGNORED_PARAMETERS)) or "none"
        _fail(source, key, f"unknown parameter for merge method '{method}' (known: {listed})")
    canonical = name.replace("_", "-")
    if canonical in CHOICE_PARAMETERS:
        words = CHOICE_PARAMETERS[canonical]
        if value not in words:
            _fail(source, key, f"must be one of {', '.join(words)}, got {show_value(value)}")
        return
    _check_value(source, key, value, name=canonical)


def _check_value(source, key, value, nested=False, name=""):
    scalar = _scalar(value)
    if scalar is not None:
        _check_number(source, key, scalar, name)
        return
    if isinstance(value, list) and value and all(_scalar(v) is not None for v in value):
        for i, item in enumerate(value):
            _check_number(source, f"{key}[{i}]", _scalar(item), name)
        return
    if isinstance(value, list) and value and not nested and all(isinstance(v, dict) for v in value):
        for i, cond in enumerate(value):
            extra = set(cond) - {"filter", "value"}
            if extra or "value" not in cond:
                _fail(source, f"{key}[{i}]", "a filter entry is {filter: SUBSTRING, value: VALUE} (filter optional)")
            if cond.get("filter") is not None and not isinstance(cond["filter"], str):
                _fail(source, f"{key}[{i}].filter", f"must be a string, got {show_value(cond['filter'])}")
            _check_value(source, f"{key}[{i}].value", cond["value"], nested=True, name=name)
        return
    _fail(source, key, f"must be a number, a boolean, a list of numbers (gradient over layers) or a list of "
                       f"{{filter, value}} entries, got {show_value(value)}")


def _check_number(source, key, number, name: str) -> None:
    """A finite number, inside the parameter's range where it has one (NaN / inf never reach weights)."""
    if isinstance(number, bool):
        return
    try:
        finite = math.isfinite(number)
    except OverflowError:  # an integer too large for a float
        finite = False
    if not finite:
        _fail(source, key, f"must be a finite number, got {show_value(number)}")
    if name in PARAMETER_RANGES:
        low, high, low_included = PARAMETER_RANGES[name]
        if number > high or number < low or (number == low and not low_included):
            interval = f"{'[' if low_included else '('}{low:g}, {high:g}]"
            _fail(source, key, f"must be in {interval}, got {show_value(number)}")


def _scalar(value):
    """A number or boolean (numeric strings, as YAML reads 1e-3, count as numbers), else None."""
    if isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


# --------------------------------------------------------------------------- resolving per tensor

def layer_count(names) -> int:
    indices = [int(m.group(1)) for m in map(LAYER.search, names) if m]
    return max(indices) + 1 if indices else 0


def layer_position(name: str, layers: int) -> float:
    """t of a tensor for gradients: i / (layers - 1) in layer i (1 with a single layer); every tensor outside
    the numbered layers, before them (embeddings) or after them (final norm, lm_head), takes t = 0, as in
    mergekit 0.1.2 to 0.1.5, whose planner reads both its pre and its post weights' parameters at t = 0
    (up to 0.1.1 the post weights took t = 1)."""
    match = LAYER.search(name)
    if layers <= 0 or not match:
        return 0.0
    return int(match.group(1)) / (layers - 1) if layers > 1 else 1.0


def evaluate(value, name: str, t: float):
    """One parameter value (scalar, gradient or filter list) for tensor `name` at layer position t; None
    when a filter list has no entry for it."""
    scalar = _scalar(value)
    if scalar is not None:
        return scalar
    if isinstance(value, str):  # a word parameter (CHOICE_PARAMETERS)
        return value
    if all(isinstance(v, dict) for v in value):
        for cond in value:
            pattern = cond.get("filter")
            if pattern is None or pattern == "*" or pattern in name:
                return evaluate(cond["value"], name, t)
        return None
    values = [_scalar(v) for v in value]
    if any(isinstance(v, bool) for v in values):  # booleans pick an entry, they do not interpolate
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    low = int(scaled)
    high = min(len(values) - 1, low + 1)
    frac = scaled - low
    return (1 - frac) * values[low] + frac * values[high]


class ParameterResolver:
    """Every declared parameter of a method, resolved for one tensor name at a time."""

    def __init__(self, config: MergeConfig, method, names):
        self.config, self.method = config, method
        self.models = merged_models(config, method)
        self.layers = layer_count(names)

    def _value(self, params: dict, name: str, tensor: str, t: float):
        raw = _lookup(params, name)
        return None if raw is None else evaluate(raw, tensor, t)

    def resolve(self, tensor: str) -> tuple[list[dict], dict]:
        t = layer_position(tensor, self.layers)
        model_params = []
        for entry in self.models:
            resolved = {}
            for name, default in self.method.model_params.items():
                value = self._value(entry.parameters, name, tensor, t)
                key = f"models[{self.config.models.index(entry)}].parameters.{name}"
                if value is None:
                    if _lookup(entry.parameters, name) is None:
                        key = f"parameters.{name}"
                    value = self._value(self.config.parameters, name, tensor, t)
                resolved[name] = self._final(value, default, key, tensor)
            model_params.append(resolved)
        global_params = {name: self._final(self._value(self.config.parameters, name, tensor, t), default,
                                           f"parameters.{name}", tensor)
                         for name, default in self.method.global_params.items()}
        return model_params, global_params

    def _final(self, value, default, key, tensor):
        if value is None:
            if default is REQUIRED:
                raise RlgenError(f"{_where(self.config.source, key)}: no value for tensor '{tensor}' (no filter "
                                 "entry matches it and there is no default)")
            return default
        return bool(value) if isinstance(default, bool) else value
