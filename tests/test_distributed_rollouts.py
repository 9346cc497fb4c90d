"""The rollout trainers (grpo and its options, online-dpo) on two gloo processes (torchrun) train like one
process on the same global batch: each rank rolls out its share of the prompts, every completion from its own
seeded stream (the same text on any rank), advantages and reward metrics come from the gathered rewards, and
the loss is normalised by global counts. Per-step metrics and final weights match a 1-process run: uneven
prompt shares, dynamic sampling (ranks keep different numbers of groups), a KL reference with several
iterations and micro-batches, per-token and greedy-baseline advantages, and FSDP."""
from __future__ import annotations

import pytest

from cli_helpers import rlgen, rlgen_ok
from test_distributed_offline import COMMON, assert_same_run, rows_of, run_files, torchrun

from rlgen.algorithms.grpo import GRPOConfig, check_rollout_shares
from rlgen.errors import RlgenError
from rlgen.rewards.base import RewardSet, RewardSpec

ROLLOUT = ["--task", "arithmetic", "--set", "rollout.num_generations=4", "--set", "rollout.max_new_tokens=8"]

# prompts_per_step = 5: shares of 3 and 2 prompts (12 and 8 completions)
CASES = {
    "grpo": ("grpo", ["--set", "rollout.prompts_per_step=5"]),
    # rounds of 5 prompts until 5 groups with a reward spread: the kept groups sit unevenly on the ranks
    "grpo-dynamic-sampling": ("grpo", ["--set", "rollout.prompts_per_step=5", "--set", "algorithm.dynamic_sampling=true"]),
    # 2 prompts, dynamic sampling and a greedy baseline: a rank may keep no group and then decodes no baseline
    "grpo-dynamic-remax": ("grpo", ["--set", "rollout.prompts_per_step=2", "--set", "algorithm.dynamic_sampling=true",
                                    "--set", "algorithm.advantage=remax", "--steps", 4]),
    "grpo-kl-iterations": ("grpo", ["--set", "rollout.prompts_per_step=5", "--set", "algorithm.beta=0.1",
                                    "--set", "algorithm.num_iterations=2", "--set", "optim.gradient_accumulation_steps=2"]),
    # a greedy baseline per prompt (ReMax), batch-wide reward scaling, the per-sequence loss
    "grpo-remax": ("grpo", ["--set", "rollout.prompts_per_step=5", "--set", "algorithm.advantage=remax",
                            "--set", "algorithm.scale_rewards=batch", "--set", "algorithm.loss_type=grpo"]),
    # per-token advantages normalised over the whole batch's tokens
    "grpo-reinforce++": ("grpo", ["--set", "rollout.prompts_per_step=4", "--set", "algorithm.advantage=reinforce++",
                                  "--set", "algorithm.loss_type=dr_grpo"]),
    "grpo-fsdp": ("grpo", ["--set", "rollout.prompts_per_step=4", "--set", "run.distributed=fsdp", "--set", "algorithm.beta=0.1",
                           "--set", "optim.gradient_accumulation_steps=2"]),
    "online-dpo": ("online-dpo", ["--set", "rollout.prompts_per_step=5"]),
}



@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("case", sorted(CASES))
def test_two_processes_roll_out_and_train_like_one(tmp_path, case):
    algorithm, extra = CASES[case]
    args = ["train", algorithm, *ROLLOUT, "--steps", 3, *extra, *COMMON]  # a case's own --steps wins
    rlgen_ok(*args, "--out", tmp_path / "single", cwd=tmp_path)
    torchrun(*args, "--out", tmp_path / "multi", cwd=tmp_path)
    diffs = assert_same_run(tmp_path / "single", tmp_path / "multi")
    print(f"{case}: max |metric diff| {diffs['metric']:.2e}, max |weight diff| {diffs['weight']:.2e}")
    assert run_files(tmp_path / "multi") == run_files(tmp_path / "single")
    rows = rows_of(tmp_path / "single")
    assert all("loss" in row for row in rows)  # every step updated (none skipped for want of a spread)
    if case == "grpo-dynamic-sampling":
        assert max(row["sampling_rounds"] for row in rows) > 1  # refills happened, so the kept groups were chosen


@pytest.mark.slow
def test_fsdp_refuses_dynamic_sampling_in_one_line(tmp_path):
    proc = rlgen("train", "grpo", *ROLLOUT, "--set", "rollout.prompts_per_step=4", "--set", "run.distributed=fsdp",
                 "--set", "algorithm.dynamic_sampling=true", "--steps", 1, *COMMON, "--nproc", 2, "--out", tmp_path / "run",
                 cwd=tmp_path)
    assert proc.code == 2
    errors = [line for line in proc.err.splitlines() if line.strip()]
    assert errors == ["rlgen: error: algorithm.dynamic_sampling does not run with run.distributed = fsdp (the kept groups, "
                      "hence the forward passes, differ between ranks); use run.distributed = ddp"], proc.err
    assert not (tmp_path / "run").exists()


def _config(**rollout) -> GRPOConfig:
    cfg = GRPOConfig()
    for key, value in rollout.items():
        setattr(cfg.rollout, key, value)
    return cfg


def test_rollout_shares_need_a_prompt_per_process():
    rewards = RewardSet([RewardSpec("exact-match")])
    check_rollout_shares(_config(prompts_per_step=2), rewards, 2)
    with pytest.raises(RlgenError, match=r"rollout.prompts_per_step = 1 gives some of the 2 processes no prompt"):
        check_rollout_shares(_config(prompts_per_step=1), rewards, 2)


def test_rollout_shares_refuse_statistics_estimated_per_rank():
    cfg = _config(prompts_per_step=4)
    cfg.reward_shaping = "ref-normalize"
    with pytest.raises(RlgenError, match="estimates its statistics from a rank's first batch"):
        check_rollout_shares(cfg, RewardSet([RewardSpec("exact-match")], shaping="ref-normalize"), 2)
    # given statistics are the same on every rank
    check_rollout_shares(cfg, RewardSet([RewardSpec("exact-match")], shaping="ref-normalize:mean=0.5,std=0.2"), 2)
