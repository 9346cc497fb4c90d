"""rlgen as a library: config precedence, training with callbacks, and the flows the commands run, whose
results equal the commands' output on the same input."""
from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import rlgen
from cli_helpers import rlgen as rlgen_cli
from rlgen.errors import RlgenError
from rlgen.events import Callback, Events, as_events

ROOT = Path(__file__).resolve().parent.parent


def as_output(records: list[dict]) -> list[dict]:
    """Records as a JSONL reader sees them (bookkeeping fields dropped, non-finite numbers null)."""
    from rlgen.data.records import dumps

    return [json.loads(dumps(r)) for r in records]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# --- events -----------------------------------------------------------------------------------------

class Recorder(Callback):
    def __init__(self):
        self.events: list[tuple] = []

    def on_log(self, message):
        self.events.append(("log", message))

    def on_progress_start(self, total, description, completed=0):
        self.events.append(("start", total, description, completed))

    def on_progress(self, metrics):
        self.events.append(("advance", metrics))

    def on_progress_end(self):
        self.events.append(("end",))

    def on_metrics(self, step, metrics):
        self.events.append(("metrics", step, metrics))

    def on_result(self, payload):
        self.events.append(("result", payload))


class MetricsOnly:
    """A callback that is not a Callback subclass and has one method: the others are not called."""

    def __init__(self):
        self.rows = []

    def on_metrics(self, step, metrics):
        self.rows.append((step, metrics))


def test_events_reach_every_callback_in_order_and_close_progress_on_error():
    recorder, partial = Recorder(), MetricsOnly()
    events = Events([recorder, partial])
    events.log("hello")
    with pytest.raises(ValueError):
        with events.progress(3, "loop", completed=1) as advance:
            advance({"loss": 1.0})
            advance()
            raise ValueError("stop")
    events.metrics(2, {"step": 2, "loss": 0.5})
    events.result({"done": True})
    assert recorder.events == [("log", "hello"), ("start", 3, "loop", 1), ("advance", {"loss": 1.0}), ("advance", None),
                               ("end",), ("metrics", 2, {"step": 2, "loss": 0.5}), ("result", {"done": True})]
    assert partial.rows == [(2, {"step": 2, "loss": 0.5})]
    assert as_events(None).callbacks == [] and as_events(events) is events
    assert as_events(recorder).callbacks == [recorder] and as_events([recorder, partial]).callbacks == [recorder, partial]


def test_import_rlgen_does_not_import_torch_and_exports_the_api():
    code = ("import sys, rlgen\n"
            "assert 'torch' not in sys.modules\n"
            "assert rlgen.Callback is rlgen.api.Callback and callable(rlgen.train) and callable(rlgen.load_config)\n"
            "assert 'torch' not in sys.modules\n"
            "print(sorted(n for n in ('train', 'sample', 'score', 'pairs', 'evaluate', 'merge', 'load_config') if n in dir(rlgen)))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['evaluate', 'load_config', 'merge', 'pairs', 'sample', 'score', 'train']"
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        rlgen.not_a_name  # noqa: B018


# --- load_config ------------------------------------------------------------------------------------

@pytest.fixture
def recommending_model(tiny_model_dir, tmp_path) -> Path:
    """The tiny model with its own recommended settings for the grpo family."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "rlgen_defaults.toml").write_text(
        "[grpo.optim]\nlr = 0.5\n[grpo.rollout]\nnum_generations = 3\nmax_new_tokens = 7\n[grpo.run]\nsteps = 11\n"
        "[grpo.algorithm]\nloss_type = 'grpo'\n")
    return model


def test_load_config_precedence(recommending_model, tmp_path):
    model = str(recommending_model)
    # the model's settings over the class defaults; dapo's preset (loss_type = "dapo") over the model's
    cfg = rlgen.load_config("dapo", model=model)
    assert (cfg.optim.lr, cfg.rollout.num_generations, cfg.rollout.max_new_tokens, cfg.run.steps) == (0.5, 3, 7, 11)
    assert cfg.algorithm.loss_type == "dapo"
    assert cfg.model.path == str(recommending_model.resolve())
    # a config file over both; keywords (dotted, section dicts, shorthands) over the file; sets over all
    config = tmp_path / "run.toml"
    config.write_text("[optim]\nlr = 0.25\n[rollout]\nnum_generations = 5\nmax_new_tokens = 6\n[algorithm]\nloss_type = 'bnpo'\n")
    cfg = rlgen.load_config("dapo", config, model=model, sets=["optim.lr=0.0625"], steps=4,
                            rollout={"max_new_tokens": 9}, **{"optim.lr": 0.125, "algorithm.loss_type": "dr_grpo"})
    assert (cfg.optim.lr, cfg.rollout.num_generations, cfg.rollout.max_new_tokens, cfg.run.steps) == (0.0625, 5, 9, 4)
    assert cfg.algorithm.loss_type == "dr_grpo"
    # a dict is the same as the file it mirrors
    as_dict = rlgen.load_config("dapo", {"optim": {"lr": 0.25}, "rollout": {"num_generations": 5, "max_new_tokens": 6},
                                         "algorithm": {"loss_type": "bnpo"}}, model=model)
    from_file = rlgen.load_config("dapo", config, model=model)
    assert as_dict == from_file and (from_file.optim.lr, from_file.algorithm.loss_type) == (0.25, "bnpo")
    # without the model's settings: the class defaults show through
    plain = rlgen.load_config("grpo", model=model, model_defaults=False)
    assert plain.rollout.max_new_tokens != 7 and plain.optim.lr != 0.5
    # reward strings become reward sections
    cfg = rlgen.load_config("grpo", model=model, reward=["exact-match", "length:-0.01"])
    assert [(r.name, r.weight) for r in cfg.rewards] == [("exact-match", 1.0), ("length", -0.01)]


def test_load_config_does_not_change_the_callers_dicts(recommending_model):
    section = {"max_new_tokens": 9}
    rlgen.load_config("grpo", model=str(recommending_model), rollout=section, **{"rollout.num_generations": 2})
    assert section == {"max_new_tokens": 9}


def test_load_config_errors_name_the_key(tmp_path):
    with pytest.raises(RlgenError, match="has no 'optimizer' settings"):
        rlgen.load_config("grpo", **{"optimizer.lr": 1.0})
    with pytest.raises(RlgenError, match="unknown config key 'optim.lrr'"):
        rlgen.load_config("grpo", sets=["optim.lrr=1"])
    with pytest.raises(RlgenError, match="cannot resume: .*config.toml not found"):
        rlgen.load_config("grpo", resume=tmp_path)
    with pytest.raises(RlgenError, match="config file not found"):
        rlgen.load_config("grpo", tmp_path / "missing.toml")
    with pytest.raises(RlgenError):
        rlgen.load_config("no-such-algorithm")


# --- train ------------------------------------------------------------------------------------------

TINY_GRPO = {"rollout": {"prompts_per_step": 2, "num_generations": 2, "max_new_tokens": 4},
             "run": {"eval_every": 0, "threads": 1}, "optim": {"lr": 1e-3}}


def test_train_returns_the_run_and_callbacks_see_every_step(tiny_model_dir, tmp_path):
    recorder, partial = Recorder(), MetricsOnly()
    out = tmp_path / "run"
    run = rlgen.train("grpo", TINY_GRPO, model=str(tiny_model_dir), task="arithmetic", reward=["length:0.1", "exact-match"],
                      steps=2, out=str(out), callbacks=[recorder, partial])
    assert isinstance(run, rlgen.Run)
    assert (run.out, run.final_model, run.last_step) == (out, out / "final", 2)
    assert (out / "final" / "model.safetensors").is_file()
    assert run.metrics == read_jsonl(out / "metrics.jsonl")
    assert [row["step"] for row in run.metrics] == [1, 2]
    seen = [(e[1], e[2]) for e in recorder.events if e[0] == "metrics"]
    assert [step for step, _ in seen] == [1, 2]
    assert [json.loads(json.dumps(row)) for _, row in seen] == run.metrics  # the rows written, as written
    assert partial.rows == seen
    kinds = [e[0] for e in recorder.events]
    start = kinds.index("start")
    assert recorder.events[start][1:] == (2, f"training ({out})", 0)
    assert kinds[start:].count("advance") == 2 and kinds.count("end") == 1
    assert recorder.events[-1] == ("result", run.summary())
    assert run.summary()["last_step"]["step"] == 2 and run.last_metrics == run.metrics[-1]
    assert run.config.run.steps == 2


def test_train_errors_raise_before_anything_is_written(tmp_path):
    with pytest.raises(RlgenError, match="has no 'optimizer' settings"):
        rlgen.train("grpo", out=str(tmp_path / "r"), **{"optimizer.lr": 1.0})
    assert not (tmp_path / "r").exists()


# --- sample / score / pairs / evaluate = the commands ------------------------------------------------

def test_text_flows_equal_the_commands(tiny_model_dir, tmp_path, one_torch_thread):
    model = str(tiny_model_dir)
    common = ["--task", "arithmetic", "--split", "train", "-n", "3", "--limit", "4", "--seed", "1",
              "--max-new-tokens", "4", "--quiet"]
    code, out, err = rlgen_cli("sample", "--model", model, *common, "--out", tmp_path / "samples.jsonl")
    assert code == 0, err
    samples = rlgen.sample(model, task="arithmetic", split="train", n=3, limit=4, seed=1, max_new_tokens=4)
    assert len(samples) == 12 and [s["sample_index"] for s in samples[:3]] == [0, 1, 2]
    assert as_output(samples) == read_jsonl(tmp_path / "samples.jsonl")

    rewards = ["exact-match", "length:-0.01"]
    code, out, err = rlgen_cli("score", tmp_path / "samples.jsonl", "-r", rewards[0], "-r", rewards[1],
                               "--out", tmp_path / "scored.jsonl")
    assert code == 0, err
    scored = rlgen.score(samples, rewards)
    assert as_output(scored) == read_jsonl(tmp_path / "scored.jsonl")
    assert as_output(rlgen.score(tmp_path / "samples.jsonl", rewards)) == as_output(scored)
    for record in scored:  # by hand: a random model never answers right, so reward = -0.01 * length
        assert record["reward_exact-match"] == 0.0
        assert record["reward"] == pytest.approx(-0.01 * record["reward_length"])

    code, out, err = rlgen_cli("pairs", tmp_path / "scored.jsonl", "--mode", "all", "--out", tmp_path / "pairs.jsonl", "--json")
    assert code == 0, err
    pairs = rlgen.pairs(scored, mode="all")
    assert as_output(pairs) == read_jsonl(tmp_path / "pairs.jsonl")
    assert json.loads(out) == rlgen.pair_stats(scored, pairs) == {"samples": 12, "groups": 4, "pairs": len(pairs)}
    assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)

    code, out, err = rlgen_cli("eval", tmp_path / "scored.jsonl", "--similarity", "ngram", "--json")
    assert code == 0, err
    summary = rlgen.evaluate(scored, similarity="ngram")
    assert json.loads(out) == json.loads(json.dumps(summary))
    assert summary["num_samples"] == 12 and summary["accuracy"] == 0.0

    code, out, err = rlgen_cli("eval", "--model", model, "--task", "arithmetic", "--limit", "3", "--max-new-tokens", "4",
                               "--json", "--quiet")
    assert code == 0, err
    result = rlgen.evaluate(model=model, task="arithmetic", limit=3, max_new_tokens=4)
    assert json.loads(out) == json.loads(json.dumps(result))
    assert (result["num_problems"], result["sampler"], result["task"]) == (3, "greedy", "arithmetic")


def test_prompts_as_strings_and_callbacks_of_sampling(tiny_model_dir, one_torch_thread):
    recorder = Recorder()
    samples = rlgen.sample(str(tiny_model_dir), ["1+1=", {"prompt": "2+2=", "answer": "4"}], n=2, max_new_tokens=3,
                           callbacks=recorder)
    assert [(s["prompt"], s["sample_index"]) for s in samples] == [("1+1=", 0), ("1+1=", 1), ("2+2=", 0), ("2+2=", 1)]
    assert samples[2]["answer"] == "4"
    assert recorder.events[0] == ("start", 2, "sampling", 0) and recorder.events[-1] == ("end",)


def test_run_directory_and_compare(tmp_path):
    for name, rewards in (("a", [0.1, 0.4]), ("b", [0.2, 0.3])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": i + 1, "reward": r}) + "\n" for i, r in enumerate(rewards)))
    result = rlgen.evaluate(str(tmp_path / "a"))
    assert (result["steps"], result["final"]) == (2, {"step": 2, "reward": 0.4})
    code, out, err = rlgen_cli("eval", tmp_path / "a", "--json")
    assert code == 0, err
    assert json.loads(out) == result
    compared = rlgen.evaluate(compare=[str(tmp_path / "a"), str(tmp_path / "b")])
    code, out, err = rlgen_cli("eval", "compare", tmp_path / "a", tmp_path / "b", "--json")
    assert code == 0, err
    assert json.loads(out) == json.loads(json.dumps(compared))


def test_image_samples_equal_the_command_and_stay_in_memory_without_a_place(tmp_path, one_torch_thread):
    args = dict(task="digits", limit=2, n=2, num_steps=2, seed=3)
    code, out, err = rlgen_cli("sample", "--model", "tiny-digits", "--task", "digits", "--limit", "2", "-n", "2",
                               "--num-steps", "2", "--seed", "3", "--out", tmp_path / "cli.jsonl", "--quiet")
    assert code == 0, err
    records = rlgen.sample("tiny-digits", out=str(tmp_path / "api.jsonl"), **args)
    cli = read_jsonl(tmp_path / "cli.jsonl")
    assert [r["image"] for r in cli] == [f"cli_images/{i:06d}.png" for i in range(4)]
    assert [r["image"] for r in records] == [f"api_images/{i:06d}.png" for i in range(4)]
    for ours, theirs in zip(records, cli):
        assert {k: v for k, v in ours.items() if k != "image"} == {k: v for k, v in theirs.items() if k != "image"}
        assert (tmp_path / ours["image"]).read_bytes() == (tmp_path / theirs["image"]).read_bytes()
    in_memory = rlgen.sample("tiny-digits", **args)
    assert len(in_memory) == 4 and all(hasattr(r["image"], "shape") for r in in_memory)  # tensors, no files
    scored = rlgen.score(in_memory, "digit-classifier")
    assert all(0.0 <= r["reward"] <= 1.0 for r in scored)


def test_merge_equals_the_command(tiny_model_dir, tmp_path):
    model = str(tiny_model_dir)
    summary = rlgen.merge([model, model], method="linear", weights=[0.25, 0.75], out=str(tmp_path / "api"))
    code, out, err = rlgen_cli("merge", model, model, "--method", "linear", "--weights", "0.25,0.75",
                               "--out", tmp_path / "cli", "--json", "--quiet")
    assert code == 0, err
    from_cli = json.loads(out)
    assert {k: summary[k] for k in ("method", "tensors", "shards", "bytes")} == {k: from_cli[k] for k in ("method", "tensors", "shards", "bytes")}
    assert (tmp_path / "api" / "model.safetensors").read_bytes() == (tmp_path / "cli" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("call, message", [
    (lambda: rlgen.sample("tiny-arith", ["1+1="], task="arithmetic"), "give either --task or --prompts"),
    (lambda: rlgen.sample("tiny-arith"), "no prompts"),
    (lambda: rlgen.sample("tiny-arith", [3]), r"prompts\[0\]"),
    (lambda: rlgen.score([{"prompt": "p", "completion": "c"}], []), "no reward given"),
    (lambda: rlgen.score([{"prompt": "p"}], "exact-match"), "records, line 1: missing field 'completion'"),
    (lambda: rlgen.pairs("missing.jsonl"), "missing.jsonl"),
    (lambda: rlgen.evaluate(), "nothing to evaluate"),
    (lambda: rlgen.evaluate([{"prompt": "p"}]), "records: no reward fields"),
    (lambda: rlgen.evaluate(ref="tiny-arith"), "needs --model"),
    (lambda: rlgen.merge(out="x"), "give the models to merge"),
    (lambda: rlgen.merge(["a", "b"], lora="adapter", out="x"), "exactly one MODEL"),
])
def test_bad_input_raises_rlgen_error(call, message):
    with pytest.raises(RlgenError, match=message):
        call()


# --- bench/ and recipes/ use only the public API -------------------------------------------------------

def public_names() -> set[str]:
    return set(rlgen.api.__all__) | {"__version__"}


def rlgen_uses(path: Path) -> list[str]:
    """Every use of an rlgen module or name in a script that is not a public one, as 'line: what'."""
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bad += [f"{node.lineno}: import {a.name}" for a in node.names
                    if a.name.startswith("rlgen.") and a.name != "rlgen.api"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "rlgen":
            if node.module not in ("rlgen", "rlgen.api"):
                bad.append(f"{node.lineno}: from {node.module} import ...")
            else:
                bad += [f"{node.lineno}: from {node.module} import {a.name}" for a in node.names if a.name not in public_names()]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "rlgen":
            if node.attr not in public_names() | {"api"}:
                bad.append(f"{node.lineno}: rlgen.{node.attr}")
    return bad


def scripts() -> list[Path]:
    return sorted([*(ROOT / "bench").glob("*.py"), *(ROOT / "recipes").rglob("*.py")])


def test_bench_and_recipes_use_only_public_rlgen_names():
    assert len(scripts()) >= 10
    found = {str(p.relative_to(ROOT)): rlgen_uses(p) for p in scripts()}
    assert {name: uses for name, uses in found.items() if uses} == {}
    for path in scripts():
        assert "rlgen.cli" not in path.read_text(), path


def test_the_public_names_check_can_fail(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("import rlgen\nfrom rlgen.cli.train import build_config\nfrom rlgen import kernels, registry\n"
                      "from rlgen.api import load_config\nrlgen.plugins.registry('task')\nrlgen.train('grpo')\n")
    assert rlgen_uses(script) == ["2: from rlgen.cli.train import ...", "3: from rlgen import registry", "5: rlgen.plugins"]
