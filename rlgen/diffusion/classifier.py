"""The built-in digit classifier: a small CNN on 8x8 grey digits that serves as a differentiable reward.

It accepts images of any size and channel count in [0,1] and converts them to 8x8 grey inside `forward`,
so gradients reach the pixels of whatever image model produced them. Weights are stored as safetensors
with a JSON config (never pickled).
"""
from __future__ import annotations

import json
import time
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from rlgen.diffusion.digits import load_digit_images
from rlgen.errors import RlgenError

NUM_CLASSES = 10
INPUT_SIZE = 8
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "builtin_models" / "digit-classifier"


class DigitClassifier(nn.Module):
    """[B,C,H,W] images in [0,1] -> logits [B,10]."""

    def __init__(self, channels: tuple[int, int] = (32, 64), dropout: float = 0.1):
        super().__init__()
        self.channels = tuple(int(c) for c in channels)
        c1, c2 = self.channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(c2 * (INPUT_SIZE // 2) ** 2, NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_digit_input(images)
        x = x * 2 - 1  # centre the inputs; the model was trained on this scale
        x = F.gelu(self.conv1(x))
        x = F.max_pool2d(F.gelu(self.conv2(x)), 2)
        return self.head(self.dropout(x.flatten(1)))


def to_digit_input(images: torch.Tensor) -> torch.Tensor:
    """[B,C,H,W] (or [C,H,W]) in [0,1] -> [B,1,8,8] grey, differentiably."""
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4:
        raise RlgenError(f"digit classifier expects images [B,C,H,W], got shape {tuple(images.shape)}")
    x = images.float().mean(dim=1, keepdim=True)
    if tuple(x.shape[-2:]) != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x


# --- save / load -----------------------------------------------------------------------------------

def save_classifier(model: DigitClassifier, directory, *, test_accuracy: float | None = None,
                    training: dict | None = None) -> Path:
    """Write `model.safetensors` and `config.json` (architecture, held-out accuracy, training recipe)."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {
        "model_type": "rlgen-digit-classifier",
        "architecture": {"channels": list(model.channels), "dropout": model.dropout.p,
                         "input_size": INPUT_SIZE, "num_classes": NUM_CLASSES},
        "input": "images [B,C,H,W] in [0,1]; averaged to grey and resized to 8x8 inside forward",
        "test_accuracy": test_accuracy,
        "training": training or {},
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    # safetensors creates its file owner-only; give it the ordinary mode the config got from the umask
    (out / WEIGHTS_FILE).chmod((out / CONFIG_FILE).stat().st_mode & 0o777)
    return out


def load_digit_classifier(path=None) -> DigitClassifier:
    """The classifier in `path` (default: the built-in one), in eval mode with frozen parameters. Cached
    per directory: callers share one instance and must not train it."""
    directory = Path(path).expanduser() if path not in (None, "") else DEFAULT_DIR
    return _load(str(directory.resolve()))


@lru_cache(maxsize=8)
def _load(directory: str) -> DigitClassifier:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(directory)
    missing = [name for name in (WEIGHTS_FILE, CONFIG_FILE) if not (folder / name).is_file()]
    if missing:
        raise RlgenError(f"digit classifier {folder} not found or incomplete (missing {', '.join(missing)})")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
        arch = config["architecture"]
        model = DigitClassifier(channels=tuple(arch["channels"]), dropout=float(arch.get("dropout", 0.0)))
        model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    except (ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RlgenError(f"cannot load digit classifier from {folder}: {first}") from None
    model.eval()
    model.requires_grad_(False)
    return model


# --- training --------------------------------------------------------------------------------------

_BLUR = torch.tensor([1.0, 2.0, 1.0])
_BLUR = (_BLUR[:, None] * _BLUR[None, :] / 16).view(1, 1, 3, 3)  # 3x3 binomial kernel


def augment(images: torch.Tensor, generator: torch.Generator, noise: float = 0.08, jitter: float = 0.2) -> torch.Tensor:
    """Random 1-pixel shifts, blur, contrast / brightness jitter and Gaussian noise, so the classifier stays
    meaningful on generated digits (slightly off-centre, faint or noisy) and on larger images, which the
    antialiased resize in `forward` softens."""
    b = images.shape[0]
    padded = F.pad(images, (1, 1, 1, 1))
    dy = torch.randint(0, 3, (b,), generator=generator)
    dx = torch.randint(0, 3, (b,), generator=generator)
    windows = padded.unfold(2, INPUT_SIZE, 1).unfold(3, INPUT_SIZE, 1)  # [B,C,3,3,8,8]: every 1-pixel shift
    shifted = windows[torch.arange(b), :, dy, dx]
    blurred = F.conv2d(F.pad(shifted, (1, 1, 1, 1), mode="replicate"), _BLUR)
    strength = torch.rand(b, 1, 1, 1, generator=generator) * (torch.rand(b, 1, 1, 1, generator=generator) < 0.5)
    mixed = shifted + strength * (blurred - shifted)
    contrast = 1 + jitter * (2 * torch.rand(b, 1, 1, 1, generator=generator) - 1)
    brightness = 0.5 * jitter * (2 * torch.rand(b, 1, 1, 1, generator=generator) - 1)
    sigma = noise * torch.rand(b, 1, 1, 1, generator=generator)
    out = mixed * contrast + brightness + sigma * torch.randn(mixed.shape, generator=generator)
    return out.clamp(0, 1)


def junk_images(n: int, generator: torch.Generator) -> torch.Tensor:
    """[n,1,8,8] images that show no digit: uniform or Gaussian noise, smooth blobs, flat grey. Trained
    towards the uniform distribution so that a half-formed sample does not already score as a confident
    digit (the reward then rises as digits appear, instead of rewarding noise)."""
    shape = (n, 1, INPUT_SIZE, INPUT_SIZE)
    level = torch.rand(n, 1, 1, 1, generator=generator)
    kinds = torch.randint(0, 4, (n, 1, 1, 1), generator=generator)
    uniform = torch.rand(shape, generator=generator)
    gaussian = level + 0.3 * torch.randn(shape, generator=generator)
    blobs = F.conv2d(F.pad(uniform, (1, 1, 1, 1), mode="replicate"), _BLUR)
    low, high = blobs.amin(dim=(2, 3), keepdim=True), blobs.amax(dim=(2, 3), keepdim=True)
    blobs = (blobs - low) / (high - low + 1e-6)  # stretch to the full range, like a drawn image
    flat = level.expand(shape)
    out = torch.where(kinds == 0, uniform, torch.where(kinds == 1, gaussian, torch.where(kinds == 2, blobs, flat)))
    return out.clamp(0, 1)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    correct = (model(images).argmax(dim=1) == labels).float().mean().item()
    model.train(was_training)
    return correct


def train_classifier(steps: int = 1500, seed: int = 0, *, batch_size: int = 128, lr: float = 3e-3,
                     weight_decay: float = 1e-2, channels: tuple[int, int] = (32, 64), dropout: float = 0.1,
                     junk_fraction: float = 0.125, junk_weight: float = 0.5,
                     log_every: int = 0) -> tuple[DigitClassifier, float]:
    """Train on the digits train split (deterministic for a seed); returns (model, test-split accuracy)."""
    if steps < 1 or batch_size < 1:
        raise RlgenError(f"steps and batch_size must be positive, got steps={steps}, batch_size={batch_size}")
    junk_size = int(round(batch_size * junk_fraction))
    train_x, train_y = load_digit_images("train")
    test_x, test_y = load_digit_images("test")
    # Initialisation and dropout draw from the global RNG: seed it inside a fork so the caller's is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier(channels, dropout)
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
        model.train()
        start = time.perf_counter()
        for step in range(1, steps + 1):
            index = torch.randint(0, len(train_y), (batch_size,), generator=generator)
            x = augment(train_x[index], generator)
            junk = junk_images(junk_size, generator)
            logits = model(torch.cat([x, junk]))
            loss = F.cross_entropy(logits[:batch_size], train_y[index], label_smoothing=0.05)
            if junk_size:
                uniform = torch.full((junk_size, NUM_CLASSES), 1.0 / NUM_CLASSES)
                loss = loss + junk_weight * F.cross_entropy(logits[batch_size:], uniform)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if log_every and step % log_every == 0:
                print(f"step {step}/{steps} loss {loss.item():.4f} test accuracy {accuracy(model, test_x, test_y):.4f} "
                      f"({time.perf_counter() - start:.1f}s)", flush=True)
    model.eval()
    return model, accuracy(model, test_x, test_y)
