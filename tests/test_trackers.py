"""Experiment tracking (`run.report_to`, `run.log_completions_every`): what each tracker writes, read back with
its own library; completions.jsonl and its resume truncation; the one-line errors; trackers stay unimported
when not asked for."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import rlgen, rlgen_ok
from rlgen.training.trackers import environ, numeric_metrics, prompt_as_text

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--model", "tiny-arith", "--task", "arithmetic", "--set", "rollout.prompts_per_step=2",
        "--set", "rollout.num_generations=2", "--set", "rollout.max_new_tokens=4", "--set", "run.eval_every=0",
        "--set", "run.threads=1", "--quiet"]
TRACKER_MODULES = ("tensorboard", "wandb", "mlflow", "trackio")


def report_to(*names: str) -> list[str]:
    return ["--set", "run.report_to=" + json.dumps(list(names))]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def numeric_rows(run: Path) -> dict[int, dict[str, float]]:
    return {row["step"]: numeric_metrics(row) for row in jsonl(run / "metrics.jsonl")}


@pytest.mark.slow
def test_tensorboard_events_hold_the_metrics_jsonl_values(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    rlgen_ok("train", "grpo", *TINY, "--steps", 3, "--out", run, *report_to("tensorboard"), cwd=tmp_path)
    (events,) = (run / "tracking" / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    expected = numeric_rows(run)
    keys = {key for row in expected.values() for key in row}
    assert {"loss", "reward", "lr", "grad_norm"} <= keys
    assert set(acc.Tags()["scalars"]) == keys
    for key in keys:
        logged = {event.step: event.value for event in acc.Scalars(key)}
        want = {step: row[key] for step, row in expected.items() if key in row}
        assert logged.keys() == want.keys(), key
        for step, value in want.items():
            assert logged[step] == pytest.approx(value, rel=1e-6, abs=1e-7), (key, step)
    assert "config/text_summary" in acc.Tags()["tensors"]  # the resolved config, as text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing written outside the run directory


@pytest.mark.slow
def test_mlflow_and_wandb_runs_are_created_in_the_run_directory(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    wandb = pytest.importorskip("wandb")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # wandb and mlflow would otherwise keep caches and settings there
    run = tmp_path / "run"
    before = {key: value for key, value in __import__("os").environ.items() if key.startswith(("WANDB_", "MLFLOW_"))}
    rlgen_ok("train", "grpo", *TINY, "--steps", 2, "--out", run, *report_to("mlflow", "wandb"),
             "--set", "run.log_completions_every=2", cwd=tmp_path)
    after = {key: value for key, value in __import__("os").environ.items() if key.startswith(("WANDB_", "MLFLOW_"))}
    assert after == before  # environment variables set for the trackers are restored
    expected = numeric_rows(run)

    # MLflow: a finished run in the file store, every metric at its step, the config as parameters
    from mlflow.tracking import MlflowClient

    with environ(MLFLOW_ALLOW_FILE_STORE="true"):
        client = MlflowClient(tracking_uri=(run / "tracking" / "mlflow").resolve().as_uri())
        experiment = client.get_experiment_by_name("rlgen")
        (found,) = client.search_runs([experiment.experiment_id])
        assert found.info.status == "FINISHED"
        assert found.data.params["run.steps"] == "2"
        for key in ("loss", "reward", "lr"):
            history = {m.step: m.value for m in client.get_metric_history(found.info.run_id, key)}
            assert history == pytest.approx({step: row[key] for step, row in expected.items()}), key
        artifacts = [a.path for a in client.list_artifacts(found.info.run_id, "completions")]
        assert artifacts == ["completions/step-0000002.jsonl"]

    # W&B: an offline run directory with its run file and the completions table
    (offline,) = (run / "tracking" / "wandb" / "wandb").glob("offline-run-*")
    (record,) = offline.glob("run-*.wandb")
    assert record.stat().st_size > 0 and b"loss" in record.read_bytes()
    (table,) = offline.glob("files/media/table/completions_*.table.json")
    content = json.loads(table.read_text())
    assert content["columns"][:3] == ["step", "prompt", "completion"] and len(content["data"]) == 4
    assert wandb.run is None  # finished
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "run"]
    assert not any(home.rglob("*"))  # nothing under the home directory either


@pytest.mark.slow
def test_completions_jsonl_rows_and_resume_truncation(tmp_path):
    run = tmp_path / "run"
    rlgen_ok("train", "grpo", *TINY, "--steps", 4, "--out", run, "--set", "run.save_every=2",
             "--set", "run.log_completions_every=1", *report_to("example-jsonl"), cwd=tmp_path)
    rows = jsonl(run / "completions.jsonl")
    assert [row["step"] for row in rows] == [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4
    for row in rows:
        assert set(row) == {"step", "prompt", "completion", "reward", "reward_exact-match"}
        assert isinstance(row["prompt"], str) and isinstance(row["completion"], str)
        assert row["reward"] == row["reward_exact-match"] in (0.0, 1.0)
    logged = jsonl(run / "tracking" / "example-jsonl" / "log.jsonl")  # a plugin's tracker: same rows, same metrics
    assert [entry["step"] for entry in logged if "table" in entry] == [1, 2, 3, 4]
    assert logged[-1] == {"closed": "finished"}
    assert logged[0]["config"]["run"]["log_completions_every"] == 1
    # a run killed after step 4 (before its final model): resumed from step-2, the rows of steps 3 and 4 are
    # written again, once
    shutil.rmtree(run / "final")
    first = rows
    rlgen_ok("train", "grpo", "--resume", run, "--quiet", cwd=tmp_path)
    rows = jsonl(run / "completions.jsonl")
    assert [row["step"] for row in rows] == [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4
    assert rows == first  # the same seeded completions
    assert [row["step"] for row in jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4]


@pytest.mark.slow
def test_online_dpo_logs_completions_every_n_steps(tmp_path):
    run = tmp_path / "run"
    rlgen_ok("train", "online-dpo", *TINY, "--steps", 2, "--out", run, "--set", "run.log_completions_every=2",
             cwd=tmp_path)
    rows = jsonl(run / "completions.jsonl")
    assert [row["step"] for row in rows] == [2] * 4
    assert {"prompt", "completion", "reward", "reward_exact-match"} <= set(rows[0])


def test_unknown_tracker_is_one_line_listing_the_known_ones(tmp_path):
    result = rlgen("train", "grpo", *TINY, "--steps", 1, "--out", tmp_path / "run", *report_to("tensorbord"),
                   cwd=tmp_path)
    assert result.code == 2
    (line,) = result.err.strip().splitlines()
    assert "run.report_to[0]" in line and "unknown tracker 'tensorbord'" in line
    assert "mlflow, tensorboard, trackio, wandb" in line
    assert not (tmp_path / "run").exists()


def test_missing_tracker_package_is_one_line_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` raises ImportError
    monkeypatch.setattr("rlgen.training.trainer.load_policy", lambda *a, **k: pytest.fail("the model loaded"))
    result = rlgen("train", "grpo", *TINY, "--steps", 1, "--out", tmp_path / "run", *report_to("tensorboard"),
                   cwd=tmp_path)
    assert result.code == 2
    (line,) = result.err.strip().splitlines()
    assert "tracker 'tensorboard'" in line and 'pip install "rlgen[tensorboard]"' in line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_trackers_are_not_imported_when_not_asked_for(tmp_path):
    script = ("import sys\nfrom rlgen.cli.app import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as exc:\n"
              "    assert not exc.code, exc.code\n"
              f"print([m for m in {TRACKER_MODULES!r} if m in sys.modules])\n")
    proc = subprocess.run([sys.executable, "-c", script, "train", "grpo", *TINY, "--steps", "1", "--out",
                           str(tmp_path / "run"), "--set", "run.log_completions_every=1"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_prompts_as_tracker_text_and_numeric_values():
    assert prompt_as_text("1+1=") == "1+1="
    assert prompt_as_text([{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1="}]) == \
        "system: be brief\nuser: 1+1="
    assert numeric_metrics({"step": 3, "loss": 0.5, "n": 2, "flag": True, "none": None, "text": "x"}) == \
        {"loss": 0.5, "n": 2.0}


def test_a_tracker_without_the_methods_is_rejected():
    from rlgen import plugins
    from rlgen.hookspecs import hookimpl

    class Broken:
        def log(self, step, metrics):
            pass

    class Plugin:
        @hookimpl
        def register_trackers(self, register):
            register("test-broken-tracker", Broken)

    plugins.reset()
    plugins.plugin_manager().register(Plugin(), name="test-broken-tracker-plugin")
    try:
        assert "test-broken-tracker" not in plugins.registry("tracker")
        (rejected,) = [r for r in plugins.rejected() if r.kind == "tracker"]
        assert "log_table" in rejected.problem and "close" in rejected.problem
    finally:
        plugins.reset()
