"""Streaming merge: one tensor name at a time from memory-mapped inputs to a planned sharded output.

For each tensor name: zero-copy views of every model's tensor, the method's fn, the result appended to
the output shard, then the input pages released; the process holds a few tensors, never a model.

Inputs (a model string): a Hugging Face causal-LM directory, a diffusers denoiser directory
(`diffusion_pytorch_model*.safetensors`), a diffusers pipeline directory (`model_index.json`: its `unet`
or `transformer` subfolder is merged, every other component is copied from the template), a built-in
model name, a peft LoRA adapter directory (folded into its `base_model_name_or_path`), or `DIR+ADAPTER`
(the adapter folded into DIR's tensors as they are read). The output's non-weight files (config,
tokenizer, generation config, scheduler ...) come from the template: the base model, or the first model
when there is none. The output is written into a temporary directory beside OUT and renamed into place
at the end; nothing is left behind on error.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import resource
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from rlgen.errors import RlgenError, show_value
from rlgen.extension import capabilities
from rlgen.merging.config import MergeConfig, ParameterResolver, merged_models, validate
from rlgen.merging.contracts import MergeInput, merge_tensor
from rlgen.merging.lora import ADAPTER_CONFIG, FoldedCheckpoint, LoraAdapter, is_adapter_dir
from rlgen.merging.methods import dare_key
from rlgen.merging.model_files import copy_file, copy_tree, read_text
from rlgen.merging.safetensors_io import Checkpoint, ShardedWriter, find_weights
from rlgen.models.causal_lm import replace_dir
from rlgen.plugins import registry

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DENOISERS = ("unet", "transformer")  # as rlgen.diffusion.pipeline.DENOISERS (not imported: keeps this light)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf")
Progress = Callable[[int, int], None]  # (tensors done, tensors in all)


@dataclass
class Source:
    """One input model as a stream of tensors."""

    label: str  # as the user wrote it
    root: Path  # the model directory (a pipeline's root)
    weights_dir: Path  # where its weights live (root, or root/unet)
    kind: str  # "lm" | "denoiser" | "pipeline"
    denoiser: str | None  # a pipeline's merged subfolder
    checkpoint: Checkpoint | FoldedCheckpoint

    @property
    def family(self) -> str:
        return "causal LM" if self.kind == "lm" else "diffusers model"


def _locate(name: str) -> Path | None:
    """A built-in model's directory, an existing path, or None."""
    models = registry("model")
    if name in models:
        return Path(models.get(name))
    path = Path(name)
    return path if path.exists() else None


def _split_adapter(spec: str) -> tuple[Path, Path] | None:
    """DIR+ADAPTER -> (DIR, ADAPTER) when both exist (tried at every '+', rightmost first)."""
    cuts = [i for i, c in enumerate(spec) if c == "+"]
    for i in reversed(cuts):
        base, adapter = _locate(spec[:i]), Path(spec[i + 1:])
        if base is not None and adapter.is_dir():
            return base, adapter
    return None


def _unknown(spec: str) -> RlgenError:
    known = ", ".join(registry("model").names())
    return RlgenError(f"unknown model '{spec}': not a built-in name ({known}), an existing directory, nor DIR+ADAPTER")


def open_source(spec: str) -> Source:
    path = _locate(spec)
    adapter = None
    if path is None:
        split = _split_adapter(spec)
        if split is None:
            raise _unknown(spec)
        path, adapter = split
    if not path.is_dir():
        raise RlgenError(f"{spec}: not a model directory")
    root, weights_dir, kind, denoiser = path, path, "lm", None
    if os.path.lexists(path / "model_index.json"):  # (a link or FIFO is refused by _denoiser, not skipped)
        kind, denoiser = "pipeline", _denoiser(path)
        weights_dir = path / denoiser
        if adapter is None and (path / f"{denoiser}_lora").is_dir():  # saved with lora_merge_on_save = false
            adapter = path / f"{denoiser}_lora"
    elif is_adapter_dir(path) and find_weights(path) is None:  # an adapter alone: fold it into its base
        if adapter is not None:
            raise RlgenError(f"{spec}: {path} is itself a LoRA adapter; give its base model directory before '+'")
        base_name = _adapter_base(path)
        root = weights_dir = _locate(base_name)
        if root is None:
            raise RlgenError(f"{path}/{ADAPTER_CONFIG}: base_model_name_or_path {show_value(base_name)} is not a local "
                             f"directory or built-in model (give it as BASE+{path})")
        adapter = path
    if find_weights(weights_dir, root) is None and any(weights_dir.glob("*.bin")):
        raise RlgenError(f"{spec}: {weights_dir} has only .bin (pickle) weights; convert them to safetensors "
                         "(rlgen never unpickles)")
    checkpoint = Checkpoint(weights_dir, label=spec, root=root)
    if checkpoint.prefix == "diffusion_pytorch_model" and kind == "lm":
        kind = "denoiser"
    if adapter is not None:
        try:
            checkpoint = FoldedCheckpoint(checkpoint, LoraAdapter(adapter, label=str(adapter)))
        except BaseException:
            checkpoint.close()
            raise
    return Source(spec, root, weights_dir, kind, denoiser, checkpoint)


def _denoiser(path: Path) -> str:
    try:
        index = json.loads(read_text(path, path / "model_index.json"))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise RlgenError(f"{path}/model_index.json: bad JSON ({type(exc).__name__})") from None
    if not isinstance(index, dict):
        raise RlgenError(f"{path}/model_index.json: expected a JSON object")
    for name in DENOISERS:
        if name in index and (path / name).is_dir():
            return name
    raise RlgenError(f"{path}: a diffusers pipeline without a `unet` or `transformer` folder to merge")


def _adapter_base(path: Path) -> str:
    try:
        config = json.loads(read_text(path, path / ADAPTER_CONFIG))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise RlgenError(f"{path}/{ADAPTER_CONFIG}: bad JSON ({type(exc).__name__})") from None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if base is not None and not isinstance(base, str):
        raise RlgenError(f"{path}/{ADAPTER_CONFIG}: key 'base_model_name_or_path' must be a string, "
                         f"got {show_value(base)}")
    if not base:
        raise RlgenError(f"{path}/{ADAPTER_CONFIG}: no base_model_name_or_path; give the base as BASE+{path}")
    return base


# --------------------------------------------------------------------------- checks

def check_compatible(template: Source, others: list[Source]) -> None:
    """Same family, same tensor names, and per name the same shape and dtype as the template."""
    names = template.checkpoint.names
    expected = set(names)
    for source in others:
        if source is template:
            continue
        if source.family != template.family:
            raise RlgenError(f"{source.label} is a {source.family} but {template.label} is a {template.family}")
        have = set(source.checkpoint.names)
        if have != expected:
            missing = sorted(expected - have)
            if missing:
                raise RlgenError(f"{source.label} has no tensor '{missing[0]}' (which {template.label} has)"
                                 + (f", nor {len(missing) - 1} more" if len(missing) > 1 else ""))
            extra = sorted(have - expected)
            raise RlgenError(f"{source.label} has tensor '{extra[0]}', which {template.label} does not have"
                             + (f" ({len(extra) - 1} more)" if len(extra) > 1 else ""))
        for name in names:
            mine, theirs = template.checkpoint.info(name), source.checkpoint.info(name)
            if mine.shape != theirs.shape or mine.dtype != theirs.dtype:
                raise RlgenError(f"{source.label}: tensor '{name}' is {_describe(theirs)} but in {template.label} "
                                 f"it is {_describe(mine)}")


def _describe(info) -> str:
    return f"{str(info.dtype).replace('torch.', '')} {list(info.shape)}"


# --------------------------------------------------------------------------- output

TMP_MARKER = ".rlgen-merge.lock"  # inside each temporary output, flock-ed by the merge writing it
TMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")  # mkdtemp(prefix=".NAME.", suffix=".tmp")


def _remove_stale_temps(parent: Path) -> list[str]:
    """Remove the temporary outputs that killed merges left in `parent`; their names.

    Only directories that are certainly rlgen's are touched: a name like `.NAME.xxxxxxxx.tmp`, a real
    folder (not a link) holding a TMP_MARKER file that names rlgen and that no live process holds locked
    (the lock goes with the process that took it, however it ended)."""
    removed = []
    for entry in sorted(parent.iterdir()) if parent.is_dir() else []:
        if not TMP_NAME.fullmatch(entry.name) or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            fd = os.open(entry / TMP_MARKER, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue  # no marker: not ours (or written by an older rlgen)
        with os.fdopen(fd, "rb") as marker:
            try:
                fcntl.flock(marker.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a merge still running
            if not stat.S_ISREG(os.fstat(marker.fileno()).st_mode) or not marker.read(64).startswith(b"rlgen merge"):
                continue  # not ours, or its merge had not yet written the marker
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed


def _prepare_out(out: str) -> tuple[Path, Path, list[Path], object]:
    """(target, temporary sibling, parents created, the temporary's lock): refuses to replace anything but
    a model directory; removes what killed merges left in the parent."""
    target = Path(out)
    if target.exists():
        looks_like_model = any((target / f).is_file() for f in ("config.json", "model_index.json"))
        if not target.is_dir() or (any(target.iterdir()) and not looks_like_model):
            raise RlgenError(f"--out {target} exists and is not a model directory (refusing to replace it)")
    created = [p for p in [target.parent, *target.parent.parents] if not p.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    lock = open(tmp / TMP_MARKER, "wb")
    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # held until the merge ends: marks tmp as in use
    lock.write(f"rlgen merge, pid {os.getpid()}\n".encode())  # written once locked (see _remove_stale_temps)
    lock.flush()
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the output private
    return target, tmp, created, lock


def _is_weight_file(name: str) -> bool:
    return (name.endswith(WEIGHT_SUFFIXES) or name.endswith((".safetensors.index.json", ".bin.index.json"))
            or name == ADAPTER_CONFIG or name.startswith("adapter_model."))


def _copy_non_weights(root: Path, src: Path, dst: Path, skip: set[str] = frozenset()) -> None:
    """Copy src's non-weight files to dst: regular files only, no link out of the model directory root."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in sorted(src.iterdir()):
        if item.name.startswith(".") or item.name in skip or _is_weight_file(item.name):
            continue
        if item.is_dir():
            copy_tree(root, item, dst / item.name)
        else:
            copy_file(root, item, dst / item.name)


def _copy_template(template: Source, tmp: Path) -> Path:
    """Copy the template's non-weight files; the directory the merged weights go to."""
    if template.kind == "pipeline":
        skip = {template.denoiser, f"{template.denoiser}_lora"}
        _copy_non_weights(template.root, template.root, tmp, skip)
        _copy_non_weights(template.root, template.weights_dir, tmp / template.denoiser)
        return tmp / template.denoiser
    _copy_non_weights(template.root, template.root, tmp)
    return tmp


def _record_dtype(weights_dir: Path, dtype: str | None) -> None:
    """Point config.json's dtype entries at the output dtype (transformers loads with it)."""
    config = weights_dir / "config.json"
    if dtype is None or not config.is_file():
        return
    data = json.loads(config.read_text())
    keys = [k for k in ("dtype", "torch_dtype") if k in data]
    if keys:
        data.update({k: dtype for k in keys})
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _stream(template: Source, entries: list[tuple], produce: Callable[[str], torch.Tensor],
            release: Callable[[str], None], out: str, *, max_shard_size: int, progress: Progress | None,
            dtype: str | None, culprit: Callable[[str], str | None] | None = None) -> dict:
    """Write produce(name) for every planned (name, dtype, shape) into OUT (atomically); a summary. A
    produced tensor holding NaN / inf is an error (nothing written), naming culprit(name) when it names
    the input that holds them."""
    target, tmp, created, lock = _prepare_out(out)
    writer = None
    try:
        weights_dir = _copy_template(template, tmp)
        _record_dtype(weights_dir, dtype)
        writer = ShardedWriter(weights_dir, entries, prefix=template.checkpoint.prefix, max_shard_size=max_shard_size)
        total = len(entries)
        if progress:
            progress(0, total)
        for done, (name, _, _) in enumerate(entries, 1):
            merged = produce(name)
            if not all_finite(merged):
                source = culprit(name) if culprit else None
                raise RlgenError(f"tensor {show_value(name)}: the merged values are not finite (NaN or inf)"
                                 + (f"; {show_value(source)} holds non-finite values in it" if source else "")
                                 + f"; nothing written to {out}")
            writer.write(name, merged)
            del merged
            release(name)
            if progress:
                progress(done, total)
        files = writer.finish()
        (tmp / TMP_MARKER).unlink()  # (still locked through `lock` until the rename is done)
        replace_dir(tmp, target)
    except BaseException:
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in created:  # directories made for OUT, innermost first
            try:
                parent.rmdir()
            except OSError:
                break
        raise
    finally:
        lock.close()
    return {"out": str(target), "tensors": len(entries), "shards": len(files["files"]), "bytes": files["bytes"]}


_FINITE_CHUNK = 1 << 24  # elements checked at a time (a 16 MB bool mask)


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a floating tensor holds no NaN / inf (any other dtype: True), in chunks."""
    if not tensor.is_floating_point():
        return True
    flat = tensor.reshape(-1)
    if flat.element_size() == 1:  # float8: isfinite is not implemented for it everywhere
        flat = flat.to(torch.float16)
    return all(bool(torch.isfinite(flat[i:i + _FINITE_CHUNK]).all()) for i in range(0, flat.numel(), _FINITE_CHUNK))


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def _out_entries(template: Source, dtype: str | None) -> list[tuple]:
    out_dtype = DTYPES[dtype] if dtype else None
    entries = []
    for name in template.checkpoint.names:
        info = template.checkpoint.info(name)
        keep = out_dtype is None or not info.dtype.is_floating_point
        entries.append((name, info.dtype if keep else out_dtype, info.shape))
    return entries


# --------------------------------------------------------------------------- public API

def merge_models(config: MergeConfig, out: str, progress: Progress | None = None, device=None) -> dict:
    """Merge `config`'s models into the model directory OUT, streaming; the summary (out, tensors, shards,
    bytes, method, seconds, ...). On a CUDA `device` each tensor goes host -> device, is merged there and
    comes back before it is written, so the device holds a few tensors at a time; on the CPU (the default)
    nothing moves."""
    started = time.perf_counter()
    device = torch.device(device or "cpu")
    on_host = device.type == "cpu"

    def to_device(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return tensor if on_host or tensor is None else tensor.to(device, non_blocking=True)

    method = validate(config)
    listed = merged_models(config, method)
    opened: dict[str, Source] = {}
    try:
        for spec in ([config.base] if config.base else []) + [m.model for m in listed]:
            if spec not in opened:
                opened[spec] = open_source(spec)
        models = [opened[m.model] for m in listed]
        base = opened[config.base] if config.base else None
        template = base or models[0]
        check_compatible(template, list(opened.values()))
        entries = _out_entries(template, config.dtype)
        resolver = ParameterResolver(config, method, template.checkpoint.names)
        out_dtypes = {name: dtype for name, dtype, _ in entries}
        for name, dtype, _ in entries:  # parameter errors (a filter list missing a tensor) before any output
            if dtype.is_floating_point:
                resolver.resolve(name)
        base_for_method = base if capabilities(method).needs_base else None

        def produce(name: str) -> torch.Tensor:
            if not template.checkpoint.info(name).dtype.is_floating_point:
                return template.checkpoint.tensor(name)  # integer buffers are copied, not merged
            tensors = [to_device(m.checkpoint.tensor(name)) for m in models]
            base_tensor = to_device(base_for_method.checkpoint.tensor(name)) if base_for_method else None
            model_params, global_params = resolver.resolve(name)
            keys = [dare_key(config.seed, name, i) for i in range(len(models))]
            merged = merge_tensor(method.fn, MergeInput(name, tensors, base_tensor, model_params, global_params, keys,
                                                        out_dtypes[name]))
            return merged if on_host else merged.cpu()

        def release(name: str) -> None:
            for source in opened.values():
                source.checkpoint.release(name)

        def culprit(name: str) -> str | None:
            for spec, source in opened.items():
                if not all_finite(source.checkpoint.tensor(name)):
                    return spec
            return None

        summary = _stream(template, entries, produce, release, out, max_shard_size=config.max_shard_size,
                          progress=progress, dtype=config.dtype, culprit=culprit)
    finally:
        for source in opened.values():
            source.checkpoint.close()
    return {**summary, "method": config.method, "models": [m.model for m in listed], "base": config.base,
            "dtype": config.dtype, "seed": config.seed, "threads": torch.get_num_threads(), "device": str(device),
            "seconds": round(time.perf_counter() - started, 3), "peak_rss_mb": _peak_rss_mb()}


def fold_adapter(base: str, adapter: str, out: str, *, dtype: str | None = None, max_shard_size: int = 2 * 10**9,
                 progress: Progress | None = None) -> dict:
    """BASE with the LoRA ADAPTER folded in, written to OUT (streaming, atomic); the summary."""
    started = time.perf_counter()
    if not Path(adapter).is_dir():
        raise RlgenError(f"--lora {adapter}: no such adapter directory")
    source = open_source(base)
    try:
        if isinstance(source.checkpoint, FoldedCheckpoint):
            raise RlgenError(f"{base} already carries a LoRA adapter; fold one adapter at a time")
        source.checkpoint = FoldedCheckpoint(source.checkpoint, LoraAdapter(adapter))
        entries = _out_entries(source, dtype)
        out_dtypes = {name: dt for name, dt, _ in entries}

        def produce(name: str) -> torch.Tensor:
            return source.checkpoint.tensor(name).to(out_dtypes[name])

        summary = _stream(source, entries, produce, source.checkpoint.release, out, max_shard_size=max_shard_size,
                          progress=progress, dtype=dtype)
    finally:
        source.checkpoint.close()
    return {**summary, "method": "lora-fold", "base": base, "adapter": adapter, "dtype": dtype,
            "seconds": round(time.perf_counter() - started, 3), "peak_rss_mb": _peak_rss_mb()}
