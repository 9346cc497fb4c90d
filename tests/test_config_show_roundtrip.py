"""`rlgen config show ALGO --toml` prints the settings `rlgen train ALGO` starts from (class defaults, the
model's recommended settings, the preset), and training on that file runs exactly those settings."""
from __future__ import annotations

import pytest

import rlgen
from cli_helpers import rlgen as run
from rlgen.config import to_dict


@pytest.mark.parametrize("algo, model", [("grpo", None), ("sft", None), ("dapo", None), ("kto", None),
                                         ("flow-grpo", None), ("ddpo", "tiny-digits")])
def test_toml_round_trips_to_the_training_defaults(tmp_path, algo, model):
    args = ["config", "show", algo, "--toml"] + (["--model", model] if model else [])
    code, out, err = run(*args)
    assert code == 0, err
    path = tmp_path / f"{algo}.toml"
    path.write_text(out)
    expected = rlgen.load_config(algo, **({"model": model} if model else {}))
    assert to_dict(rlgen.load_config(algo, config=path)) == to_dict(expected)


def test_show_includes_the_models_recommended_settings():
    """tiny-arith recommends lr 2e-4 and 8 new tokens for grpo (its rlgen_defaults.toml); the class says 1e-6, 256."""
    code, out, err = run("config", "show", "grpo", "--toml")
    assert code == 0, err
    assert "\nlr = 0.0002\n" in out and "\nmax_new_tokens = 8\n" in out


def test_training_on_the_shown_file_runs(tmp_path):
    code, out, err = run("config", "show", "grpo", "--toml")
    (tmp_path / "g.toml").write_text(out)
    code, _, err = run("train", "grpo", "--config", str(tmp_path / "g.toml"), "--steps", "1", "--out",
                       str(tmp_path / "run"), "--set", "rollout.prompts_per_step=2", "--set", "rollout.num_generations=2",
                       "--set", "run.eval_every=0", "-q")
    assert code == 0, err
