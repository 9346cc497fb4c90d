"""`rlgen eval --metric NAME[:k=v,...]` runs registered metrics (the metric contract) on the evaluated
samples: scored JSONL, stdin, or the samples a model evaluation draws; the API takes the same specs."""
from __future__ import annotations

import json

import pytest

import rlgen
from cli_helpers import rlgen as run

# Two prompts, three samples each: prompt a has 1 correct of 3, prompt b 2 of 3.
SAMPLES = [
    {"prompt": "a", "completion": "x y", "reward": 1.0},
    {"prompt": "a", "completion": "x z", "reward": 0.0},
    {"prompt": "a", "completion": "x y", "reward": 0.0},
    {"prompt": "b", "completion": "p q", "reward": 1.0},
    {"prompt": "b", "completion": "p q", "reward": 1.0},
    {"prompt": "b", "completion": "r", "reward": 0.0},
]


@pytest.fixture
def scored(tmp_path):
    path = tmp_path / "scored.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in SAMPLES))
    return path


def test_metrics_by_name_on_scored_samples(scored):
    code, out, err = run("eval", str(scored), "--metric", "pass@k:k=2", "--metric", "distinct-n:n=1", "--json")
    assert code == 0, err
    metrics = json.loads(out)["metrics"]
    # pass@2 = 1 - C(n-c, 2) / C(n, 2): a: 1 - C(2,2)/C(3,2) = 2/3, b: 1 - C(1,2)/C(3,2) = 1 -> mean 5/6
    assert metrics["pass@k:k=2"]["pass@2"] == pytest.approx(5 / 6)
    assert metrics["pass@k:k=2"]["num_problems"] == 2
    # words: x y x z x y p q p q r -> 11 tokens, 6 distinct (x, y, z, p, q, r)
    assert metrics["distinct-n:n=1"]["distinct-n"] == pytest.approx(6 / 11)


def test_metric_on_stdin_and_through_the_api(scored):
    code, out, err = run("eval", "-", "--metric", "pass@k:k=1", "--json", stdin=scored.read_text())
    assert code == 0, err
    assert json.loads(out)["metrics"]["pass@k:k=1"]["pass@1"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    result = rlgen.evaluate(SAMPLES, metrics=["pass@k:k=1"])
    assert result["metrics"] == json.loads(out)["metrics"]


def test_plugin_metric_by_name(scored):
    """The example plugin's metric runs through the same flag (CI installs plugins/rlgen-example)."""
    code, out, err = run("eval", str(scored), "--metric", "example-well-formed", "--json")
    assert code == 0, err
    assert "example-well-formed" in json.loads(out)["metrics"]


@pytest.mark.parametrize("spec, message", [
    ("nope", "unknown metric 'nope'"),
    ("distinct-n:zz=1", "metric 'distinct-n' has no option 'zz'"),
    ("hypervolume", "hypervolume"),  # needs points, not samples: refused in one line
])
def test_bad_metric_is_one_line_before_anything_runs(scored, spec, message):
    code, out, err = run("eval", str(scored), "--metric", spec)
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1


def test_metric_needs_samples(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    code, _, err = run("eval", str(run_dir), "--metric", "distinct-n")
    assert code == 2 and "--metric runs on samples" in err


def test_metric_on_a_model_evaluation():
    code, out, err = run("eval", "--model", "tiny-arith", "--task", "arithmetic", "--limit", "4", "--metric",
                         "accuracy:field=correct", "--json", "-q")
    assert code == 0, err
    result = json.loads(out)
    # the samples carry `correct`; the metric over the evaluated (greedy) samples agrees with eval's own accuracy
    assert result["metrics"]["accuracy:field=correct"]["accuracy"] == pytest.approx(result["accuracy"])
