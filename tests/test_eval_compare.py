"""`rlgen eval compare RUN_A RUN_B ...`: the final-metrics table (JSON) and one PNG per metric, on hand-made
run directories and on one real tiny `rlgen train grpo` run; errors name the path (exit 2); and
`rlgen eval samples.jsonl` reports diversity."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_helpers import rlgen, rlgen_process
from rlgen.evaluation.compare import algorithm_label, compare_runs, plot_file_names

PNG = b"\x89PNG\r\n\x1a\n"

GRPO_CONFIG = """\
[model]
path = "/models/tiny-arith"

[algorithm]
advantage = "rloo"
loss_type = "dapo"
beta = 0.0
"""

DPO_CONFIG = """\
[model]
path = "tiny-arith"

[algorithm]
loss_type = "sigmoid"
beta = 0.1
"""


def write_run(root: Path, rows: list[dict], config: str | None = None) -> Path:
    root.mkdir(parents=True)
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if config is not None:
        (root / "config.toml").write_text(config)
    return root


@pytest.fixture()
def hand_runs(tmp_path):
    a = write_run(tmp_path / "runs" / "grpo", [
        {"step": 0, "eval/accuracy": 0.5},
        {"step": 1, "reward": 0.25, "loss": 0.1, "step_time": 0.5},
        {"step": 2, "reward": 0.5, "loss": 0.05, "step_time": 0.25, "eval/accuracy": 0.75},
        {"step": 3, "reward": 0.75, "loss": 0.02, "step_time": 0.25, "eval/accuracy": 0.625},
    ], GRPO_CONFIG)
    b = write_run(tmp_path / "runs" / "dpo", [
        {"step": 1, "loss": 0.7, "step_time": 1.0, "rewards/accuracies": 0.5, "wall_time": 3.0},
        {"step": 2, "loss": 0.6, "step_time": 1.0, "eval/accuracy": 0.8, "eval/reward": -0.5, "wall_time": 5.5,
         "note": "not a number"},
    ], DPO_CONFIG)
    return a, b


def test_compare_table_and_plots(hand_runs, tmp_path):
    a, b = hand_runs
    result = compare_runs([a, b], plot_dir=tmp_path / "plots")
    first, second = result["runs"]
    assert first == {
        "name": "grpo", "path": str(a), "algorithm": "rloo/dapo", "model": "/models/tiny-arith", "steps": 3,
        "eval/accuracy_last": 0.625, "eval/accuracy_best": 0.75, "eval/accuracy_best_step": 2,
        "reward_last": 0.75, "train_time_s": 1.0,
    }
    assert second["algorithm"] == "preference/sigmoid" and second["model"] == "tiny-arith" and second["steps"] == 2
    assert second["eval/accuracy_last"] == second["eval/accuracy_best"] == 0.8
    assert second["eval/reward_last"] == -0.5 and second["eval/reward_best_step"] == 2
    assert second["wall_time_s"] == 5.5 and second["train_time_s"] == 2.0
    assert "reward_last" not in second
    # every numeric key of either run gets a plot; strings and `step` do not
    assert set(result["metrics"]) == {"eval/accuracy", "reward", "loss", "step_time", "rewards/accuracies", "eval/reward",
                                      "wall_time"}
    assert set(result["plots"]) == set(result["metrics"])
    for key, path in result["plots"].items():
        assert Path(path).parent == tmp_path / "plots"
        assert Path(path).read_bytes().startswith(PNG), key
    assert Path(result["plots"]["eval/accuracy"]).name == "eval_accuracy.png"
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(Path(p).name for p in result["plots"].values())


def test_names_algorithm_labels_and_file_names(tmp_path):
    a = write_run(tmp_path / "x" / "run", [{"step": 1, "reward": 1.0}])
    b = write_run(tmp_path / "y" / "run", [{"step": 1, "reward": 0.0}])
    result = compare_runs([a, b])
    assert [r["name"] for r in result["runs"]] == [str(a), str(b)]  # same directory names: the paths
    assert result["runs"][0]["algorithm"] is None and "plots" not in result
    assert algorithm_label({"sft": {}, "model": {}}) == "sft"
    assert algorithm_label({"algorithm": {"desirable_weight": 1.0, "loss_type": "kto"}}) == "kto"
    assert algorithm_label({"algorithm": {"head": "auto", "center_rewards_coefficient": 0.0}}) == "rm"
    assert algorithm_label({"algorithm": {"name": "my-algo", "loss_type": "x"}}) == "my-algo"
    assert plot_file_names(["a/b", "a_b", "A/B", "éval"]) == {"a/b": "a_b.png", "a_b": "a_b-2.png", "A/B": "A_B-3.png",
                                                              "éval": "val.png"}


def test_cli_compare_json(hand_runs, tmp_path):
    a, b = hand_runs
    code, stdout, _ = rlgen("eval", "compare", a, b, "--plot-dir", tmp_path / "p", "--json")
    assert code == 0
    result = json.loads(stdout)
    assert [r["name"] for r in result["runs"]] == ["grpo", "dpo"]
    assert all(Path(p).is_file() for p in result["plots"].values())


@pytest.mark.parametrize("make, expect", [
    (lambda root: root / "missing", "missing: no such run directory"),
    (lambda root: (root / "empty-dir").mkdir() or root / "empty-dir", "metrics.jsonl"),
    (lambda root: write_run(root / "bad", []) and (root / "bad" / "metrics.jsonl").write_text("{\n") and root / "bad",
     "line 1"),
])
def test_cli_compare_errors_name_the_path(hand_runs, tmp_path, make, expect):
    bad = make(tmp_path)
    code, stdout, err = rlgen("eval", "compare", hand_runs[0], bad, "--plot-dir", tmp_path / "never", "--json")
    assert code == 2 and stdout == ""
    assert err.startswith("rlgen: error: ") and str(bad) in err and expect in err
    assert not (tmp_path / "never").exists()  # nothing written before every run was read


def test_cli_misuse(hand_runs, tmp_path):
    a, b = hand_runs
    code, _, err = rlgen("eval", a, b)
    assert code == 2 and "eval compare" in err
    code, _, err = rlgen("eval", "compare")
    assert code == 2 and "at least one run" in err
    code, _, err = rlgen("eval", a, "--plot-dir", tmp_path / "p")
    assert code == 2 and "--plot-dir" in err
    # one run directory: the existing summary
    code, stdout, _ = rlgen("eval", a, "--json", "--plot", tmp_path / "one.png")
    summary = json.loads(stdout)
    assert code == 0 and summary["steps"] == 3 and summary["eval_accuracy_last"] == 0.625
    assert (tmp_path / "one.png").read_bytes().startswith(PNG)


def test_cli_eval_samples_reports_diversity(tmp_path):
    samples = tmp_path / "samples.jsonl"
    rows = [{"prompt": "p1", "completion": "the cat sat"}, {"prompt": "p1", "completion": "the cat sat"},
            {"prompt": "p2", "completion": "a b", "reward": 1.0}, {"prompt": "p2", "completion": "c d", "reward": 0.0}]
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, stdout, _ = rlgen("eval", samples, "--similarity", "ngram", "--json")
    result = json.loads(stdout)
    assert code == 0 and result["num_samples"] == 4 and result["reward"]["count"] == 2
    d = result["diversity"]
    assert d["similarity"] == "ngram" and d["groups"] == 2
    assert d["distinct-1"] == pytest.approx((3 / 6 + 4 / 4) / 2)
    assert d["vendi"] == pytest.approx((1 + 2) / 2)
    assert d["self-bleu"] == pytest.approx((0.1 ** 0.25 + 0) / 2)  # Texygen: no 4-gram in "the cat sat" -> 0.1
    assert d["ngram-overlap"] == pytest.approx((1 + 0) / 2)


@pytest.mark.slow  # a real training run in a fresh interpreter
def test_real_tiny_run_against_a_hand_made_one(hand_runs, tmp_path):
    """One real `rlgen train grpo` run (2 steps of tiny-arith, held-out accuracy on 4 problems) compared with a
    hand-made run, end to end through the CLI."""
    real = tmp_path / "real"
    rlgen_process("train", "grpo", "--model", "tiny-arith", "--task", "arithmetic", "--out", real,
                  "--steps", 2, "--set", "rollout.prompts_per_step=2", "--set", "rollout.num_generations=2",
                  "--set", "rollout.max_new_tokens=5", "--set", "run.eval_every=1", "--set", "data.eval_samples=4",
                  "--set", "run.threads=1", "--quiet", check=True)
    code, stdout, _ = rlgen("eval", "compare", real, hand_runs[0], "--plot-dir", tmp_path / "plots", "--json")
    assert code == 0
    result = json.loads(stdout)
    summary = result["runs"][0]
    assert summary["name"] == "real" and summary["steps"] == 2 and summary["algorithm"] == "grpo/dapo"
    assert summary["model"] == "tiny-arith"
    assert 0.0 <= summary["eval/accuracy_last"] <= 1.0 and summary["eval/accuracy_best"] >= summary["eval/accuracy_last"]
    assert "reward_last" in summary and summary["train_time_s"] > 0
    for key in ("eval/accuracy", "reward", "loss", "entropy", "grad_norm"):
        assert Path(result["plots"][key]).read_bytes().startswith(PNG)
    assert not [p for p in (tmp_path / "plots").iterdir() if p.name.startswith(".")]  # no temporary files left
