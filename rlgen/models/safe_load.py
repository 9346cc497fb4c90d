"""Loading model directories safely: no code from the directory, no pickle, no network.

Every `from_pretrained` in rlgen (transformers, peft, diffusers) goes through the keyword arguments and
checks here:

- `trust_remote_code=False`: a directory whose config names its own Python code (`auto_map` for an
  architecture transformers does not know) is refused before transformers sees it, so transformers never
  asks "run custom code? [y/N]" on stdout nor reads the answer from stdin;
- `use_safetensors=True`: weights stored only as a pickle (`pytorch_model.bin`, `adapter_model.bin`,
  `.pt`, ...) are refused with the one-line command that converts them (unpickling can run code);
- `local_files_only=True`: nothing is downloaded, and a config naming a Hub repository fails at once.
"""
from __future__ import annotations

import contextlib
import json
import shlex
from pathlib import Path
from typing import Iterator

from rlgen.errors import RlgenError, show_value
from rlgen.plugins import registry

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Files whose `auto_map` can name code shipped in the directory.
AUTO_MAP_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json")
NO_CODE = "rlgen never runs code from model directories"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"


def no_download_kwargs() -> dict:
    """For tokenizers, configs and schedulers: local files only, never the directory's code."""
    return {"trust_remote_code": False, "local_files_only": True}


def weights_kwargs() -> dict:
    """For transformers models: also safetensors weights only."""
    return {**no_download_kwargs(), "use_safetensors": True}


def diffusers_weights_kwargs() -> dict:
    """For diffusers models (ModelMixin takes no trust_remote_code; it never runs a directory's code)."""
    return {"local_files_only": True, "use_safetensors": True}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # the loader reports unreadable files with its own message
    return data if isinstance(data, dict) else {}


def _known_architecture(model_type) -> bool:
    from transformers import CONFIG_MAPPING

    return isinstance(model_type, str) and model_type in CONFIG_MAPPING


def _known_class(name) -> bool:
    import transformers

    return isinstance(name, str) and name.isidentifier() and not name.startswith("_") and hasattr(transformers, name)


def check_no_custom_code(directory: Path) -> None:
    """Refuse a directory that can only be loaded by running its own Python files (an `auto_map` for an
    architecture or tokenizer class that transformers does not ship). An `auto_map` beside a known
    architecture is harmless: with trust_remote_code=False transformers uses its own class."""
    directory = Path(directory)
    for name in AUTO_MAP_FILES:
        file = directory / name
        if not file.is_file():
            continue
        data = _read_json(file)
        if not data.get("auto_map"):
            continue
        if name == "config.json":
            if not _known_architecture(data.get("model_type")):
                raise RlgenError(f"{file}: key 'auto_map' asks for the directory's own Python code (model_type "
                                 f"{show_value(data.get('model_type'))} is not a transformers architecture); {NO_CODE}")
        elif name == "tokenizer_config.json":
            tokenizer_class = data.get("tokenizer_class")
            if not (_known_class(tokenizer_class) or tokenizer_class == "TokenizersBackend"):
                raise RlgenError(f"{file}: key 'auto_map' asks for the directory's own Python code (tokenizer_class "
                                 f"{show_value(tokenizer_class)} is not a transformers class); {NO_CODE}")
        else:
            processor_class = data.get("processor_class") or data.get("image_processor_type")
            if not _known_class(processor_class):
                raise RlgenError(f"{file}: key 'auto_map' asks for the directory's own Python code; {NO_CODE}")


def convert_command(weights_dir: Path, loader: str) -> str:
    """The one-line shell command that rewrites pickled weights as safetensors with `loader`
    (e.g. "transformers.AutoModelForCausalLM", "diffusers.UNet2DModel")."""
    library, cls = loader.rsplit(".", 1)
    where = json.dumps(str(weights_dir))  # a Python string literal in double quotes, inside shell single quotes
    code = (f"import {library}; {library}.{cls}.from_pretrained({where}, use_safetensors=False)"
            f".save_pretrained({where}, safe_serialization=True)")
    return f"python -c {shlex.quote(code)}"


def _pickles(directory: Path) -> list[Path]:
    try:
        return sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES))
    except OSError:
        return []


def _pickle_error(file: Path, command: str) -> RlgenError:
    return RlgenError(f"{file}: weights stored only as a pickle, which rlgen never loads (unpickling can run code); "
                      f"only if you trust this file, convert it once with: {command}")


def check_safetensors(directory: Path, loader: str) -> None:
    """Weights must be in safetensors: a directory holding only pickled weights is an error naming the
    file and the conversion command. A directory with no weights at all is left to the loader."""
    directory = Path(directory)
    if any(directory.glob("*.safetensors")) or any(directory.glob("*.safetensors.index.json")):
        return
    pickles = _pickles(directory)
    if pickles:
        raise _pickle_error(pickles[0], convert_command(directory, loader))


def check_model_dir(directory: Path, loader: str = "transformers.AutoModelForCausalLM") -> None:
    """Both checks for a transformers model directory, before transformers opens it."""
    check_no_custom_code(directory)
    check_safetensors(directory, loader)


def check_adapter_weights(directory: Path) -> None:
    """A peft adapter's weights must be adapter_model.safetensors (peft would unpickle the .bin)."""
    directory = Path(directory)
    if (directory / ADAPTER_WEIGHTS).is_file():
        return
    pickled = directory / ADAPTER_PICKLE
    if pickled.is_file():
        code = (f"import torch; from safetensors.torch import save_file; save_file(torch.load({json.dumps(str(pickled))}, "
                f"weights_only=True), {json.dumps(str(directory / ADAPTER_WEIGHTS))})")
        raise _pickle_error(pickled, f"python -c {shlex.quote(code)}")
    raise RlgenError(f"{directory}: LoRA adapter without its weights ({ADAPTER_WEIGHTS})")


def adapter_base_path(directory: Path) -> Path:
    """The local base model named by an adapter's `base_model_name_or_path` (a directory or a built-in
    name); a Hub repository id is an error at once (nothing is downloaded)."""
    config_file = Path(directory) / "adapter_config.json"
    base = _read_json(config_file).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise RlgenError(f"{config_file}: key 'base_model_name_or_path' must name the base model directory")
    models = registry("model")
    if base in models:
        return Path(models.get(base))
    if not (Path(base) / "config.json").is_file():
        raise RlgenError(f"{config_file}: key 'base_model_name_or_path' is {show_value(base)}, not a local model "
                         "directory (rlgen never downloads: give the base model's local path)")
    return Path(base)


def load_peft_adapter(model, directory: Path, is_trainable: bool = False, causal_lm: bool = False):
    """`PeftModel.from_pretrained` on a local adapter directory, safetensors only (`causal_lm`: a
    PeftModelForCausalLM even when the adapter config names no task type, as AutoPeftModelForCausalLM gives)."""
    from peft import PeftModel, PeftModelForCausalLM

    directory = Path(directory)
    check_adapter_weights(directory)
    cls = PeftModelForCausalLM if causal_lm else PeftModel
    with load_errors(f"cannot load the LoRA adapter {directory}"):
        return cls.from_pretrained(model, str(directory), is_trainable=is_trainable, local_files_only=True)


@contextlib.contextmanager
def load_errors(what: str) -> Iterator[None]:
    """Any loader failure becomes one line `what: first line of the error`; transformers' refusal to
    run a directory's code (the checks above normally come first) says so plainly."""
    try:
        yield
    except RlgenError:
        raise
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad model directory for the user
        text = str(exc).strip() or type(exc).__name__
        if "trust_remote_code" in text or "custom code" in text:
            raise RlgenError(f"{what}: the directory asks for its own Python code; {NO_CODE}") from None
        raise RlgenError(f"{what}: {text.splitlines()[0]}") from None
