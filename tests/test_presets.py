"""Every GRPO-family algorithm runs a real update in-process, and each preset's settings take effect."""
import json

import pytest
import torch

from rlgen.cli.report import Reporter
from rlgen.cli.train import build_config
from rlgen.plugins import registry
from rlgen.training.run_dir import RunDir

GRPO_FAMILY = ["grpo", "rloo", "remax", "reinforce-pp", "dapo", "dr-grpo", "gdpo", "gspo", "cispo"]


def run(name, model_dir, tmp_path, sets=(), rewards=None):
    algorithm = registry("algorithm").get(name)
    flags = {"model.path": str(model_dir), "data.task": "arithmetic", "run.out": str(tmp_path / name), "run.steps": 2}
    if rewards:
        flags["rewards"] = rewards
    base = ["rollout.prompts_per_step=3", "rollout.num_generations=4", "rollout.max_new_tokens=5",
            "run.eval_every=0", "run.threads=1", "optim.lr=1e-3"]
    cfg = build_config(algorithm, None, [*base, *sets], flags, None)
    trainer = algorithm.trainer_cls(cfg, RunDir(cfg.run.out), Reporter(quiet=True))
    last = trainer.fit()
    return cfg, trainer, last


# a real update per preset (~1.5 s each): the fast tier keeps GRPO and RLOO (group- and leave-one-out baselines)
@pytest.mark.parametrize("name", [name if name in ("grpo", "rloo") else pytest.param(name, marks=pytest.mark.slow)
                                  for name in GRPO_FAMILY])
def test_every_grpo_preset_trains(name, tiny_model_dir, tmp_path):
    # `length` gives every group a reward spread even for a random model, so updates are never empty.
    cfg, trainer, last = run(name, tiny_model_dir, tmp_path, rewards=[{"name": "length", "weight": 0.1}, {"name": "exact-match"}])
    lines = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert all(line["grad_norm"] is not None and line["grad_norm"] > 0 for line in lines)
    assert (tmp_path / name / "final" / "model.safetensors").is_file()
    preset = registry("algorithm").get(name).defaults.get("algorithm", {})
    for key, value in preset.items():
        assert getattr(cfg.algorithm, key) == value, (name, key)


def test_dapo_dynamic_sampling_keeps_only_groups_with_spread(tiny_model_dir, tmp_path):
    # exact-match on a random model: every group is all-wrong, so no group survives the filter, the
    # sampler refills up to max_resample_rounds and the step is skipped (overlong shaping off: its
    # length penalty would give the groups a spread of their own)
    cfg, trainer, last = run("dapo", tiny_model_dir, tmp_path, sets=["algorithm.max_resample_rounds=2", "algorithm.overlong_buffer=0"],
                             rewards=[{"name": "exact-match"}])
    assert last["frac_reward_zero_std"] == 1.0
    assert last["sampling_rounds"] == 2
    assert last["skipped_update"] == 1
    assert trainer.sampler.position == 2 * 2 * 3  # two steps x two rounds x three prompts drawn


def test_remax_advantage_is_reward_minus_greedy_reward(tiny_model_dir, tmp_path):
    from rlgen.rollout.engine import SamplingParams

    cfg, trainer, last = run("remax", tiny_model_dir, tmp_path, rewards=[{"name": "length"}])
    records = trainer.sampler.records[:2]
    greedy = trainer.engine.generate([r["prompt"] for r in records], SamplingParams(cfg.rollout.max_new_tokens, 0.0))
    baseline = torch.tensor([float(len(text)) for text in greedy.texts])
    totals = torch.arange(8, dtype=torch.float32)
    out = trainer._advantages(records, totals.view(8, 1), totals)
    assert torch.allclose(out, totals - baseline.repeat_interleave(4))
