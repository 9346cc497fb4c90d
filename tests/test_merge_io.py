"""rlgen.merging.safetensors_io: the memory-mapped reader against safetensors' own, page release, and the
planned sharded writer (round trip, index, loadable by safetensors and transformers)."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rlgen.errors import RlgenError
from rlgen.merging.safetensors_io import (Checkpoint, SafetensorsFile, ShardedWriter, parse_size, plan_shards,
                                          save_streaming)

TINY_ARITH = Path(__file__).resolve().parent.parent / "rlgen" / "builtin_models" / "tiny-arith"


def mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w.f32": torch.randn(5, 7, generator=g),
        "w.bf16": torch.randn(3, 9, generator=g).to(torch.bfloat16),
        "w.f16": torch.randn(11, generator=g).to(torch.float16),
        "w.f64": torch.randn(2, 2, 2, generator=g, dtype=torch.float64),
        "ids.i64": torch.arange(13, dtype=torch.int64),
        "mask.bool": torch.tensor([True, False, True]),
        "odd.u8": torch.arange(3, dtype=torch.uint8),  # 3 bytes: later tensors may start unaligned
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }


def test_reader_equals_safe_open(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file(mixed_tensors(), str(path), metadata={"format": "pt", "note": "hi"})
    reader = SafetensorsFile(path)
    with safe_open(str(path), "pt") as ref:
        assert set(reader.names) == set(ref.keys())
        assert reader.metadata == ref.metadata()
        for name in ref.keys():
            expected = ref.get_tensor(name)
            got = reader.tensor(name)
            assert got.dtype == expected.dtype and got.shape == expected.shape, name
            assert torch.equal(got, expected), name
    # the order is storage order (by offset): sequential reads
    starts = [reader.info(n).start for n in reader.names]
    assert starts == sorted(starts)
    reader.close()


def test_reader_views_are_zero_copy_and_survive_release(tmp_path):
    path = tmp_path / "x.safetensors"
    data = torch.randn(64, 1024)
    save_file({"a": data, "b": data * 2}, str(path))
    reader = SafetensorsFile(path)
    view = reader.tensor("a")
    again = reader.tensor("a")
    assert view.data_ptr() == again.data_ptr()  # both point into the one mapping
    reader.release("a")  # pages dropped from the process; reading refaults them from the file
    assert torch.equal(view, data)
    assert torch.equal(reader.tensor("b"), data * 2)
    reader.close()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_release_gives_the_pages_back(tmp_path):
    path = tmp_path / "big.safetensors"
    save_file({"big": torch.ones(16 * 2**20 // 4 * 2)}, str(path))  # 32 MB
    reader = SafetensorsFile(path)
    before = _rss_bytes()
    assert float(reader.tensor("big").sum()) == 8 * 2**20  # touches every page
    touched = _rss_bytes()
    reader.release("big")
    released = _rss_bytes()
    assert touched - before > 24 * 2**20
    assert touched - released > 24 * 2**20
    reader.close()


def test_reader_rejects_a_non_safetensors_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(RlgenError, match="bad.safetensors"):
        SafetensorsFile(bad)
    bad.write_bytes(struct.pack("<Q", 4) + b"nope")
    with pytest.raises(RlgenError, match="bad header JSON"):
        SafetensorsFile(bad)



@pytest.mark.parametrize("shape, offsets", [
    ("[1e9992, 3]", "[0, 12]"),  # a float overflowing to inf (found by the fuzz test: an internal OverflowError)
    ("[2.0]", "[0, 8]"),         # whole-valued floats are not integers either
    ("[true, 2]", "[0, 8]"),
    ("[-1, -2]", "[0, 8]"),
    ("[2]", "[-8, 0]"),
])
def test_header_shapes_and_offsets_must_be_non_negative_integers(tmp_path, shape, offsets):
    header = ('{"w":{"dtype":"F32","shape":%s,"data_offsets":%s}}' % (shape, offsets)).encode()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))
    with pytest.raises(RlgenError, match="malformed or unsupported header entry"):
        SafetensorsFile(bad)

def test_writer_single_file_round_trip(tmp_path):
    tensors = mixed_tensors()
    summary = save_streaming(tmp_path, tensors)
    assert summary["files"] == ["model.safetensors"] and summary["index"] is None
    assert not (tmp_path / "model.safetensors.index.json").exists()
    raw = (tmp_path / "model.safetensors").read_bytes()
    assert (8 + struct.unpack("<Q", raw[:8])[0]) % 8 == 0  # data starts 8-byte aligned
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as ref:
        assert ref.metadata() == {"format": "pt"}
        assert list(ref.keys()) == sorted(tensors)
        for name, tensor in tensors.items():
            assert torch.equal(ref.get_tensor(name), tensor), name


def test_writer_shards_with_index(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {f"layer.{i}.w": torch.randn(100, generator=g) for i in range(10)}  # 400 bytes each
    tensors["big"] = torch.randn(500, generator=g)  # larger than a shard: a shard of its own
    summary = save_streaming(tmp_path, tensors, max_shard_size=1000)
    assert summary["files"] == [f"model-{i:05d}-of-00006.safetensors" for i in range(1, 7)]  # 2 + 2 + 2 + 2 + 2 + big
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    for name, tensor in tensors.items():
        with safe_open(str(tmp_path / index["weight_map"][name]), "pt") as ref:
            assert torch.equal(ref.get_tensor(name), tensor)
    for file in summary["files"]:
        held = [n for n, f in index["weight_map"].items() if f == file]
        assert held == ["big"] or sum(tensors[n].numel() * 4 for n in held) <= 1000
    checkpoint = Checkpoint(tmp_path)
    assert checkpoint.names == list(tensors)  # storage order = the order written
    for name, tensor in tensors.items():
        assert torch.equal(checkpoint.tensor(name), tensor)
    checkpoint.close()


def test_plan_shards_is_greedy_in_order():
    entries = [(f"t{i}", torch.float32, (n,)) for i, n in enumerate([10, 10, 30, 5, 5])]
    plan = plan_shards(entries, 80)  # bytes: 40, 40, 120, 20, 20
    assert [[e[0] for e in shard] for shard in plan] == [["t0", "t1"], ["t2"], ["t3", "t4"]]


def test_writer_checks_the_plan(tmp_path):
    writer = ShardedWriter(tmp_path, [("a", torch.float32, (2,)), ("b", torch.float32, (2,))])
    with pytest.raises(RuntimeError, match="plan order"):
        writer.write("b", torch.zeros(2))
    with pytest.raises(RuntimeError, match="planned"):
        writer.write("a", torch.zeros(3))
    writer.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="never written"):
        writer.finish()
    writer.abort()


def test_sharded_output_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    source = Checkpoint(TINY_ARITH)
    names = source.names
    out = tmp_path / "resharded"
    out.mkdir()
    writer = ShardedWriter(out, [(n, source.info(n).dtype, source.info(n).shape) for n in names],
                           max_shard_size=600_000)
    for name in names:
        writer.write(name, source.tensor(name))
        source.release(name)
    summary = writer.finish()
    assert len(summary["files"]) > 2
    for item in TINY_ARITH.iterdir():
        if not item.name.endswith(".safetensors"):
            shutil.copy2(item, out / item.name)
    original = AutoModelForCausalLM.from_pretrained(str(TINY_ARITH))
    loaded = AutoModelForCausalLM.from_pretrained(str(out))
    for name, value in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    source.close()


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1GiB") == 2**30
    assert parse_size("1.5kb") == 1500
    assert parse_size("1234") == 1234
    with pytest.raises(RlgenError, match="2GB"):
        parse_size("lots")
