"""Image rewards (digit classifier, JPEG size, brightness, contrast) and the image I/O helpers."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rlgen.diffusion.classifier import load_digit_classifier
from rlgen.diffusion.digits import load_digit_images
from rlgen.diffusion.images import load_png, make_grid, sample_images, save_grid, save_png, to_uint8
from rlgen.errors import RlgenError
from rlgen.plugins import registry
from rlgen.rewards import image as R
from rlgen.rewards.base import RewardSet, RewardSpec

torch.set_num_threads(1)

NAMES = ("digit-classifier", "digit-accuracy", "jpeg-compressibility", "jpeg-incompressibility", "brightness", "contrast")
DIFFERENTIABLE = ("digit-classifier", "brightness", "contrast")


def digits(n: int = 6):
    images, labels = load_digit_images("test")
    return images[:n], labels[:n]


def test_registered_with_modality_and_flags():
    rewards = registry("reward")
    for name in NAMES:
        fn = rewards.get(name)
        assert fn.modality == "image"
        assert (getattr(fn, "differentiable", None) is not None) == (name in DIFFERENTIABLE)
    assert rewards.get("digit-accuracy").is_correctness is True
    assert rewards.get("digit-classifier").is_correctness is False


# --- digit rewards -------------------------------------------------------------------------------------

def test_digit_classifier_is_the_softmax_probability_of_the_requested_class():
    images, labels = digits()
    wanted = [int(labels[0]), int(labels[1]), 7, 2, int(labels[4]), 0]
    samples = [
        {"prompt": "ignored when there is a label", "label": wanted[0], "image": images[0]},
        {"prompt": str(wanted[1]), "image": images[1]},
        {"prompt": "a handwritten seven", "image": images[2]},
        {"prompt": "the digit two", "image": images[3]},
        {"prompt": "a cat", "image": images[4]},  # no digit requested: not applicable
        {"prompt": "0", "label": 0, "image": images[5]},
    ]
    with torch.no_grad():
        probs = F.softmax(load_digit_classifier()(images), dim=-1)
    expected = [float(probs[i, c]) for i, c in enumerate(wanted)]
    expected[4] = None
    got = R.digit_classifier(samples)
    assert got[4] is None
    assert [g for g in got if g is not None] == pytest.approx([e for e in expected if e is not None], abs=1e-6)
    # the differentiable form gives the same numbers, 0 where not applicable
    same = R.digit_classifier.differentiable(images, samples)
    assert same.tolist()[:4] == pytest.approx(got[:4], abs=1e-6) and float(same[4]) == 0.0
    # correct labels score high: the classifier is confident on held-out digits
    assert got[0] > 0.5 and got[1] > 0.5


def test_digit_accuracy_is_argmax_match():
    images, labels = digits(4)
    wrong = (int(labels[1]) + 1) % 10
    samples = [{"label": int(labels[0]), "image": images[0]}, {"label": wrong, "image": images[1]},
               {"prompt": "no digit here", "image": images[2]}, {"prompt": str(int(labels[3])), "image": images[3]}]
    assert R.digit_accuracy(samples) == [1.0, 0.0, None, 1.0]


def test_bad_label_is_an_error():
    images, _ = digits(1)
    with pytest.raises(RlgenError, match="label 12"):
        R.digit_classifier([{"label": 12, "image": images[0]}])


def test_gradient_flows_through_digit_classifier():
    images, labels = digits(3)
    pixels = images.repeat(1, 3, 2, 2).clone().requires_grad_(True)  # RGB 16x16
    samples = [{"label": int(c)} for c in labels]
    value = R.digit_classifier.differentiable(pixels, samples)
    assert value.shape == (3,) and value.requires_grad
    value.sum().backward()
    assert pixels.grad.shape == pixels.shape and pixels.grad.abs().sum() > 0
    # one step of gradient ascent on the pixels raises the reward
    stepped = (pixels + 0.05 * pixels.grad.sign()).detach()
    assert (R.digit_classifier.differentiable(stepped, samples) > value.detach()).all()


def test_not_applicable_samples_get_no_gradient():
    images, _ = digits(2)
    pixels = images.clone().requires_grad_(True)
    R.digit_classifier.differentiable(pixels, [{"label": 3}, {"prompt": "nothing"}]).sum().backward()
    assert pixels.grad[0].abs().sum() > 0 and pixels.grad[1].abs().sum() == 0


def test_reward_set_combines_image_rewards():
    images, labels = digits(2)
    samples = [{"prompt": str(int(c)), "image": im} for im, c in zip(images, labels)]
    rewards = RewardSet([RewardSpec("digit-classifier"), RewardSpec("brightness", 2.0)])
    components, valid = rewards.compute(samples)
    assert valid.all()
    assert components[:, 1].tolist() == pytest.approx(images.mean(dim=(1, 2, 3)).tolist())


# --- JPEG, brightness, contrast ---------------------------------------------------------------------------

def jpeg_bytes(array: np.ndarray, mode: str) -> int:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="JPEG", quality=95)
    return len(buffer.getvalue())


def test_jpeg_rewards_are_the_encoded_size_in_kb():
    generator = torch.Generator().manual_seed(0)
    noisy = torch.rand(3, 16, 16, generator=generator)
    flat = torch.full((3, 16, 16), 0.5)
    noisy_u8 = (noisy.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    flat_u8 = np.full((16, 16, 3), 128, np.uint8)  # 0.5 * 255 = 127.5 rounds to 128 (half to even)
    sizes = [jpeg_bytes(noisy_u8, "RGB") / 1000, jpeg_bytes(flat_u8, "RGB") / 1000]
    samples = [{"image": noisy}, {"image": flat}]
    assert R.jpeg_incompressibility(samples) == pytest.approx(sizes, abs=1e-9)
    assert R.jpeg_compressibility(samples) == pytest.approx([-s for s in sizes], abs=1e-9)
    assert sizes[0] > sizes[1]  # noise compresses worse than a flat image
    # grey images are encoded as grey JPEGs
    grey = [{"image": flat[:1]}]
    assert R.jpeg_incompressibility(grey) == [jpeg_bytes(flat_u8[..., 0], "L") / 1000]


def test_brightness_and_contrast_by_hand():
    half = torch.zeros(1, 2, 2)
    half[0, 0] = 1.0  # two pixels of 1, two of 0
    rgb = torch.stack([torch.full((2, 2), 0.2), torch.full((2, 2), 0.4), torch.full((2, 2), 0.9)])
    samples = [{"image": half}, {"image": torch.full((1, 2, 2), 0.25)}]
    assert R.brightness(samples) == pytest.approx([0.5, 0.25])
    assert R.contrast(samples) == pytest.approx([0.5, 0.0])  # population std of (1, 1, 0, 0) is 0.5
    assert R.brightness([{"image": rgb}]) == pytest.approx([0.5])
    assert R.contrast([{"image": rgb}]) == pytest.approx([0.0])  # luminance is 0.5 everywhere
    lum = torch.tensor([[0.0, 0.3], [0.6, 0.9]])  # channels that average to these values
    mixed = torch.stack([lum, lum, lum]) + torch.tensor([0.05, -0.05, 0.0])[:, None, None]
    assert R.contrast([{"image": mixed}]) == pytest.approx([float(np.std([0.0, 0.3, 0.6, 0.9]))])


def test_brightness_and_contrast_are_differentiable():
    pixels = torch.tensor([[[[0.0, 1.0], [0.5, 0.5]]]], requires_grad=True)
    R.brightness.differentiable(pixels, [{}]).sum().backward()
    assert torch.allclose(pixels.grad, torch.full_like(pixels, 0.25))  # d mean / d pixel = 1/4
    pixels.grad = None
    R.contrast.differentiable(pixels, [{}]).sum().backward()
    # d std / d x_i = (x_i - mean) / (n * std) with mean 0.5, std sqrt(0.125), n = 4
    expected = (pixels.detach() - 0.5) / (4 * 0.125 ** 0.5)
    assert torch.allclose(pixels.grad, expected)


def test_empty_batch_gives_empty_lists():
    for name in NAMES:
        assert registry("reward").get(name)([]) == []


# --- image I/O -----------------------------------------------------------------------------------------

def test_to_uint8_layout_and_rounding():
    image = torch.tensor([[[0.0, 0.5]], [[1.0, 2.0]], [[-1.0, 0.002]]])  # [3,1,2]
    out = to_uint8(image)
    assert out.dtype == np.uint8 and out.shape == (1, 2, 3)
    assert out[0, 0].tolist() == [0, 255, 0] and out[0, 1].tolist() == [128, 255, 1]
    assert to_uint8(image.unsqueeze(0)).shape == (1, 1, 2, 3)


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB")])
def test_png_round_trip_is_exact_for_uint8_values(tmp_path, channels, mode):
    values = torch.randint(0, 256, (channels, 5, 7), generator=torch.Generator().manual_seed(1))
    image = values.float() / 255
    path = save_png(image, tmp_path / "sub" / "a.png")
    assert path.is_file() and not list(path.parent.glob(".*.tmp"))
    assert Image.open(path).mode == mode
    back = load_png(path)
    assert back.shape == (channels, 5, 7) and back.dtype == torch.float32
    assert torch.equal((back * 255).round().long(), values)


def test_grid_size_arithmetic(tmp_path):
    images = torch.rand(5, 1, 8, 8)
    grid = make_grid(images, nrow=3, scale=4, pad=1)
    # 3 columns x 2 rows of 32x32 cells with 1-pixel padding around each
    assert grid.size == (3 * (32 + 1) + 1, 2 * (32 + 1) + 1) and grid.mode == "L"
    pixels = np.asarray(grid)
    assert pixels[0, 0] == 128  # the padding
    first = to_uint8(images[0])[..., 0]
    assert (pixels[1:33, 1:33] == first.repeat(4, 0).repeat(4, 1)).all()  # nearest-neighbour upscale
    assert make_grid(torch.rand(2, 3, 4, 4), nrow=10, scale=2, pad=0).size == (16, 8)
    path = save_grid(images, tmp_path / "grid.png", nrow=5, scale=2)
    assert Image.open(path).size == (5 * 17 + 1, 18)
    with pytest.raises(RlgenError, match="nrow"):
        make_grid(images, nrow=0)


def test_sample_images_from_tensors_and_paths(tmp_path, monkeypatch):
    a, b = torch.rand(1, 8, 8).mul(255).round() / 255, torch.rand(1, 8, 8).mul(255).round() / 255
    save_png(b, tmp_path / "imgs" / "b.png")
    batch = sample_images([{"image": a}, {"image": "imgs/b.png"}], base_dir=tmp_path)
    assert batch.shape == (2, 1, 8, 8)
    assert torch.equal(batch[0], a) and torch.allclose(batch[1], b, atol=1e-6)
    monkeypatch.chdir(tmp_path)  # relative paths default to the working directory
    assert torch.allclose(sample_images([{"image": "imgs/b.png"}])[0], b, atol=1e-6)
    # rewards read PNG paths as well
    assert R.brightness([{"image": str(tmp_path / "imgs" / "b.png")}]) == pytest.approx([float(b.mean())], abs=1e-6)


def test_sample_images_missing_file_names_it(tmp_path):
    with pytest.raises(RlgenError, match="nowhere.png"):
        sample_images([{"image": "nowhere.png"}], base_dir=tmp_path)
    with pytest.raises(RlgenError, match="sample 1 has no 'image'"):
        sample_images([{"image": torch.rand(1, 2, 2)}, {"prompt": "x"}])
    with pytest.raises(RlgenError, match="differ in shape"):
        sample_images([{"image": torch.rand(1, 2, 2)}, {"image": torch.rand(1, 3, 3)}])
