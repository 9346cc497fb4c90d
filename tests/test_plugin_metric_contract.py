"""The metric contract (rlgen.evaluation.metric_contract): a registered metric maps scored samples to named
numbers; built-in building blocks are adapted where that makes sense. Values here are computed by hand."""
from __future__ import annotations

import math

import pytest

from rlgen import plugins
from rlgen.errors import RlgenError
from rlgen.evaluation.metric_contract import parse_metric, run_metric, samples_metric
from rlgen.hookspecs import hookimpl

# Two prompts with two completions each; `reward` is a 0/1 correctness, `reward_len` another column.
SAMPLES = [
    {"prompt": "a", "completion": "x y", "reward": 1.0, "reward_len": 3},
    {"prompt": "a", "completion": "x z", "reward": 0.0, "reward_len": 5},
    {"prompt": "b", "completion": "1", "reward": 1, "reward_len": None},
    {"prompt": "b", "completion": "2", "reward": None, "reward_len": 1.0},
]


def test_accuracy_and_reward_stats():
    assert run_metric("accuracy", SAMPLES) == {"accuracy": 2 / 3, "count": 3.0}  # None is left out
    stats = run_metric("reward-stats", SAMPLES, field="reward_len")  # 3, 5, 1
    assert stats == pytest.approx({"count": 3.0, "mean": 3.0, "std": math.sqrt(8 / 3), "min": 1.0, "max": 5.0})
    assert run_metric("reward-stats", [], field="reward") == {"count": 0.0}


def test_pass_at_k_groups_by_prompt():
    # a: 1 of 2 correct; b: 1 of 2 (None is not correct). pass@1 = c/n = 1/2 each.
    assert run_metric("pass@k", SAMPLES) == {"pass@1": 0.5, "num_problems": 2.0}
    # pass@2 with n = 2, c = 1: 1 - C(1, 2) / C(2, 2) = 1.
    assert run_metric("pass@k", SAMPLES, k=2) == {"pass@2": 1.0, "num_problems": 2.0}
    with pytest.raises(RlgenError, match="pass@3 needs at least 3 samples per problem, got 2"):
        run_metric("pass@k", SAMPLES, k=3)


def test_diversity_metrics_over_completions():
    # unigrams of all completions: x y x z 1 2 -> 5 distinct of 6
    assert run_metric("distinct-n", SAMPLES) == {"distinct-n": 5 / 6}
    # per prompt: a -> x y x z: 3/4; b -> 1 2: 2/2; mean 7/8
    assert run_metric("distinct-n", SAMPLES, by_prompt=True) == {"distinct-n": 7 / 8, "groups": 2.0}
    # bigrams: "x y", "x z" and none for the one-word texts (counted as one short gram each: 4 distinct / 4)
    assert run_metric("distinct-n", SAMPLES, n=2)["distinct-n"] == 1.0
    # Four texts without a shared word: n-gram vectors are orthogonal, K = I, Vendi = 4 ... except "x y" and
    # "x z" share no bigram either (n=2), so K = I still.
    assert run_metric("vendi", SAMPLES) == pytest.approx({"vendi": 4.0})
    # Identical texts: one effective sample.
    same = [{"prompt": "p", "completion": "a b c"}] * 3
    assert run_metric("vendi", same) == pytest.approx({"vendi": 1.0})
    assert run_metric("self-bleu", same, max_n=3) == pytest.approx({"self-bleu": 1.0})
    # with the default max_n = 4 a 3-word text has no 4-gram: nltk's method-1 epsilon 0.1 stands in for that
    # order's precision, the geometric mean of (1, 1, 1, 0.1)
    assert run_metric("self-bleu", same) == pytest.approx({"self-bleu": 0.1 ** 0.25})
    assert run_metric("ngram-overlap", same) == pytest.approx({"ngram-overlap": 1.0})
    # "a b" against "a c" (and back): unigram precision 1/2, no shared bigram
    pair = [{"prompt": "p", "completion": "a b"}, {"prompt": "p", "completion": "a c"}]
    assert run_metric("ngram-overlap", pair, max_n=1) == {"ngram-overlap": 0.5}
    assert run_metric("ngram-overlap", pair, max_n=2) == {"ngram-overlap": 0.0}


def test_building_blocks_are_refused_in_one_line():
    for name in ("pareto-front", "hypervolume", "kl-to-reference", "rm-pair-accuracy"):
        with pytest.raises(RlgenError, match=f"metric '{name}' is a building block") as info:
            samples_metric(name)
        assert "\n" not in str(info.value) and "accuracy" in str(info.value)
    with pytest.raises(RlgenError, match="unknown metric 'no-such'"):
        run_metric("no-such", SAMPLES)


def test_options_are_checked_against_the_signature():
    with pytest.raises(RlgenError, match="metric 'accuracy' has no option 'colum'.*field"):
        run_metric("accuracy", SAMPLES, colum="reward")
    assert parse_metric("pass@k:k=2,field=reward_len") == ("pass@k", {"k": 2, "field": "reward_len"})


class _PluginMetrics:
    @hookimpl
    def register_metrics(self, register):
        register("fixture-mean-length", lambda samples, **_: {"mean_length": sum(len(s["completion"]) for s in samples) / len(samples)})
        register("fixture-bad-output", lambda samples, **_: {"n": "three"})
        register("fixture-not-a-dict", lambda samples, **_: [1.0])


@pytest.fixture
def plugin_metrics():
    plugins.reset()
    plugins.plugin_manager().register(_PluginMetrics(), name="fixture-metrics")
    try:
        yield
    finally:
        plugins.reset()


def test_plugin_metric_is_used_as_it_is_and_its_output_checked(plugin_metrics):
    assert run_metric("fixture-mean-length", SAMPLES) == {"mean_length": (3 + 3 + 1 + 1) / 4}
    with pytest.raises(RlgenError, match="metric 'fixture-bad-output' returned 'three' for 'n'"):
        run_metric("fixture-bad-output", SAMPLES)
    with pytest.raises(RlgenError, match="metric 'fixture-not-a-dict' returned list"):
        run_metric("fixture-not-a-dict", SAMPLES)
