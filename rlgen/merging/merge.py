"""Merging HF model directories tensor by tensor from memory-mapped safetensors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from rlgen.errors import RlgenError
from rlgen.models.causal_lm import replace_dir, resolve_model_path


def _weight_files(path: Path) -> dict[str, Path]:
    """tensor name -> file, for single-file and sharded safetensors checkpoints."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise RlgenError(f"{path} has no safetensors weights (model.safetensors or its index)")
    with safe_open(str(single), "pt") as handle:
        return {name: single for name in handle.keys()}


def merge_models(models: list[str], weights: list[float], method, out: str, options: dict | None = None) -> dict:
    if len(models) < 2:
        raise RlgenError("merge needs at least two models")
    if len(weights) != len(models):
        raise RlgenError(f"got {len(weights)} weights for {len(models)} models")
    paths = [resolve_model_path(m) for m in models]
    maps = [_weight_files(p) for p in paths]
    names = list(maps[0])
    for path, weight_map in zip(paths[1:], maps[1:]):
        if set(weight_map) != set(names):
            missing = sorted(set(names) ^ set(weight_map))[:3]
            raise RlgenError(f"{path} does not have the same tensors as {paths[0]} (e.g. {', '.join(missing)})")
    target = Path(out)
    tmp = target.with_name(f".{target.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        merged = {}
        for name in names:
            tensors = []
            for weight_map in maps:
                with safe_open(str(weight_map[name]), "pt") as handle:
                    tensors.append(handle.get_tensor(name))
            shapes = {tuple(t.shape) for t in tensors}
            if len(shapes) != 1:
                raise RlgenError(f"tensor '{name}' has different shapes across models: {sorted(shapes)}")
            merged[name] = method(tensors, weights, **(options or {})).contiguous()
        save_file(merged, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for item in paths[0].iterdir():  # config, tokenizer, generation config from the first model
            if item.is_file() and not item.name.endswith(".safetensors") and item.name != "model.safetensors.index.json":
                shutil.copy2(item, tmp / item.name)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(target), "tensors": len(names), "models": [str(p) for p in paths], "weights": weights}
