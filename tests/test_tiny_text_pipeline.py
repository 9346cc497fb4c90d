"""rlgen.diffusion.testing: a tiny random text-conditioned pipeline written offline and loaded back."""
import json

import pytest
import torch

pytest.importorskip("diffusers")

from rlgen.diffusion.testing import build_tiny_text_pipeline, write_tiny_clip_tokenizer  # noqa: E402
from rlgen.errors import RlgenError  # noqa: E402


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return build_tiny_text_pipeline(root / "ddim"), build_tiny_text_pipeline(root / "flow", scheduler="flow")


def test_ddim_variant_runs_as_stable_diffusion(pipelines):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pipelines[0], safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert sum(p.numel() for p in pipe.unet.parameters()) < 1_000_000
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    out = pipe("seven", num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 3, 16, 16)  # 8x8 latents, VAE down factor 2
    assert torch.isfinite(out.images).all()
    again = pipe("seven", num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.images, again.images)


def test_flow_variant_components_load(pipelines):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = pipelines[1]
    index = json.loads((path / "model_index.json").read_text())
    assert index["scheduler"][1] == "FlowMatchEulerDiscreteScheduler"
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler")
    unet = UNet2DConditionModel.from_pretrained(path / "unet")
    vae = AutoencoderKL.from_pretrained(path / "vae")
    text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
    assert scheduler.config.shift == 1.0

    ids = tokenizer(["seven", "a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (2, 77) and int(ids.max()) < text_encoder.config.vocab_size
    assert tokenizer.unk_token_id not in ids[0, 1:2].tolist()  # "seven" is a known token
    with torch.no_grad():
        text = text_encoder(ids)[0]
        latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        eps = unet(latents, torch.tensor([500, 500]), encoder_hidden_states=text).sample
        image = vae.decode(latents / vae.config.scaling_factor).sample
    assert eps.shape == latents.shape and image.shape == (2, 3, 16, 16)


def test_same_seed_same_weights(tmp_path, pipelines):
    from safetensors.torch import load_file

    other = build_tiny_text_pipeline(tmp_path / "again", seed=0)
    a = load_file(pipelines[0] / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(other / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tokenizer_helper_and_bad_input(tmp_path):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(tmp_path / "tok"))
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("A red circle, 7!").input_ids)
    assert tokens[0] == "<|startoftext|>" and tokens[-1] == "<|endoftext|>" and "red</w>" in tokens
    with pytest.raises(RlgenError, match="scheduler"):
        build_tiny_text_pipeline(tmp_path / "bad", scheduler="euler")
