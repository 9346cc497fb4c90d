"""Causal-LM backbone: any local Hugging Face directory (or built-in name) in, HF directory out."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from rlgen.data.records import use_umask_modes
from rlgen.errors import RlgenError
from rlgen.models.backbone import claiming_backbone
from rlgen.models.safe_load import (
    adapter_base_path,
    check_model_dir,
    check_no_custom_code,
    load_errors,
    load_peft_adapter,
    no_download_kwargs,
    weights_kwargs,
)
from rlgen.plugins import registry

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    path: str = "tiny-arith"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # DTYPES' names
    lora_r: int = 0  # 0 = full fine-tuning; > 0 trains a peft LoRA adapter
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    lora_merge_on_save: bool = True  # final/ holds merged weights; false keeps the adapter
    gradient_checkpointing: bool = False  # recompute activations in the backward pass (less memory, ~30% more time)
    # Log-prob passes without padding: each batch's sequences packed into rows, position_ids restarting per
    # sequence (rlgen.models.logprobs.supports_packing says which models; the others silently run padded).
    padding_free: bool = field(default=False, metadata={"doc": "pack log-prob passes without padding (position_ids "
                                                               "per sequence; other models run padded)"})

    def validate(self):
        if self.dtype not in DTYPES:
            raise RlgenError(f"config key 'model.dtype' must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.lora_r < 0:
            raise RlgenError("config key 'model.lora_r' must be >= 0")


def quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    import transformers

    # peft's disable_adapter() still asks for the deprecated is_gradient_checkpointing: not the user's concern
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def resolve_model_path(name_or_path: str) -> Path:
    """A built-in name or a local HF model directory; anything else is a clear error."""
    models = registry("model")
    other = claiming_backbone(name_or_path)
    if other is not None and other.name != "causal-lm":  # another backbone's model (a diffusers pipeline ...)
        usage = getattr(other, "usage", "")
        raise RlgenError(f"'{name_or_path}' is {other.description}, not a causal LM" + (f": {usage}" if usage else ""))
    if name_or_path in models:
        path = Path(models.get(name_or_path))
        if not (path / "config.json").is_file():
            raise RlgenError(f"built-in model '{name_or_path}' is missing its files at {path}")
        return path
    path = Path(name_or_path)
    if not path.exists():
        known = ", ".join(models.names())
        raise RlgenError(f"unknown model '{name_or_path}': not a built-in name ({known}) nor an existing directory")
    if not path.is_dir() or not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
        raise RlgenError(f"{path} is not a Hugging Face model directory (no config.json)")
    return path


# Files that hold (part of) a tokenizer: a directory with none of them has no tokenizer of its own.
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


def tokenizer_dir(path: Path) -> Path:
    """Where a model directory's tokenizer is: the directory itself, except for a LoRA adapter saved
    without tokenizer files (peft's save_pretrained writes none), whose base model's tokenizer it uses.
    An adapter's base is resolved first, so a Hub id there fails at once naming the key."""
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        return path
    base = adapter_base_path(path)
    return path if any((path / name).is_file() for name in TOKENIZER_FILES) else base


def load_tokenizer(path: Path):
    """The directory's tokenizer (an adapter's base's when the adapter has none), with an EOS token and a
    pad id inside the model's vocabulary."""
    from transformers import AutoTokenizer

    quiet_transformers()
    source = tokenizer_dir(Path(path))
    check_no_custom_code(source)
    with load_errors(f"cannot load a tokenizer from {source}"):
        tokenizer = AutoTokenizer.from_pretrained(str(source), **no_download_kwargs())
    _settle_special_tokens(tokenizer, Path(path))
    return tokenizer


def _model_config(path: Path) -> dict:
    """config.json of the model (of its base for an adapter directory without one), or {}."""
    for directory in (path, _adapter_base_or_none(path)):
        if directory is not None and (directory / "config.json").is_file():
            try:
                data = json.loads((directory / "config.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return {}
            return data if isinstance(data, dict) else {}
    return {}


def _adapter_base_or_none(path: Path) -> Path | None:
    if not (path / "adapter_config.json").is_file():
        return None
    try:
        return adapter_base_path(path)
    except RlgenError:
        return None  # reported when the model itself loads


def _valid_id(token_id, vocab_size) -> bool:
    return isinstance(token_id, int) and 0 <= token_id and (vocab_size is None or token_id < vocab_size)


def _settle_special_tokens(tokenizer, path: Path) -> None:
    """EOS ends completions and pad fills batches. A tokenizer without EOS takes the model config's
    eos_token_id; a pad id missing or outside the model's vocabulary (transformers 5's Qwen2 tokenizer
    invents one) becomes EOS. Neither available: one line naming the directory."""
    config = _model_config(path)
    vocab_size = config.get("vocab_size") if isinstance(config.get("vocab_size"), int) else None
    if not _valid_id(tokenizer.eos_token_id, vocab_size):
        eos = config.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
        if _valid_id(eos, vocab_size) and eos < len(tokenizer):
            tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    eos_ok = _valid_id(tokenizer.eos_token_id, vocab_size)
    if not _valid_id(tokenizer.pad_token_id, vocab_size):
        if not eos_ok:
            raise RlgenError(f"tokenizer of {path} has no usable EOS or pad token (none set, or an id outside the "
                             f"model's vocabulary of {vocab_size}): set eos_token in its tokenizer_config.json")
        tokenizer.pad_token = tokenizer.eos_token


def load_model(path: Path, dtype: str = "float32"):
    """A causal LM, or a saved LoRA adapter on its local base (safetensors only, no code, no network)."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    path = Path(path)
    if (path / "adapter_config.json").is_file():  # a saved LoRA adapter: load base + adapter
        return load_peft_adapter(load_model(adapter_base_path(path), dtype), path, causal_lm=True)
    check_model_dir(path, "transformers.AutoModelForCausalLM")
    with load_errors(f"cannot load a causal LM from {path}"):
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype], **weights_kwargs())


def load_start_model(path: Path, dtype: str = "float32"):
    """The model training starts from: a causal LM, or a saved LoRA adapter merged into its base (trainable:
    peft froze the base for inference)."""
    model = load_model(path, dtype)
    return model.merge_and_unload().requires_grad_(True) if is_peft(model) else model


def load_policy(cfg: ModelConfig):
    """(model, tokenizer, resolved path); LoRA is attached when cfg.lora_r > 0. A saved LoRA adapter directory
    is a model like any other: its adapter is merged into its base, and training starts from the merged
    weights (with a new adapter when cfg.lora_r > 0)."""
    path = resolve_model_path(cfg.path)
    tokenizer = load_tokenizer(path)
    model = load_start_model(path, cfg.dtype)
    if cfg.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        target = cfg.lora_target_modules
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=target[0] if target == ["all-linear"] else target,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    return model, tokenizer, path


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def unwrap_peft(model):
    """The transformers model inside a peft wrapper (adapters stay injected), or the model itself."""
    return model.get_base_model() if is_peft(model) and hasattr(model, "get_base_model") else model


def save_hf(model, tokenizer, out_dir: Path, merge_lora: bool = True, extra_files: tuple[Path, ...] = ()) -> None:
    """Write an HF directory (safetensors) atomically: a temporary sibling, then rename. `extra_files` are
    copied in beside the weights (e.g. the base model's rlgen_defaults.toml)."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    to_save = model
    if is_peft(model) and merge_lora:
        import copy

        to_save = copy.deepcopy(model).merge_and_unload()
    to_save.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    copy_side_files(extra_files, tmp)
    replace_dir(tmp, out_dir)


def copy_side_files(files, directory: Path) -> None:
    """Copy regular files (not links) into a model directory being written."""
    for file in files:
        file = Path(file)
        if file.is_file() and not file.is_symlink():
            shutil.copyfile(file, Path(directory) / file.name)


def side_files(model_dir) -> tuple[Path, ...]:
    """Files of a model directory that rlgen reads and that a trained copy keeps: its recommended settings."""
    recommended = Path(model_dir) / "rlgen_defaults.toml"
    return (recommended,) if recommended.is_file() else ()


def replace_dir(tmp: Path, target: Path) -> None:
    """Swap a finished temporary directory into place (rename is atomic on one filesystem)."""
    use_umask_modes(tmp)  # safetensors writes 0600 files: saved models get the user's umask instead
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old)
    else:
        os.rename(tmp, target)


def model_summary(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    return {"path": str(path), "architecture": (config.get("architectures") or ["?"])[0]}


def checkpoint_weights(model):
    """(name, tensor) of the policy's weights under the names of its HF checkpoint, one tensor at a time and
    without gradient: a LoRA module's weight comes merged (W + its delta, computed here: the model itself is
    left untouched, so no merge / unmerge round-off reaches the trained base), a sharded (FSDP) parameter
    gathered just before it is yielded (every rank must walk the iterator in step). For engines holding their
    own copy of the weights (vLLM), which read them as they would a checkpoint."""
    base = unwrap_peft(model)
    adapter = getattr(model, "active_adapter", None) if is_peft(model) else None
    adapter = adapter[0] if isinstance(adapter, (list, tuple)) else adapter
    with torch.no_grad():
        for name, value in base.state_dict(keep_vars=True).items():
            if ".lora_" in name or ".original_module." in name:
                continue  # adapters are merged into their base weights; modules_to_save replace the originals
            gathered = value.full_tensor() if hasattr(value, "full_tensor") else value
            if ".base_layer." in name:
                module_name, _, leaf = name.partition(".base_layer.")
                module = base.get_submodule(module_name)
                if getattr(module, "use_dora", {}).get(adapter, False):
                    raise RlgenError("DoRA adapters cannot be handed to another engine yet (their magnitudes are not "
                                     "merged here)")
                if leaf == "weight" and adapter is not None and adapter in getattr(module, "lora_A", {}) \
                        and not getattr(module, "merged", False):
                    gathered = gathered + module.get_delta_weight(adapter).to(gathered.dtype)
                name = f"{module_name}.{leaf}"
            elif adapter is not None and f".modules_to_save.{adapter}." in name:
                name = name.replace(f".modules_to_save.{adapter}.", ".")
            yield name, gathered.detach()
