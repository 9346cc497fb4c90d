"""rlgen.distributed: shares of a global batch, and the collectives on a real 2-process gloo group."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from rlgen.distributed import Dist


@pytest.mark.parametrize("n, world", [(0, 2), (1, 2), (5, 2), (6, 3), (7, 4), (32, 2)])
def test_shares_cover_the_batch_once_in_order(n, world):
    shares = [list(Dist(rank=r, world_size=world).share(n)) for r in range(world)]
    assert [i for share in shares for i in share] == list(range(n))
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    items = [f"x{i}" for i in range(n)]
    assert [x for r in range(world) for x in Dist(rank=r, world_size=world).shard(items)] == items


def test_one_process_collectives_are_identities():
    d = Dist()
    assert not d.enabled and d.is_main
    assert d.sum(2.5) == 2.5
    metrics = {"loss": 1.0, "name": "x"}
    assert d.mean_metrics(metrics) is metrics
    assert d.broadcast_object({"a": 1}) == {"a": 1}


WORKER = textwrap.dedent('''
    import json, os, sys, torch
    from rlgen.distributed import Dist, init_distributed, sync_gradients, shutdown
    ctx = init_distributed(torch.device("cpu"))
    assert isinstance(ctx, Dist) and ctx.enabled
    r = ctx.rank
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(1))]
    params[0].grad = torch.full((3,), float(r + 1))
    params[1].grad = torch.full((2, 2), 10.0 * (r + 1))
    if r == 0:
        params[2].grad = torch.ones(1)  # rank 1 has no gradient here: counts as zero
    sync_gradients(params, ctx, bucket_bytes=16)  # tiny buckets: several collectives
    out = {
        "rank": r,
        "grads": [p.grad.flatten().tolist() for p in params],
        "sum": ctx.sum(r + 0.5),
        "tensor_sum": ctx.sum(torch.tensor([r, 1.0])).tolist(),
        "metrics": ctx.mean_metrics({"loss": float(r), "tokens": 3 + r, "flag": True, "nan": float("nan")}),
        "broadcast": ctx.broadcast_object({"from": r, "text": "é"}),
        # rank 0: 2 rows of width 3; rank 1: 1 row of width 1 (padded with -1 to 3)
        "gathered": ctx.all_gather_rows(torch.arange(6.0).view(2, 3) if r == 0 else torch.tensor([[9.0]]), pad_value=-1).tolist(),
        "gathered_bool": ctx.all_gather_rows(torch.tensor([True, False]) if r == 0 else torch.zeros(0, dtype=torch.bool)).tolist(),
        "offset": ctx.row_offset(2 if r == 0 else 1),
        "objects": ctx.all_gather_json({"rank": r, "keys": ["a"] * (r + 1)}),
    }
    ctx.barrier()
    with open(os.path.join(sys.argv[1], f"rank{r}.json"), "w") as f:  # not stdout: the ranks' lines interleave
        json.dump(out, f)
    shutdown()
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_collectives_on_two_gloo_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(_free_port()), str(script), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["grads"] == [[3.0] * 3, [30.0] * 4, [1.0]]
        assert r["sum"] == 2.0
        assert r["tensor_sum"] == [1.0, 2.0]
        assert r["metrics"]["loss"] == 0.5 and r["metrics"]["tokens"] == 4  # an int metric stays an int
        assert r["metrics"]["flag"] is True  # booleans are not averaged
        assert r["metrics"]["nan"] != r["metrics"]["nan"]  # a NaN anywhere makes the mean NaN
        assert r["broadcast"] == {"from": 0, "text": "é"}
        assert r["gathered"] == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0], [9.0, -1.0, -1.0]]
        assert r["gathered_bool"] == [True, False]  # a rank without rows adds none
    assert [r["offset"] for r in results] == [0, 2]
    assert all(r["objects"] == [{"rank": 0, "keys": ["a"]}, {"rank": 1, "keys": ["a", "a"]}] for r in results)
