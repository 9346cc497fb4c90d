"""`rlgen.load_config`: the typed config of a training run, from every source in order of precedence.

Lowest first: the config class defaults, the model's recommended settings (`rlgen_defaults.toml` in its
directory, e.g. the built-in models'), the algorithm preset, the config file / dict, keyword overrides,
`sets` ("section.key=value" strings, as `--set` gives them). A resumed run's saved config.toml replaces
the defaults, the model's settings, the preset and the file.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from rlgen.api._inputs import string_list
from rlgen.config import RENAMED_KEYS, apply_override, deep_merge, from_dict, read_toml, upgrade_keys
from rlgen.errors import RlgenError, show_value
from rlgen.plugins import registry


def algorithm_entry(algo: str):
    """The registered algorithm `algo` (its config class, trainer class, preset and family)."""
    if not isinstance(algo, str):
        raise RlgenError(f"algo = {show_value(algo)}: expected an algorithm name (sft, grpo, dpo, ... see `rlgen plugins`)")
    return registry("algorithm").get(algo)


def model_recommended(algorithm, data: dict) -> dict:
    """Settings a model directory recommends for an algorithm family ([grpo], [sft] ... tables of its
    rlgen_defaults.toml): how a built-in model carries its own learning rate and lengths."""
    default = algorithm.config_cls().model.path
    model_path = data.get("model", {}).get("path", default) if isinstance(data.get("model"), dict) else default
    # function-level: the backbone module imports torch, which `rlgen.train` must not load before it is called
    from rlgen.models.backbone import claiming_backbone

    backbone = claiming_backbone(str(model_path))
    if backbone is None:
        return {}  # reported with a proper message when the model is loaded
    try:
        path = backbone.resolve(str(model_path))
    except RlgenError:
        return {}  # reported with a proper message when the model is loaded
    recommended = path / "rlgen_defaults.toml"
    if not recommended.is_file():
        return {}
    # renamed keys are upgraded source by source, so that each source's precedence holds for them too
    settings = upgrade_keys(algorithm.config_cls, read_toml(recommended).get(algorithm.family, {}), f"{recommended} [{algorithm.family}]")
    try:
        from_dict(algorithm.config_cls, settings)
    except RlgenError as exc:
        raise RlgenError(f"{recommended} [{algorithm.family}]: {exc}") from None
    return settings


# Completion lengths whose defaults (TRL's: 256 tokens) a small model's context may not hold.
LENGTH_KEYS = (("rollout", "max_new_tokens"), ("algorithm", "max_new_tokens"))


def declared_context(model_path) -> int | None:
    """The positions a model directory's config.json declares (an adapter: its base's), without loading it."""
    import json

    from rlgen.models.backbone import claiming_backbone

    backbone = claiming_backbone(str(model_path))
    try:
        path = backbone.resolve(str(model_path)) if backbone is not None else None
    except RlgenError:
        return None
    if path is None:
        return None
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        try:
            base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            return None
        return declared_context(base) if isinstance(base, str) and base else None
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for name in ("max_position_embeddings", "n_positions"):
        value = config.get(name) if isinstance(config, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def clamp_default_lengths(typed, data: dict) -> None:
    """A completion length left at its default (neither given nor recommended by the model) that takes more
    than half the model's context is lowered to half of it, with one warning line naming the key."""
    model = getattr(typed, "model", None)
    limit = declared_context(model.path) if model is not None and getattr(model, "path", None) else None
    if not limit:
        return
    evaluating = bool(getattr(getattr(typed, "run", None), "eval_every", 0))
    for section, key in LENGTH_KEYS:
        part = getattr(typed, section, None)
        value = getattr(part, key, None) if part is not None else None
        given = isinstance(data.get(section), dict) and key in data[section]
        if not isinstance(value, int) or given or value <= limit // 2:
            continue
        if section == "algorithm" and not evaluating:  # SFT's: the held-out evaluation's length, unused without it
            continue
        setattr(part, key, max(1, limit // 2))
        sys.stderr.write(f"rlgen: warning: {section}.{key} = {value} (the default) is more than half of the model's "
                         f"context of {limit} positions: using {limit // 2} (set {section}.{key} to choose)\n")


# What decides which records a run trains on and which it holds out (rlgen.training.trainer.held_out_split):
# a resumed run must keep them, or it would train on records it held out, or hold out ones it trained on.
SPLIT_KEYS = (("data", "path"), ("data", "task"), ("data", "eval_path"), ("data", "eval_fraction"),
              ("data", "prompt_field"), ("run", "seed"))


def check_same_split(typed, saved) -> None:
    """A resumed run's overrides that would change its training / held-out split are one error line."""
    pairs = [(f"{section}.{key}", getattr(getattr(typed, section, None), key, None), getattr(getattr(saved, section, None), key, None))
             for section, key in SPLIT_KEYS]
    evaluating = [bool(getattr(getattr(c, "run", None), "eval_every", 0)) for c in (typed, saved)]
    pairs.append(("run.eval_every (on or off)", evaluating[0], evaluating[1]))
    for name, now, before in pairs:
        if now != before:
            raise RlgenError(f"--resume: {name} cannot change ({show_value(before)} -> {show_value(now)}): it decides "
                             "which records the run trains on and which it holds out")


# Keyword shorthands named like the `rlgen train` flags: train("grpo", model="tiny-arith", task="arithmetic", steps=2).
SHORTHANDS = {"task": "data.task", "out": "run.out", "steps": "run.steps", "seed": "run.seed",
              "save_every": "run.save_every"}


def _expand_shorthand(key: str, value):
    """(dotted key, value) of one keyword override: a shorthand, a model / data path given as a string, or
    rewards given as NAME[:WEIGHT] strings."""
    if key in SHORTHANDS:
        return SHORTHANDS[key], value
    if key in ("model", "data") and isinstance(value, (str, Path)):
        return f"{key}.path", str(value)
    if key in ("reward", "rewards") and value is not None:
        from rlgen.rewards.base import RewardSpec  # imports torch: `import rlgen; rlgen.load_config` must not load it

        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(r, (str, dict)) for r in items):
            raise RlgenError(f"{key} = {show_value(value)}: expected NAME[:WEIGHT] strings (or reward tables as dicts)")
        return "rewards", [dataclasses.asdict(RewardSpec.parse(r)) if isinstance(r, str) else r for r in items]
    return key, value


def _renamed_section(section: str, sections: set[str]) -> bool:
    """Whether `section` is an old name (RENAMED_KEYS: a whole section, or the section of a renamed key) whose
    new name is one of this config's sections: upgrade_keys then moves it there with its warning."""
    return any((old == section or old.startswith(f"{section}.")) and new.split(".", 1)[0] in sections
               for old, new in RENAMED_KEYS.items())


def overrides_to_sections(algorithm, overrides: dict[str, Any], what: str = "override") -> dict:
    """{"run.steps": 5, "optim": {...}, "rewards": [...]} -> nested sections; None values are skipped
    (an option not given). An unknown section is an error naming the key."""
    sections = {f.name for f in dataclasses.fields(algorithm.config_cls)}
    nested: dict = {}
    for given, value in overrides.items():
        if value is None:
            continue
        dotted, value = _expand_shorthand(given, value)
        section, key = dotted.split(".", 1) if "." in dotted else (dotted, None)
        if section not in sections and not _renamed_section(section, sections):
            raise RlgenError(f"`rlgen train {algorithm.name}` has no '{section}' settings ({what} {dotted})")
        if key is None:
            if isinstance(value, dict):  # a copy: later dotted keys must not change the caller's dict
                nested[section] = deep_merge(nested.get(section) if isinstance(nested.get(section), dict) else {}, value)
            else:
                nested[section] = value
        else:
            target = nested.setdefault(section, {})
            for part in key.split(".")[:-1]:
                target = target.setdefault(part, {})
            target[key.split(".")[-1]] = value
    return nested


def load_config(algo, config: str | Path | dict | None = None, *, sets: list[str] | None = None,
                resume: str | Path | None = None, model_defaults: bool = True, **overrides):
    """The typed config of `rlgen train ALGO`: `config` is a TOML path or a dict of sections; `overrides`
    are dotted keys (pass them as a dict: `**{"run.steps": 5}`), sections (`optim={"lr": 1e-3}`) or the
    flag-like shorthands model=, data= (paths), task=, reward= / rewards= (NAME[:WEIGHT] strings), out=,
    steps=, seed=, save_every=; `sets` are "section.key=value" strings. `model_defaults=False` leaves out
    the model's rlgen_defaults.toml (a benchmark that must run exactly the settings it states). Local model /
    data paths are stored absolute."""
    # an entry object is what build_trainer passes on; a caller gives the name
    algorithm = algo if hasattr(algo, "config_cls") else algorithm_entry(algo)
    if config is not None and not isinstance(config, (str, Path, dict)):
        raise RlgenError(f"config = {show_value(config)}: expected a TOML path or a dict of sections")
    sets = string_list("sets", sets, '"section.key=value" strings')
    if resume:
        saved = Path(resume) / "config.toml"
        if not saved.is_file():
            raise RlgenError(f"cannot resume: {saved} not found (is {resume} a run directory?)")
        data = upgrade_keys(algorithm.config_cls, read_toml(saved), str(saved))
        saved_data = deep_merge({}, data)  # the saved config as read (its warnings given once), before overrides
    else:
        data = deep_merge({}, algorithm.defaults)
        if isinstance(config, dict):
            data = deep_merge(data, upgrade_keys(algorithm.config_cls, config))
        elif config is not None:
            data = deep_merge(data, upgrade_keys(algorithm.config_cls, read_toml(str(config)), str(config)))
    user = overrides_to_sections(algorithm, overrides)
    for assignment in sets or []:
        apply_override(user, assignment)
    data = deep_merge(data, upgrade_keys(algorithm.config_cls, user, "--set" if sets else ""))
    if resume:
        data.setdefault("run", {})["out"] = str(resume)
    elif model_defaults:  # a resumed run's config.toml already holds what the model recommended
        data = deep_merge(model_recommended(algorithm, data), data)
    typed = from_dict(algorithm.config_cls, data)
    if not resume:
        clamp_default_lengths(typed, data)
    # Local paths are stored absolute, so a resumed run or a saved adapter finds them from anywhere.
    for section, key in (("model", "path"), ("data", "path"), ("data", "eval_path")):
        part = getattr(typed, section, None)
        value = getattr(part, key, None) if part is not None else None
        if value and Path(value).exists():
            setattr(part, key, str(Path(value).resolve()))
    if resume and user:
        check_same_split(typed, from_dict(algorithm.config_cls, saved_data))
    return typed
