"""What rlgen writes keeps the values it was given: `rlgen score` writes the reward functions' own values
(computed in float64, so -0.2 is written -0.2, not float32's -0.20000000298023224; the weighted total
likewise), and a trained model's final/ keeps its base's recommended settings (rlgen_defaults.toml)."""
from __future__ import annotations

import json

from cli_helpers import rlgen_ok

REWARD = '''
def tenths(prompts, completions, **kwargs):
    return [-0.2, 0.1, 1 / 3][: len(completions)]
'''


def test_written_rewards_round_trip_exactly(tmp_path):
    (tmp_path / "myrewards.py").write_text(REWARD)
    data = tmp_path / "samples.jsonl"
    data.write_text("".join(json.dumps({"prompt": "p", "completion": c}) + "\n" for c in ("a", "b", "c")))
    out = rlgen_ok("score", "-r", "myrewards:tenths:0.5", data, cwd=tmp_path).out
    rows = [json.loads(line) for line in out.splitlines()]
    assert [row["reward_myrewards:tenths"] for row in rows] == [-0.2, 0.1, 1 / 3]
    assert [row["reward"] for row in rows] == [-0.1, 0.05, 0.5 * (1 / 3)]
    assert '"reward_myrewards:tenths": -0.2,' in out.splitlines()[0]


def test_final_keeps_the_models_recommended_settings(tmp_path):
    """`train sft` then `train grpo` on its final/: the base model's rlgen_defaults.toml goes along, so the
    second run gets tiny-arith's settings (8 new tokens, lr 2e-4), not TRL's defaults for an unknown model."""
    from rlgen.models.causal_lm import resolve_model_path

    rlgen_ok("train", "sft", "--task", "arithmetic", "--steps", 1, "--set", "algorithm.batch_size=4",
             "--set", "data.eval_samples=0", "--quiet", "--out", tmp_path / "sft", cwd=tmp_path)
    final = tmp_path / "sft" / "final"
    base = resolve_model_path("tiny-arith") / "rlgen_defaults.toml"
    assert (final / "rlgen_defaults.toml").read_text() == base.read_text()
    shown = rlgen_ok("config", "show", "grpo", "--model", final).out
    rows = {line.split()[0]: line for line in shown.splitlines() if line.strip()}
    assert " 8 " in rows["rollout.max_new_tokens"] and "0.0002" in rows["optim.lr"], (rows["rollout.max_new_tokens"], rows["optim.lr"])


def test_default_lengths_a_small_context_cannot_hold_are_clamped_with_a_warning(hf_dirs):
    """A model without recommended settings keeps TRL's defaults, except a completion length of more than half
    its context: that one is halved to fit, with one warning line naming the key. Given values are kept."""
    from rlgen.api import load_config

    import io
    import contextlib

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        config = load_config("grpo", model=str(hf_dirs["gpt2"]))
        given = load_config("grpo", model=str(hf_dirs["gpt2"]), sets=["rollout.max_new_tokens=40"])
        builtin = load_config("grpo", model="tiny-arith")
    assert config.rollout.max_new_tokens == 32 and given.rollout.max_new_tokens == 40
    assert builtin.rollout.max_new_tokens == 8  # tiny-arith's recommended setting
    assert err.getvalue() == ("rlgen: warning: rollout.max_new_tokens = 256 (the default) is more than half of the "
                              "model's context of 64 positions: using 32 (set rollout.max_new_tokens to choose)\n")
