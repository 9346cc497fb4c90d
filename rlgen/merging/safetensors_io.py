"""Safetensors checkpoints streamed tensor by tensor: memory-mapped reading, planned sharded writing.

Reading: our own header parser and one `mmap` per file; `tensor(name)` is a zero-copy `torch.frombuffer`
view of the mapped bytes (a private, copy-on-write mapping: the file is never modified). Pages a view
touches count in the process RSS until `release(name)` drops them (`madvise(MADV_DONTNEED)`; they come
back from the page cache if read again), so a merge that releases each tensor after use holds a few
tensors, not whole models. torch does not keep the mapping alive: a view must not be used after
`close()` (clone what outlives it).

Writing: `ShardedWriter` plans the shards up front from the names, dtypes and shapes (greedy, in order,
at most `max_shard_size` bytes each unless one tensor is larger), writes each shard's header when the
shard is opened, then appends tensors in the planned order as they are produced. More than one shard
gets an index JSON (`metadata.total_size`, `weight_map`) in the Hugging Face layout, so the output loads
with `safetensors.safe_open` and transformers' / diffusers' `from_pretrained`.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from rlgen.errors import RlgenError, show_value
from rlgen.merging.model_files import allowed_roots, checked_file, inside, read_text

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
CODES = {dtype: code for code, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library itself enforces
WEIGHT_PREFIXES = ("model", "diffusion_pytorch_model")  # transformers, diffusers
DEFAULT_METADATA = {"format": "pt"}


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def tensor_nbytes(dtype: torch.dtype, shape) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict | None, int]:
    """(tensor name -> TensorInfo in file order, __metadata__, file size) of a safetensors file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise RlgenError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise RlgenError(f"{path}: not a safetensors file (header length {length} for a {size}-byte file)")
            raw = fh.read(length)
    except OSError as exc:
        raise RlgenError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw, object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RlgenError(f"{path}: not a safetensors file (bad header JSON: {exc})") from None
    except _DuplicateKey as exc:
        raise RlgenError(f"{path}: not a safetensors file (key {show_value(exc.args[0])} appears twice in an "
                         "object of the header JSON)") from None
    except ValueError:  # json reads integers with Python's int(): at most 4300 digits
        raise RlgenError(f"{path}: not a safetensors file (its header JSON holds an integer too long to "
                         "read)") from None
    except RecursionError:
        raise RlgenError(f"{path}: not a safetensors file (its header JSON is nested too deeply)") from None
    if not isinstance(header, dict):
        raise RlgenError(f"{path}: not a safetensors file (the header is not a JSON object)")
    metadata = header.pop("__metadata__", None)
    data_start = 8 + length
    entries = []
    for name, entry in header.items():
        try:
            code, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            dtype = DTYPES[code]
            if not all(_is_count(n) for n in (*shape, begin, end)):
                raise ValueError("shape and offsets must be non-negative integers")
        except (KeyError, TypeError, ValueError):
            raise RlgenError(f"{path}: tensor {show_value(name)} has a malformed or unsupported header entry: "
                             f"{show_value(entry)}") from None
        info = TensorInfo(dtype, shape, data_start + begin, data_start + end)
        if info.nbytes != tensor_nbytes(dtype, shape) or info.start < data_start or info.end > size:
            raise RlgenError(f"{path}: tensor '{name}' has data offsets {begin}..{end} that do not fit its "
                             f"{code} {list(shape)} or the file size")
        entries.append((name, info))
    entries.sort(key=lambda item: item[1].start)
    return dict(entries), metadata, size


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list) -> dict:
    """A JSON object as a dict, refusing a key given twice (json.loads keeps the last one silently)."""
    result = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _is_count(value) -> bool:
    """A JSON integer >= 0 (not a float such as 1e9992, nor a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class SafetensorsFile:
    """One safetensors file, memory-mapped: zero-copy tensor views and page release.

    The file stays open, so that each tensor() first checks (fstat) that the file still holds the
    tensor's bytes: touching mapped pages past the end of a file truncated meanwhile would kill the
    process with SIGBUS, which no Python code can catch. (A truncation racing with the read of a tensor
    already checked is still fatal: the check narrows the window, it cannot close it.)"""

    def __init__(self, path):
        self.path = Path(path)
        self.infos, self.metadata, size = read_header(self.path)
        self._mm = None
        self._fh = None
        if size > 0:
            self._fh = open(self.path, "rb")
            try:
                self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_COPY)  # writable for frombuffer; never written
            except BaseException:
                self._fh.close()
                raise

    @property
    def names(self) -> list[str]:
        return list(self.infos)

    def info(self, name: str) -> TensorInfo:
        return self.infos[name]

    def _check_size(self, name: str, info: TensorInfo) -> None:
        size = os.fstat(self._fh.fileno()).st_size
        if size < info.end:
            raise RlgenError(f"{self.path}: truncated while being read (tensor {show_value(name)} ends at byte "
                             f"{info.end}, the file now has {size})")

    def tensor(self, name: str) -> torch.Tensor:
        """A view of the mapped bytes (valid until close(); never modify it)."""
        info = self.infos[name]
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        if self._mm is None:
            raise RlgenError(f"{self.path} is closed")
        self._check_size(name, info)
        itemsize = info.nbytes // info.numel
        if info.start % itemsize:  # unaligned data (not written by torch-aware tools): an aligned copy
            raw = torch.frombuffer(self._mm, dtype=torch.uint8, count=info.nbytes, offset=info.start)
            return raw.clone().view(info.dtype).view(info.shape)
        flat = torch.frombuffer(self._mm, dtype=info.dtype, count=info.numel, offset=info.start)
        return flat.view(info.shape)

    def release(self, name: str) -> None:
        """Drop the pages of `name` from this process (they stay in the page cache)."""
        info = self.infos[name]
        if self._mm is None or info.nbytes == 0:
            return
        page = mmap.PAGESIZE
        start = info.start // page * page
        end = min(len(self._mm), -(-info.end // page) * page)
        self._mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def find_weights(directory: Path, root: Path | None = None) -> tuple[str, Path | None, list[Path]] | None:
    """(prefix, index file or None, shard files) of the safetensors weights in a model directory, or None.

    Every file is checked with model_files.checked_file against `root` (the model directory, default
    `directory`): no link out of it, regular files only; an index's shard names must stay inside it."""
    directory = Path(directory)
    root = Path(root) if root is not None else directory
    for prefix in WEIGHT_PREFIXES:
        index = directory / f"{prefix}.safetensors.index.json"
        if os.path.lexists(index):
            shards = _index_shards(root, index)
            for shard in shards:
                checked_file(root, shard)
            return prefix, index, shards
        single = directory / f"{prefix}.safetensors"
        if os.path.lexists(single):
            checked_file(root, single)
            return prefix, None, [single]
    return None


def read_weight_map(root: Path, index: Path) -> dict[str, str]:
    """The index's weight_map (tensor name -> shard file name), checked: a mapping of strings."""
    try:
        weight_map = json.loads(read_text(root, index))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, RecursionError) as exc:
        raise RlgenError(f"{index}: not a safetensors index ({type(exc).__name__}: {show_value(str(exc))})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise RlgenError(f"{index}: key 'weight_map' must map tensor names to shard file names")
    return weight_map


def _index_shards(root: Path, index: Path) -> list[Path]:
    """The shard files an index names, each one inside the index's folder (no '..', no absolute path)."""
    folder = index.parent
    shards = set()
    for name in set(read_weight_map(root, index).values()):
        path = folder / name
        if Path(name).is_absolute() or not inside(Path(os.path.abspath(path)), [Path(os.path.abspath(folder))]):
            raise RlgenError(f"{index}: shard {show_value(name)} is outside the model directory (refused)")
        if not os.path.lexists(path):
            raise RlgenError(f"{index}: names shard {show_value(name)}, which does not exist")
        if not inside(path.resolve(), allowed_roots(root)):
            raise RlgenError(f"{index}: shard {show_value(name)} is a symbolic link out of the model directory "
                             "(refused)")
        shards.add(path)
    return sorted(shards, key=_shard_order)


def _shard_order(path: Path):
    numbers = re.findall(r"\d+", path.name)
    return (int(numbers[0]) if numbers else 0, path.name)


class Checkpoint:
    """The tensors of a model directory, from one safetensors file or the shards its index names.

    `names` are in storage order (shard, then offset), which keeps reads sequential."""

    def __init__(self, directory, label: str | None = None, root=None):
        self.directory = Path(directory)
        self.label = label or str(directory)
        root = Path(root) if root is not None else self.directory  # the model directory no file may leave
        found = find_weights(self.directory, root)
        if found is None:
            raise RlgenError(f"{self.label}: no safetensors weights in {self.directory} "
                             f"({', '.join(p + '.safetensors' for p in WEIGHT_PREFIXES)} or an index)")
        self.prefix, index, files = found
        self.files: list[SafetensorsFile] = []
        self._where: dict[str, SafetensorsFile] = {}
        try:
            weight_map = read_weight_map(root, index) if index else None
            for path in files:
                handle = SafetensorsFile(path)
                self.files.append(handle)
                for name in handle.names:
                    if weight_map is None or (name in weight_map and index.parent / weight_map[name] == path):
                        self._where[name] = handle
            if weight_map is not None:
                missing = [n for n in weight_map if n not in self._where]
                if missing:
                    raise RlgenError(f"{index}: tensor {show_value(missing[0])} is not in "
                                     f"{show_value(weight_map[missing[0]])}")
        except BaseException:
            self.close()
            raise

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def info(self, name: str) -> TensorInfo:
        return self._where[name].info(name)

    def tensor(self, name: str) -> torch.Tensor:
        return self._where[name].tensor(name)

    def release(self, name: str) -> None:
        self._where[name].release(name)

    def close(self) -> None:
        for handle in self.files:
            handle.close()
        self.files = []
        self._where = {}


# --------------------------------------------------------------------------- writing

def parse_size(text) -> int:
    """'2GB' -> 2*10**9 (the Hugging Face convention), '500MiB' -> 500*2**20, '1234' -> 1234 bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?)B?\s*", str(text).upper())
    if not match or float(match.group(1)) <= 0:
        raise RlgenError(f"size must look like 2GB, 500MB, 1GiB or a byte count, got {show_value(text)}")
    value, unit, binary = match.groups()
    power = "KMGT".find(unit) + 1 if unit else 0
    return int(float(value) * ((1024 if binary else 1000) ** power))


def _header_bytes(entries, metadata: dict) -> bytes:
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape in entries:
        size = tensor_nbytes(dtype, shape)
        header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def plan_shards(entries, max_shard_size: int) -> list[list[tuple]]:
    """Split (name, dtype, shape) entries, in order, into shards of at most max_shard_size bytes."""
    shards: list[list[tuple]] = [[]]
    size = 0
    for entry in entries:
        nbytes = tensor_nbytes(entry[1], entry[2])
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


class ShardedWriter:
    """Writes planned tensors, in plan order, into `{prefix}.safetensors` or numbered shards + index."""

    def __init__(self, directory, entries, *, prefix: str = "model", max_shard_size: int = 2 * 10**9,
                 metadata: dict | None = None):
        self.directory = Path(directory)
        self.entries = [(name, dtype, tuple(int(d) for d in shape)) for name, dtype, shape in entries]
        self.metadata = dict(DEFAULT_METADATA if metadata is None else metadata)
        self.prefix = prefix
        self.shards = plan_shards(self.entries, max_shard_size)
        count = len(self.shards)
        self.file_names = ([f"{prefix}.safetensors"] if count == 1 else
                           [f"{prefix}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        self._order = [(shard, entry) for shard, entries_ in enumerate(self.shards) for entry in entries_]
        self._next = 0
        self._open_shard = -1
        self._fh = None
        self.total_size = sum(tensor_nbytes(dtype, shape) for _, dtype, shape in self.entries)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order):
            raise RuntimeError(f"tensor '{name}' was not planned (all planned tensors are written)")
        shard, (expected, dtype, shape) = self._order[self._next]
        if name != expected:
            raise RuntimeError(f"tensors must be written in plan order: expected '{expected}', got '{name}'")
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(f"tensor '{name}' is {tensor.dtype} {tuple(tensor.shape)}, planned {dtype} {shape}")
        if shard != self._open_shard:
            self._start_shard(shard)
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            self._fh.write(data.view(torch.uint8).numpy().data)
        self._next += 1
        if self._next == len(self._order) or self._order[self._next][0] != shard:
            self._fh.close()
            self._fh = None

    def _start_shard(self, shard: int) -> None:
        self._open_shard = shard
        self._fh = open(self.directory / self.file_names[shard], "wb")
        self._fh.write(_header_bytes(self.shards[shard], self.metadata))

    def finish(self) -> dict:
        """Check that everything was written, write the index when sharded; a summary of the files."""
        if self._next != len(self._order):
            raise RuntimeError(f"{len(self._order) - self._next} planned tensors were never written")
        if not self._order:  # no tensors at all: still one (empty) file
            self._start_shard(0)
            self._fh.close()
            self._fh = None
        index = None
        if len(self.shards) > 1:
            index = f"{self.prefix}.safetensors.index.json"
            weight_map = {name: self.file_names[shard] for shard, (name, _, _) in self._order}
            payload = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / index).write_text(json.dumps(payload, indent=2) + "\n")
        return {"files": list(self.file_names), "index": index, "bytes": self.total_size}

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def save_streaming(directory, tensors, *, prefix: str = "model", max_shard_size: int = 2 * 10**9) -> dict:
    """Write a {name: tensor} dict with ShardedWriter (tests and small tools)."""
    writer = ShardedWriter(directory, [(n, t.dtype, t.shape) for n, t in tensors.items()], prefix=prefix,
                           max_shard_size=max_shard_size)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    return writer.finish()
