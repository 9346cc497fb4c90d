"""plugins/rlgen-clip-rewards: aesthetic and pickscore on a tiny random local CLIP model."""
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

try:
    import rlgen_clip_rewards as clip_rewards
except ImportError:  # not pip-installed: import it from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "plugins" / "rlgen-clip-rewards"))
    import rlgen_clip_rewards as clip_rewards

from rlgen import plugins  # noqa: E402
from rlgen.diffusion.testing import write_tiny_clip_tokenizer  # noqa: E402
from rlgen.errors import RlgenError  # noqa: E402

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
HEAD_DIMS = [(16, 24), (24, 8), (8, 4), (4, 1)]  # projection_dim 16 -> ... -> 1
HEAD_KEYS = ["layers.0", "layers.2", "layers.4", "layers.10"]  # natural order, not string order


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("clip")
    clip_dir = write_tiny_clip_tokenizer(root / "clip")
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(clip_dir)
    head = {}
    for key, (d_in, d_out) in zip(HEAD_KEYS, HEAD_DIMS):
        head[f"{key}.weight"] = torch.randn(d_out, d_in) / d_in**0.5
        head[f"{key}.bias"] = torch.randn(d_out)
    head_file = root / "head.safetensors"
    save_file(head, str(head_file))
    return clip_dir, head_file, head


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    for name in ("RLGEN_CLIP_DIR", "RLGEN_AESTHETIC_HEAD", "RLGEN_PICKSCORE_DIR", "RLGEN_PICKSCORE_PROCESSOR"):
        monkeypatch.delenv(name, raising=False)


def _reference_model(clip_dir):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()


def _features(output):
    return output if isinstance(output, torch.Tensor) else output.pooler_output  # transformers 4 / 5


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def _images(n=3, size=32, seed=1):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_aesthetic_matches_a_direct_computation(weights):
    clip_dir, head_file, head = weights
    images = _images()
    samples = [{"prompt": "seven", "image": image} for image in images]
    values = clip_rewards.aesthetic(samples, clip=str(clip_dir), head=str(head_file))

    with torch.no_grad():
        embeds = _unit(_features(_reference_model(clip_dir).get_image_features(pixel_values=(images - MEAN) / STD)))
        x = embeds
        for key in HEAD_KEYS:
            x = x @ head[f"{key}.weight"].T + head[f"{key}.bias"]
    assert values == pytest.approx(x.squeeze(-1).tolist(), abs=1e-5)
    assert clip_rewards.aesthetic.modality == "image"

    # the differentiable form gives the same values
    same = clip_rewards.aesthetic.differentiable(images, samples, clip=str(clip_dir), head=str(head_file))
    assert same.shape == (3,) and same.tolist() == pytest.approx(values, abs=1e-6)


def test_pickscore_matches_a_direct_computation(weights):
    from transformers import CLIPTokenizer

    clip_dir = weights[0]
    images = _images(seed=2)
    prompts = ["a red circle", "seven", "the number 7"]
    samples = [{"prompt": p, "image": image} for p, image in zip(prompts, images)]
    values = clip_rewards.pickscore(samples, clip=str(clip_dir))

    model = _reference_model(clip_dir)
    tokens = CLIPTokenizer.from_pretrained(clip_dir)(prompts, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        image = _unit(_features(model.get_image_features(pixel_values=(images - MEAN) / STD)))
        text = _unit(_features(model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)))
        expected = model.logit_scale.exp() * (image * text).sum(-1) / 26
    assert values == pytest.approx(expected.tolist(), abs=1e-5)
    halved = clip_rewards.pickscore(samples, clip=str(clip_dir), scale="52")  # options may arrive as text
    assert halved == pytest.approx([v / 2 for v in values], abs=1e-5)
    same = clip_rewards.pickscore.differentiable(images, samples, clip=str(clip_dir))
    assert same.tolist() == pytest.approx(values, abs=1e-6)


def test_gradients_reach_the_pixels(weights):
    clip_dir, head_file, _ = weights
    images = _images(n=2, size=48).requires_grad_(True)  # resized to 32 inside
    samples = [{"prompt": "seven"}, {"prompt": "a red circle"}]
    total = clip_rewards.aesthetic.differentiable(images, samples, clip=str(clip_dir), head=str(head_file)).sum()
    total = total + clip_rewards.pickscore.differentiable(images, samples, clip=str(clip_dir)).sum()
    total.backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    model = clip_rewards._models.load_clip(clip_dir, "cpu").model
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_png_paths_grey_and_odd_sizes(weights, tmp_path, monkeypatch):
    from PIL import Image

    clip_dir, head_file, _ = weights
    monkeypatch.setenv("RLGEN_CLIP_DIR", str(clip_dir))  # defaults from the environment
    monkeypatch.setenv("RLGEN_AESTHETIC_HEAD", str(head_file))
    rgb = (_images(n=1, size=40)[0] * 255).round().to(torch.uint8)
    Image.fromarray(rgb.permute(1, 2, 0).numpy()).save(tmp_path / "a.png")
    grey = torch.rand(1, 24, 36, generator=torch.Generator().manual_seed(3))
    samples = [{"prompt": "x", "image": str(tmp_path / "a.png")}, {"prompt": "y", "image": grey}]
    # force the package's own loader: these images differ in size
    monkeypatch.setattr(clip_rewards._images, "_rlgen_loader", lambda: None)
    values = clip_rewards.aesthetic(samples)
    expected = [
        clip_rewards.aesthetic.differentiable(rgb[None].float() / 255, samples[:1])[0].item(),
        clip_rewards.aesthetic.differentiable(grey.repeat(3, 1, 1)[None], samples[1:])[0].item(),
    ]
    assert values == pytest.approx(expected, abs=1e-5)


def test_missing_weights_name_the_option_and_the_path(weights, tmp_path):
    missing = tmp_path / "no-such-clip"
    samples = [{"prompt": "seven", "image": _images(n=1)[0]}]
    with pytest.raises(RlgenError) as info:
        clip_rewards.aesthetic(samples, clip=str(missing), head=str(weights[1]))
    message = str(info.value)
    assert "aesthetic" in message and "clip=DIR" in message and "RLGEN_CLIP_DIR" in message and str(missing) in message
    assert "\n" not in message
    with pytest.raises(RlgenError, match="head=FILE.*RLGEN_AESTHETIC_HEAD.*nothing.safetensors"):
        clip_rewards.aesthetic(samples, clip=str(weights[0]), head=str(tmp_path / "nothing.safetensors"))
    with pytest.raises(RlgenError, match="clip=DIR or RLGEN_PICKSCORE_DIR.*neither is set"):
        clip_rewards.pickscore(samples)
    with pytest.raises(RlgenError, match="no 'image'"):
        clip_rewards.pickscore([{"prompt": "seven"}], clip=str(weights[0]))


def test_registered_as_rewards():
    plugins.reset()
    try:
        manager = plugins.plugin_manager()
        if not manager.is_registered(clip_rewards):  # not pip-installed here
            manager.register(clip_rewards, name="rlgen-clip-rewards")
        rewards = plugins.registry("reward")
        assert rewards.get("aesthetic") is clip_rewards.aesthetic
        assert rewards.get("pickscore") is clip_rewards.pickscore
    finally:
        plugins.reset()
