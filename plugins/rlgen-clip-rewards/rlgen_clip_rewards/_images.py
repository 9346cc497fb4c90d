"""Images in, CLIP pixel values out.

`load_images(samples)` reads each sample's "image" (a [C,H,W] tensor in [0,1] or a PNG path). It uses
rlgen's own `rlgen.diffusion.images.sample_images` when that exists and falls back to a small loader here.

`clip_pixels(images, size, mean, std)` is the differentiable counterpart of CLIP's image processor, in
torch ops only: grey -> RGB, resize the shorter side to `size` (bilinear, antialiased when shrinking),
centre crop to size x size, then normalise with the CLIP mean / std. For square images this is a plain
bilinear resize to size x size.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from rlgen.errors import RlgenError

IMAGE_HINT = "a [C,H,W] tensor in [0,1] or a PNG path"


def _rlgen_loader():
    try:
        from rlgen.diffusion.images import sample_images
    except ImportError:
        return None
    return sample_images


def load_images(samples: list[dict], reward: str) -> torch.Tensor | list[torch.Tensor]:
    """The samples' images: one float [B,C,H,W] tensor from rlgen's loader, or (fallback) a list of
    float [C,H,W] tensors in [0,1], which may differ in size."""
    loader = _rlgen_loader()
    if loader is not None:
        return loader(samples)
    return [_one_image(sample, i, reward) for i, sample in enumerate(samples)]


def _one_image(sample: dict, index: int, reward: str) -> torch.Tensor:
    image = sample.get("image")
    if image is None:
        raise RlgenError(f"reward '{reward}': sample {index} has no 'image' ({IMAGE_HINT})")
    if isinstance(image, torch.Tensor):
        image = image.detach()
        if image.ndim == 2:
            image = image.unsqueeze(0)
        if image.ndim != 3:
            raise RlgenError(f"reward '{reward}': sample {index}'s image has shape {tuple(image.shape)}, expected [C,H,W]")
        if image.dtype == torch.uint8:
            return image.float() / 255
        return image.float()
    if isinstance(image, (str, Path)):
        return _read_png(Path(image), index, reward)
    raise RlgenError(f"reward '{reward}': sample {index}'s 'image' is a {type(image).__name__}, expected {IMAGE_HINT}")


def _read_png(path: Path, index: int, reward: str) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise RlgenError(f"reward '{reward}': image file {path} (sample {index}) not found")
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
            data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
            width, height = rgb.size
    except (UnidentifiedImageError, OSError) as exc:
        raise RlgenError(f"reward '{reward}': cannot read image {path} (sample {index}): {exc}") from None
    return data.view(height, width, 3).permute(2, 0, 1).float() / 255


def clip_pixels(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """[B,C,H,W] (or [C,H,W]) in [0,1] -> [B,3,size,size] CLIP input, differentiable in `images`."""
    x = images if images.is_floating_point() else images.float() / 255
    x = x.float()
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise RlgenError(f"CLIP rewards need images shaped [B,C,H,W], got {tuple(images.shape)}")
    channels = x.shape[1]
    if channels == 1:
        x = x.repeat(1, 3, 1, 1)
    elif channels == 4:
        x = x[:, :3]  # drop alpha
    elif channels != 3:
        raise RlgenError(f"CLIP rewards need 1, 3 or 4 image channels, got {channels}")
    height, width = x.shape[-2:]
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    if (new_h, new_w) != (height, width):
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False,
                          antialias=new_h < height or new_w < width)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[:, :, top:top + size, left:left + size]
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def batch_pixels(images, size: int, mean, std, device) -> torch.Tensor:
    """CLIP pixel values for a batch tensor or a list of differently sized [C,H,W] images."""
    if isinstance(images, torch.Tensor):
        return clip_pixels(images.to(device), size, mean, std)
    return torch.cat([clip_pixels(image.to(device), size, mean, std) for image in images])
