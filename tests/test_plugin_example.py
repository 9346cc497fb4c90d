"""Every item of the example plugin (plugins/rlgen-example, installed by the test install and CI) used by
its name through the CLI, on tiny sizes: the plugin contracts as a third-party author relies on them."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_helpers import rlgen_ok
from rlgen import plugins
from rlgen.evaluation.metric_contract import run_metric

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_GRPO = ["--set", "rollout.prompts_per_step=2", "--set", "rollout.num_generations=2",
             "--set", "rollout.max_new_tokens=4", "--set", "run.eval_every=0", "--set", "run.threads=1", "--quiet"]


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def metrics_of(run: Path) -> list[dict]:
    return jsonl((run / "metrics.jsonl").read_text())


def test_every_hook_kind_is_registered_by_the_example_plugin():
    provided = {kind for kind, registry in plugins.registries().items()
                if any(entry.provider == "rlgen-example" for entry in registry)}
    assert provided == set(plugins.KINDS.values())
    commands = json.loads(rlgen_ok("plugins", "--json").out)["command"]
    assert {"name": "example-hello", "provider": "rlgen-example", "status": "ok"}.items() <= \
        next(c for c in commands if c["name"] == "example-hello").items()


# --- algorithm, policy loss, preference loss ---------------------------------------------------------


@pytest.mark.slow
def test_train_example_grpo_preset(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    rlgen_ok("train", "example-grpo", "--model", tiny_model_dir, "--task", "arithmetic", "--steps", 1,
             "--out", run, *TINY_GRPO, cwd=tmp_path)
    assert len(metrics_of(run)) == 1
    config = (run / "config.toml").read_text()
    assert 'advantage = "rank"' in config  # the preset's default reached the trainer


@pytest.mark.slow
def test_policy_loss_by_name(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    rlgen_ok("train", "grpo", "--model", tiny_model_dir, "--task", "arithmetic", "--steps", 1, "--out", run,
             "--set", "algorithm.loss_type=example-unclipped", *TINY_GRPO, cwd=tmp_path)
    (row,) = metrics_of(run)
    # The loss's own statistic is logged: on the first (on-policy) iteration every ratio is exactly 1.
    assert row["example/ratio_mean"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_preference_loss_by_name(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"{a:03d}+{b:03d}=", "chosen": str(a + b), "rejected": str(a + b + 10)})
                             + "\n" for a, b in [(12, 34), (250, 250), (901, 87), (66, 77)]))
    run = tmp_path / "run"
    rlgen_ok("train", "dpo", "--model", "tiny-arith", "--data", pairs, "--out", run, "--steps", 1,
             "--set", "algorithm.loss_type=example-ref-free", "--set", "algorithm.batch_size=4",
             "--set", "run.eval_every=0", "--set", "run.threads=1", "--quiet", cwd=tmp_path)
    (row,) = metrics_of(run)
    # Reference-free: the implicit rewards are beta x the policy's own log-probs, not 0 as sigmoid DPO's
    # are at step 1 (policy == reference); both summed log-probs are negative.
    assert row["rewards/chosen"] < 0 and row["rewards/rejected"] < 0
    assert row["loss"] > 0 and math.isfinite(row["loss"])


# --- sampler, combiner, shaping, merger ------------------------------------------------------------


def test_sampler_by_name_with_factor_zero_is_greedy():
    args = ["sample", "--model", "tiny-arith", "--task", "arithmetic", "--limit", 3, "--max-new-tokens", 6, "--quiet"]
    cooled = jsonl(rlgen_ok(*args, "--sampler", "example-cooled", "--sampler-opt", "factor=0", "--temperature", 1.0).out)
    greedy = jsonl(rlgen_ok(*args, "--temperature", 0).out)
    assert len(cooled) == 3
    assert [r["completion"] for r in cooled] == [r["completion"] for r in greedy]


def test_combiner_and_shaping_by_name():
    records = [
        {"prompt": "2+40=", "completion": "45", "answer": "42"},  # exact 0, overlap 0.5 -> max 0.5
        {"prompt": "3+4=", "completion": "7", "answer": "7"},  # 1 and 1 -> 1
        {"prompt": "free text", "completion": "hi"},  # no reward applies -> 0
    ]
    stdin = "".join(json.dumps(r) + "\n" for r in records)
    out = jsonl(rlgen_ok("score", "-r", "exact-match", "-r", "digit-overlap", "--combine", "example-max",
                         "--shape", "example-affine:scale=2,shift=-1", stdin=stdin).out)
    assert [r["reward"] for r in out] == pytest.approx([2 * 0.5 - 1, 2 * 1.0 - 1, 2 * 0.0 - 1])


def test_merger_by_name_averages(tiny_model_dir, tmp_path):
    tripled = tmp_path / "tripled"
    shutil.copytree(tiny_model_dir, tripled)
    weights = load_file(str(tripled / "model.safetensors"))
    save_file({k: (v * 3 if v.is_floating_point() else v) for k, v in weights.items()}, str(tripled / "model.safetensors"),
              metadata={"format": "pt"})
    out = tmp_path / "merged"
    rlgen_ok("merge", tiny_model_dir, tripled, "--method", "example-mean", "--out", out, "--quiet")
    merged = load_file(str(out / "model.safetensors"))
    original = load_file(str(tiny_model_dir / "model.safetensors"))
    assert merged.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.allclose(merged[name].float(), 2 * tensor.float(), rtol=1e-6, atol=1e-7), name  # (x + 3x) / 2


# --- task, model alias, metric, command, backbone alias --------------------------------------------


def test_task_by_name_in_eval():
    result = json.loads(rlgen_ok("eval", "--model", "tiny-arith", "--task", "example-doubling", "--limit", 3, "--json").out)
    metrics = result.get("metrics", result)
    assert metrics["num_problems"] == 3
    assert round(metrics["accuracy"] * 3, 9) in (0, 1, 2, 3)  # a fraction of 3 problems
    task = plugins.registry("task").get("example-doubling")
    test = task.split("test")
    assert len(test) == 50 and len(task.split("train")) == 400
    assert {r["prompt"] for r in test}.isdisjoint(r["prompt"] for r in task.split("train"))
    assert all(int(r["answer"]) == 2 * int(r["prompt"][:3]) for r in test)


def test_model_alias_is_the_same_model():
    args = ["--task", "arithmetic", "--limit", 4, "--max-new-tokens", 6, "--temperature", 0, "--quiet"]
    alias = jsonl(rlgen_ok("sample", "--model", "example-tiny", *args).out)
    original = jsonl(rlgen_ok("sample", "--model", "tiny-arith", *args).out)
    assert [r["completion"] for r in alias] == [r["completion"] for r in original]
    assert plugins.registry("model").get("example-tiny") == plugins.registry("model").get("tiny-arith")


def test_metric_through_the_contract():
    samples = [{"prompt": "p", "completion": "42"}, {"prompt": "p", "completion": " -7\n"},
               {"prompt": "p", "completion": "4x"}, {"prompt": "p", "completion": "--3"}]
    assert run_metric("example-well-formed", samples) == {"well_formed": 0.5, "count": 4.0}
    assert run_metric("example-well-formed", []) == {"well_formed": None, "count": 0.0}


def test_command_runs_and_is_in_help():
    out = json.loads(rlgen_ok("example-hello", "--name", "Ada").out)
    assert out["greeting"] == "hello, Ada" and out["plugin"] == "rlgen-example" and out["version"] == "0.2.0"
    assert "example-hello" in rlgen_ok("--help").out


def test_backbone_alias_forwards_to_causal_lm():
    backbones = plugins.registry("backbone")
    alias, original = backbones.get("example-causal-lm"), backbones.get("causal-lm")
    assert alias.target is original
    public = [name for name in dir(original) if not name.startswith("_") and name not in ("name", "description")]
    assert public
    for name in public:
        assert getattr(alias, name) == getattr(original, name), name


@pytest.mark.slow
def test_image_sampler_by_name_draws_what_plain_draws(tmp_path):
    images = {}
    for sampler in ("example-plain", "plain"):
        out = tmp_path / f"{sampler}.jsonl"
        rlgen_ok("sample", "--model", "tiny-digits", "--task", "digits", "--limit", 2, "--num-steps", 4, "--seed", 5,
                 "--sampler", sampler, "--out", out, "--quiet", cwd=tmp_path)
        images[sampler] = [(tmp_path / r["image"]).read_bytes() for r in jsonl(out.read_text())]
    assert len(images["plain"]) == 2
    assert images["example-plain"] == images["plain"]
