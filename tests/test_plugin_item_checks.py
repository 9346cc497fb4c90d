"""A plugin item without the shape of its kind's contract (an int as an algorithm, a string as a task, None as a
sampler ...) is dropped when the registries are built: one warning line naming the plugin's package, the kind,
the name and what is wrong; the plugin's other items keep working and `rlgen plugins` lists the dropped one.
A metric that raises while it runs is one error line naming it, not an internal error."""
from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass

import pytest

from cli_helpers import rlgen
from rlgen import plugins
from rlgen.algorithms.base import Algorithm
from rlgen.errors import RlgenError
from rlgen.evaluation.metric_contract import run_metric
from rlgen.hookspecs import hookimpl

PACKAGE = "junk-plugin"


def _always_half(samples, **_):
    return [0.5] * len(samples)


class _Forwarding:
    """Forwards every attribute elsewhere (like the example plugin's backbone alias): accepted unseen."""

    def __getattr__(self, attribute):
        raise AttributeError(attribute)


@dataclass
class _Config:
    lr: float = 0.1


class _Trainer:
    pass


# kind -> (hook, the bad item, the expected problem)
BAD_ITEMS = {
    "algorithm": ("register_algorithms", 42,
                  "got int 42, expected an rlgen.algorithms.base.Algorithm: missing or wrong name (a string), "
                  "config_cls (a dataclass), trainer_cls (a class), defaults (a dict), family (a string)"),
    "task": ("register_tasks", "arithmetic-ish",
             "got str 'arithmetic-ish', expected an rlgen.data.tasks.Task: missing or wrong default_rewards "
             "(a list of reward names)"),
    "sampler": ("register_samplers", None, "got NoneType None, expected a callable"),
    "reward": ("register_rewards", 3.5, "got float 3.5, expected a callable"),
    "metric": ("register_metrics", {"accuracy": 1.0}, "got dict {'accuracy': 1.0}, expected a callable"),
    "image-sampler": ("register_image_samplers", "plain", "got str 'plain', expected a callable"),
    "model": ("register_models", 7, "got int 7, expected a directory (str or Path)"),
    "merger": ("register_mergers", _always_half,
               "expected an rlgen.merging.methods.MergeMethod: missing or wrong fn (a method), needs_base (true or "
               "false), model_params (a dict), global_params (a dict), min_models (an integer >= 1), max_models "
               "(None or an integer >= 1)"),
    "backbone": ("register_backbones", object(),
                 "expected an rlgen.models.backbone.Backbone: missing or wrong name (a string), claims (a method), "
                 "resolve (a method), load (a method), save (a method), reference_policy (a method), "
                 "rollout_engine (a method), sequence_logprobs (a method)"),
}


def _plugin_with(hook_name: str, item):
    """A plugin registering `item` as 'junk' through `hook_name`, and a good reward 'fine-half'."""

    class Plugin:
        @hookimpl
        def register_rewards(self, register):
            register("fine-half", _always_half)

    def register_junk(self, register):
        register("junk", item)

    if hook_name == "register_rewards":
        def register_both(self, register):
            register("fine-half", _always_half)
            register("junk", item)
        Plugin.register_rewards = hookimpl(register_both)
    else:
        setattr(Plugin, hook_name, hookimpl(register_junk))
    return Plugin()


@pytest.fixture
def junk_plugin():
    """Register a plugin (by hook name and item) in-process; forgotten afterwards."""
    plugins.reset()

    def register(hook_name: str, item):
        plugins.plugin_manager().register(_plugin_with(hook_name, item), name=PACKAGE)

    try:
        yield register
    finally:
        plugins.reset()


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("rlgen: warning:")]


@pytest.mark.parametrize("kind", sorted(BAD_ITEMS))
def test_bad_item_is_dropped_with_one_warning_and_the_rest_works(kind, junk_plugin, capsys):
    hook_name, item, problem = BAD_ITEMS[kind]
    junk_plugin(hook_name, item)

    registry = plugins.registry(kind)
    assert "junk" not in registry
    message = f"{kind} 'junk' registered by package '{PACKAGE}' is dropped: "
    (warning,) = _warnings(capsys.readouterr().err)
    assert warning.startswith(f"rlgen: warning: {message}") and warning.endswith(problem)
    assert plugins.rejected() == [plugins.Rejected(kind, "junk", PACKAGE, warning[len("rlgen: warning: ") + len(message):])]
    # The plugin is not broken: its good item is there and works.
    assert [info.status for info in plugins.plugin_infos() if info.name == PACKAGE] == ["ok"]
    assert plugins.registry("reward").get("fine-half")([{}, {}]) == [0.5, 0.5]
    plugins.registries()
    assert _warnings(capsys.readouterr().err) == []  # once per process

    code, out, err = rlgen("plugins", "--json")
    assert code == 0, err
    rows = [row for row in json.loads(out)[kind] if row["name"] == "junk"]
    assert [(row["provider"], row["status"]) for row in rows] == [(PACKAGE, "dropped")]
    assert rows[0]["description"].startswith("dropped: ") and rows[0]["description"].endswith(problem)


def test_a_good_item_of_a_later_plugin_keeps_the_name_a_rejected_one_wanted(junk_plugin):
    junk_plugin("register_rewards", 3.5)

    class Later:
        @hookimpl
        def register_rewards(self, register):
            register("junk", _always_half)

    plugins.plugin_manager().register(Later(), name="later-plugin")
    assert plugins.registry("reward").entry("junk").provider == "later-plugin"


def test_shapes_that_pass():
    assert plugins.item_problem("algorithm", Algorithm("x", _Config, _Trainer)) is None
    assert plugins.item_problem("backbone", _Forwarding()) is None  # only running it could tell
    assert plugins.item_problem("model", "some/dir") is None
    assert plugins.item_problem("reward", _always_half) is None


def test_wrong_attribute_of_an_algorithm_is_named():
    not_a_dataclass = Algorithm("x", _Trainer, _Trainer)
    assert plugins.item_problem("algorithm", not_a_dataclass).endswith("missing or wrong config_cls (a dataclass)")
    no_defaults = Algorithm("x", _Config, _Trainer, defaults=[1])
    assert plugins.item_problem("algorithm", no_defaults).endswith("missing or wrong defaults (a dict)")


def test_a_builtin_breaking_its_contract_is_a_bug(monkeypatch):
    fake_builtin = types.ModuleType("rlgen_fake_builtin")

    @hookimpl
    def register_samplers(register):
        register("broken-builtin", None)

    fake_builtin.register_samplers = register_samplers
    monkeypatch.setitem(sys.modules, "rlgen_fake_builtin", fake_builtin)
    monkeypatch.setattr(plugins, "DEFAULT_PLUGINS", (*plugins.DEFAULT_PLUGINS, "rlgen_fake_builtin"))
    plugins.reset()
    try:
        with pytest.raises(TypeError, match="built-in sampler 'broken-builtin' breaks its contract: got NoneType None"):
            plugins.registries()
    finally:
        plugins.reset()


# --- the CLI paths that used to end in "internal error" ---------------------------------------------


def _assert_one_error(result, expected: str) -> None:
    code, _, err = result
    assert code == 2, err
    assert "internal error" not in err
    errors = [line for line in err.splitlines() if line.startswith("rlgen: error:")]
    assert len(errors) == 1 and expected in errors[0], err


@pytest.mark.parametrize("command", [("train", "junk"), ("config", "show", "junk")])
def test_junk_algorithm_is_unknown(command, junk_plugin):
    junk_plugin("register_algorithms", 42)
    _assert_one_error(rlgen(*command), "unknown algorithm 'junk'")


def test_junk_task_and_sampler_are_unknown(junk_plugin):
    junk_plugin("register_tasks", "arithmetic-ish")
    _assert_one_error(rlgen("sample", "--model", "tiny-arith", "--task", "junk", "--limit", "1"), "unknown task 'junk'")
    plugins.reset()
    junk_plugin("register_samplers", None)
    _assert_one_error(rlgen("sample", "--model", "tiny-arith", "--task", "arithmetic", "--limit", "1",
                            "--sampler", "junk"), "unknown sampler 'junk'")


def test_junk_backbone_does_not_break_directories_no_backbone_claims(junk_plugin, tmp_path):
    junk_plugin("register_backbones", object())
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_one_error(rlgen("sample", "--model", str(empty), "--task", "arithmetic", "--limit", "1"), str(empty))


# --- metrics that fail while running ----------------------------------------------------------------

SAMPLES = [{"prompt": "a", "completion": "x y", "reward": 1.0}, {"prompt": "a", "completion": "x z", "reward": 0.0}]


@pytest.fixture
def scored(tmp_path):
    path = tmp_path / "scored.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in SAMPLES))
    return path


class _RaisingMetric:
    @hookimpl
    def register_metrics(self, register):
        register("raises", lambda samples, **_: {"x": 1 / 0})
        register("raises-rlgen-error", self.rlgen_error)

    @staticmethod
    def rlgen_error(samples, **_):
        raise RlgenError("samples, record 2: no field 'answer'")


@pytest.fixture
def raising_metric():
    plugins.reset()
    plugins.plugin_manager().register(_RaisingMetric(), name="raising-metric")
    try:
        yield
    finally:
        plugins.reset()


def test_metric_that_raises_is_one_line_naming_it(raising_metric, scored):
    _assert_one_error(rlgen("eval", str(scored), "--metric", "raises"),
                      "metric 'raises' failed: ZeroDivisionError: division by zero")
    with pytest.raises(RlgenError, match=r"^samples, record 2: no field 'answer'$"):  # already one line: unchanged
        run_metric("raises-rlgen-error", SAMPLES)


@pytest.mark.parametrize("spec, expected", [
    ("distinct-n:n=-1", "option 'n' of metric 'distinct-n' must be an integer >= 1, got -1"),
    ("self-bleu:max_n=0", "option 'max_n' of metric 'self-bleu' must be an integer >= 1, got 0"),
    ("pass@k:k=0", "option 'k' of metric 'pass@k' must be an integer >= 1, got 0"),
    ("distinct-n:unit='token'", "option 'unit' of metric 'distinct-n' must be one of word, char, got 'token'"),
    ("vendi:q=-1", "metric 'vendi' failed: ValueError: the order q of the Vendi score must be >= 0 (or inf), got -1.0"),
])
def test_bad_option_values_of_builtin_metrics(spec, expected, scored):
    _assert_one_error(rlgen("eval", str(scored), "--metric", spec), expected)
