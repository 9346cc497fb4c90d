"""Tiny random diffusers pipelines built offline from configs, for tests and smoke runs.

`build_tiny_text_pipeline(path)` writes a Stable-Diffusion-format directory (model_index.json + one
folder per component, safetensors weights), deterministic given the seed:

    unet/          UNet2DConditionModel, 4 latent channels, sample_size x sample_size latents (< 1M params)
    text_encoder/  CLIPTextModel, hidden 32, 2 layers, 4 heads, 77 positions
    tokenizer/     CLIPTokenizer over a handmade byte-level vocab (every byte, alone and with "</w>",
                   plus a few merges), so any prompt tokenizes without unknown tokens
    vae/           AutoencoderKL with two blocks: the down factor is 2, so an 8x8 latent decodes to a
                   16x16 RGB image (image size = 2 * sample_size)
    scheduler/     DDIMScheduler (SD-like betas) or FlowMatchEulerDiscreteScheduler

What loads it: the "ddim" variant loads with
`diffusers.StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)`
and runs with it. The "flow" variant is the same directory with another scheduler: StableDiffusionPipeline
loads it too but cannot sample with it (its __call__ needs `scheduler.init_noise_sigma`); each component
loads with its own class's `from_pretrained(path / "component")` (`UNet2DConditionModel`, `CLIPTextModel`,
`CLIPTokenizer`, `AutoencoderKL`, `FlowMatchEulerDiscreteScheduler`), which is how
rlgen.diffusion.pipeline reads any pipeline directory.

`write_tiny_clip_tokenizer(dir)` writes just the tokenizer (vocab.json, merges.txt and the files
`CLIPTokenizer.save_pretrained` adds), e.g. for tiny CLIP reward models.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from rlgen.errors import RlgenError

SCHEDULERS = ("ddim", "flow")
TEXT_HIDDEN = 32  # the text encoder's width = the UNet's cross_attention_dim
MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# A few merges so the BPE path is exercised ("the", "red", "circle", "seven" ...); every merged
# token is added to the vocabulary.
MERGES = [("t", "h"), ("th", "e</w>"), ("e", "d</w>"), ("r", "ed</w>"), ("i", "n"), ("e", "n</w>"),
          ("s", "e"), ("se", "v"), ("sev", "en</w>"), ("c", "i"), ("ci", "r"), ("l", "e</w>"), ("o", "n")]


def _byte_alphabet() -> list[str]:
    """The 256 characters the byte-level pre-tokenizer maps bytes to (printable bytes stand for
    themselves, the others are shifted to code points from 256 up), in byte order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    chars, shift = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + shift))
            shift += 1
    return chars


def _tiny_vocab() -> dict[str, int]:
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(pair) for pair in MERGES] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab


def write_tiny_clip_tokenizer(directory) -> Path:
    """Write a small CLIPTokenizer (vocab.json + merges.txt, then save_pretrained) to `directory`;
    return the directory. Vocabulary size: len(CLIPTokenizer.from_pretrained(directory))."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(_tiny_vocab(), ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES), encoding="utf-8")
    tokenizer = _load_tokenizer(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _load_tokenizer(directory: Path):
    from transformers import CLIPTokenizer

    vocab = json.loads((directory / "vocab.json").read_text())
    return CLIPTokenizer(vocab=vocab, merges=list(MERGES), model_max_length=MAX_LENGTH)


def _scheduler(kind: str):
    if kind == "ddim":
        from diffusers import DDIMScheduler

        return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                             clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def build_tiny_text_pipeline(path, scheduler: str = "ddim", seed: int = 0, sample_size: int = 8) -> Path:
    """Write a tiny random text-conditioned Stable-Diffusion-format pipeline to `path` and return it.

    scheduler: "ddim" (DDIMScheduler, SD betas) or "flow" (FlowMatchEulerDiscreteScheduler, shift 1).
    Latents are [4, sample_size, sample_size]; images are [3, 2 * sample_size, 2 * sample_size].
    """
    if scheduler not in SCHEDULERS:
        raise RlgenError(f"tiny pipeline scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
    if int(sample_size) < 4 or int(sample_size) % 2:
        raise RlgenError(f"tiny pipeline sample_size must be an even number >= 4, got {sample_size!r}")
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = write_tiny_clip_tokenizer(path / "tokenizer")
    tokenizer = _load_tokenizer(tokenizer_dir)

    fork = torch.random.fork_rng(devices=[])  # leave the caller's global RNG as it was
    with fork:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_HIDDEN,
            attention_head_dim=8, norm_num_groups=8,
        )
        torch.manual_seed(seed + 1)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=MAX_LENGTH, projection_dim=TEXT_HIDDEN,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ))
        torch.manual_seed(seed + 2)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=4, sample_size=2 * sample_size,
        )
    for module in (unet, text_encoder, vae):
        module.eval()

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=_scheduler(scheduler), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path
