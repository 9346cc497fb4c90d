"""Trainer state on disk: tensors in safetensors, everything else in JSON (nothing is ever unpickled)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rlgen.data.records import use_umask_mode


def _flatten(obj, prefix: str, tensors: dict, skeleton):
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_key(k), _flatten(v, f"{prefix}.{k}", tensors, skeleton)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(v, f"{prefix}.{i}", tensors, skeleton) for i, v in enumerate(obj)], "tuple": isinstance(obj, tuple)}
    return obj


def _key(k):
    return {"int": k} if isinstance(k, int) else k


def _unflatten(node, tensors: dict):
    if isinstance(node, dict) and "__tensor__" in node:
        return tensors[node["__tensor__"]]
    if isinstance(node, dict) and "__dict__" in node:
        return {(k["int"] if isinstance(k, dict) else k): _unflatten(v, tensors) for k, v in node["__dict__"]}
    if isinstance(node, dict) and "__list__" in node:
        items = [_unflatten(v, tensors) for v in node["__list__"]]
        return tuple(items) if node.get("tuple") else items
    return node


def save_state(obj, directory: Path, name: str) -> None:
    """Save a nested state (e.g. an optimizer's state_dict) as NAME.safetensors + NAME.json."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(obj, name, tensors, None)
    if tensors:
        save_file(tensors, str(directory / f"{name}.safetensors"))
        use_umask_mode(directory / f"{name}.safetensors")  # safetensors creates it 0600
    (directory / f"{name}.json").write_text(json.dumps(skeleton))


def load_state(directory: Path, name: str):
    skeleton = json.loads((directory / f"{name}.json").read_text())
    tensor_file = directory / f"{name}.safetensors"
    tensors = load_file(str(tensor_file)) if tensor_file.exists() else {}
    return _unflatten(skeleton, tensors)


def rng_state(generator: torch.Generator) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "python": random.getstate(),
    }


def restore_rng(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
