"""Plugin manager: built-ins and third-party packages register through the same pluggy hooks.

A third-party plugin can fail in three ways, none of which stops rlgen (each is ONE warning line on
stderr, printed once per process, and `rlgen plugins` shows it):
- importing it raises (a missing dependency, a syntax error ...): the plugin is "broken" and contributes
  nothing;
- one of its hooks raises: the plugin is "broken" and everything it registered (in any hook) is dropped;
- it registers a name that is already taken in that kind: built-ins come first, then plugins in the
  order of their distribution names; the first keeps the name, the later item is dropped ("clash");
- it registers an item that does not have the shape of its kind's contract (`item_problem`: an int as an
  algorithm, a string as a task ...): that item alone is dropped ("rejected"), the plugin's others stay.
Using a clashed name is not an error: it resolves to the item that kept the name.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import inspect
import os
import sys
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable

import pluggy

from rlgen import hookspecs
from rlgen.errors import RlgenError
from rlgen.registry import Registry, describe

ENTRY_POINT_GROUP = "rlgen"
BUILTIN_PROVIDER = "rlgen"

# Built-in plugins: modules with hookimpls, registered exactly like entry-point plugins.
DEFAULT_PLUGINS = (
    "rlgen.data.tasks",
    "rlgen.diffusion.digits",
    "rlgen.rewards.builtin",
    "rlgen.rewards.image",
    "rlgen.algorithms.advantages",
    "rlgen.algorithms.losses",
    "rlgen.algorithms.preference_losses",
    "rlgen.rewards.combine",
    "rlgen.algorithms.builtin",
    "rlgen.models.builtin",
    "rlgen.rollout.backbones",
    "rlgen.rollout.samplers",
    "rlgen.rollout.image_search",
    "rlgen.merging.methods",
    "rlgen.evaluation.metrics",
    "rlgen.training.trackers",
)

# hook name -> registry kind (as shown by `rlgen plugins`)
KINDS = {
    "register_algorithms": "algorithm",
    "register_rewards": "reward",
    "register_advantage_estimators": "advantage-estimator",
    "register_policy_losses": "policy-loss",
    "register_preference_losses": "preference-loss",
    "register_reward_combiners": "reward-combiner",
    "register_reward_shapings": "reward-shaping",
    "register_backbones": "backbone",
    "register_models": "model",
    "register_samplers": "sampler",
    "register_image_samplers": "image-sampler",
    "register_mergers": "merger",
    "register_metrics": "metric",
    "register_trackers": "tracker",
    "register_tasks": "task",
}
COMMAND_KIND = "command"  # register_commands(app): CLI subcommands, collected by rlgen.cli.app


@dataclass
class PluginInfo:
    """One third-party plugin: an entry point of the "rlgen" group, or an object registered in-process."""

    name: str  # the entry point's name (or the in-process registration name)
    distribution: str  # the package that provides it ("" for in-process plugins)
    version: str = ""
    error: str | None = None  # why it is broken; None when it works

    @property
    def status(self) -> str:
        return "ok" if self.error is None else "broken"

    @property
    def provider(self) -> str:
        """The name items are attributed to: the distribution, else the registration name."""
        return self.distribution or self.name

    def label(self) -> str:
        dist = f"{self.distribution} {self.version}".strip() or "registered in-process"
        return f"plugin '{self.name}' (distribution '{dist}')"

    def as_dict(self) -> dict:
        return {"name": self.name, "distribution": self.distribution, "version": self.version,
                "status": self.status, "error": self.error}


@dataclass(frozen=True)
class Clash:
    kind: str
    name: str
    kept: str  # provider whose item keeps the name
    dropped: str  # provider whose item was dropped

    def message(self) -> str:
        return (f"{self.kind} '{self.name}' is registered twice: by package '{self.kept}' (kept) and by "
                f"package '{self.dropped}' (dropped)")


@dataclass(frozen=True)
class Rejected:
    """A plugin's item dropped because it does not have the shape its kind's contract asks for."""

    kind: str
    name: str
    provider: str
    problem: str

    def message(self) -> str:
        return f"{self.kind} '{self.name}' registered by package '{self.provider}' is dropped: {self.problem}"


# Registration-time shape checks: attribute names and types only, so that nothing heavy (torch, the
# trainers) is imported to register an item, and a bad item fails here, naming its plugin, instead of
# as an AttributeError wherever it is first used.
_BACKBONE_METHODS = ("claims", "resolve", "load", "save", "reference_policy", "rollout_engine", "sequence_logprobs")
_MERGER_FIELDS = {"needs_base": bool, "model_params": Mapping, "global_params": Mapping, "min_models": int}
_CALLABLE_KINDS = ("reward", "advantage-estimator", "policy-loss", "preference-loss", "reward-combiner",
                   "reward-shaping", "sampler", "image-sampler", "metric")


def _shown(item: Any) -> str:
    try:
        text = " ".join(repr(item).split())
    except Exception:  # noqa: BLE001 - the plugin's own __repr__
        text = "?"
    return f"{type(item).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


_MISSING, _DYNAMIC = object(), object()


def _static_attribute(item: Any, attr: str) -> Any:
    """The attribute as stored (no property, no __getattr__ runs: a forwarding object may look up the very
    registries being built); _DYNAMIC where only running code would tell, _MISSING where it is absent."""
    try:
        value = inspect.getattr_static(item, attr)
    except AttributeError:
        return _DYNAMIC if hasattr(type(item), "__getattr__") else _MISSING
    if isinstance(value, (property, classmethod, staticmethod)):
        return _DYNAMIC
    if hasattr(type(value), "__get__") and not isinstance(value, (type, types.FunctionType)):
        return _DYNAMIC  # another descriptor (functools.cached_property ...)
    return value


def _wrong_attributes(item: Any, expected: dict[str, Callable[[Any], bool]]) -> list[str]:
    wrong = []
    for attr, check in expected.items():
        value = _static_attribute(item, attr)
        if value is _MISSING or (value is not _DYNAMIC and not check(value)):
            wrong.append(f"{attr} ({check.__doc__})")
    return wrong


def _is_str(value: Any) -> bool:
    """a string"""
    return isinstance(value, str)


def _is_class(value: Any) -> bool:
    """a class"""
    return isinstance(value, type)


def _is_dataclass_class(value: Any) -> bool:
    """a dataclass"""
    return isinstance(value, type) and dataclasses.is_dataclass(value)


def _is_mapping(value: Any) -> bool:
    """a dict"""
    return isinstance(value, Mapping)


def _is_callable(value: Any) -> bool:
    """a method"""
    return callable(value)


def _is_names(value: Any) -> bool:
    """a list of reward names"""
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


def _is_count(value: Any) -> bool:
    """an integer >= 1"""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_optional_count(value: Any) -> bool:
    """None or an integer >= 1"""
    return value is None or _is_count(value)


def _is_bool(value: Any) -> bool:
    """true or false"""
    return isinstance(value, bool)


_EXPECTED_ATTRIBUTES: dict[str, tuple[str, dict[str, Callable[[Any], bool]]]] = {
    "algorithm": ("an rlgen.algorithms.base.Algorithm", {
        "name": _is_str, "config_cls": _is_dataclass_class, "trainer_cls": _is_class, "defaults": _is_mapping,
        "family": _is_str}),
    "task": ("an rlgen.data.tasks.Task", {"split": _is_callable, "default_rewards": _is_names}),
    "backbone": ("an rlgen.models.backbone.Backbone", {
        "name": _is_str, **{method: _is_callable for method in _BACKBONE_METHODS}}),
    "tracker": ("an rlgen.training.trackers.Tracker class", {
        "log": _is_callable, "log_table": _is_callable, "close": _is_callable}),
    "merger": ("an rlgen.merging.methods.MergeMethod", {
        "fn": _is_callable, "needs_base": _is_bool, "model_params": _is_mapping, "global_params": _is_mapping,
        "min_models": _is_count, "max_models": _is_optional_count}),
}


def item_problem(kind: str, item: Any) -> str | None:
    """Why `item` cannot be registered as a `kind` (one phrase), or None when it has the contract's shape."""
    if kind in _CALLABLE_KINDS:
        return None if callable(item) else f"got {_shown(item)}, expected a callable"
    if kind == "model":
        return None if isinstance(item, (str, os.PathLike)) else f"got {_shown(item)}, expected a directory (str or Path)"
    if kind in _EXPECTED_ATTRIBUTES:
        what, expected = _EXPECTED_ATTRIBUTES[kind]
        wrong = _wrong_attributes(item, expected)
        if wrong:
            return f"got {_shown(item)}, expected {what}: missing or wrong {', '.join(wrong)}"
    return None


@dataclass
class _State:
    """What loading plugins found; filled by plugin_manager(), registries() and rlgen.cli.app."""

    plugins: list[PluginInfo] = field(default_factory=list)
    clashes: list[Clash] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    commands: Registry | None = None


_state = _State()
_warned: set[str] = set()


def warn(message: str) -> None:
    """One `rlgen: warning: ...` line on stderr, at most once per process for the same message."""
    message = " ".join(message.split())
    if message in _warned:
        return
    _warned.add(message)
    sys.stderr.write(f"rlgen: warning: {message}\n")


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}".rstrip(": ")


def _mark_broken(info: PluginInfo, error: str) -> None:
    if info.error is None:
        info.error = error
        warn(f"{info.label()} failed to load: {error}")


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    # Sorted by distribution, then entry point name: which plugin keeps a clashed name must not depend
    # on the order of sys.path.
    found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)

    def key(ep):
        dist = getattr(ep, "dist", None)
        return ((dist.metadata["Name"] or "") if dist is not None else "", ep.name)

    return sorted(found, key=key)


def _load_entry_points(pm: pluggy.PluginManager) -> list[PluginInfo]:
    loaded = []
    for ep in _entry_points():
        dist = getattr(ep, "dist", None)
        info = PluginInfo(ep.name, (dist.metadata["Name"] or "") if dist is not None else "",
                          (dist.version or "") if dist is not None else "")
        if any(other.name == ep.name for other in loaded):
            continue  # the same distribution seen twice on sys.path
        loaded.append(info)
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)  # validates the hookimpls' names and arguments
        except Exception as exc:  # noqa: BLE001 - importing runs the plugin's code; any failure is its own
            _mark_broken(info, _error_text(exc))
    return loaded


@lru_cache(maxsize=1)
def third_party_manager() -> pluggy.PluginManager:
    """The entry-point plugins alone: loading them imports no built-in module (torch ...), so the CLI can
    list plugin commands in `rlgen --help` at the cost of importing the plugins only."""
    pm = pluggy.PluginManager("rlgen")
    pm.add_hookspecs(hookspecs)
    _state.plugins = _load_entry_points(pm)
    return pm


@lru_cache(maxsize=1)
def plugin_manager() -> pluggy.PluginManager:
    """Built-ins first, then the entry-point plugins that loaded."""
    third_party = third_party_manager()
    pm = pluggy.PluginManager("rlgen")
    pm.add_hookspecs(hookspecs)
    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    for name, plugin in third_party.list_name_plugin():
        if plugin is not None and pm.get_plugin(name) is None:
            pm.register(plugin, name=name)
    return pm


def plugin_infos() -> list[PluginInfo]:
    """Every third-party plugin, broken ones included, and those registered in-process on plugin_manager()
    (while it is cached)."""
    third_party_manager()
    known = {info.name for info in _state.plugins}
    if plugin_manager.cache_info().currsize:
        for name, _ in plugin_manager().list_name_plugin():
            if name not in known and name not in DEFAULT_PLUGINS:
                _state.plugins.append(PluginInfo(name, ""))
                known.add(name)
    return list(_state.plugins)


def _info_for(plugin_name: str) -> PluginInfo | None:
    return next((info for info in plugin_infos() if info.name == plugin_name), None)


def hook_calls(hook_name: str, make_kwargs: Callable[[PluginInfo | None], dict],
               manager: pluggy.PluginManager | None = None) -> list[tuple[PluginInfo | None, Any]]:
    """Call each implementation of one hook separately, in registration order (built-ins first, with None
    as their PluginInfo), so that every result is attributed to its plugin. A third-party hook that raises
    marks its plugin broken (one warning line) and is left out; a built-in one is a bug and propagates."""
    pm = manager or plugin_manager()
    order = {name: index for index, (name, _) in enumerate(pm.list_name_plugin())}
    impls = sorted(getattr(pm.hook, hook_name).get_hookimpls(), key=lambda impl: order.get(impl.plugin_name, len(order)))
    results: list[tuple[PluginInfo | None, Any]] = []
    for impl in impls:
        if impl.plugin_name in DEFAULT_PLUGINS:
            kwargs = make_kwargs(None)
            results.append((None, impl.function(**{name: kwargs[name] for name in impl.argnames if name in kwargs})))
            continue
        info = _info_for(impl.plugin_name) or PluginInfo(impl.plugin_name, "")
        if info.error is not None:
            continue
        kwargs = make_kwargs(info)
        try:
            results.append((info, impl.function(**{name: kwargs[name] for name in impl.argnames if name in kwargs})))
        except Exception as exc:  # noqa: BLE001 - the plugin's own code
            _mark_broken(info, f"hook {hook_name} raised {_error_text(exc)}")
    return results


def _snapshot() -> tuple[str, ...]:
    return tuple(name for name, _ in plugin_manager().list_name_plugin())


_registries_cache: dict[tuple[str, ...], dict[str, Registry]] = {}


def registries() -> dict[str, Registry]:
    """Every kind's registry. Rebuilt when the set of registered plugins changes (a plugin registered
    in-process with plugin_manager().register(...) is seen at once)."""
    snapshot = _snapshot()
    if snapshot not in _registries_cache:
        _registries_cache.clear()
        _registries_cache[snapshot] = _build_registries()
    return _registries_cache[snapshot]


registries.cache_clear = lambda: _registries_cache.clear()  # type: ignore[attr-defined]  # older callers


def _build_registries() -> dict[str, Registry]:
    # Stage every plugin's items first: a plugin found broken by a later hook loses all of them.
    staged: list[tuple[str, PluginInfo | None, list[tuple[str, Any, str]]]] = []
    for hook_name, kind in KINDS.items():
        def make_kwargs(info, _staged=staged, _kind=kind):
            items: list[tuple[str, Any, str]] = []
            _staged.append((_kind, info, items))

            def register(name: str, item: Any, description: str = ""):
                if not isinstance(name, str) or not name:
                    raise RlgenError(f"{_kind} names must be non-empty strings, got {name!r}")
                items.append((name, item, description))

            return {"register": register}

        hook_calls(hook_name, make_kwargs)
    result = {kind: Registry(kind) for kind in KINDS.values()}
    clashes = [c for c in _state.clashes if c.kind == COMMAND_KIND]
    rejected: list[Rejected] = []
    for kind, info, items in staged:
        if info is not None and info.error is not None:
            continue
        provider = BUILTIN_PROVIDER if info is None else info.provider
        registry = result[kind]
        for name, item, description in items:
            if name in registry:
                clash = Clash(kind, name, registry.entry(name).provider, provider)
                if clash not in clashes:
                    clashes.append(clash)
                    warn(clash.message())
                continue
            # Checked after the clash test (a clashing item is dropped either way); a rejected item is not
            # added, so it never takes a name from a later plugin's good one.
            problem = item_problem(kind, item)
            if problem is not None:
                if info is None:
                    raise TypeError(f"built-in {kind} '{name}' breaks its contract: {problem}")
                rejected.append(Rejected(kind, name, provider, problem))
                warn(rejected[-1].message())
                continue
            registry.add(name, item, provider, description or describe(item))
    _state.clashes = clashes
    _state.rejected = rejected
    return result


def registry(kind: str) -> Registry:
    return registries()[kind]


def clashes() -> list[Clash]:
    """Every name clash found so far (item kinds once registries() ran; commands once the CLI added them)."""
    return list(_state.clashes)


def rejected() -> list[Rejected]:
    """Every plugin item dropped for not having its kind's shape (once registries() ran)."""
    return list(_state.rejected)


def record_commands(commands: Registry, command_clashes: list[Clash]) -> None:
    """rlgen.cli.app hands over the commands it registered (built-in and plugin) and the clashes it found."""
    _state.commands = commands
    for clash in command_clashes:
        if clash not in _state.clashes:
            _state.clashes.append(clash)
            warn(clash.message())


def commands() -> Registry | None:
    """The CLI's commands, or None when the CLI did not load plugin commands in this process."""
    return _state.commands


def reset() -> None:
    """Forget loaded plugins (tests register extra plugins then reset)."""
    plugin_manager.cache_clear()
    third_party_manager.cache_clear()
    _registries_cache.clear()
    _state.plugins = []
    _state.clashes = []
    _state.rejected = []
    _state.commands = None
    _warned.clear()


def load_dotted(path: str) -> Any:
    """Resolve 'package.module:attribute' (the quick-experiment escape hatch). This imports, i.e. runs, the
    user's module. The current directory is searched first, but only while that import runs: sys.path is
    restored exactly afterwards, so a stray `./pyarrow.py` cannot shadow a library imported later."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise RlgenError(f"'{path}' is not a 'module:function' path")
    import os

    saved_path = list(sys.path)
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RlgenError(f"cannot import module '{module_name}' for '{path}': {exc}") from None
    except SyntaxError as exc:  # the user's file (or one it imports) is not valid Python
        where = f"{exc.filename}:{exc.lineno}" if exc.filename else f"line {exc.lineno}"
        raise RlgenError(f"cannot import module '{module_name}' for '{path}': {where}: syntax error "
                         f"({' '.join(str(exc.msg).split())[:200]})") from None
    except Exception as exc:  # noqa: BLE001 - importing runs the user's code; any failure is theirs
        raise RlgenError(f"cannot import module '{module_name}' for '{path}': importing it raised "
                         f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None
    finally:
        sys.path[:] = saved_path
    try:
        return getattr(module, attr)
    except AttributeError:
        raise RlgenError(f"module '{module_name}' has no attribute '{attr}' (from '{path}')") from None
