"""Sharded checkpoints (rlgen.training.sharded_state): each rank's rows written as FSDP2 splits them, read back
by rows at any world size, whole tensors written once, and a damaged index caught. The ranks are simulated
here (a stand-in for a DTensor's shard); tests/test_fsdp.py and tests/test_distributed_offline.py resume real
2-process FSDP runs from them."""
from __future__ import annotations

import json

import pytest
import torch
from torch.distributed.tensor.placement_types import Shard

from rlgen.training.run_dir import checkpoint_problem
from rlgen.training.sharded_state import INDEX, ShardedState, is_sharded_checkpoint, row_span, save_sharded


class _Mesh:
    def __init__(self, rank, world):
        self.rank, self.world = rank, world

    def get_local_rank(self):
        return self.rank

    def size(self):
        return self.world


class _Shard:
    """What save_sharded reads of a DTensor split along dim 0: its global shape, placement and local rows."""

    def __init__(self, whole: torch.Tensor, rank: int, world: int):
        self.shape, self.dtype = whole.shape, whole.dtype
        self.placements, self.device_mesh = (Shard(0),), _Mesh(rank, world)
        self._local = whole[slice(*row_span(whole.shape[0], rank, world))]

    def dim(self):
        return len(self.shape)

    def to_local(self):
        return self._local


def test_row_span_splits_as_torch_chunk():
    for rows in (1, 2, 5, 7, 8):
        for world in (1, 2, 3, 4):
            expected = [len(part) for part in torch.arange(rows).chunk(world)]
            expected += [0] * (world - len(expected))  # torch.chunk gives fewer chunks; FSDP2 pads with empty shards
            spans = [row_span(rows, r, world) for r in range(world)]
            assert [stop - start for start, stop in spans] == expected
            assert spans[0][0] == 0 and spans[-1][1] == rows
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def _save(directory, tensors: dict, world: int) -> None:
    """save_sharded as `world` ranks run it: rank 0 last, with every rank's part gathered."""
    parts = []

    def gather(part):
        parts.append(part)
        return parts[::-1] if len(parts) == world else None  # in rank order, as Dist.all_gather_json

    for rank in reversed(range(world)):
        local = {name: (_Shard(t, rank, world) if sharded else t) for name, (t, sharded) in tensors.items()}
        save_sharded(directory, local, rank, world, gather)


def _tensors():
    generator = torch.Generator().manual_seed(0)
    return {"model.embed": (torch.randn(7, 3, generator=generator), True),  # 4 + 3 rows on 2 ranks
            "model.bias": (torch.randn(1, generator=generator), True),  # one row: rank 1 holds none
            "optimizer.embed.exp_avg": (torch.randn(7, 3, generator=generator).to(torch.bfloat16), True),
            "optimizer.embed.step": (torch.tensor(3.0), False)}  # a whole scalar, rank 0's


def test_sharded_round_trip_at_any_world_size(tmp_path):
    tensors = _tensors()
    _save(tmp_path / "shards", tensors, 2)
    files = sorted(p.name for p in (tmp_path / "shards").iterdir())
    assert files == ["rank-00000-of-00002.safetensors", "rank-00001-of-00002.safetensors", INDEX]
    index = json.loads((tmp_path / "shards" / INDEX).read_text())
    assert index["tensors"]["model.embed"]["pieces"] == [["rank-00000-of-00002.safetensors", 0, 4],
                                                         ["rank-00001-of-00002.safetensors", 4, 7]]
    assert index["tensors"]["model.bias"]["pieces"] == [["rank-00000-of-00002.safetensors", 0, 1]]
    assert index["tensors"]["optimizer.embed.exp_avg"]["dtype"] == "bfloat16"

    state = ShardedState(tmp_path / "shards")
    for name, (whole, _) in tensors.items():
        assert torch.equal(state.like(name, torch.empty(whole.shape)), whole), name  # one process: whole tensors
        if whole.dim():
            for world in (1, 2, 3, 4):  # any new world size reads its ranks' rows, across the saved files
                rows = [state.rows(name, *row_span(whole.shape[0], r, world)) for r in range(world)]
                assert torch.equal(torch.cat(rows), whole), (name, world)
    assert state.rows("model.embed", 3, 5).shape == (2, 3)  # a span across both files
    target = torch.zeros(7, 3)
    state.copy_into("model.embed", target)
    assert torch.equal(target, tensors["model.embed"][0])


def test_wrong_shapes_missing_rows_and_outside_files_are_errors(tmp_path):
    _save(tmp_path / "shards", _tensors(), 2)
    state = ShardedState(tmp_path / "shards")
    with pytest.raises(ValueError, match="shape"):
        state.like("model.embed", torch.empty(8, 3))
    with pytest.raises(KeyError):
        state.like("model.missing", torch.empty(1))

    index_file = tmp_path / "shards" / INDEX
    index = json.loads(index_file.read_text())
    index["tensors"]["model.embed"]["pieces"].pop()  # rows 4..7 held by no file
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="rows 4..7"):
        ShardedState(tmp_path / "shards").rows("model.embed", 0, 7)
    index["tensors"]["model.embed"]["pieces"] = [["../elsewhere.safetensors", 0, 7]]
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="outside"):
        ShardedState(tmp_path / "shards").rows("model.embed", 0, 7)
    index_file.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="index"):
        ShardedState(tmp_path / "shards")


def _checkpoint(tmp_path):
    step = tmp_path / "step-2"
    step.mkdir()
    (step / "trainer_state.json").write_text(json.dumps({"step": 2}))
    for name in ("optimizer", "rng"):
        (step / f"{name}.json").write_text("{}")
    _save(step / "shards", _tensors(), 2)
    return step


def test_a_sharded_checkpoint_passes_the_soundness_check_until_damaged(tmp_path):
    step = _checkpoint(tmp_path)
    assert is_sharded_checkpoint(step) and not is_sharded_checkpoint(None)
    assert checkpoint_problem(step, 2) is None  # no model/ directory is needed
    shard = step / "shards" / "rank-00001-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 8])  # truncated
    assert checkpoint_problem(step, 2) is not None
    shard.unlink()
    assert "missing shard rank-00001-of-00002.safetensors" in checkpoint_problem(step, 2)
