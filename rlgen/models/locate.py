"""Where a --model value points (a built-in name or a directory) and which backbone family it is, decided
from the directory's files alone (nothing is imported or loaded)."""
from __future__ import annotations

from pathlib import Path


def is_diffusion_dir(path: Path) -> bool:
    return (Path(path) / "model_index.json").is_file()


def model_dir(name_or_path: str) -> Path:
    """A built-in model's directory, or the path as given (which may not exist)."""
    from rlgen.plugins import registry

    models = registry("model")
    return Path(models.get(name_or_path)) if name_or_path in models else Path(name_or_path)


def is_image_model(name_or_path: str | None) -> bool:
    """Whether a --model value names a diffusers pipeline (built-in name or directory)."""
    return bool(name_or_path) and is_diffusion_dir(model_dir(name_or_path))
