"""Where a --model value points (a built-in name or a directory) and which backbone family it is, decided
from the directory's files alone (nothing is imported or loaded)."""
from __future__ import annotations

from pathlib import Path

from rlgen.plugins import registry


def is_diffusion_dir(path: Path) -> bool:
    return (Path(path) / "model_index.json").is_file()


def is_causal_lm_dir(path: Path) -> bool:
    """A Hugging Face model directory (config.json) or a saved LoRA adapter (adapter_config.json) that is
    not the root of a diffusers pipeline (whose components hold config.json files of their own)."""
    path = Path(path)
    has_config = (path / "config.json").is_file() or (path / "adapter_config.json").is_file()
    return has_config and not is_diffusion_dir(path)


def model_dir(name_or_path: str) -> Path:
    """A built-in model's directory, or the path as given (which may not exist)."""
    models = registry("model")
    return Path(models.get(name_or_path)) if name_or_path in models else Path(name_or_path)
