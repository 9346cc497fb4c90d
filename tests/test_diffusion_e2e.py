"""Image models end to end through the CLI, on tiny random pipelines built offline:

- `rlgen train ddpo` (DDIM pipeline) and `rlgen train flow-grpo` (flow-matching pipeline) train a tiny
  random text-conditioned Stable-Diffusion-format pipeline with and without LoRA; OUT/final loads back
  with diffusers, the unet changed, every other component is a byte-identical copy of the base's;
- the first policy-gradient micro-step is exactly on-policy (ratio exactly 1);
- a run interrupted after its step-1 checkpoint and resumed ends bit-identical to an uninterrupted one;
- `rlgen sample` (PNGs + JSONL + grid) -> `rlgen score` -> `rlgen pairs` -> `rlgen train diffusion-dpo`
  on the pixel-space tiny-digits pipelines (random init from recipes/tiny-digits/make_init.py);
- bad input: one `rlgen: error:` line, exit status 2, no run directory.

Every command runs in-process through `rlgen.cli.app.main` (a subprocess would pay ~8 s of imports each),
with one torch thread.
"""
from __future__ import annotations

import contextlib
import filecmp
import io
import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import rlgen
from rlgen.diffusion.testing import build_tiny_text_pipeline

REPO = Path(__file__).resolve().parent.parent
TINY_PG = ["--set", "rollout.prompts_per_step=2", "--set", "rollout.num_generations=2",
           "--set", "sampling.num_steps=3", "--set", "data.eval_samples=0", "--set", "run.threads=1"]
TIMING_FIELDS = {"step_time", "rollout_time", "images_per_s"}
FROZEN = ("text_encoder", "vae", "tokenizer", "scheduler")
UNET_FILE = Path("unet") / "diffusion_pytorch_model.safetensors"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


# In-process training runs: one intra-op thread avoids oversubscription.
pytestmark = pytest.mark.usefixtures("one_torch_thread")




def ok(*args) -> str:
    code, out, err = rlgen(*args)
    assert code == 0, f"rlgen {' '.join(map(str, args))} -> {code}\n{err}"
    return out


def one_line_error(*args) -> str:
    code, _, err = rlgen(*args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"rlgen {' '.join(map(str, args))} -> {code}\n{err}"
    assert len(lines) == 1 and lines[0].startswith("rlgen: error: "), err
    return lines[0]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


def same_tree(a: Path, b: Path) -> bool:
    """Same file names and byte-identical contents under a and b."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files_a)


def png_mean(path: Path) -> float:
    import numpy as np
    from PIL import Image

    with Image.open(path) as picture:
        return float(np.asarray(picture, dtype=np.float64).mean() / 255)


# --- fixtures: pipelines and the training runs the tests inspect ---

@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("diffusion-e2e")
    build_tiny_text_pipeline(root / "pipe-ddim", scheduler="ddim")
    build_tiny_text_pipeline(root / "pipe-flow", scheduler="flow")
    write_jsonl(root / "prompts.jsonl", [{"prompt": "a red circle"}, {"prompt": "seven"}])
    return root


PIPE = {"ddpo": "pipe-ddim", "flow-grpo": "pipe-flow"}
VARIANTS = [("ddpo", 4), ("ddpo", 0), ("flow-grpo", 4), ("flow-grpo", 0)]


def train_args(work: Path, algorithm: str, lora_r: int, out: Path, *extra) -> list:
    return ["train", algorithm, "--model", work / PIPE[algorithm], "--data", work / "prompts.jsonl",
            "--reward", "brightness", "--steps", 2, "--save-every", 1, "--seed", 3, "--out", out,
            *TINY_PG, "--set", f"model.lora_r={lora_r}", *extra, "--quiet"]


@pytest.fixture(scope="module")
def runs(work) -> dict:
    """One uninterrupted 2-step run per (algorithm, lora_r), checkpointing after step 1 (the tests that read
    them are slow: the fast tier trains images in test_builtin_digits)."""
    out = {}
    for algorithm, lora_r in VARIANTS:
        run = work / f"run-{algorithm}-r{lora_r}"
        ok(*train_args(work, algorithm, lora_r, run))
        out[algorithm, lora_r] = run
    return out


# --- 1. training: final/ loads, only the unet changed ---

@pytest.mark.slow
@pytest.mark.parametrize("algorithm,lora_r", VARIANTS)
def test_train_final_loads_and_only_the_unet_changed(work, runs, algorithm, lora_r):
    from diffusers import UNet2DConditionModel

    base, final = work / PIPE[algorithm], runs[algorithm, lora_r] / "final"
    assert [r["step"] for r in read_jsonl(runs[algorithm, lora_r] / "metrics.jsonl")] == [1, 2]
    for component in FROZEN:
        assert same_tree(base / component, final / component), f"{component} is not a byte-identical copy"
    assert filecmp.cmp(base / "model_index.json", final / "model_index.json", shallow=False)
    # merged on save (the default): a plain unet, no adapter left beside it
    assert not (final / "unet_lora").exists() and not (final / "unet" / "adapter_config.json").exists()
    assert isinstance(UNet2DConditionModel.from_pretrained(final / "unet"), UNet2DConditionModel)

    before, after = load_file(str(base / UNET_FILE)), load_file(str(final / UNET_FILE))
    assert before.keys() == after.keys()  # no lora_A / lora_B / base_layer names left
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "training did not change the unet"
    assert all(torch.isfinite(t).all() for t in after.values())
    if lora_r:  # LoRA only touches the attention projections it targets
        assert all(any(f".{t}." in k for t in LORA_TARGETS) for k in changed), changed[:5]
    else:  # full fine-tuning moves the convolutions too
        assert any("conv" in k for k in changed), changed[:5]


@pytest.mark.slow
def test_ddim_final_runs_as_stable_diffusion_pipeline(runs):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(runs["ddpo", 4] / "final", safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.unet) is UNet2DConditionModel
    images = pipe("seven", num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


@pytest.mark.slow
def test_flow_final_components_load(runs):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    final = runs["flow-grpo", 0] / "final"
    unet = UNet2DConditionModel.from_pretrained(final / "unet")
    text_encoder = CLIPTextModel.from_pretrained(final / "text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(final / "tokenizer")
    vae = AutoencoderKL.from_pretrained(final / "vae")
    assert FlowMatchEulerDiscreteScheduler.from_pretrained(final / "scheduler").config.shift == 1.0
    ids = tokenizer(["seven"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        velocity = unet(torch.randn(1, 4, 8, 8), torch.tensor([500]), encoder_hidden_states=text_encoder(ids)[0]).sample
        image = vae.decode(velocity).sample
    assert velocity.shape == (1, 4, 8, 8) and image.shape == (1, 3, 16, 16)


@pytest.mark.slow
def test_lora_kept_unmerged_loads_as_the_merged_weights(work, runs):
    """lora_merge_on_save=false: final/unet is the base unet, the adapter sits in final/unet_lora, and rlgen
    loads the pair as the same weights the merged run saved."""
    from rlgen.diffusion.pipeline import DiffusionModelConfig, load_diffusion_model

    run = work / "run-flow-grpo-r4-unmerged"
    ok(*train_args(work, "flow-grpo", 4, run, "--set", "model.lora_merge_on_save=false"))
    final = run / "final"
    assert same_tree(work / "pipe-flow" / "unet", final / "unet")
    assert (final / "unet_lora" / "adapter_config.json").is_file()
    loaded = load_diffusion_model(DiffusionModelConfig(path=str(final))).denoiser.state_dict()
    merged = load_file(str(runs["flow-grpo", 4] / "final" / UNET_FILE))
    assert loaded.keys() == merged.keys()
    worst = max(float((loaded[k] - merged[k]).abs().max()) for k in merged)
    assert worst < 1e-6, worst


# --- 2. the on-policy invariant ---

@pytest.mark.slow
@pytest.mark.parametrize("algorithm,lora_r", VARIANTS)
def test_first_ratio_is_exactly_one_in_metrics(runs, algorithm, lora_r):
    rows = read_jsonl(runs[algorithm, lora_r] / "metrics.jsonl")
    assert rows[0]["onpolicy/first_ratio_max_dev"] == 0.0
    assert rows[0]["ratio_mean"] == 1.0 and rows[0]["grad_norm"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("algorithm,lora_r", [("ddpo", 0), ("flow-grpo", 4)])
def test_first_ratio_is_exactly_one_unrounded(work, tmp_path, algorithm, lora_r):
    """metrics.jsonl rounds to 6 decimals; the trainer's own value must be exactly 0 before the first update
    (DDPO trains each sample's steps in a shuffled order: per-sample timesteps in one batch)."""
    from rlgen.cli.report import Reporter
    from rlgen.cli.train import build_config
    from rlgen.plugins import registry
    from rlgen.training.run_dir import RunDir

    algo = registry("algorithm").get(algorithm)
    sets = [s for s in TINY_PG if s != "--set"] + [f"model.lora_r={lora_r}"]
    flags = {"model.path": str(work / PIPE[algorithm]), "data.path": str(work / "prompts.jsonl"),
             "run.out": str(tmp_path / "run"), "run.steps": 2, "rewards": [{"name": "brightness"}]}
    cfg = build_config(algo, None, sets, flags, None)
    assert cfg.algorithm.shuffle_timesteps == (algorithm == "ddpo")
    trainer = algo.trainer_cls(cfg, RunDir(cfg.run.out), Reporter(quiet=True))
    trainer.setup()
    for _ in range(2):  # every step's first micro-step comes before that step's update
        metrics = trainer.train_step()
        assert metrics["onpolicy/first_ratio_max_dev"] == 0.0
        assert metrics["trained_samples"] == 4


# --- 3. resume ---

class Crash(Exception):
    pass


def run_crashing_in_step_2(trainer_cls, args: list) -> None:
    """`rlgen ARGS` with the trainer dying at the start of step 2 (an internal error: exit 1)."""
    original = trainer_cls.train_step

    def crashing(self):
        if self.step == 2:
            raise Crash("simulated crash in step 2")
        return original(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_cls, "train_step", crashing)
        code, _, err = rlgen(*args)
    assert code == 1 and "simulated crash in step 2" in err, err


def assert_same_unet(dir_a: Path, dir_b: Path) -> None:
    want, got = load_file(str(dir_a / UNET_FILE)), load_file(str(dir_b / UNET_FILE))
    assert want.keys() == got.keys()
    assert not [k for k in want if not torch.equal(want[k], got[k])], "resumed weights differ"


@pytest.mark.slow
@pytest.mark.parametrize("algorithm,lora_r", [("ddpo", 4), ("flow-grpo", 0)])
def test_interrupted_run_resumes_bit_identically(work, runs, algorithm, lora_r):
    """A run that dies in step 2, after its step-1 checkpoint; `--resume` ends with the uninterrupted run's
    weights and metrics. flow-grpo trains the whole unet with a KL to a frozen copy of the base
    (beta > 0): the resumed run must compare with the base, not with the checkpoint it restarted from."""
    from rlgen.algorithms.diffusion.policy_gradient import DiffusionPolicyGradientTrainer

    reference, run = runs[algorithm, lora_r], work / f"resumed-{algorithm}-r{lora_r}"
    run_crashing_in_step_2(DiffusionPolicyGradientTrainer, train_args(work, algorithm, lora_r, run))
    assert not (run / "final").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1"]
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1]
    if lora_r:
        assert (run / "checkpoints" / "step-1" / "model" / "unet_lora" / "adapter_config.json").is_file()

    ok("train", algorithm, "--resume", run, "--quiet")
    rows, expected = read_jsonl(run / "metrics.jsonl"), read_jsonl(reference / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert without_timing(rows) == without_timing(expected)
    assert_same_unet(reference / "final", run / "final")
    for component in FROZEN:
        assert same_tree(reference / "final" / component, run / "final" / component)


# --- 4. sample -> score -> pairs -> diffusion-dpo ---

@pytest.fixture(scope="module")
def sampled(work) -> Path:
    folder = work / "samples"
    folder.mkdir()
    write_jsonl(folder / "p.jsonl", [{"prompt": "a red circle", "id": 1}, {"prompt": "seven", "id": 2},
                                     {"prompt": "the sun", "id": 3}])
    ok("sample", "--model", work / "pipe-ddim", "--prompts", folder / "p.jsonl", "-n", 2, "--num-steps", 3,
       "--out", folder / "s.jsonl", "--grid", folder / "g.png", "--quiet")
    return folder


def test_sample_writes_pngs_jsonl_and_grid(sampled):
    from PIL import Image

    rows = read_jsonl(sampled / "s.jsonl")
    assert [(r["id"], r["sample_index"]) for r in rows] == [(1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)]
    for row in rows:
        assert not Path(row["image"]).is_absolute() and row["image"].startswith("s_images")
        with Image.open(sampled / row["image"]) as picture:
            assert picture.format == "PNG" and picture.size == (16, 16) and picture.mode == "RGB"
    assert len({(sampled / r["image"]).read_bytes() for r in rows}) == 6  # different noise, different images
    assert sorted(p.name for p in (sampled / "s_images").iterdir()) == [f"{i:06d}.png" for i in range(6)]
    with Image.open(sampled / "g.png") as grid:  # a row per prompt, -n images per row, 4x upscaled, 1px pad
        assert grid.size == (2 * (16 * 4 + 1) + 1, 3 * (16 * 4 + 1) + 1)


def test_score_and_pairs_on_image_samples(sampled, digits):
    ok("score", sampled / "s.jsonl", "-r", "brightness", "--out", sampled / "scored.jsonl", "--quiet")
    scored = read_jsonl(sampled / "scored.jsonl")
    assert [r["image"] for r in scored] == [r["image"] for r in read_jsonl(sampled / "s.jsonl")]  # kept relative
    for row in scored:
        assert row["reward_brightness"] == pytest.approx(png_mean(sampled / row["image"]), abs=1e-6)
        assert row["reward"] == row["reward_brightness"]

    ok("pairs", sampled / "scored.jsonl", "--out", sampled / "pairs.jsonl", "--quiet")
    pairs = read_jsonl(sampled / "pairs.jsonl")
    assert [p["prompt"] for p in pairs] == ["a red circle", "seven", "the sun"]
    for pair in pairs:
        group = {r["image"]: r["reward"] for r in scored if r["prompt"] == pair["prompt"]}
        assert {pair["chosen"], pair["rejected"]} == set(group)
        assert group[pair["chosen"]] > group[pair["rejected"]]
        assert pair["chosen_score"] == group[pair["chosen"]] and pair["id"] in (1, 2, 3)
        assert "image" not in pair and "sample_index" not in pair

    # Diffusion-DPO on a latent pipeline: the pair images are VAE-encoded once and trained on as latents;
    # policy == reference at step 1, so the loss is log 2
    ok("train", "diffusion-dpo", "--model", sampled.parent / "pipe-ddim", "--data", sampled / "pairs.jsonl",
       "--steps", 2, "--out", sampled / "dpo-run", "--set", "data.eval_samples=0", "--set", "run.threads=1", "--quiet")
    metrics = read_jsonl(sampled / "dpo-run" / "metrics.jsonl")
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and metrics[0]["implicit_acc"] == 0.5
    assert (sampled / "dpo-run" / "final" / "unet").is_dir()
    # diffusion-sft on the same latent pipeline: the sampled PNGs as a dataset, VAE-encoded the same way
    ok("train", "diffusion-sft", "--model", sampled.parent / "pipe-ddim", "--data", sampled / "s.jsonl", "--steps", 2,
       "--out", sampled / "sft-run", "--set", "algorithm.batch_size=4", "--set", "data.eval_samples=0",
       "--set", "run.threads=1", "--quiet")
    assert [r["step"] for r in read_jsonl(sampled / "sft-run" / "metrics.jsonl")] == [1, 2]
    # pairs of 16x16 RGB images do not fit the 8x8 grey pixel-space pipeline: one line naming the file
    line = one_line_error("train", "diffusion-dpo", "--model", digits / "tiny-digits", "--data", sampled / "pairs.jsonl",
                          "--steps", 1, "--out", sampled / "dpo-bad", "--set", "data.eval_samples=0", "--quiet")
    assert "pairs.jsonl" in line and "(3, 16, 16)" in line and "(1, 8, 8)" in line
    assert not (sampled / "dpo-bad").exists()


def test_eval_matches_sample_then_score(sampled):
    """`rlgen eval --model PIPE` samples with the same seeds as `rlgen sample`: its per-prompt mean brightness
    is the mean over the sampled PNGs (up to their 8-bit rounding)."""
    out = ok("eval", "--model", sampled.parent / "pipe-ddim", "--data", sampled / "p.jsonl", "-r", "brightness",
             "-k", 2, "--num-steps", 3, "--json")
    result = json.loads(out.strip().splitlines()[-1])
    assert result["images"] == 6 and result["images_per_prompt"] == 2
    rows = read_jsonl(sampled / "s.jsonl")
    for prompt, value in result["per_prompt"].items():
        pngs = [png_mean(sampled / r["image"]) for r in rows if r["prompt"] == prompt]
        assert len(pngs) == 2 and value == pytest.approx(sum(pngs) / 2, abs=1e-3)
    assert sorted(result["per_prompt"]) == ["a red circle", "seven", "the sun"]


@pytest.fixture(scope="module")
def digits(work) -> Path:
    """recipes/tiny-digits/make_init.py: random-init class-conditional pixel-space pipelines (8x8 grey)."""
    root = work / "digits"
    argv = sys.argv
    try:
        sys.argv = ["make_init.py", str(root)]
        with contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(str(REPO / "recipes" / "tiny-digits" / "make_init.py"), run_name="__main__")
    finally:
        sys.argv = argv
    return root


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["tiny-digits", "tiny-digits-flow"])
def test_diffusion_dpo_on_sampled_pairs(digits, pipeline):
    folder = digits / f"dpo-{pipeline}"
    folder.mkdir()
    write_jsonl(folder / "p.jsonl", [{"prompt": "three"}, {"prompt": "a handwritten seven"}])
    ok("sample", "--model", digits / pipeline, "--prompts", folder / "p.jsonl", "-n", 3, "--num-steps", 3,
       "--eta", 1.0, "--out", folder / "s.jsonl", "--quiet")
    ok("score", folder / "s.jsonl", "-r", "brightness", "--out", folder / "scored.jsonl", "--quiet")
    ok("pairs", folder / "scored.jsonl", "--out", folder / "pairs.jsonl", "--quiet")
    assert len(read_jsonl(folder / "pairs.jsonl")) == 2

    def train(out: Path) -> list:
        return ["train", "diffusion-dpo", "--model", digits / pipeline, "--data", folder / "pairs.jsonl", "--steps", 2,
                "--save-every", 1, "--out", out, "--set", "data.eval_samples=0", "--set", "algorithm.batch_size=4",
                "--set", "run.threads=1", "--set", "optim.lr=1e-3", "--quiet"]

    run = folder / "run"
    ok(*train(run))
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    first = rows[0]
    # the policy starts as the reference: the margin is 0, the loss log 2, every pair a tie
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["implicit_acc"] == 0.5 and first["inside_mean"] == 0.0
    assert first["grad_norm"] > 0
    assert rows[1]["inside_mean"] != 0.0  # after one update the policy has moved away from the reference
    before = load_file(str(digits / pipeline / "unet" / "diffusion_pytorch_model.safetensors"))
    after = load_file(str(run / "final" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert filecmp.cmp(digits / pipeline / "scheduler" / "scheduler_config.json",
                       run / "final" / "scheduler" / "scheduler_config.json", shallow=False)

    # crash in step 2, resume: the reference stays the base model (not the step-1 checkpoint)
    from rlgen.algorithms.diffusion.dpo import DiffusionDPOTrainer

    resumed = folder / "resumed"
    run_crashing_in_step_2(DiffusionDPOTrainer, train(resumed))
    ok("train", "diffusion-dpo", "--resume", resumed, "--quiet")
    assert without_timing(read_jsonl(resumed / "metrics.jsonl")) == without_timing(rows)
    assert_same_unet(run / "final", resumed / "final")


# --- 5. bad input ---

def test_model_that_is_not_a_pipeline(work, tmp_path):
    not_a_pipe = tmp_path / "not-a-pipeline"
    not_a_pipe.mkdir()
    (not_a_pipe / "config.json").write_text("{}")
    line = one_line_error("train", "ddpo", "--model", not_a_pipe, "--data", work / "prompts.jsonl",
                          "--reward", "brightness", "--out", tmp_path / "run", "--steps", 1, *TINY_PG)
    assert "not-a-pipeline" in line and "model_index.json" in line
    line = one_line_error("train", "flow-grpo", "--model", tmp_path / "missing", "--data", work / "prompts.jsonl",
                          "--reward", "brightness", "--out", tmp_path / "run", "--steps", 1, *TINY_PG)
    assert "missing" in line
    assert not (tmp_path / "run").exists()


def test_reward_backprop_refuses_a_non_differentiable_reward(work, tmp_path):
    line = one_line_error("train", "reward-backprop", "--model", work / "pipe-ddim", "--data", work / "prompts.jsonl",
                          "--reward", "jpeg-compressibility", "--out", tmp_path / "run", "--steps", 1,
                          "--set", "data.eval_samples=0")
    assert "'jpeg-compressibility'" in line and "differentiable" in line
    assert not (tmp_path / "run").exists()


def test_lm_trainer_refuses_a_diffusion_pipeline(work, tmp_path):
    line = one_line_error("train", "grpo", "--model", work / "pipe-flow", "--task", "arithmetic",
                          "--out", tmp_path / "run", "--steps", 1)
    assert "is a diffusers pipeline" in line
    assert not (tmp_path / "run").exists()


def test_reno_sampler_needs_a_guide_reward(work, tmp_path):
    line = one_line_error("sample", "--model", work / "pipe-ddim", "--prompts", work / "prompts.jsonl",
                          "--sampler", "reno", "--num-steps", 2, "--out", tmp_path / "s.jsonl")
    assert "reno" in line and "--sampler-reward" in line
    assert not (tmp_path / "s.jsonl").exists() and not (tmp_path / "s_images").exists()
