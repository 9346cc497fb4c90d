"""The rewards themselves (torch, transformers): imported when rlgen first builds its registries, not when
`rlgen --help` loads the plugin."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from rlgen.errors import RewardError
from rlgen_clip_rewards._images import batch_pixels, clip_pixels, load_images  # noqa: F401 - clip_pixels: public through the package
from rlgen_clip_rewards._models import clear_caches, load_clip, load_head, load_tokenizer, resolve  # noqa: F401 - clear_caches: public


CLIP_HINT = "a transformers CLIP directory"


# --- options --------------------------------------------------------------------------------------

def _aesthetic_paths(clip, head) -> tuple[Path, Path]:
    clip_dir = resolve("aesthetic", "clip", clip, "RLGEN_CLIP_DIR", "local CLIP weights", CLIP_HINT)
    head_file = resolve("aesthetic", "head", head, "RLGEN_AESTHETIC_HEAD", "aesthetic head weights",
                        "a .safetensors file of the MLP head's Linear layers", kind="file")
    return clip_dir, head_file


def _pickscore_paths(clip, processor) -> tuple[Path, Path]:
    clip_dir = resolve("pickscore", "clip", clip, "RLGEN_PICKSCORE_DIR", "local CLIP weights", CLIP_HINT)
    if processor in (None, "") and not os.environ.get("RLGEN_PICKSCORE_PROCESSOR"):
        return clip_dir, clip_dir
    processor_dir = Path(str(processor or os.environ["RLGEN_PICKSCORE_PROCESSOR"])).expanduser()
    if not processor_dir.is_dir():
        raise RewardError(f"reward 'pickscore': processor directory {processor_dir} (option processor=DIR or "
                          f"RLGEN_PICKSCORE_PROCESSOR) not found")
    return clip_dir, processor_dir


def _number(reward: str, name: str, value, kind=float, positive: bool = True):
    try:
        number = kind(value)
    except (TypeError, ValueError):
        number = None
    if number is None or (positive and not number > 0):
        raise RewardError(f"reward '{reward}': option {name} must be a positive {kind.__name__}, got {value!r}")
    return number


def _device(device, images) -> torch.device:
    if device not in (None, ""):
        return torch.device(device)
    first = images if isinstance(images, torch.Tensor) else (images[0] if images else None)
    if isinstance(first, torch.Tensor) and first.device.type != "cpu":
        return first.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _chunks(images, batch_size: int):
    for start in range(0, len(images), batch_size):
        yield start, images[start:start + batch_size]


# --- aesthetic ------------------------------------------------------------------------------------

def _aesthetic_scores(images, clip_dir: Path, head_file: Path, device) -> torch.Tensor:
    clip = load_clip(clip_dir, device)
    head = load_head(head_file, device)
    embeds = clip.image_embeds(batch_pixels(images, clip.image_size, clip.mean, clip.std, device))
    if embeds.shape[-1] != head[0].in_features:
        raise RewardError(f"reward 'aesthetic': head {head_file} takes {head[0].in_features}-d embeddings but the CLIP "
                          f"model {clip_dir} gives {embeds.shape[-1]}-d ones (projection_dim)")
    return head(embeds).squeeze(-1)


def aesthetic(samples, clip=None, head=None, device=None, batch_size=32, **_):
    """LAION-style aesthetic score of the image: CLIP image embedding -> MLP head (local weights only)."""
    clip_dir, head_file = _aesthetic_paths(clip, head)
    images = load_images(samples, "aesthetic")
    device = _device(device, images)
    batch_size = _number("aesthetic", "batch_size", batch_size, int)
    out: list[float] = []
    with torch.no_grad():
        for _, chunk in _chunks(images, batch_size):
            out.extend(_aesthetic_scores(chunk, clip_dir, head_file, device).float().cpu().tolist())
    return out


def aesthetic_differentiable(images: torch.Tensor, samples=None, clip=None, head=None, **_) -> torch.Tensor:
    """aesthetic on a [B,C,H,W] batch in [0,1], keeping the graph to the pixels: Tensor[B]."""
    clip_dir, head_file = _aesthetic_paths(clip, head)
    return _aesthetic_scores(images, clip_dir, head_file, images.device)


aesthetic.modality = "image"
aesthetic.is_correctness = False
aesthetic.differentiable = aesthetic_differentiable


# --- pickscore ------------------------------------------------------------------------------------

def _pickscore_scores(images, prompts: list[str], clip_dir: Path, processor_dir: Path, scale: float,
                      device) -> torch.Tensor:
    clip = load_clip(clip_dir, device, processor_dir)
    tokenizer = load_tokenizer(processor_dir)
    limit = int(clip.model.config.text_config.max_position_embeddings)
    max_length = min(limit, int(getattr(tokenizer, "model_max_length", limit) or limit))
    tokens = tokenizer(list(prompts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    mask = tokens.get("attention_mask")
    with torch.no_grad():  # the prompts are data: no graph through the text tower
        text = clip.text_embeds(tokens["input_ids"].to(device), None if mask is None else mask.to(device))
    image = clip.image_embeds(batch_pixels(images, clip.image_size, clip.mean, clip.std, device))
    return clip.model.logit_scale.exp() * (image * text).sum(dim=-1) / scale


def _prompts(samples, n: int) -> list[str]:
    if samples is None:
        raise RewardError("reward 'pickscore' needs the samples (their 'prompt') next to the images")
    if len(samples) != n:
        raise RewardError(f"reward 'pickscore': {n} images but {len(samples)} samples")
    return [str(sample.get("prompt", "")) for sample in samples]


def pickscore(samples, clip=None, processor=None, scale=26, device=None, batch_size=32, **_):
    """PickScore-style prompt/image agreement: logit_scale.exp() * cos(image, prompt) / scale (local CLIP only)."""
    clip_dir, processor_dir = _pickscore_paths(clip, processor)
    scale = _number("pickscore", "scale", scale)
    batch_size = _number("pickscore", "batch_size", batch_size, int)
    images = load_images(samples, "pickscore")
    prompts = _prompts(samples, len(images))
    device = _device(device, images)
    out: list[float] = []
    with torch.no_grad():
        for start, chunk in _chunks(images, batch_size):
            scores = _pickscore_scores(chunk, prompts[start:start + len(chunk)], clip_dir, processor_dir, scale, device)
            out.extend(scores.float().cpu().tolist())
    return out


def pickscore_differentiable(images: torch.Tensor, samples=None, clip=None, processor=None, scale=26, **_) -> torch.Tensor:
    """pickscore on a [B,C,H,W] batch in [0,1] with the samples' prompts, keeping the graph to the pixels: Tensor[B]."""
    clip_dir, processor_dir = _pickscore_paths(clip, processor)
    scale = _number("pickscore", "scale", scale)
    return _pickscore_scores(images, _prompts(samples, images.shape[0]), clip_dir, processor_dir, scale, images.device)


pickscore.modality = "image"
pickscore.is_correctness = False
pickscore.differentiable = pickscore_differentiable
