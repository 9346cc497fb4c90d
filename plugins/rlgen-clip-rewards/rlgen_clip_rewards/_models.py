"""Local weights only: CLIP models, their tokenizers and aesthetic heads, each loaded once per path.

Nothing is ever downloaded (`local_files_only=True`), unpickled, or run from a model directory. Missing
or unreadable weights raise rlgen.errors.RewardError (an RlgenError that rlgen reports at once, instead of once per sample).
"""
from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from rlgen.errors import RewardError

# CLIP's image normalisation (OpenAI), used when a directory has no preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Clip:
    model: nn.Module  # transformers CLIPModel, eval mode, frozen
    image_size: int
    mean: tuple
    std: tuple

    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings [B, projection_dim]."""
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return _normalise(self.model.visual_projection(pooled))

    def text_embeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        pooled = self.model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return _normalise(self.model.text_projection(pooled))

    @property
    def projection_dim(self) -> int:
        return int(self.model.config.projection_dim)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)


def resolve(reward: str, option: str, value, env: str, what: str, hint: str, kind: str = "dir") -> Path:
    """The path given as option `option`, else environment variable `env`; it must exist (a directory
    with a config.json for kind "dir", a file for kind "file")."""
    given = value if value not in (None, "") else os.environ.get(env, "")
    metavar = "DIR" if kind == "dir" else "FILE"
    needs = f"reward '{reward}' needs {what}: set option {option}={metavar} or {env} ({hint})"
    if not given:
        raise RewardError(f"{needs}; neither is set")
    path = Path(str(given)).expanduser()
    if kind == "dir" and not (path / "config.json").is_file():
        raise RewardError(f"{needs}; {path} not found" if not path.exists() else f"{needs}; {path} has no config.json")
    if kind == "file" and not path.is_file():
        raise RewardError(f"{needs}; {path} not found")
    return path


def _device_key(device) -> str:
    return str(torch.device(device))


@lru_cache(maxsize=4)
def _clip(path: str, device: str, processor: str) -> Clip:
    from transformers import CLIPModel

    _check_model_dir(Path(path), "transformers.CLIPModel")
    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                          trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - any loading failure is a bad path for the user
        raise RewardError(f"cannot load a transformers CLIPModel from {path}: {_first_line(exc)}") from None
    model.eval().requires_grad_(False).to(device)
    mean, std = CLIP_MEAN, CLIP_STD
    config_file = Path(processor) / "preprocessor_config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            raise RewardError(f"cannot read {config_file}: {_first_line(exc)}") from None
        mean = tuple(config.get("image_mean", mean))
        std = tuple(config.get("image_std", std))
    return Clip(model, int(model.config.vision_config.image_size), mean, std)


def load_clip(path: Path, device, processor: Path | None = None) -> Clip:
    return _clip(str(path), _device_key(device), str(processor or path))


@lru_cache(maxsize=4)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    _check_model_dir(Path(path), None)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001
        raise RewardError(f"cannot load a CLIP tokenizer from {path} (set option processor=DIR to a directory with "
                          f"the tokenizer files): {_first_line(exc)}") from None


def load_tokenizer(path: Path):
    return _tokenizer(str(path))


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


@lru_cache(maxsize=4)
def _head(path: str, device: str) -> nn.Sequential:
    state = _read_state(Path(path))
    weights = sorted((k for k, v in state.items() if k.endswith("weight") and v.ndim == 2), key=_natural_key)
    if not weights:
        raise RewardError(f"aesthetic head {path} has no 2-D '*.weight' tensors (expected Linear layers)")
    layers = []
    for i, key in enumerate(weights):
        weight = state[key].float()
        out_dim, in_dim = weight.shape
        if layers and in_dim != layers[-1].out_features:
            raise RewardError(f"aesthetic head {path}: layer '{key}' takes {in_dim} inputs but the layer before "
                              f"gives {layers[-1].out_features}")
        bias = state.get(key[: -len("weight")] + "bias")
        layer = nn.Linear(in_dim, out_dim, bias=bias is not None)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias.float().reshape(out_dim))
        layers.append(layer)
    if layers[-1].out_features != 1:
        raise RewardError(f"aesthetic head {path}: the last layer '{weights[-1]}' gives {layers[-1].out_features} "
                          f"outputs, expected 1")
    return nn.Sequential(*layers).eval().requires_grad_(False).to(device)


def _check_model_dir(path: Path, loader: str | None) -> None:
    """rlgen's checks (no code from the directory; for weights, safetensors only) as a RewardError."""
    from rlgen.errors import RlgenError
    from rlgen.models.safe_load import check_model_dir, check_no_custom_code

    try:
        check_model_dir(path, loader) if loader else check_no_custom_code(path)
    except RlgenError as exc:
        raise RewardError(str(exc)) from None


def _read_state(path: Path) -> dict:
    if path.suffix in (".pt", ".pth", ".bin"):  # never unpickled: loading a pickle can run code
        code = (f"import torch; from safetensors.torch import save_file; save_file({{k: v.contiguous() for k, v in "
                f"torch.load({json.dumps(str(path))}, map_location=\"cpu\", weights_only=True).items()}}, "
                f"{json.dumps(str(path.with_suffix('.safetensors')))})")
        raise RewardError(f"aesthetic head {path}: a pickle, which rlgen never loads (unpickling can run code); only "
                          f"if you trust this file, convert it once with: python -c {shlex.quote(code)}")
    try:
        from safetensors.torch import load_file

        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise RewardError(f"cannot read aesthetic head weights {path}: {_first_line(exc)}") from None


def load_head(path: Path, device) -> nn.Sequential:
    """The aesthetic MLP head: the file's 2-D '*.weight' tensors (natural order) as Linear layers, no
    activations between them (as in LAION's improved aesthetic predictor)."""
    return _head(str(path), _device_key(device))


def _first_line(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def clear_caches() -> None:
    for cached in (_clip, _tokenizer, _head):
        cached.cache_clear()
