"""Image I/O for image models and rewards: float [C,H,W] tensors in [0,1] <-> PNG files, grids of samples,
and the pixels of a batch of samples (in-memory tensors or PNG paths from `rlgen sample`)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from rlgen.errors import RlgenError

IMAGE_HINT = "a [C,H,W] tensor in [0,1] or a PNG path"


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B,C,H,W] -> uint8 [B,H,W,C], or [C,H,W] -> [H,W,C]; values are clamped to [0,1] and rounded."""
    if images.ndim not in (3, 4):
        raise RlgenError(f"expected an image [C,H,W] or a batch [B,C,H,W], got shape {tuple(images.shape)}")
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return pixels.movedim(-3, -1).numpy()


def to_pil(image: torch.Tensor):
    """A [C,H,W] image in [0,1] as a PIL image: 1 channel -> 'L', 3 -> 'RGB', 4 -> 'RGBA'."""
    from PIL import Image

    if image.ndim != 3:
        raise RlgenError(f"expected an image [C,H,W], got shape {tuple(image.shape)}")
    modes = {1: "L", 3: "RGB", 4: "RGBA"}
    if image.shape[0] not in modes:
        raise RlgenError(f"an image needs 1, 3 or 4 channels, got {image.shape[0]} (shape {tuple(image.shape)})")
    pixels = to_uint8(image)
    return Image.fromarray(pixels[..., 0] if image.shape[0] == 1 else pixels, modes[image.shape[0]])


def _save_atomic(picture, path, image_format: str = "PNG") -> Path:
    """Write via a temporary file and os.replace, so readers never see a half-written image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        picture.save(tmp, format=image_format)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_png(image: torch.Tensor, path) -> Path:
    """Save a [C,H,W] image in [0,1] as an 8-bit PNG (grey for 1 channel, RGB for 3)."""
    return _save_atomic(to_pil(image), path)


def load_png(path) -> torch.Tensor:
    """A PNG (or any image PIL reads) as a float [C,H,W] tensor in [0,1]: grey -> 1 channel, colour -> 3."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise RlgenError(f"image file {path} not found")
    try:
        with Image.open(path) as picture:
            grey = picture.mode in ("1", "L", "LA", "I", "I;16", "F")
            picture = picture.convert("L" if grey else "RGB")
            pixels = np.asarray(picture, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise RlgenError(f"cannot read image {path}: {exc}") from None
    tensor = torch.from_numpy(pixels.copy()).float() / 255
    return tensor.unsqueeze(0) if grey else tensor.permute(2, 0, 1).contiguous()


def make_grid(images: torch.Tensor, nrow: int, scale: int = 4, pad: int = 1, pad_value: float = 0.5):
    """A PIL image of the batch [B,C,H,W] in [0,1], `nrow` images per row, each upscaled `scale` times by
    nearest neighbour and separated by `pad` pixels. Size: (cols*(W*scale+pad)+pad, rows*(H*scale+pad)+pad)
    with cols = min(nrow, B), rows = ceil(B / nrow)."""
    from PIL import Image

    if isinstance(images, (list, tuple)):
        images = torch.stack(list(images))
    if images.ndim != 4 or images.shape[0] == 0:
        raise RlgenError(f"a grid needs a non-empty batch [B,C,H,W], got shape {tuple(images.shape)}")
    for name, value, least in (("nrow", nrow, 1), ("scale", scale, 1), ("pad", pad, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
            raise RlgenError(f"grid {name} must be an integer >= {least}, got {value!r}")
    b, c, h, w = images.shape
    if c not in (1, 3):
        raise RlgenError(f"a grid needs 1 or 3 channels, got {c}")
    cols, rows = min(nrow, b), math.ceil(b / nrow)
    cell_h, cell_w = h * scale, w * scale
    # pad with mid grey: digits are light on black, so black padding would hide the cell borders
    canvas = np.full((rows * (cell_h + pad) + pad, cols * (cell_w + pad) + pad, c), round(pad_value * 255), np.uint8)
    pixels = to_uint8(images).repeat(scale, axis=1).repeat(scale, axis=2)
    for k in range(b):
        top, left = pad + (k // nrow) * (cell_h + pad), pad + (k % nrow) * (cell_w + pad)
        canvas[top : top + cell_h, left : left + cell_w] = pixels[k]
    return Image.fromarray(canvas[..., 0] if c == 1 else canvas, "L" if c == 1 else "RGB")


def save_grid(images: torch.Tensor, path, nrow: int, scale: int = 4, pad: int = 1) -> Path:
    """Write `make_grid(images, nrow, scale, pad)` as a PNG (atomically)."""
    return _save_atomic(make_grid(images, nrow, scale, pad), path)


def _one_image(sample: dict, index: int, base_dir: Path | None) -> torch.Tensor:
    if not isinstance(sample, dict) or sample.get("image") is None:
        raise RlgenError(f"sample {index} has no 'image' ({IMAGE_HINT})")
    image = sample["image"]
    if isinstance(image, torch.Tensor):
        if image.ndim == 2:
            image = image.unsqueeze(0)
        if image.ndim != 3:
            raise RlgenError(f"sample {index}'s image has shape {tuple(image.shape)}, expected [C,H,W]")
        return image.float() / 255 if image.dtype == torch.uint8 else image.float()
    if isinstance(image, (str, os.PathLike)):
        path = Path(image).expanduser()
        if not path.is_absolute():
            path = (base_dir if base_dir is not None else Path.cwd()) / path
        if not path.is_file():
            raise RlgenError(f"sample {index}'s image file {path} not found")
        return load_png(path)
    raise RlgenError(f"sample {index}'s 'image' is a {type(image).__name__}, expected {IMAGE_HINT}")


def sample_images(samples: list[dict], base_dir: Path | None = None) -> torch.Tensor:
    """The samples' images as one float batch [B,C,H,W] in [0,1]. Each sample's "image" is a [C,H,W]
    tensor or a PNG path (relative paths are resolved against `base_dir`, default the working directory).
    Grey images are repeated to 3 channels when the batch mixes grey and colour."""
    if not samples:
        raise RlgenError("no samples to read images from")
    base = Path(base_dir) if base_dir is not None else None
    images = [_one_image(s, i, base) for i, s in enumerate(samples)]
    channels = {int(im.shape[0]) for im in images}
    if channels == {1, 3}:
        images = [im.expand(3, -1, -1) if im.shape[0] == 1 else im for im in images]
    sizes = {tuple(im.shape) for im in images}
    if len(sizes) > 1:
        shown = ", ".join(str(list(s)) for s in sorted(sizes)[:4])
        raise RlgenError(f"the samples' images differ in shape ({shown}); a batch needs one shape")
    devices = {im.device for im in images}
    if len(devices) > 1:
        images = [im.cpu() for im in images]
    return torch.stack(images)
