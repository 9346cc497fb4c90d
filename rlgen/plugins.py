"""Plugin manager: built-ins and third-party packages register through the same pluggy hooks."""
from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Any

import pluggy

from rlgen import hookspecs
from rlgen.errors import RlgenError
from rlgen.registry import Registry, describe

ENTRY_POINT_GROUP = "rlgen"

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
    "rlgen.rollout.samplers",
    "rlgen.rollout.image_search",
    "rlgen.merging.methods",
    "rlgen.evaluation.metrics",
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
    "register_tasks": "task",
}


def _make_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("rlgen")
    pm.add_hookspecs(hookspecs)
    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    return pm


@lru_cache(maxsize=1)
def plugin_manager() -> pluggy.PluginManager:
    return _make_manager()


def _providers(pm: pluggy.PluginManager) -> dict[int, str]:
    """Map each plugin object to the distribution (package) that provides it.

    Built-ins are "rlgen"; entry-point plugins are their distribution's name; plugins registered
    in-process (pm.register(obj, name=...)) are their registration name.
    """
    providers = {}
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin)
        providers[id(plugin)] = "rlgen" if name in DEFAULT_PLUGINS else name
    for plugin, dist in pm.list_plugin_distinfo():
        providers[id(plugin)] = dist.metadata["name"] or dist.project_name
    return providers


@lru_cache(maxsize=1)
def registries() -> dict[str, Registry]:
    pm = plugin_manager()
    providers = _providers(pm)
    result: dict[str, Registry] = {}
    for hook_name, kind in KINDS.items():
        registry: Registry = Registry(kind)
        # Call each implementation separately so every item is attributed to its package.
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            provider = providers.get(id(impl.plugin), impl.plugin_name)

            def register(name: str, item: Any, description: str = "", _p=provider, _r=registry):
                _r.add(name, item, _p, description or describe(item))

            impl.function(register=register)
        result[kind] = registry
    return result


def registry(kind: str) -> Registry:
    return registries()[kind]


def reset() -> None:
    """Forget loaded plugins (tests register extra plugins then reset)."""
    plugin_manager.cache_clear()
    registries.cache_clear()


def load_dotted(path: str) -> Any:
    """Resolve 'package.module:attribute' (the quick-experiment escape hatch). This imports, i.e. runs, the
    user's module. The current directory is searched first, but only while that import runs: sys.path is
    restored exactly afterwards, so a stray `./pyarrow.py` cannot shadow a library imported later."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise RlgenError(f"'{path}' is not a 'module:function' path")
    import os
    import sys

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
