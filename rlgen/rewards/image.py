"""Built-in image rewards. Each sample carries "image" (a [C,H,W] tensor in [0,1] or a PNG path).

Every function here has `modality = "image"`. The differentiable ones also have
`differentiable(images [B,C,H,W] in [0,1], samples, **options) -> Tensor[B]`, which keeps the graph to the
pixels (reward backprop, ReNO) and gives the same values as the plain form; where the plain form says
None (not applicable) the differentiable form gives a constant 0, i.e. contributes nothing to a sum.
"""
from __future__ import annotations

import io
import numbers
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from rlgen.diffusion.classifier import load_digit_classifier
from rlgen.diffusion.digits import parse_digit_prompt
from rlgen.diffusion.images import sample_images, to_pil
from rlgen.errors import RlgenError
from rlgen.hookspecs import hookimpl
from rlgen.rewards.base import current_scoring_device


def _pixels(samples: list[dict]) -> torch.Tensor:
    return sample_images(samples).to(current_scoring_device())


def _check_batch(images: torch.Tensor, samples: list[dict] | None, reward: str) -> None:
    if images.ndim != 4:
        raise RlgenError(f"reward '{reward}' expects images [B,C,H,W], got shape {tuple(images.shape)}")
    if samples is not None and len(samples) != images.shape[0]:
        raise RlgenError(f"reward '{reward}' got {images.shape[0]} images for {len(samples)} samples")


def _plain(differentiable, samples: list[dict], **options) -> list[float]:
    """The plain (list of floats) form of a differentiable reward, without building a graph."""
    if not samples:
        return []
    with torch.no_grad():
        return differentiable(_pixels(samples), samples, **options).float().cpu().tolist()


# --- digit classifier -------------------------------------------------------------------------------

def requested_digit(sample: dict) -> int | None:
    """The digit a sample asks for: its integer `label` when present, else the digit its prompt names."""
    label = sample.get("label")
    if label is not None:
        if isinstance(label, bool) or not isinstance(label, numbers.Integral) or not 0 <= label <= 9:
            raise RlgenError(f"sample label {label!r} is not a digit class 0-9")
        return int(label)
    prompt = sample.get("prompt")
    return None if prompt is None else parse_digit_prompt(prompt)


@lru_cache(maxsize=8)
def _classifier_on(path: str | None, device: str) -> torch.nn.Module:
    model = load_digit_classifier(path)
    # the loader's instance stays on the CPU; other devices get their own (frozen) copy
    return model if device == "cpu" else _frozen_copy(model).to(device)


def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).requires_grad_(False).eval()


def digit_probabilities(images: torch.Tensor, path=None) -> torch.Tensor:
    """Softmax over the 10 digit classes of the classifier in `path` (default built-in): [B,10]."""
    key = None if path in (None, "") else str(Path(path).expanduser().resolve())  # one cache entry per directory
    model = _classifier_on(key, str(images.device))
    return F.softmax(model(images), dim=-1)


def digit_classifier_differentiable(images: torch.Tensor, samples: list[dict], path=None, **_) -> torch.Tensor:
    """Probability of each sample's requested digit, [B] with the graph to `images` (0 where no digit is
    requested)."""
    _check_batch(images, samples, "digit-classifier")
    classes = [requested_digit(s) for s in samples]
    probs = digit_probabilities(images, path)
    index = torch.tensor([c if c is not None else 0 for c in classes], device=probs.device)
    picked = probs.gather(1, index[:, None]).squeeze(1)
    applies = torch.tensor([c is not None for c in classes], device=probs.device)
    return torch.where(applies, picked, torch.zeros_like(picked))


def digit_classifier(samples: list[dict], path=None, **_) -> list[float | None]:
    """The built-in digit classifier's probability that the image shows the requested digit (`label`, else
    the digit named in the prompt; None when neither names one). Option path=DIR: another classifier."""
    values = _plain(digit_classifier_differentiable, samples, path=path)
    return [None if requested_digit(s) is None else v for s, v in zip(samples, values)]


def digit_accuracy(samples: list[dict], path=None, **_) -> list[float | None]:
    """1.0 when the digit classifier's most likely class is the requested digit, else 0.0 (None when the
    sample requests no digit)."""
    if not samples:
        return []
    with torch.no_grad():
        predicted = digit_probabilities(_pixels(samples), path).argmax(dim=-1).tolist()
    out = []
    for sample, guess in zip(samples, predicted):
        wanted = requested_digit(sample)
        out.append(None if wanted is None else float(guess == wanted))
    return out


# --- JPEG size (DDPO's compressibility rewards) ----------------------------------------------------

JPEG_QUALITY = 95


def jpeg_kilobytes(image: torch.Tensor) -> float:
    """Size of the image encoded as JPEG at quality 95, in thousands of bytes."""
    picture = to_pil(image)
    if picture.mode == "RGBA":  # JPEG has no alpha channel
        picture = picture.convert("RGB")
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return len(buffer.getvalue()) / 1000


def jpeg_compressibility(samples: list[dict], **_) -> list[float]:
    """Minus the JPEG size (quality 95) in kB: higher for images that compress well (DDPO)."""
    return [-jpeg_kilobytes(image) for image in _pixels(samples)] if samples else []


def jpeg_incompressibility(samples: list[dict], **_) -> list[float]:
    """The JPEG size (quality 95) in kB: higher for detailed images that compress badly (DDPO)."""
    return [jpeg_kilobytes(image) for image in _pixels(samples)] if samples else []


# --- simple pixel statistics -----------------------------------------------------------------------

def brightness_differentiable(images: torch.Tensor, samples: list[dict] | None = None, **_) -> torch.Tensor:
    _check_batch(images, samples, "brightness")
    return images.float().mean(dim=(1, 2, 3))


def brightness(samples: list[dict], **_) -> list[float]:
    """Mean pixel value of the image, in [0, 1]."""
    return _plain(brightness_differentiable, samples)


def contrast_differentiable(images: torch.Tensor, samples: list[dict] | None = None, **_) -> torch.Tensor:
    _check_batch(images, samples, "contrast")
    luminance = images.float().mean(dim=1).flatten(1)
    return luminance.std(dim=1, correction=0)


def contrast(samples: list[dict], **_) -> list[float]:
    """Standard deviation (population) of the per-pixel luminance (the mean over channels), in [0, 0.5]."""
    return _plain(contrast_differentiable, samples)


digit_classifier.differentiable = digit_classifier_differentiable
brightness.differentiable = brightness_differentiable
contrast.differentiable = contrast_differentiable
digit_accuracy.is_correctness = True  # its mean is reported as `accuracy`
for _fn in (digit_classifier, brightness, contrast, jpeg_compressibility, jpeg_incompressibility):
    _fn.is_correctness = False
for _fn in (digit_classifier, digit_accuracy, jpeg_compressibility, jpeg_incompressibility, brightness, contrast):
    _fn.modality = "image"

# name -> (function, one-line description for `rlgen plugins`)
IMAGE_REWARDS = {
    "digit-classifier": (digit_classifier, "image: the digit classifier's probability of the requested digit "
                                           "(label or prompt; path=DIR); differentiable"),
    "digit-accuracy": (digit_accuracy, "image: 1.0 when the digit classifier's top class is the requested digit"),
    "jpeg-compressibility": (jpeg_compressibility, "image: minus the JPEG size (quality 95) in kB (DDPO)"),
    "jpeg-incompressibility": (jpeg_incompressibility, "image: the JPEG size (quality 95) in kB (DDPO)"),
    "brightness": (brightness, "image: mean pixel value in [0, 1]; differentiable"),
    "contrast": (contrast, "image: standard deviation of the pixel luminance; differentiable"),
}


@hookimpl
def register_rewards(register):
    for name, (fn, description) in IMAGE_REWARDS.items():
        register(name, fn, description)
