"""Sharded checkpoints: every rank writes the rows it holds, nobody gathers the whole model.

Under FSDP2 (`fully_shard`) a parameter, its gradient and its AdamW moments are DTensors split along dim 0
over the ranks. A sharded checkpoint keeps them that way on disk:

    shards/rank-00000-of-00002.safetensors   rank 0's rows of every sharded tensor, and every whole tensor
    shards/rank-00001-of-00002.safetensors   rank 1's rows
    shards/shards.json                       per tensor: global shape, dtype, and which file holds which rows

Reading works at any world size: a rank reads the rows of its new shard from whichever files hold them
(safetensors slices, so a rank never reads the whole tensor), and one process reads whole tensors. As
torch.distributed.checkpoint does, but without its pickled `.metadata`: safetensors and JSON only.
Sharded checkpoints need a file system that every rank writes to (one machine, or a shared one across nodes).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rlgen.data.records import use_umask_mode

INDEX = "shards.json"
FORMAT = "rlgen-sharded-1"


def shard_file(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}.safetensors"


def row_span(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [start, stop) that `rank` holds of a tensor split along dim 0 as FSDP2 splits it (torch.chunk:
    ceil(rows / world) each, so the last ranks may hold fewer rows, or none)."""
    chunk = -(-rows // world_size)
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


def _sharding(value) -> tuple[int, int] | None:
    """(rank, world size) over which `value`'s dim 0 is split; None for a whole (replicated) tensor."""
    placements = getattr(value, "placements", None)
    if placements is None or all(p.is_replicate() for p in placements):
        return None
    if len(placements) != 1 or not placements[0].is_shard(0):
        raise ValueError(f"a tensor sharded as {placements}: sharded checkpoints hold dim-0 shards on one mesh only")
    mesh = value.device_mesh
    return mesh.get_local_rank(), mesh.size()


def _local(value) -> torch.Tensor:
    return value.to_local() if hasattr(value, "to_local") else value


def save_sharded(directory: Path, tensors: dict[str, torch.Tensor], rank: int, world_size: int, gather_json) -> None:
    """Write this rank's part of `tensors` (name -> tensor or DTensor) under `directory`, and on rank 0 the
    index. Every rank calls it (`gather_json`, rlgen.distributed.Dist.all_gather_json, is a collective), and
    it returns once every rank's file is written. A whole tensor is written by rank 0 only."""
    directory.mkdir(exist_ok=True)
    mine, pieces, described = {}, {}, {}
    for name, value in tensors.items():
        sharding = _sharding(value)
        local = _local(value).detach()
        if sharding is None:
            if rank != 0:
                continue
            start, stop = 0, (value.shape[0] if value.dim() else None)
        else:
            start, stop = row_span(value.shape[0], *sharding)
            if local.shape[0] != stop - start:
                raise ValueError(f"{name}: this rank holds {local.shape[0]} rows, not the {stop - start} of an even split")
        described[name] = {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
        if local.numel() or not value.dim():  # a rank of a small tensor may hold no rows
            mine[name] = local.to("cpu").contiguous()
            pieces[name] = [start, stop]
    file = shard_file(rank, world_size)
    save_file(mine, str(directory / file))
    use_umask_mode(directory / file)  # safetensors creates it 0600
    every = gather_json({"file": file, "pieces": pieces, "described": described})
    if rank != 0:
        return
    index = {"format": FORMAT, "world_size": world_size, "tensors": {}}
    for part in every:
        for name, info in part["described"].items():
            index["tensors"].setdefault(name, {**info, "pieces": []})
        for name, (start, stop) in part["pieces"].items():
            index["tensors"][name]["pieces"].append([part["file"], start, stop])
    (directory / INDEX).write_text(json.dumps(index, indent=1))


class ShardedState:
    """A sharded checkpoint's tensors, read by rows (a read-only view of `directory`)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        index = json.loads((self.directory / INDEX).read_text())
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise ValueError(f"{INDEX}: not an {FORMAT} index")
        self.tensors: dict[str, dict] = index["tensors"]
        self._open: dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> torch.Size:
        return torch.Size(self.tensors[name]["shape"])

    def _file(self, name: str):
        if name not in self._open:
            if Path(name).name != name:  # the index names files in its own folder only
                raise ValueError(f"{INDEX} names a file outside it: {name}")
            self._open[name] = safe_open(str(self.directory / name), framework="pt")
        return self._open[name]

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` (a 0-dim tensor: the whole of it), from the files that hold them."""
        info = self.tensors[name]
        if not info["shape"]:
            file, _, _ = info["pieces"][0]
            return self._file(file).get_tensor(name)
        parts, at = [], start
        for file, first, last in sorted(info["pieces"], key=lambda piece: piece[1]):
            if last <= at or first >= stop:
                continue
            if first > at:
                break
            parts.append(self._file(file).get_slice(name)[at - first:min(stop, last) - first])
            at = min(stop, last)
        if at < stop:
            raise ValueError(f"{INDEX}: no file holds rows {at}..{stop} of {name}")
        if not parts:  # an empty span
            return torch.empty((0, *info["shape"][1:]), dtype=getattr(torch, info["dtype"]))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def like(self, name: str, target) -> torch.Tensor:
        """Tensor `name` laid out as `target` (a tensor, or a DTensor whose shard this rank gets), on its device."""
        if name not in self.tensors:
            raise KeyError(f"{name} is not in the checkpoint")
        if self.shape(name) != target.shape:
            raise ValueError(f"{name} has shape {list(self.shape(name))} in the checkpoint, {list(target.shape)} here")
        sharding = _sharding(target)
        if sharding is None:
            whole = self.rows(name, 0, self.shape(name)[0] if target.dim() else 0)
            if hasattr(target, "placements"):  # replicated DTensor
                from torch.distributed.tensor import DTensor

                return DTensor.from_local(whole.to(_local(target).device), target.device_mesh, target.placements,
                                          run_check=False)
            return whole.to(target.device)
        from torch.distributed.tensor import DTensor

        local = self.rows(name, *row_span(target.shape[0], *sharding)).to(_local(target).device)
        return DTensor.from_local(local, target.device_mesh, target.placements, run_check=False,
                                  shape=target.shape, stride=target.stride())

    def copy_into(self, name: str, target: torch.Tensor) -> None:
        """Write tensor `name` into `target` in place (a DTensor: this rank's rows into its local shard)."""
        value = self.like(name, target)
        with torch.no_grad():
            _local(target).copy_(_local(value))


def is_sharded_checkpoint(checkpoint: Path | None) -> bool:
    return checkpoint is not None and (Path(checkpoint) / "shards" / INDEX).is_file()
