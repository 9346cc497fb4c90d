"""Folding a peft LoRA adapter into base weights, one tensor at a time, while streaming.

An adapter directory holds adapter_config.json and adapter_model.safetensors. Its keys map to the base
model's tensor names by dropping peft's `base_model.model.` prefix:

    <module>.lora_A.weight, <module>.lora_B.weight     Linear / Conv:  <module>.weight += s * B @ A
    <module>.lora_embedding_A, <module>.lora_embedding_B   Embedding:  <module>.weight += s * (B @ A)^T
    <module>.lora_B.bias                                (lora_bias)     <module>.bias   += s * bias
    <module>.base_layer.weight, any other full tensor   (modules_to_save, saved embedding layers)
                                                        replaces the base tensor of that name first

with s = lora_alpha / r (alpha / sqrt(r) with use_rslora), r and alpha taken from rank_pattern /
alpha_pattern when a pattern matches the module name (peft's rule: the first pattern P in the dict with
the module name matching `(.*\\.)?P$`). fan_in_fan_out (GPT-2's Conv1D) transposes B @ A. Conv layers
fold B (out, r, 1, ...) @ A (r, in, k...) into (out, in, k...). The delta is computed in float32 and the
sum rounded once to the base tensor's dtype. DoRA, other peft types and layers whose LoRA factors do not
fit their base tensor (grouped convolutions, MultiheadAttention, target_parameters, quantized bases) are
one-line errors.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from rlgen.errors import RlgenError, show_value
from rlgen.merging.model_files import checked_file, read_text
from rlgen.merging.safetensors_io import SafetensorsFile
from rlgen.models.safe_load import check_adapter_weights

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Settings that change what merging means; unsupported when set (value -> why).
UNSUPPORTED = {
    "use_dora": "DoRA adapters",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens",
    "layer_replication": "layer replication",
    "use_qalora": "QA-LoRA",
}
_FACTOR = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?P<suffix>\.weight|\.bias|)$")


def is_adapter_dir(path: Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


@dataclass
class _Fold:
    """What an adapter does to one base tensor."""

    replace: str | None = None  # adapter key whose tensor replaces the base tensor
    a: str | None = None
    b: str | None = None
    bias: str | None = None  # lora_B.bias (folded into <module>.bias)
    kind: str = "linear"  # "linear" | "embedding"
    scale: float = 0.0


def _pattern_value(patterns: dict, module: str, default):
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


class LoraAdapter:
    """A peft LoRA adapter directory, checked against the base tensors it folds into."""

    def __init__(self, directory, label: str | None = None):
        self.directory = Path(directory)
        self.label = label or str(directory)
        config_path = self.directory / ADAPTER_CONFIG
        if not os.path.lexists(config_path):
            raise RlgenError(f"{self.label}: not a LoRA adapter directory (no {ADAPTER_CONFIG})")
        try:
            self.config = json.loads(read_text(self.directory, config_path))
        except (json.JSONDecodeError, RecursionError) as exc:
            raise RlgenError(f"{config_path}: bad JSON ({type(exc).__name__}: {show_value(str(exc))})") from None
        if not isinstance(self.config, dict):
            raise RlgenError(f"{config_path}: expected a JSON object")
        self._check_config(config_path)
        weights = self.directory / ADAPTER_WEIGHTS
        if not os.path.lexists(weights):
            check_adapter_weights(self.directory)  # names adapter_model.bin and its conversion command
            raise RlgenError(f"{self.label}: no {ADAPTER_WEIGHTS} (it is missing)")
        checked_file(self.directory, weights)  # no link out of the adapter directory, a regular file
        self.file = SafetensorsFile(weights)
        self.folds: dict[str, _Fold] = {}
        try:
            self._plan(weights)
        except BaseException:
            self.file.close()
            raise

    def _check_config(self, path: Path) -> None:
        cfg = self.config
        if cfg.get("peft_type", "LORA") != "LORA":
            raise RlgenError(f"{path}: key 'peft_type' is {show_value(cfg.get('peft_type'))}; only LORA adapters can be folded")
        for key, what in UNSUPPORTED.items():
            if cfg.get(key):
                raise RlgenError(f"{path}: key '{key}': {what} cannot be folded by rlgen merge")
        for key in ("r", "lora_alpha"):
            if not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
                raise RlgenError(f"{path}: key '{key}' must be a positive number, got {show_value(cfg.get(key))}")

    def _scale(self, module: str) -> tuple[int, float]:
        cfg = self.config
        rank = _pattern_value(cfg.get("rank_pattern"), module, cfg["r"])
        alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg["lora_alpha"])
        return int(rank), alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)

    def _plan(self, weights: Path) -> None:
        for key in self.file.names:
            name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            if "lora_magnitude_vector" in name:
                raise RlgenError(f"{weights}: tensor '{key}' belongs to a DoRA adapter, which cannot be folded")
            match = _FACTOR.match(name)
            if match is None:
                if ".lora_" in name or "trainable_tokens" in name:
                    raise RlgenError(f"{weights}: tensor '{key}' is of an unsupported LoRA layer type")
                target = name.replace(".base_layer.", ".")  # a saved base layer / modules_to_save copy
                fold = self.folds.setdefault(target, _Fold())
                fold.replace = key
                continue
            module, kind, suffix = match["module"], match["kind"], match["suffix"]
            if suffix == ".bias":
                if kind != "lora_B":
                    raise RlgenError(f"{weights}: tensor '{key}' is of an unsupported LoRA layer type")
                self.folds.setdefault(f"{module}.bias", _Fold()).bias = key
                continue
            fold = self.folds.setdefault(f"{module}.weight", _Fold())
            fold.kind = "embedding" if "embedding" in kind else "linear"
            if kind.endswith("A"):
                fold.a = key
            else:
                fold.b = key
            rank, fold.scale = self._scale(module)
            if kind.endswith("A") and self.file.info(key).shape[0] != rank:
                raise RlgenError(f"{weights}: tensor '{key}' has rank {self.file.info(key).shape[0]} but "
                                 f"adapter_config.json says r = {rank} for '{module}'")
        for target, fold in self.folds.items():
            if fold.bias is not None:
                fold.scale = self._scale(target[: -len(".bias")])[1]
            if (fold.a is None) != (fold.b is None):
                raise RlgenError(f"{weights}: '{target}' has only one of its two LoRA factors")

    def check(self, base) -> None:
        """Every folded tensor exists in `base` (a Checkpoint) with a shape the factors fit."""
        for target, fold in self.folds.items():
            if target not in base:
                what = fold.replace or fold.a or fold.bias
                raise RlgenError(f"{self.label}: adapter tensor '{what}' targets '{target}', which {base.label} "
                                 "does not have (tied embeddings, or an adapter for another model?)")
            info = base.info(target)
            if not info.dtype.is_floating_point:
                raise RlgenError(f"{base.label}: tensor '{target}' is {info.dtype}: LoRA folds into floating-point "
                                 "weights only (quantized base?)")
            for key in (fold.replace, fold.bias):
                if key is not None and self.file.info(key).shape != info.shape:
                    raise RlgenError(f"{self.label}: adapter tensor '{key}' is {list(self.file.info(key).shape)} but "
                                     f"{base.label} has '{target}' as {list(info.shape)}")
            if fold.a is not None:
                shape = self._delta_shape(fold)
                if shape != info.shape:
                    raise RlgenError(f"{self.label}: LoRA factors '{fold.a}' / '{fold.b}' make a {list(shape)} update "
                                     f"for '{target}' {list(info.shape)} (unsupported layer type, e.g. a grouped "
                                     "convolution, or an adapter for another model)")

    def _delta_shape(self, fold: _Fold) -> tuple[int, ...]:
        a, b = self.file.info(fold.a).shape, self.file.info(fold.b).shape
        if b[1:2] != a[:1] or any(d != 1 for d in b[2:]):
            return (-1,)
        if fold.kind == "embedding":
            return (a[1], b[0])
        if len(a) == 2:
            return (a[1], b[0]) if self.config.get("fan_in_fan_out") else (b[0], a[1])
        return (b[0], *a[1:])

    def delta(self, fold: _Fold) -> torch.Tensor:
        """scale * B @ A in float32, shaped like the base tensor."""
        a = self.file.tensor(fold.a).float()
        b = self.file.tensor(fold.b).float()
        product = b.reshape(b.shape[0], b.shape[1]) @ a.reshape(a.shape[0], -1)
        if fold.kind == "embedding" or (a.dim() == 2 and self.config.get("fan_in_fan_out")):
            product = product.T
        elif a.dim() > 2:
            product = product.view(b.shape[0], *a.shape[1:])
        return product * fold.scale

    def fold(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The base tensor `name` with this adapter folded in (the input itself when untouched)."""
        fold = self.folds.get(name)
        if fold is None:
            return tensor
        if fold.replace is not None:
            tensor = self.file.tensor(fold.replace).to(tensor.dtype)
        if fold.a is None and fold.bias is None:
            return tensor.clone()  # never hand out a view of the adapter file's pages
        update = self.delta(fold) if fold.a is not None else self.file.tensor(fold.bias).float() * fold.scale
        return (tensor.float() + update).to(tensor.dtype)

    def close(self) -> None:
        self.file.close()


class FoldedCheckpoint:
    """A Checkpoint with a LoRA adapter folded into the tensors it touches, as they are read."""

    def __init__(self, base, adapter: LoraAdapter):
        try:
            adapter.check(base)
        except BaseException:
            adapter.close()
            raise
        self.base, self.adapter = base, adapter
        self.label = f"{base.label}+{adapter.label}"
        self.prefix = base.prefix
        self.directory = base.directory

    @property
    def names(self) -> list[str]:
        return self.base.names

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def info(self, name: str):
        return self.base.info(name)

    def tensor(self, name: str) -> torch.Tensor:
        return self.adapter.fold(name, self.base.tensor(name))

    def release(self, name: str) -> None:
        self.base.release(name)

    def close(self) -> None:
        self.adapter.close()
        self.base.close()
