"""run.precision on the CPU: bf16-mixed keeps float32 master weights and trains like fp32 (step-1 loss within
bf16 tolerance), bf16 trains and saves bfloat16 weights, and fp16-mixed's loss scaler skips an overflowing
update, halves its scale, and survives a checkpoint."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import rlgen

TIMING = ("time", "_per_s")  # wall-clock metrics differ between any two runs
LM = ["run.eval_every=0", "run.threads=1"]
GROUPS = ["rollout.prompts_per_step=2", "rollout.num_generations=4", "rollout.max_new_tokens=4"]
IMAGE = ["run.eval_every=0", "run.threads=1", "data.eval_samples=0"]
IMAGE_GROUPS = ["rollout.prompts_per_step=2", "rollout.num_generations=2", "sampling.num_steps=2"]
CASES = {
    "sft": dict(task="arithmetic", sets=LM + ["algorithm.batch_size=4"]),
    "grpo": dict(sets=LM + GROUPS),
    "online-dpo": dict(task="arithmetic", sets=LM + GROUPS),
    "ddpo": dict(model="tiny-digits", sets=IMAGE + IMAGE_GROUPS + ["algorithm.advantage=grpo"]),
    "flow-grpo": dict(sets=IMAGE + IMAGE_GROUPS),
    "reward-backprop": dict(model="tiny-digits", sets=IMAGE + IMAGE_GROUPS + ["algorithm.backprop_steps=2"]),
    "diffusion-dpo": dict(sets=IMAGE + ["algorithm.batch_size=2"]),
}


@pytest.fixture(scope="module")
def image_pairs(tmp_path_factory) -> Path:
    """Two preference pairs of random 8x8 grey PNGs (tiny-digits' image shape)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("pairs")
    generator = torch.Generator().manual_seed(0)
    rows = []
    for prompt in ("3", "7"):
        names = []
        for side in ("chosen", "rejected"):
            pixels = (torch.rand(8, 8, generator=generator) * 255).to(torch.uint8).numpy()
            names.append(f"{prompt}-{side}.png")
            Image.fromarray(pixels, mode="L").save(folder / names[-1])
        rows.append({"prompt": prompt, "chosen": names[0], "rejected": names[1]})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder / "pairs.jsonl"


def _train(algo: str, precision: str, out: Path, pairs: Path) -> list[dict]:
    options = dict(CASES[algo])
    sets = options.pop("sets") + [f"run.precision={precision}", "run.device=cpu"]
    if algo == "diffusion-dpo":
        options["data"] = str(pairs)
    run = rlgen.train(algo, steps=2, out=str(out), sets=sets, **options)
    return [{k: v for k, v in row.items() if not any(part in k for part in TIMING)} for row in run.metrics]


def _saved_dtypes(final: Path) -> set[str]:
    from safetensors import safe_open

    dtypes = set()
    for path in final.rglob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            dtypes |= {handle.get_slice(key).get_dtype() for key in handle.keys()}
    return dtypes


@pytest.mark.parametrize("algo", list(CASES))
def test_bf16_mixed_trains_like_fp32_with_float32_master_weights(tmp_path, image_pairs, algo):
    reference = _train(algo, "fp32", tmp_path / "fp32", image_pairs)
    mixed = _train(algo, "bf16-mixed", tmp_path / "mixed", image_pairs)
    assert [row["step"] for row in mixed] == [1, 2]
    assert all(math.isfinite(row["loss"]) for row in mixed)
    assert _saved_dtypes(tmp_path / "mixed" / "final") == {"F32"}
    # the step-1 loss within bf16's tolerance of fp32's (~3 significant digits, through a few layers)
    assert mixed[0]["loss"] == pytest.approx(reference[0]["loss"], rel=0.05, abs=0.03)
    assert mixed[0] != reference[0]  # autocast did run: some step-1 figure (loss, grad norm ...) moved


@pytest.mark.parametrize("algo", list(CASES))
def test_bf16_trains_and_saves_bfloat16_weights(tmp_path, image_pairs, algo):
    rows = _train(algo, "bf16", tmp_path / "bf16", image_pairs)
    assert [row["step"] for row in rows] == [1, 2] and all(math.isfinite(row["loss"]) for row in rows)
    assert _saved_dtypes(tmp_path / "bf16" / "final") == {"BF16"}


# --- fp16-mixed: the dynamic loss scaler ---

def _fp16_trainer(out: Path, resume: Path | None = None):
    from rlgen.api import build_trainer

    trainer = build_trainer("sft", task="arithmetic", out=str(out), steps=4, resume=resume,
                            sets=["run.precision=fp16-mixed", "run.device=cpu", "run.eval_every=0", "run.threads=1",
                                  "algorithm.batch_size=4"])
    trainer.setup()
    return trainer


def _weights(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model.parameters() if p.requires_grad]


def test_fp16_overflow_skips_the_update_halves_the_scale_and_resumes(tmp_path):
    trainer = _fp16_trainer(tmp_path / "run")
    scaler = trainer.precision.scaler
    assert scaler is not None and trainer.precision.autocast_dtype == torch.float16
    start_scale = scaler.get_scale()
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    before = _weights(trainer)

    trainer.step = 1
    trainer.backward(params[0].sum() * 1e35)  # x the loss scale: beyond float32, the gradient overflows
    norm = trainer.optimizer_step()  # no RlgenError: an fp16 run skips the step and goes on
    assert not math.isfinite(norm)
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(trainer)))
    assert scaler.get_scale() == start_scale / 2
    assert all(p.grad is None for p in params)

    trainer.step = 2
    trainer.backward((params[0] ** 2).sum())
    assert math.isfinite(trainer.optimizer_step())
    assert not torch.equal(before[0], params[0].detach())  # a sound step is applied
    assert scaler.get_scale() == start_scale / 2  # and the scale grows only after growth_interval of them

    trainer.run.create(trainer.config, fresh=True)
    checkpoint = trainer.save_checkpoint()
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["grad_scaler"]
    assert saved["scale"] == start_scale / 2
    resumed = _fp16_trainer(tmp_path / "run", resume=tmp_path / "run")
    assert resumed.step == 2
    assert resumed.precision.scaler.state_dict() == scaler.state_dict()


def test_fp16_mixed_run_trains(tmp_path):
    rows = _train("sft", "fp16-mixed", tmp_path / "fp16", tmp_path)
    assert [row["step"] for row in rows] == [1, 2] and all(math.isfinite(row["loss"]) for row in rows)
    assert _saved_dtypes(tmp_path / "fp16" / "final") == {"F32"}


def test_mixed_precision_needs_float32_master_weights(tmp_path):
    from cli_helpers import rlgen as run_rlgen

    code, out, err = run_rlgen("train", "sft", "--task", "arithmetic", "--steps", "1", "--out", str(tmp_path / "x"),
                           "--precision", "fp16-mixed", "--set", 'model.dtype="float16"')
    assert code == 2 and out == "" and not (tmp_path / "x").exists()
    assert err.strip().splitlines() == ["rlgen: error: run.precision = fp16-mixed keeps float32 master weights: model.dtype "
                                        "must be float32, not float16 (run.precision = bf16 trains bf16 weights)"]
