"""rlgen serve's wire, without vLLM: the weight stream between trainer and server (names, dtypes and shapes
as sent, in order, over a real gloo group of two), sampling settings through JSON, and a trainer whose server
is not there stopping with one line."""
from __future__ import annotations

import json
import socket
import threading

import pytest
import torch

from cli_helpers import rlgen

from rlgen.rollout.engine import SamplingParams
from rlgen.rollout.vllm_server import (SERVER_RANK, TRAINER_RANK, _params_dict, _params_of, receive_weights, send_weights,
                                       weight_group)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_weights_stream_through_a_group_of_two_as_sent():
    sent = [("model.embed_tokens.weight", torch.randn(7, 3)), ("lm_head.bias", torch.randn(5, dtype=torch.float64)),
            ("scale", torch.tensor(2.5, dtype=torch.bfloat16)), ("model.layers.0.mlp.up_proj.weight", torch.randn(2, 3, 4).half()),
            ("steps", torch.tensor([3, 1, 4], dtype=torch.int64)), ("mask", torch.tensor([True, False])),
            ("empty", torch.zeros(0, 4))]
    port = _free_port()
    received, errors = [], []

    def server() -> None:
        try:
            group, _store = weight_group("127.0.0.1", port, SERVER_RANK, torch.device("cpu"), 30)
            received.extend(receive_weights(group, torch.device("cpu")))
            group.shutdown()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    thread = threading.Thread(target=server)
    thread.start()
    group, _store = weight_group("127.0.0.1", port, TRAINER_RANK, torch.device("cpu"), 30)
    count = send_weights(group, iter(sent), torch.device("cpu"))
    thread.join(30)
    group.shutdown()
    assert not errors, errors
    assert count == len(sent)
    assert [name for name, _ in received] == [name for name, _ in sent]
    for (_, a), (_, b) in zip(sent, received):
        assert b.dtype == a.dtype and b.shape == a.shape
        assert torch.equal(a, b)


def test_sampling_settings_survive_json():
    params = SamplingParams(12, 0.7, 0.9, 5, 0.05, 1.1, ("\n", "END"))
    assert _params_of(json.loads(json.dumps(_params_dict(params)))) == params
    with pytest.raises(ValueError, match="bad sampling settings"):
        _params_of({"max_new_tokens": 4, "beams": 2})


@pytest.mark.slow
def test_a_run_whose_server_is_not_there_stops_in_one_line(tmp_path):
    port = _free_port()  # nothing listens here
    proc = rlgen("train", "grpo", "--task", "arithmetic", "--steps", 1, "--set", 'rollout.engine="vllm"',
                 "--set", 'rollout.vllm_mode="server"', "--set", f"rollout.vllm_server_port={port}",
                 "--set", "rollout.vllm_server_timeout=2", "--out", tmp_path / "run", cwd=tmp_path)
    assert proc.code == 2
    errors = [line for line in proc.err.splitlines() if line.startswith("rlgen: error")]
    assert len(errors) == 1 and f"the vLLM server at http://127.0.0.1:{port} is not reachable" in errors[0], proc.err
    assert "Traceback" not in proc.err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "--port"),
    (["--dtype", "float8"], "--dtype float8: expected auto, float32, bfloat16 or float16"),
    (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
])
def test_serve_refuses_bad_options_in_one_line(args, message):
    proc = rlgen("serve", *args)
    assert proc.code == 2
    lines = [line for line in proc.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("rlgen: error:") and message in lines[0], proc.err
