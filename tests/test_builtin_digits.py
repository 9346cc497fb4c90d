"""The built-in tiny-digits pipelines: upstream-loadable, their recommended settings valid, their recipe
reproducible, and imperfect enough that reward training has something to fix."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_helpers import rlgen_ok
from rlgen.plugins import registry

ROOT = Path(__file__).resolve().parent.parent
ALGORITHMS = ("ddpo", "flow-grpo", "reward-backprop", "diffusion-dpo")


@pytest.mark.parametrize("name, scheduler", [("tiny-digits", "DDIMScheduler"), ("tiny-digits-flow", "FlowMatchEulerDiscreteScheduler")])
def test_builtin_pipeline_loads_in_diffusers(name, scheduler):
    from diffusers import DiffusionPipeline, UNet2DModel

    pipe = DiffusionPipeline.from_pretrained(str(registry("model").get(name)))
    assert isinstance(pipe.unet, UNet2DModel) and type(pipe.scheduler).__name__ == scheduler
    assert pipe.unet.config.num_class_embeds == 11  # ten digits and the null class of guidance
    out = pipe.unet(torch.zeros(2, 1, 8, 8), torch.tensor([10, 500]), class_labels=torch.tensor([3, 10])).sample
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_recommended_settings_are_valid_for_every_image_trainer(algorithm):
    from rlgen.cli.train import build_config

    config = build_config(registry("algorithm").get(algorithm), None, [], {"model.path": "tiny-digits"}, None)
    assert config.model.path.endswith("tiny-digits")
    assert config.optim.lr == 1e-4  # from the model's rlgen_defaults.toml, not the class default


def test_ddpo_preset_keeps_the_models_timestep_fraction():
    from rlgen.cli.train import build_config

    config = build_config(registry("algorithm").get("ddpo"), None, [], {"model.path": "tiny-digits"}, None)
    assert config.algorithm.timestep_fraction == 0.9 and config.algorithm.advantage == "per-prompt"
    assert config.eval.eta == 1.0  # DDPO evaluates with its own sampler


def _sft(tmp_path, out):
    rlgen_ok("train", "diffusion-sft", "--model", tmp_path / "init" / "tiny-digits", "--out", out, "--steps", 3,
             "--quiet", "--set", "algorithm.batch_size=16", "--set", "data.eval_samples=0", "--set", "data.label_noise=0.3",
             "--set", "run.threads=1")
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
def test_recipe_is_reproducible(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "recipes/tiny-digits/make_init.py"), str(tmp_path / "init")], check=True,
                   capture_output=True)
    first, second = _sft(tmp_path, tmp_path / "a"), _sft(tmp_path, tmp_path / "b")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_sloppy_labels_are_a_fixed_fraction_of_wrong_classes():
    from rlgen.algorithms.diffusion.sft import sloppy_labels

    labels = torch.arange(10).repeat(300)
    noisy = sloppy_labels(labels, 0.3)
    wrong = (noisy != labels).float().mean().item()
    assert 0.27 < wrong < 0.33 and torch.equal(noisy, sloppy_labels(labels, 0.3))
    assert torch.equal(sloppy_labels(labels, 0.0), labels)


def test_flow_grpo_with_gdpo_and_two_rewards(tmp_path):
    import json

    rlgen_ok("train", "flow-grpo", "--out", tmp_path / "run", "--steps", 1, "--quiet",
             "-r", "digit-classifier", "-r", "brightness:0.5", "--set", "algorithm.advantage=gdpo",
             "--set", "rollout.prompts_per_step=2", "--set", "rollout.num_generations=3",
             "--set", "sampling.num_steps=3", "--set", "data.eval_samples=0", "--set", "run.threads=1")
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"rewards/digit-classifier/mean", "rewards/brightness/mean", "kl", "zero_std_ratio"} <= metrics.keys()
    assert metrics["trained_samples"] == 6 and metrics["onpolicy/first_ratio_max_dev"] == 0.0
