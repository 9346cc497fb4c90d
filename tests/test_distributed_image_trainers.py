"""diffusion-sft, diffusion-dpo and reward-backprop on two gloo processes (torchrun) train like one process on
the same global batch: every rank draws the single process's images / pairs / prompts and every noise tensor
of the whole batch, trains on its contiguous share of the rows, and divides the loss by the global batch size.
Per-step metrics and final denoiser weights match a 1-process run; the batches are odd, so the shares are
uneven (3 and 2 pairs, 4 and 3 images, 5 and 4 samples), and diffusion-dpo also runs under FSDP (its frozen
reference copied before the denoiser is sharded)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_helpers import rlgen_ok
from test_distributed_diffusion import assert_trained, denoiser_weights
from test_distributed_offline import assert_same_run, rows_of, run_files, torchrun

# adam_eps = 1e-3 keeps Adam from turning rounding noise into lr-sized steps (see test_distributed_offline).
COMMON = ["--model", "tiny-digits", "--steps", 3, "--set", "optim.lr=1e-3", "--set", "optim.adam_eps=1e-3",
          "--set", "run.threads=1", "--set", "run.eval_every=0", "--set", "data.eval_samples=0", "--quiet"]
# 7 images with label dropout (drawn for the whole batch, then sliced): shares of 4 and 3.
SFT = ["train", "diffusion-sft", "--set", "algorithm.batch_size=7", "--set", "algorithm.cond_dropout=0.3"]
# beta 50 keeps the sigmoid away from saturation, so the loss has a gradient to compare.
DPO = ["train", "diffusion-dpo", "--set", "algorithm.beta=50"]
# 3 prompts x 3 images: shares of 5 and 4 images; a stochastic sampler (eta 0.5), so the per-step noise is
# drawn for the whole batch too; the gradient flows through the last 2 of 3 steps (checkpointed).
BACKPROP = ["train", "reward-backprop", "--set", "rollout.prompts_per_step=3", "--set", "rollout.num_generations=3",
            "--set", "sampling.num_steps=3", "--set", "sampling.eta=0.5", "--set", "algorithm.backprop_steps=2"]
# Two or three 1-process runs and torchrun launches per test on 2 busy cores: ~1 min each.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory) -> Path:
    """12 preference pairs of built-in digit images (PNG), each prompted with the chosen image's class."""
    import numpy as np
    from PIL import Image

    from rlgen.diffusion.digits import CLASS_NAMES, load_digit_images

    folder = tmp_path_factory.mktemp("image-pairs")
    images, labels = load_digit_images("train")
    lines = []
    for k in range(12):
        for side, i in (("chosen", 2 * k), ("rejected", 2 * k + 1)):
            Image.fromarray((images[i, 0].clamp(0, 1).numpy() * 255).astype(np.uint8), mode="L").save(folder / f"{k}-{side}.png")
        lines.append({"prompt": CLASS_NAMES[int(labels[2 * k])], "chosen": f"{k}-chosen.png", "rejected": f"{k}-rejected.png"})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder / "pairs.jsonl"


def check_two_processes(tmp_path: Path, args: list, name: str, distributed: str = "ddp") -> None:
    single, multi = tmp_path / f"single-{distributed}", tmp_path / distributed
    rlgen_ok(*args, *COMMON, "--out", single, cwd=tmp_path)
    torchrun(*args, *COMMON, "--set", f"run.distributed={distributed}", "--out", multi, cwd=tmp_path)
    assert_trained(single, "tiny-digits")
    diffs = assert_same_run(single, multi, weights_of=denoiser_weights)
    print(f"{name} {distributed} vs 1 process: max |metric diff| {diffs['metric']:.2e}, max |weight diff| {diffs['weight']:.2e}")
    # rank 0 alone wrote the run directory, one metrics line per step
    assert run_files(multi) == run_files(single)
    assert [r["step"] for r in rows_of(multi)] == [1, 2, 3]


def test_diffusion_sft_two_processes_train_like_one(tmp_path):
    check_two_processes(tmp_path, SFT, "diffusion-sft")


def test_diffusion_dpo_two_processes_ddp_and_fsdp_train_like_one(tmp_path, pair_file):
    args = [*DPO, "--data", pair_file]
    check_two_processes(tmp_path, [*args, "--set", "algorithm.batch_size=5"], "diffusion-dpo")  # shares of 3 and 2 pairs
    # FSDP needs equal shares (the same policy and reference forwards on every rank): 6 pairs
    check_two_processes(tmp_path, [*args, "--set", "algorithm.batch_size=6"], "diffusion-dpo", "fsdp")


def test_reward_backprop_two_processes_train_like_one(tmp_path):
    check_two_processes(tmp_path, BACKPROP, "reward-backprop")
    rows = rows_of(tmp_path / "ddp")
    assert all(r["backprop_steps"] == 2 for r in rows) and len({r["reward_std"] for r in rows}) == 3
