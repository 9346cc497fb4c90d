"""Two nodes simulated on this machine: two torchrun invocations (`--nnodes 2 --node_rank 0/1`, one process
each, a localhost rendezvous) train together, and the run equals a one-process run of the same global batch."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

TRAIN = ["-m", "rlgen", "train", "sft", "--task", "arithmetic", "--steps", "3", "--set", "run.threads=1",
         "--set", "algorithm.batch_size=8", "--set", "data.eval_samples=0", "-q"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_nodes_train_like_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, *TRAIN, "--out", str(tmp_path / "single")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    port = str(_free_port())
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
                               *TRAIN, "--out", str(tmp_path / "multi")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-2000:]
    single_rows, multi_rows = _rows(tmp_path / "single"), _rows(tmp_path / "multi")
    assert [r["step"] for r in multi_rows] == [1, 2, 3]  # one writer: node 0's rank 0
    for a, b in zip(single_rows, multi_rows):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        assert b["tokens"] == a["tokens"]
    ours, theirs = (load_file(str(tmp_path / run / "final" / "model.safetensors")) for run in ("single", "multi"))
    for name, tensor in ours.items():
        torch.testing.assert_close(theirs[name], tensor, atol=1e-5, rtol=1e-4)
