"""flow-grpo and ddpo on two gloo processes (torchrun) train like one process on the same global batch: every
rank draws the single process's prompts and noise and samples its share of the groups, advantages and metrics
come from the gathered global batch, and each rank back-propagates its rows' share of every micro-batch. Per-step
metrics and final weights match a 1-process run (uneven shares and sampling batches split between ranks
included), and run.distributed = fsdp matches ddp. The noise slicing that makes a rank's images the single
process's is checked in-process (fast)."""
from __future__ import annotations

import glob
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import rlgen_ok
from test_distributed_offline import assert_same_run as same_run, rows_of, torchrun

from rlgen.algorithms.diffusion.policy_gradient import DiffusionPGConfig, DiffusionPolicyGradientTrainer
from rlgen.diffusion.generate import rollout
from rlgen.diffusion.pipeline import DiffusionModelConfig, load_diffusion_model
from rlgen.diffusion.sampling import DiffusionSamplingParams, step_noises
from rlgen.distributed import Dist
from rlgen.errors import RlgenError
from rlgen.rewards.base import RewardSet

# adam_eps = 1e-3 keeps Adam from turning rounding noise into lr-sized steps (see test_distributed_offline);
# 4 sampling steps keep each run short.
COMMON = ["--steps", 3, "--set", "optim.lr=1e-3", "--set", "optim.adam_eps=1e-3", "--set", "run.threads=1",
          "--set", "sampling.num_steps=4", "--quiet"]
# 5 prompts x 4 images on 2 ranks: shares of 3 and 2 groups (12 and 8 images); sampling batches of 6 images,
# so the third batch is split between the ranks; 2 updates per step of micro-batches of 3 images, which
# also straddle the ranks' rows.
UNEVEN = ["--set", "rollout.prompts_per_step=5", "--set", "rollout.num_generations=4", "--set", "rollout.batch_size=6",
          "--set", "algorithm.updates_per_step=2", "--set", "algorithm.train_batch_size=3"]
FLOW = ["train", "flow-grpo", "--model", "tiny-digits-flow", *UNEVEN, "--set", "rollout.same_noise_in_group=true",
        "--set", "run.eval_every=2", "--set", "data.eval_samples=3", "--set", "eval.num_steps=4"]
# DDPO: per-prompt statistics, shuffled timesteps, 2 inner epochs; odd prompts_per_step too.
DDPO = ["train", "ddpo", "--model", "tiny-digits", *UNEVEN, "--set", "rollout.prompts_per_step=3",
        "--set", "algorithm.timestep_fraction=0.75", "--set", "data.eval_samples=0"]
# Metrics are written to 6 decimals. DDPO's loss is ~0 (an on-policy ratio of 1 against centred advantages)
# and its gradient a large cancelling sum: a different micro-batch layout on one process already moves its
# grad_norm by ~1e-4 relative, so that one figure gets a looser tolerance.
RTOL, ATOL, WEIGHT_ATOL = 1e-4, 2e-6, 1e-5
LOOSE = {"grad_norm": 1e-3}
# Three 1-process runs and three torchrun launches on 2 busy cores: ~2.5 min.


def denoiser_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(glob.glob(str(run / "final" / "unet" / "*.safetensors"))[0])


def assert_same_run(single: Path, multi: Path) -> dict[str, float]:
    """Per-step metrics and final denoiser weights agree -> the largest differences seen (grad_norm's relative)."""
    assert [r["step"] for r in rows_of(single)] == [0, 1, 2, 3][-len(rows_of(single)):]
    diffs = same_run(single, multi, denoiser_weights, LOOSE, RTOL, ATOL)
    return {"metric": diffs["metric"], "weight": diffs["weight"], "grad_norm_rel": diffs["loose_rel"]}


def assert_trained(run: Path, model: str) -> None:
    """The weights moved far beyond the tolerance (the comparison is not of two untrained models)."""
    base = load_file(glob.glob(str(Path(load_diffusion_model(DiffusionModelConfig(path=model)).path) / "unet" / "*.safetensors"))[0])
    trained = denoiser_weights(run)
    assert max(float((trained[k] - base[k]).abs().max()) for k in base) > 10 * WEIGHT_ATOL
    assert all(r.get("trained_samples", 1) > 0 and "skipped_update" not in r for r in rows_of(run) if r["step"] > 0)


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_flow_grpo_two_processes_ddp_and_fsdp_train_like_one(tmp_path):
    rlgen_ok(*FLOW, *COMMON, "--out", tmp_path / "single", cwd=tmp_path)
    torchrun(*FLOW, *COMMON, "--out", tmp_path / "ddp", cwd=tmp_path)
    torchrun(*FLOW, *COMMON, "--set", "run.distributed=fsdp", "--save-every", 2, "--out", tmp_path / "fsdp", cwd=tmp_path)
    assert_trained(tmp_path / "single", "tiny-digits-flow")
    for run in ("ddp", "fsdp"):
        diffs = assert_same_run(tmp_path / "single", tmp_path / run)
        print(f"flow-grpo {run} vs 1 process: max |metric diff| {diffs['metric']:.2e}, max |weight diff| {diffs['weight']:.2e}, "
              f"max grad_norm rel diff {diffs['grad_norm_rel']:.1e}")
    diffs = assert_same_run(tmp_path / "ddp", tmp_path / "fsdp")
    print(f"flow-grpo fsdp vs ddp: max |metric diff| {diffs['metric']:.2e}, max |weight diff| {diffs['weight']:.2e}, "
              f"max grad_norm rel diff {diffs['grad_norm_rel']:.1e}")
    # the held-out evaluation ran (rank 0's under ddp; every rank's under fsdp)
    assert all("eval/reward" in r for r in rows_of(tmp_path / "fsdp") if r["step"] in (0, 2, 3))

    # its sharded step-2 checkpoint (each rank's rows of the denoiser and AdamW states; the frozen reference
    # and text encoder come from the base) resumes on one process and on two to the same final weights
    assert (tmp_path / "fsdp" / "checkpoints" / "step-2" / "shards" / "shards.json").is_file()
    for processes in (1, 2):
        resumed = tmp_path / f"resumed-{processes}"
        shutil.copytree(tmp_path / "fsdp", resumed)
        shutil.rmtree(resumed / "final")
        if processes == 1:
            rlgen_ok("train", "flow-grpo", "--resume", resumed, "--quiet", cwd=tmp_path)
        else:
            torchrun("train", "flow-grpo", "--resume", resumed, "--quiet", cwd=tmp_path)
        diffs = assert_same_run(tmp_path / "fsdp", resumed)
        print(f"flow-grpo fsdp resumed on {processes}: max |metric diff| {diffs['metric']:.2e}, "
              f"max |weight diff| {diffs['weight']:.2e}")


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_ddpo_two_processes_train_like_one(tmp_path):
    args = [*DDPO, *COMMON]
    rlgen_ok(*args, "--out", tmp_path / "single", cwd=tmp_path)
    torchrun(*args, "--out", tmp_path / "ddp", cwd=tmp_path)
    assert_trained(tmp_path / "single", "tiny-digits")
    diffs = assert_same_run(tmp_path / "single", tmp_path / "ddp")
    print(f"ddpo ddp vs 1 process: max |metric diff| {diffs['metric']:.2e}, max |weight diff| {diffs['weight']:.2e}, "
              f"max grad_norm rel diff {diffs['grad_norm_rel']:.1e}")


@pytest.mark.parametrize("model,eta", [("tiny-digits", 1.0), ("tiny-digits-flow", 0.7)])
def test_sampling_a_share_of_a_batch_gives_its_rows(model, eta):
    """A rank draws the whole batch's noise (initial, then each noisy step's) and samples only its rows: the
    generator ends where the single process's does, and the rows' latents and log-probs are the single
    process's rows."""
    pipe = load_diffusion_model(DiffusionModelConfig(path=model))
    params = DiffusionSamplingParams(num_steps=4, eta=eta, noise_level=eta, sde_window=(1, 3))
    records = [{"prompt": str(k % 10)} for k in range(6)]
    whole_gen, share_gen = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    with torch.no_grad():
        whole = rollout(pipe, records, params, whole_gen)
        noise = torch.randn((6, *pipe.latent_shape), generator=share_gen)
        steps = step_noises(pipe, params, 6, share_gen)
        assert [s is None for s in steps] == [True, False, False, True]  # only the SDE window's steps are noisy
        share = rollout(pipe, records[2:5], params, None, noise=noise[2:5], step_noise=[s[2:5] if s is not None else None for s in steps])
    assert torch.equal(whole_gen.get_state(), share_gen.get_state())
    torch.testing.assert_close(share.trajectory.latents, whole.trajectory.latents[2:5], atol=1e-5, rtol=0)
    torch.testing.assert_close(share.trajectory.log_probs, whole.trajectory.log_probs[2:5], atol=1e-4, rtol=1e-5)


def test_too_few_prompts_for_the_processes_are_refused(tmp_path):
    cfg = DiffusionPGConfig()
    cfg.rollout.prompts_per_step = 3
    trainer = DiffusionPolicyGradientTrainer(cfg, None, None)
    trainer.rewards = RewardSet(cfg.rewards)
    trainer.dist = Dist(rank=0, world_size=4)
    with pytest.raises(RlgenError, match=r"^rollout.prompts_per_step = 3 gives some of the 4 processes no prompt"):
        trainer.check_distributed()
    trainer.dist = Dist(rank=0, world_size=3)
    trainer.check_distributed()  # one prompt per process is enough (uneven shares are fine)
