"""The two test tiers: `pytest -m "not slow"` (the fast tier, for every edit) and plain `pytest` (everything; CI).

`slow` must be a registered marker under --strict-markers (a misspelt marker would otherwise put a test in the fast
tier without a word), the fast tier must keep most of the tests, and it must keep one fast representative of every
area, so that a run of the fast tier alone still goes through each subsystem end to end."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# One fast test per area (under tests/): what `pytest -m "not slow"` must still run after any test is marked slow.
FAST_REPRESENTATIVES = {
    "text training through the CLI": "test_run_dir.py::test_a_run_that_failed_before_its_first_checkpoint_can_be_run_again",
    "GRPO-family update": "test_presets.py::test_every_grpo_preset_trains[grpo]",
    "resume from a checkpoint": "test_run_dir.py::test_resume_skips_a_damaged_newest_checkpoint",
    "preference training": "test_preference_trainers.py::test_dpo_step_one_is_log2_with_a_reference_and_simpo_has_none",
    "plain HF checkpoints": "test_preference_trainers.py::test_dpo_on_plain_hf_checkpoint_loads_back[gpt2-GPT2LMHeadModel]",
    "reward-model training": "test_reward_model.py::test_value_head_trains_saves_and_scores_identically",
    "image training through the CLI": "test_builtin_digits.py::test_flow_grpo_with_gdpo_and_two_rewards",
    "image sampling through the CLI": "test_diffusion_e2e.py::test_sample_writes_pngs_jsonl_and_grid",
    "reward-guided sampling": "test_samplers.py::test_best_of_n_returns_the_argmax_of_the_same_draws",
    "eval through the CLI": "test_eval_kl.py::test_cli_eval_with_ref_and_k",
    "CLI errors in a real process": "test_cli_errors.py::test_bad_input_gives_one_line_error[missing-data-file]",
    "merging through the CLI": "test_merge_hardening.py::test_rescale_norm_from_a_config_file",
    "merge sweep": "test_merge_sweep.py::test_sweep_keeps_the_merged_models_when_asked",
    "kernels in a trainer's loss": "test_kernels_trainers.py::test_grpo_loss_equal_on_kernels_and_reference[llama-True]",
    "plugins through the CLI": "test_plugins.py::test_score_cli_with_plugin_reward",
    "input readers": "test_fuzz_inputs.py::test_unmutated_seeds_pass_every_check",
}


def test_slow_is_a_registered_marker_under_strict_markers(pytestconfig):
    registered = [line.split(":", 1)[0].strip() for line in pytestconfig.getini("markers")]
    assert "slow" in registered
    assert "--strict-markers" in pytestconfig.getini("addopts")


def test_a_misspelt_marker_is_an_error(tmp_path):
    """What --strict-markers buys: `@pytest.mark.slwo` stops the collection instead of landing in the fast tier."""
    (tmp_path / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_typo.py").write_text("import pytest\n\n@pytest.mark.slwo\ndef test_x():\n    pass\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:randomly"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "'slwo' not found in `markers` configuration option" in proc.stdout + proc.stderr


@pytest.mark.slow  # collects the whole suite (every test module's imports): it belongs with the full run in CI
def test_fast_tier_keeps_most_tests_and_every_area():
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "not slow"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = re.search(r"(\d+)/(\d+) tests collected \((\d+) deselected\)", proc.stdout)
    assert summary, proc.stdout[-2000:]
    fast, total, slow = map(int, summary.groups())
    assert fast + slow == total and slow > 0
    assert fast > total / 2, f"only {fast} of {total} tests are in the fast tier"
    collected = set(proc.stdout.split())
    missing = {area: test for area, test in FAST_REPRESENTATIVES.items() if f"tests/{test}" not in collected}
    assert not missing, f"areas left without a fast test: {missing}"
