"""The digits data (prompt parsing, fixed split, the `digits` task) and the shipped digit classifier."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from rlgen.diffusion import classifier as C
from rlgen.diffusion.digits import CLASS_NAMES, load_digit_images, parse_digit_prompt, split_indices
from rlgen.errors import RlgenError
from rlgen.plugins import registry

torch.set_num_threads(1)


@pytest.mark.parametrize("text, expected", [
    ("3", 3), ("three", 3), ("THREE", 3), ("digit 3", 3), ("a 3", 3), ("the digit three", 3),
    ("a handwritten seven", 7), ("7.", 7), ("  0 ", 0), ("Nine!", 9), ("draw a 5, please", 5),
    ("", None), ("a cat", None), ("13", None), ("3 and 5", None), ("three 3", None), ("seventy", None),
    ("threes", None), ("2.5", None),
])
def test_parse_digit_prompt(text, expected):
    assert parse_digit_prompt(text) == expected


def test_class_names():
    assert CLASS_NAMES == ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    assert [parse_digit_prompt(name) for name in CLASS_NAMES] == list(range(10))


def test_split_sizes_values_and_disjointness():
    train_x, train_y = load_digit_images("train")
    test_x, test_y = load_digit_images("test")
    assert train_x.shape == (1500, 1, 8, 8) and test_x.shape == (297, 1, 8, 8)
    assert train_x.dtype == torch.float32 and train_y.dtype == torch.long and test_y.shape == (297,)
    assert float(train_x.min()) == 0.0 and float(train_x.max()) == 1.0
    # sklearn's pixels are the integers 0..16, divided by 16
    assert torch.equal(train_x * 16, (train_x * 16).round())
    train_i, test_i = split_indices("train"), split_indices("test")
    assert not set(train_i.tolist()) & set(test_i.tolist())
    assert sorted(train_i.tolist() + test_i.tolist()) == list(range(1797))
    assert set(test_y.tolist()) == set(range(10))


def test_split_is_the_seed_0_permutation_and_copies():
    from sklearn.datasets import load_digits

    order = torch.randperm(1797, generator=torch.Generator().manual_seed(0))
    assert torch.equal(split_indices("test"), order[1500:])
    raw = load_digits()
    k = int(order[1500])
    images, labels = load_digit_images("test")
    assert torch.equal(images[0, 0], torch.tensor(raw.images[k], dtype=torch.float32) / 16)
    assert int(labels[0]) == int(raw.target[k])
    images.zero_()  # the caller's copy; the cache is unchanged
    assert float(load_digit_images("test")[0].sum()) > 0


def test_unknown_split():
    with pytest.raises(RlgenError, match="unknown digits split 'dev'"):
        load_digit_images("dev")


def test_digits_task_registered():
    task = registry("task").get("digits")
    assert task.default_rewards == ("digit-classifier",)
    train, test = task.split("train"), task.split("test")
    assert len(train) == 20 and len(test) == 10
    assert {"prompt": "3", "label": 3} in train and {"prompt": "three", "label": 3} in train
    assert test[4] == {"prompt": "the digit four", "label": 4}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    for record in train + test:
        assert parse_digit_prompt(record["prompt"]) == record["label"]


# --- the shipped classifier ---------------------------------------------------------------------------

def test_shipped_classifier_held_out_accuracy():
    model = C.load_digit_classifier()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    images, labels = load_digit_images("test")
    with torch.no_grad():
        accuracy = (model(images).argmax(dim=1) == labels).float().mean().item()
    assert accuracy >= 0.97
    config = json.loads((C.DEFAULT_DIR / "config.json").read_text())
    assert config["test_accuracy"] == pytest.approx(accuracy)
    assert (C.DEFAULT_DIR / "model.safetensors").stat().st_size < 200_000


def test_classifier_is_unsure_about_images_without_a_digit():
    generator = torch.Generator().manual_seed(5)
    junk = torch.cat([torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8), torch.rand(8, 1, 8, 8, generator=generator)])
    with torch.no_grad():
        probs = F.softmax(C.load_digit_classifier()(junk), -1)
    assert probs.max() < 0.3  # near uniform (0.1), so noise does not already earn the digit reward


def test_classifier_is_cached_per_directory():
    assert C.load_digit_classifier() is C.load_digit_classifier(str(C.DEFAULT_DIR))


def test_classifier_on_rgb_32x32_agrees_with_8x8():
    model = C.load_digit_classifier()
    images, labels = load_digit_images("test")
    # nearest-neighbour 4x upscale to RGB 32x32, as an image model at a larger resolution might draw it
    big = images.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3).repeat(1, 3, 1, 1)
    assert big.shape == (297, 3, 32, 32)
    with torch.no_grad():
        p_small, p_big = F.softmax(model(images), -1), F.softmax(model(big), -1)
    assert (p_big.argmax(1) == p_small.argmax(1)).float().mean() >= 0.98
    assert (p_big.argmax(1) == labels).float().mean() >= 0.97
    assert (p_small - p_big).abs().mean() < 0.02
    # grey 8x8 input passes through untouched; 3 equal channels average to the same grey image
    assert torch.equal(C.to_digit_input(images[:5]), images[:5])
    assert torch.allclose(model(images[:5].repeat(1, 3, 1, 1)), model(images[:5]))
    assert C.to_digit_input(big[:2]).shape == (2, 1, 8, 8)


def test_classifier_is_differentiable_in_the_pixels():
    images = load_digit_images("test")[0][:4].repeat(1, 3, 2, 2).requires_grad_(True)  # [4,3,16,16]
    logits = C.load_digit_classifier()(images)
    logits[:, 0].sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_missing_classifier_names_the_path(tmp_path):
    with pytest.raises(RlgenError, match=str(tmp_path / "nothing")):
        C.load_digit_classifier(tmp_path / "nothing")


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = C.DigitClassifier(channels=(4, 8))
    C.save_classifier(model, tmp_path / "clf", test_accuracy=0.5, training={"steps": 1})
    loaded = C.load_digit_classifier(tmp_path / "clf")
    x = torch.rand(3, 1, 8, 8)
    model.eval()
    assert torch.equal(model(x), loaded(x))
    assert json.loads((tmp_path / "clf" / "config.json").read_text())["architecture"]["channels"] == [4, 8]


def test_train_classifier_is_deterministic_and_learns():
    a, acc_a = C.train_classifier(steps=30, seed=3, batch_size=32)
    b, acc_b = C.train_classifier(steps=30, seed=3, batch_size=32)
    assert acc_a == acc_b and acc_a > 0.5  # well above chance (0.1) after 30 steps
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
